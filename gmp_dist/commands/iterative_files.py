"""The files of an iterative run (``gmp_dist.commands.iterative``): its state file, the snapshots and round
masks it saves, and what it reads back from its rounds' folders, local or object storage alike."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Sequence

import torch

from gmp_dist import storage
from gmp_dist.errors import UserError

STATE_FILE = "iterative.json"


def read_weights(where: storage.Location) -> dict[str, torch.Tensor]:
    from gmp_dist.model_sources import model_weights, read_model_source

    return model_weights(read_model_source(where.text))


def read_masks(where: storage.Location, names: Sequence[str]) -> list[torch.Tensor]:
    from gmp_dist.checkpoint import load_checkpoint

    with storage.local_file(where) as local:
        masks = load_checkpoint(local)["pruner"]["masks"]
    return [masks[n].to(torch.bool) for n in names]


def newest_epoch(run: storage.Location) -> int:
    from gmp_dist.checkpoint import load_checkpoint, newest_complete_checkpoint

    with contextlib.ExitStack() as downloads:
        local = newest_complete_checkpoint(run, downloads)
        return int(load_checkpoint(local)["epoch"]) if local is not None else 0


def save_file(where: storage.Location, state: dict) -> None:
    from gmp_dist.checkpoint import save_checkpoint

    with storage.writable(where) as path:
        save_checkpoint(state, path)


def read_state(folder: storage.Location) -> dict:
    where = folder.child(STATE_FILE)
    if not where.is_file():
        return {}
    with storage.local_file(where) as path:
        try:
            state = json.loads(path.read_text())
        except ValueError as exc:
            raise UserError(f"{where} is not valid JSON ({exc}); delete the run folder to start again") from None
    return state if isinstance(state, dict) else {}


def write_state(folder: storage.Location, state: dict) -> None:
    with storage.writable(folder.child(STATE_FILE)) as path:
        partial = path.with_name(path.name + ".tmp")
        partial.write_text(json.dumps(state, indent=1, sort_keys=True) + "\n")
        os.replace(partial, path)  # a crash leaves the previous state, never half of one
