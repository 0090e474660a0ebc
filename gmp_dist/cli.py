"""The `gmp-dist` entry point: one subcommand per module in ``gmp_dist.commands``.

Exit codes (design.md §1): 0 success, 2 bad input (a :class:`UserError`), 1 internal failure, 130 / 143
when stopped by SIGINT / SIGTERM (:mod:`gmp_dist.signals`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from gmp_dist import __version__, signals
from gmp_dist.errors import UserError

# Subcommand name -> module in gmp_dist.commands. Each module has add_arguments(parser) and run(args) -> int.
SUBCOMMANDS = {
    "train": "Fine-tune (or pre-train) a model from a YAML config on Ray Train workers.",
    "prune": "Prune a checkpoint offline (Global MP + Minimum Threshold, or --method) and write a report.",
    "models": "List the model names model.name and --model accept.",
    "data": "Convert a data set (imagenet, imagefolder, cifar10, har2, digits) into training files.",
    "report": "Plots and a markdown table comparing the runs of an MLflow experiment.",
    "export": "Write a compact sparse model (kept values + 1-bit masks).",
    "eval": "Evaluate a checkpoint or a sparse export on a config's validation data.",
    "sweep": "Run one training per grid point under one MLflow parent run.",
    "study": "The paper's comparison: methods x sparsities, one-shot and fine-tuned, as a table and plots.",
    "demo": "The quickstart: dense digits CNN, one-shot Global MP at 90% with MT, 2 Ray workers.",
}


class _ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 already; keep its usage line
        self.print_usage(sys.stderr)
        self.exit(2, f"gmp-dist: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="gmp-dist", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"gmp-dist {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_ArgumentParser)
    for name, help_text in SUBCOMMANDS.items():
        module = _command_module(name)
        if module is None:
            continue
        p = sub.add_parser(name, help=help_text, description=help_text,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _command_module(name: str):
    try:
        return importlib.import_module(f"gmp_dist.commands.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"gmp_dist.commands.{name}":
            return None  # not built yet
        raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args._module.run(args) or 0)
    except UserError as exc:
        print(f"gmp-dist {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGINT/SIGTERM turned into signals.Stopped
        print(f"gmp-dist {args.command}: {signals.describe(exc)}", file=sys.stderr)
        return signals.exit_code(exc)
    except Exception:  # an internal failure: keep the traceback for the bug report
        traceback.print_exc()
        print(f"gmp-dist {args.command}: internal error (exit 1); the traceback above helps a bug report",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
