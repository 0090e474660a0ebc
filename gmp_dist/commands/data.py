"""`gmp-dist data DATASET`: convert a data set into the files the loaders read.

imagenet: an ImageFolder (--src with train/ and val/) -> train.beton, val.beton, classes.json
imagefolder: the same for any class-per-folder tree of your own (data.name: imagefolder)
cifar10:  the python batches (cifar-10-batches-py in --src, downloaded there when absent)
har2:     the UCI HAR Dataset folder -> the FastGRNN paper's binary HAR-2 task
digits:   scikit-learn's bundled 8x8 digits (no --src; the quickstart data)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gmp_dist.data.files import ConversionResult, available_cpus
from gmp_dist.data.formats import default_data_dir
from gmp_dist.errors import UserError

DATASETS = ("imagenet", "imagefolder", "cifar10", "har2", "digits")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", choices=DATASETS, help="which data set to convert")
    parser.add_argument("--src", type=Path, default=None,
                        help="source folder: imagenet, imagefolder: holds train/ and val/ (one sub-folder per class); "
                             "cifar10: holds cifar-10-batches-py (downloaded there when missing; default "
                             "OUT/source); har2: the 'UCI HAR Dataset' folder or its parent; digits: not used")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: ./data/DATASET, where data.path defaults to)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    parser.add_argument("--workers", type=int, default=available_cpus(),
                        help="parallel processes for checking and writing")
    imagenet = parser.add_argument_group("imagenet/imagefolder .beton settings (defaults: ffcv-imagenet's ResNet-50 files)")
    imagenet.add_argument("--max-resolution", type=int, default=500,
                          help="resize so that the longer side is at most this many pixels")
    imagenet.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of the compressed images")
    imagenet.add_argument("--compress-probability", type=float, default=0.5,
                          help="fraction of images stored as JPEG; the rest are stored raw (faster to decode)")


def _check_args(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if not 1 <= args.jpeg_quality <= 100:
        raise UserError(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
    if not 0.0 <= args.compress_probability <= 1.0:
        raise UserError(f"--compress-probability must be in [0, 1], got {args.compress_probability}")
    if args.max_resolution < 8:
        raise UserError(f"--max-resolution must be at least 8 pixels, got {args.max_resolution}")
    if args.dataset in ("imagenet", "imagefolder", "har2") and args.src is None:
        raise UserError(f"`gmp-dist data {args.dataset}` needs --src (the source folder; see --help)")
    if args.dataset == "digits" and args.src is not None:
        raise UserError("digits ships with scikit-learn and takes no --src; drop it")


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    out = args.out if args.out is not None else default_data_dir(args.dataset)
    if args.dataset in ("imagenet", "imagefolder"):
        from gmp_dist.data.convert_imagenet import ImageNetOptions, convert_imagenet

        options = ImageNetOptions(max_resolution=args.max_resolution, jpeg_quality=args.jpeg_quality,
                                  compress_probability=args.compress_probability, num_workers=args.workers)
        result = convert_imagenet(args.src, out, overwrite=args.overwrite, options=options, dataset=args.dataset)
    elif args.dataset == "cifar10":
        from gmp_dist.data.convert_cifar import convert_cifar10

        src = args.src if args.src is not None else out / "source"
        result = convert_cifar10(src, out, overwrite=args.overwrite, num_workers=args.workers)
    elif args.dataset == "har2":
        from gmp_dist.data.convert_har import convert_har2

        result = convert_har2(args.src, out, overwrite=args.overwrite, num_workers=args.workers)
    else:
        from gmp_dist.data.convert_digits import convert_digits

        result = convert_digits(out, overwrite=args.overwrite, num_workers=args.workers)
    _print_summary(args.dataset, result)
    return 0


def _print_summary(dataset: str, result: ConversionResult) -> None:
    print(f"{dataset}: {result.num_train} train / {result.num_val} val samples in {result.folder}")
    for path in result.files:
        print(f"  {path.name:24s} {path.stat().st_size / 1e6:10.2f} MB")
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable image(s), listed in {result.skipped_log}:")
        for name in result.skipped[:20]:
            print(f"  {name}")
        if len(result.skipped) > 20:
            print(f"  ... and {len(result.skipped) - 20} more")
