"""The coordinator protocol on 2 real gloo processes, and the engine's local runs (no Ray)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from gmp_dist.dist import DistContext, TorchCollective, masks_checksum, verify_same_on_all_ranks
from gmp_dist.models import build_model
from gmp_dist.pruning.apply import decide_masks
from gmp_dist.pruning.selection import prunable_parameters


def _weights(seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model("resnet32")
    tensors = [p.detach().clone() for _, p in prunable_parameters(model)]
    tensors[3].view(-1)[:50] = tensors[3].view(-1)[50]  # a block of ties at some magnitude
    return tensors


def _rank_main(rank: int, world_size: int, port: int, out) -> None:
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        ctx = DistContext(rank, world_size)
        tensors = _weights()
        masks, decision = decide_masks(tensors, 0.95, 120, "exact", TorchCollective(ctx), rank, world_size)
        verify_same_on_all_ranks(ctx, masks_checksum(masks), "masks")
        bad = [m.clone() for m in masks]
        if rank == 1:
            bad[0].view(-1)[0] = ~bad[0].view(-1)[0]
        try:
            verify_same_on_all_ranks(ctx, masks_checksum(bad), "masks")
            mismatch_caught = False
        except RuntimeError:
            mismatch_caught = True
        # numpy, not tensors: torch would pass shared-memory handles that vanish when this process exits
        out.put((rank, decision.as_tensor().numpy(), torch.cat([m.reshape(-1) for m in masks]).numpy(), mismatch_caught))
    finally:
        torch_dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree_bit_for_bit_with_single_process():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted([queue.get() for _ in range(2)], key=lambda r: r[0])  # drain before join: pipes block
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    single_masks, single_decision = decide_masks(_weights(), 0.95, 120)
    single_flat = torch.cat([m.reshape(-1) for m in single_masks])
    for _, decision_tensor, flat, mismatch_caught in results:
        assert torch.equal(torch.from_numpy(decision_tensor), single_decision.as_tensor())
        assert torch.equal(torch.from_numpy(flat), single_flat)
        assert mismatch_caught  # a checksum mismatch is a hard error on every rank
    n = single_flat.numel()
    assert int(single_flat.sum()) == n - round(0.95 * n)
