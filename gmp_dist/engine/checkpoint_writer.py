"""Checkpoints written in the background on rank 0, still atomic (design.md §5; issue 24 item 3b).

Who waits when (``TrainingCheckpoints`` in :mod:`gmp_dist.engine.state`, called from the loop):

1. at a checkpoint epoch ``e``, every rank contributes its RNG state (one allgather, as before); rank 0
   copies the state to host memory (:func:`host_snapshot`: a clone of every tensor; from a GPU,
   non-blocking copies into pinned memory behind a CUDA event), hands the copy to
   :class:`CheckpointWriter`'s one thread, which ``save_checkpoint``'s it (temp file, fsync, rename), and
   returns to training; every rank keeps epoch ``e``'s report (metrics + file; None on the other ranks);
2. at the end of epoch ``e + 1`` (after its training and validation, before its log line) rank 0 waits for
   the write, which had the whole epoch to finish, so normally not at all, and then every rank makes the
   kept report; the same happens at the next save and at the end of the run (stop after N epochs too),
   so the final checkpoint is reported, complete, before ``train`` returns.

So every checkpoint epoch is reported once, in epoch order, always with a complete file. Reports stay
on each worker's main thread, at the same points on every rank, as Ray Train V2 wants:
``ray.train.report`` is a barrier across the workers (api/train_fn_utils.py), which is why rank 0 does not
report from the writer's thread as soon as the file is there. The kept report goes out *before* the next
write starts: Ray's reporter deletes the reported folder (``scratch/report``), where the next write goes.

The cost of not stalling: a checkpoint reaches Ray Train's storage one epoch later, so a run stopped or
failed during epoch ``e + 1`` resumes from the checkpoint before ``e`` (a local run folder holds the file
as soon as it is renamed, and resume finds it there). At most one write is in flight and one snapshot
exists: a save waits for the previous write before it copies. An error of the write (disk full) is raised
at that wait; when training itself failed, the write is waited for and its error only logged, and
nothing is reported. A crash during a write leaves the previous checkpoint file as it was
(``save_checkpoint``).
"""

from __future__ import annotations

import copy
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

from gmp_dist.checkpoint import save_checkpoint

log = logging.getLogger(__name__)


def host_snapshot(obj: Any) -> tuple[Any, list]:
    """A copy of ``obj`` (nested dicts, lists, tuples, tensors, numbers, strings) that training can no longer
    change: every tensor cloned to host memory. Returns it with the CUDA events to wait for before reading
    it (device tensors are copied non-blocking into pinned memory). A tensor that appears twice (the same
    view) is copied once, so the file keeps the sharing."""
    memo: dict[tuple, torch.Tensor] = {}
    devices: set[torch.device] = set()

    def snap(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            x = x.detach()
            key = (x.device, x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape), x.stride(), x.dtype)
            if key not in memo:
                if x.device.type == "cuda":
                    pinned = torch.empty(x.shape, dtype=x.dtype, device="cpu", pin_memory=True)
                    memo[key] = pinned.copy_(x, non_blocking=True)
                    devices.add(x.device)
                else:
                    memo[key] = x.to("cpu", copy=True)
            return memo[key]
        if isinstance(x, dict):
            out = copy.copy(x)  # keeps the type and attributes (a state_dict's ``_metadata``)
            for k, v in x.items():
                out[k] = snap(v)
            return out
        if type(x) in (list, tuple):
            return type(x)(snap(v) for v in x)
        if x is None or isinstance(x, (bool, int, float, str, bytes)):
            return x
        return copy.deepcopy(x)

    result = snap(obj)
    events = []
    for device in devices:
        with torch.cuda.device(device):
            event = torch.cuda.Event()
            event.record()  # after the copies on the current stream; later in-place updates queue behind them
            events.append(event)
    return result, events


class CheckpointWriter:
    """One background thread that writes snapshots atomically; at most one write in flight."""

    def __init__(self) -> None:
        self._pool: Optional[ThreadPoolExecutor] = None
        self._pending: Optional[Future] = None

    def save(self, state: dict, path: Path) -> None:
        """Wait for the previous write (raising its error), snapshot ``state``, start writing it to ``path``;
        returns before the file is written."""
        self.wait()
        snapshot, events = host_snapshot(state)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gmp-checkpoint")
        self._pending = self._pool.submit(_write, snapshot, events, Path(path))

    def idle(self) -> bool:
        """No write in flight, or the one in flight has ended (``wait`` will not block)."""
        return self._pending is None or self._pending.done()

    def wait(self) -> Optional[Path]:
        """The path of the write in flight once it is complete (None when there was none); its error, raised."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def close(self, failed: bool = False) -> None:
        """Wait for the write in flight and stop the thread. ``failed``: training raised already, so an error
        of the write is logged instead of raised over it."""
        try:
            if failed:
                try:
                    self.wait()
                except Exception:
                    log.exception("writing the last checkpoint failed as well")
            else:
                self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


def _write(snapshot: dict, events: list, path: Path) -> Path:
    for event in events:
        event.synchronize()
    return save_checkpoint(snapshot, path)
