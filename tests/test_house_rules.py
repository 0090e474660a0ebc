"""House rules the project enforces (design.md §2): which module may import what.

- ``torch.distributed`` only in ``gmp_dist/dist.py``;
- ``ray`` only in ``gmp_dist/ray_launcher.py``;
- ``mlflow`` only under ``gmp_dist/tracking/``;
- ``gmp_dist/pruning/`` imports only the standard library, torch, numpy and itself, and, under
  ``pruning/methods/`` only, pydantic: a method declares its options as its own model (design.md §3.10);
- the command layer (``cli.py``, ``__main__.py``, ``commands/``, ``study/``) sits on top: no other module
  imports it, so the engine, data, tracking and launchers stay usable without the CLI.

Imports are read from the syntax tree (function-level imports included), plus attribute chains such as
``torch.distributed.all_reduce`` that reach the module without importing it by name.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gmp_dist"
FILES = sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted module)`` for every import and every ``torch.distributed`` attribute chain."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: resolve against this file's package
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name) \
                and node.value.id == "torch":
            found.append((node.lineno, "torch.distributed"))
    return found


def _violations(allowed_file, module_prefix: str) -> list[str]:
    out = []
    for path in FILES:
        if allowed_file(_rel(path)):
            continue
        for line, module in _imported_modules(path):
            if module == module_prefix or module.startswith(module_prefix + "."):
                out.append(f"{_rel(path)}:{line} imports {module}")
    return out


@pytest.mark.parametrize("module,allowed", [
    ("torch.distributed", lambda rel: rel == "gmp_dist/dist.py"),
    ("ray", lambda rel: rel == "gmp_dist/ray_launcher.py"),
    ("mlflow", lambda rel: rel.startswith("gmp_dist/tracking/")),
])
def test_module_used_only_in_its_home(module, allowed):
    assert _violations(allowed, module) == []


COMMAND_LAYER = ("gmp_dist/cli.py", "gmp_dist/__main__.py", "gmp_dist/commands/", "gmp_dist/study/")


@pytest.mark.parametrize("module", ["gmp_dist.cli", "gmp_dist.commands", "gmp_dist.study"])
def test_command_layer_is_imported_only_from_itself(module):
    assert _violations(lambda rel: rel.startswith(COMMAND_LAYER), module) == []


def test_pruning_core_is_pure():
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for path in sorted((PACKAGE / "pruning").rglob("*.py")):
        for line, module in _imported_modules(path):
            top = module.split(".")[0]
            if top in stdlib or top in ("torch", "numpy") and not module.startswith("torch.distributed"):
                continue
            if module == "gmp_dist.pruning" or module.startswith("gmp_dist.pruning."):
                continue
            if top == "pydantic" and _rel(path).startswith("gmp_dist/pruning/methods/"):
                continue  # option models only: no config module, no Ray, no MLflow
            bad.append(f"{_rel(path)}:{line} imports {module}")
    assert bad == []


def test_rules_catch_what_they_should(tmp_path, monkeypatch):
    """The scanner sees function-level imports, from-imports and bare attribute chains."""
    probe = tmp_path / "gmp_dist" / "probe.py"
    probe.parent.mkdir()
    probe.write_text("import torch\n\ndef f():\n    from ray import train\n    torch.distributed.barrier()\n"
                     "    import mlflow.artifacts\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "gmp_dist")
    modules = {m for _, m in _imported_modules(probe)}
    assert {"ray", "ray.train", "torch.distributed", "mlflow.artifacts"} <= modules
