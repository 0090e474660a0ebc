"""Checkpoint files: atomic save, safe load (``weights_only=True``), checked model loading, RNG state.

Layout of a training checkpoint (written by the engine, read on resume and by ``gmp-dist export``)::

    {
      "format": "gmp-dist/1",
      "model": state_dict,                    # plain keys, no "module." DDP prefix
      "optimizer": optimizer.state_dict(),
      "scheduler": scheduler.state_dict(),
      "scaler": scaler.state_dict() or None,
      "pruner": {"masks": {param name: bool tensor}, ...},   # pruner.state_dict()
      "epoch": int,                           # epochs completed
      "global_step": int,
      "rng": capture_rng_state(),
      "config_yaml": str,                     # the resolved config (gmp_dist.config.dump_config)
      "mlflow_run_id": str | None,
      "metrics": {name: float, ...},
    }

Everything in it is a tensor, number, string, None, list, tuple or dict, so ``torch.load(weights_only=True)``
reads it: loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from gmp_dist.errors import UserError

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = "gmp-dist/1"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrap parameter names
_MAX_LISTED = 8


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """``torch.save`` to a temp file beside ``path``, fsync, then rename over it: a crash leaves the old file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path) -> dict:
    """Read a checkpoint or state_dict file (local, or a storage URI such as ``s3://…``, see
    :mod:`gmp_dist.storage`); any problem is a :class:`UserError` naming the file."""
    from gmp_dist import storage

    if isinstance(path, storage.Location) or storage.is_uri(path):
        with storage.local_file(path) as local:
            return load_checkpoint(local)
    source = Path(path)
    expected = "a checkpoint written by gmp-dist or a state_dict saved with torch.save"
    if not source.exists():
        raise UserError(f"checkpoint {source} does not exist (expected {expected})")
    if source.is_dir():
        raise UserError(f"checkpoint {source} is a directory (expected a file: {expected})")
    try:
        state = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"checkpoint {source} holds Python objects that a safe load (weights_only=True) refuses: {first_line}. "
            f"Re-save it as a plain state_dict (torch.save(model.state_dict(), path))") from None
    except Exception as exc:  # a damaged file fails anywhere in the unpickler (IndexError, KeyError, EOFError...)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"checkpoint {source} is truncated or not a torch.save file ({reason}); expected {expected}") from None
    if not isinstance(state, dict):
        raise UserError(f"checkpoint {source} holds a {type(state).__name__}, expected a dict ({expected})")
    return state


def is_complete(path: str | Path) -> bool:
    """Whether a checkpoint file was written to its end. ``torch.save`` writes a zip archive whose central
    directory comes last, so a copy cut short (a worker stopped while Ray persisted it to storage) has
    none. Reads the directory only, not the tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def newest_complete_checkpoint(run, stack: contextlib.ExitStack) -> Optional[Path]:
    """A local path (valid until ``stack`` closes) of the newest whole checkpoint in the storage folder
    ``run``, by :func:`gmp_dist.storage.checkpoints`' one order; one cut short is passed over with a
    warning and left in place (deleting is for the user). None when the run has no whole checkpoint."""
    from gmp_dist import storage

    for found in reversed(storage.checkpoints(run)):
        local = stack.enter_context(storage.local_file(found))
        if is_complete(local):
            return local
        log.warning("passing over checkpoint %s: the file is cut short (written while its run was stopped?)",
                    found.text)
    return None


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict, *, source: str, model_name: str) -> None:
    """Strict load with a readable error; accepts a state_dict, a checkpoint dict or a sparse export."""
    weights = _model_weights(state_dict, source)
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    mismatched = [f"{k} {tuple(weights[k].shape)} vs {tuple(expected[k].shape)} in the model"
                  for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected {_listing(unexpected)}")
        if mismatched:
            problems.append(f"shape {_listing(mismatched)}")
        raise UserError(f"checkpoint {source} does not fit model {model_name}: {'; '.join(problems)} "
                        f"(is it a checkpoint of another model?)")
    model.load_state_dict(weights, strict=True)


def _model_weights(state: dict, source: str) -> dict[str, torch.Tensor]:
    from gmp_dist.export import import_sparse, is_sparse_export

    if is_sparse_export(state):
        state = import_sparse(state)
    elif isinstance(state.get("model"), dict):
        state = state["model"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        raise UserError(f"checkpoint {source} is not a state_dict: entries {_listing(bad)} are not tensors "
                        f"(expected a state_dict or a gmp-dist checkpoint with a 'model' entry)")
    for prefix in _WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = f" and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
    return f"{len(names)} ({shown}{more})"


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA when present) generators, as tensors/ints for a safe load."""
    version, mt_words, gauss_next = random.getstate()
    np_kind, np_words, np_pos, np_has_gauss, np_cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt_words, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": str(np_kind), "state": torch.from_numpy(np.asarray(np_words, dtype=np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(w) for w in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["state"].numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        # A resume may see fewer devices than the run that saved (e.g. one GPU per worker).
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
