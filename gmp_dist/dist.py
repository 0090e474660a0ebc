"""The only user of ``torch.distributed`` (design.md §2). With world size 1 every helper is a no-op.

Provides the :class:`~gmp_dist.pruning.global_mp.Collective` the pruning decision runs on, the sum
reductions exact evaluation needs, and the on-device mask fingerprint that proves every rank holds the same
masks.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized()


class TorchCollective:
    """Sum all-reduce and object all-gather over the default process group."""

    def __init__(self, ctx: DistContext):
        self.ctx = ctx
        # NCCL reduces only CUDA tensors; gloo only CPU ones. Statistics live where the group can reduce them.
        self._device = ctx.device if ctx.active and torch_dist.get_backend() == "nccl" else torch.device("cpu")

    def allreduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._allreduce(tensor, torch_dist.ReduceOp.SUM)

    def allreduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._allreduce(tensor, torch_dist.ReduceOp.MAX)

    def _allreduce(self, tensor: torch.Tensor, op) -> torch.Tensor:
        if not self.ctx.active:
            return tensor
        moved = tensor.to(self._device)
        torch_dist.all_reduce(moved, op=op)
        return moved.to(tensor.device)

    def allgather(self, obj: Any) -> list[Any]:
        if not self.ctx.active:
            return [obj]
        out: list[Any] = [None] * self.ctx.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """``src``'s ``tensor`` on every rank (same shape and dtype everywhere)."""
        if not self.ctx.active:
            return tensor
        moved = tensor.to(self._device)
        torch_dist.broadcast(moved, src=src)
        return moved.to(tensor.device)


# Odd multipliers for the on-device mask hash: position i of layer l contributes (i·A + l·B) mod 2^31.
_HASH_A, _HASH_B = 2_654_435_761, 40_503


def masks_fingerprint(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per layer (kept count, position hash) as one int64 tensor, computed where the masks live: no copy
    of the masks to the host, so it is cheap enough for every mask update of a dynamic method."""
    rows = []
    for layer, mask in enumerate(masks):
        flat = mask.detach().reshape(-1)
        index = torch.arange(flat.numel(), device=flat.device, dtype=torch.int64)
        weights = (index * _HASH_A + layer * _HASH_B) & 0x7FFFFFFF
        rows.append(torch.stack([flat.sum(dtype=torch.int64), (weights * flat).sum()]))
    return torch.stack(rows) if rows else torch.zeros((0, 2), dtype=torch.int64)


def verify_masks_agree(ctx: DistContext, masks: Sequence[torch.Tensor], what: str = "the pruning masks") -> None:
    """Hard error unless every rank holds the same masks: one max all-reduce of (fingerprint, −fingerprint)."""
    if not ctx.active:
        return
    local = masks_fingerprint(masks).cpu()
    both = TorchCollective(ctx).allreduce_max(torch.cat([local, -local]))
    high, low = both[: len(local)], -both[len(local):]
    if not torch.equal(high, low):
        layers = [i for i in range(len(local)) if not torch.equal(high[i], low[i])]
        raise RuntimeError(f"{what} differ across ranks in layer(s) {layers[:5]} (kept count/hash range"
                           f" {low[layers[0]].tolist()}..{high[layers[0]].tolist()}); refusing to train on"
                           " inconsistent masks")


def sum_across_ranks(ctx: DistContext, values: torch.Tensor | Sequence[float]) -> list[float]:
    """Sum float64 statistics (loss sums, correct counts, sample counts) over all ranks; one all-reduce and
    one read back to the host, whatever the number of values."""
    tensor = values.double() if isinstance(values, torch.Tensor) else torch.tensor(list(values), dtype=torch.float64)
    return TorchCollective(ctx).allreduce_sum(tensor).tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.active:
        torch_dist.barrier()


def broadcast_buffers(ctx: DistContext, module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank — what DDP's forward would sync."""
    if not ctx.active:
        return
    for buffer in module.buffers():
        torch_dist.broadcast(buffer, src=0)


@contextlib.contextmanager
def local_group(rank: int, world_size: int, port: int, backend: str = "gloo") -> Iterator[None]:
    """Be rank ``rank`` of a group of ``world_size`` processes on this machine (the no-Ray runner and its
    tests) for the ``with`` block; NCCL when each process drives its own CUDA device. A no-op for one process.

    After a clean block every rank collects garbage (a DDP wrapper holds the group from inside a reference
    cycle) and meets the others at a barrier before the group is destroyed. Without that, one rank of two
    aborted in ~2 of 90 runs on a loaded 2-core machine ("terminate called without an active exception",
    exit -6) after its work was done and its result sent: gloo was torn down under a peer still finishing
    its last collective, or at interpreter exit. After an error the group is destroyed at once: a barrier
    would wait for peers that may never come.
    """
    if world_size == 1:
        yield
        return
    torch_dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        yield
    except BaseException:
        torch_dist.destroy_process_group()
        raise
    gc.collect()
    torch_dist.barrier()
    torch_dist.destroy_process_group()
