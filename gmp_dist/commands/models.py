"""`gmp-dist models`: the model names ``model.name`` / ``--model`` accept."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--names-only", action="store_true", help="one name per line, nothing else (for scripts)")


def run(args: argparse.Namespace) -> int:
    from gmp_dist.models import get_spec, model_names, model_sources

    named = model_names()
    listed = [n for source in model_sources() for n in source.names()]
    if args.names_only:
        print("\n".join(named + listed))
        return 0
    print("The paper's models:")
    for name in named:
        spec = get_spec(name)
        shape = "x".join(str(d) for d in spec.input_shape or ())
        print(f"  {name:20s} {shape:>11s}  {spec.summary}")
    for source in model_sources():
        print(f"\n{source.describe()}:")
        names = source.names()
        for start in range(0, len(names), 4):
            print("  " + "".join(f"{n:34s}" for n in names[start:start + 4]).rstrip())
        if not names:
            print("  e.g. model.name: mynets:tiny with model.input_shape: [3, 32, 32]")
    return 0
