"""Data: converters to on-disk formats and per-rank loaders (FFCV, or torchvision as fallback).

The engine calls :func:`build_loaders` inside each worker once the process group exists::

    loaders = build_loaders(cfg, rank, world_size, device)
    for epoch in range(epochs):
        loaders.set_epoch(epoch)
        for inputs, targets in loaders.train:   # float32 on device, normalised; int64 [B]
            ...

- ``len(loaders.train)`` is the same on every rank (whole batches, remainder dropped); each pass
  draws the next epoch's order from (train.seed, epoch), ``set_epoch(e)`` picks epoch e;
- ``loaders.val`` shows every validation sample exactly once across all ranks (no padding);
- ``loaders.kind`` is "ffcv" or "torchvision"; ``num_train_samples``/``num_val_samples`` count the
  whole data set; ``num_classes``; ``input_shape`` is one sample without the batch dimension.
"""

from gmp_dist.data.batches import Loaders
from gmp_dist.data.formats import ffcv_available
from gmp_dist.data.loaders import build_loaders, prepare_data, resolve_data_dir

__all__ = ["Loaders", "build_loaders", "prepare_data", "resolve_data_dir", "ffcv_available"]
