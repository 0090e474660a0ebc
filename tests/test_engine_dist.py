"""The coordinator protocol on 2 real gloo processes, and the engine's local runs (no Ray)."""

from __future__ import annotations

import contextlib
import queue as queue_module
import socket

import pytest
import torch
import torch.multiprocessing as mp

from gmp_dist.dist import DistContext, TorchCollective, local_group, verify_masks_agree
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
    with local_group(rank, world_size, port):
        ctx = DistContext(rank, world_size)
        tensors = _weights()
        masks, decision = decide_masks(tensors, 0.95, 120, "exact", TorchCollective(ctx), rank, world_size)
        verify_masks_agree(ctx, masks)
        bad = [m.clone() for m in masks]
        if rank == 1:
            bad[0].view(-1)[0] = ~bad[0].view(-1)[0]
        moved = [m.clone() for m in masks]  # same kept count, one kept weight moved: the hash must see it
        if rank == 1:
            flat = moved[2].view(-1)
            kept_at, pruned_at = int(flat.nonzero()[0]), int((~flat).nonzero()[0])
            flat[kept_at], flat[pruned_at] = False, True
        mismatch_caught = True
        for wrong in (bad, moved):
            try:
                verify_masks_agree(ctx, wrong)
                mismatch_caught = False
            except RuntimeError:
                pass
        # numpy, not tensors: torch would pass shared-memory handles that vanish when this process exits
        out.put((rank, decision.as_tensor().numpy(), torch.cat([m.reshape(-1) for m in masks]).numpy(), mismatch_caught))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_ranks(target, n_results: int) -> list:
    """Run ``target(rank, 2, port, queue)`` on 2 spawned processes; the results they put, unsorted."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()  # not SimpleQueue: get() needs a timeout, or a crashed rank hangs the suite
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        # drain before join (pipes block); a rank that died puts nothing, so never wait unbounded
        results = [queue.get(timeout=180) for _ in range(n_results)]
    except queue_module.Empty:
        raise AssertionError(f"a rank sent no result (exit codes {[p.exitcode for p in procs]})") from None
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    return results


def test_two_processes_agree_bit_for_bit_with_single_process():
    results = sorted(_run_two_ranks(_rank_main, 2), key=lambda r: r[0])
    single_masks, single_decision = decide_masks(_weights(), 0.95, 120)
    single_flat = torch.cat([m.reshape(-1) for m in single_masks])
    for _, decision_tensor, flat, mismatch_caught in results:
        assert torch.equal(torch.from_numpy(decision_tensor), single_decision.as_tensor())
        assert torch.equal(torch.from_numpy(flat), single_flat)
        assert mismatch_caught  # a checksum mismatch is a hard error on every rank
    n = single_flat.numel()
    assert int(single_flat.sum()) == n - round(0.95 * n)


def _tiny_bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _val_data(num: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(num, 4, generator=g), torch.randint(0, 3, (num,), generator=g)


UNEVEN_SPLITS = (9, 1)  # 5 + 4 samples; 1 + 0 (rank 1 has no validation batch at all)


def _uneven_eval_rank(rank: int, world_size: int, port: int, out) -> None:
    with local_group(rank, world_size, port):
        _uneven_eval(DistContext(rank, world_size), out)  # its DDP wrapper is garbage before the group ends


def _uneven_eval(ctx: DistContext, out) -> None:
    from host_syncs import HostReads

    from gmp_dist.data.batches import val_indices
    from gmp_dist.engine.evaluate import evaluate

    rank, world_size = ctx.rank, ctx.world_size
    net = torch.nn.parallel.DistributedDataParallel(_tiny_bn_model())
    for num_val in UNEVEN_SPLITS:
        # A training step first: DDP then owes a buffer broadcast at its next forward, which a rank
        # without validation batches would never join.
        g = torch.Generator().manual_seed(10 + rank)
        net(torch.randn(6, 4, generator=g)).sum().backward()
        x, y = _val_data(num_val)
        idx = val_indices(num_val, rank, world_size).tolist()
        batches = [(x[idx[i:i + 2]], y[idx[i:i + 2]]) for i in range(0, len(idx), 2)]
        with HostReads() as reads:
            metrics = evaluate(net, batches, ctx, contextlib.nullcontext)
        state = {k: v.numpy().copy() for k, v in net.module.state_dict().items()}
        out.put((num_val, rank, len(idx), metrics, state, reads.names))


def test_evaluation_counts_every_sample_once_on_an_uneven_split_with_one_host_read():
    from gmp_dist.engine.evaluate import evaluate

    results = sorted(_run_two_ranks(_uneven_eval_rank, 2 * len(UNEVEN_SPLITS)), key=lambda r: r[:2])
    for num_val in UNEVEN_SPLITS:
        ranks = [r for r in results if r[0] == num_val]
        assert [n for _, _, n, _, _, _ in ranks] == [(num_val + 1) // 2, num_val // 2]
        # Sums stay on the device: one read back per evaluation, whatever the number of batches.
        assert [reads for *_, reads in ranks] == [["tolist"], ["tolist"]]
        # The reference: rank 0's model (its BatchNorm statistics, broadcast to both ranks) on all samples.
        model = _tiny_bn_model()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in ranks[0][4].items()})
        x, y = _val_data(num_val)
        expected = evaluate(model, [(x, y)], DistContext(), contextlib.nullcontext)
        for _, _, _, metrics, _, _ in ranks:
            assert metrics["val_samples"] == num_val
            assert metrics["val_top1"] == expected["val_top1"] and metrics["val_top5"] == expected["val_top5"]
            assert metrics["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-6)


LOSS_STEPS, LOG_EVERY = 6, 2


def _epoch_rank(rank: int, world_size: int, port: int, out) -> None:
    with local_group(rank, world_size, port):
        _epoch(DistContext(rank, world_size), out)


def _epoch(ctx: DistContext, out) -> None:
    """One epoch of ``train_one_epoch`` on this rank's own batches: the train_loss it reports, the per-rank
    step losses it saw, and its reads of tensor values into Python."""
    from host_syncs import HostReads

    from gmp_dist.config import RunConfig
    from gmp_dist.engine.events import PruningController
    from gmp_dist.engine.loop import RunState, train_one_epoch
    from gmp_dist.engine.optim import build_optimizer, build_scheduler

    cfg = RunConfig.model_validate({"model": {"name": "digits_cnn"}, "prune": {"method": "none"},
                                    "train": {"log_every_steps": LOG_EVERY, "lr": 0.01}})
    model = _tiny_bn_model()
    controller = PruningController(cfg.prune, model, "tiny", ctx)
    net = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train, LOSS_STEPS)
    g = torch.Generator().manual_seed(100 + ctx.rank)  # different data on each rank: different losses
    batches = [(torch.randn(4, 4, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(LOSS_STEPS)]
    losses: list[float] = []
    loss_fn = torch.nn.CrossEntropyLoss()

    def recording_loss(logits, targets):
        loss = loss_fn(logits, targets)
        losses.append(loss.detach().clone())
        return loss

    logged: list[tuple[int, dict]] = []

    class Recorder:
        def log_metrics(self, metrics, step):
            logged.append((step, dict(metrics)))

    with HostReads() as reads:
        stats = train_one_epoch(net, batches, optimizer, scheduler, recording_loss, controller, RunState(), cfg, ctx,
                                contextlib.nullcontext, None, Recorder())
    out.put((ctx.rank, stats["train_loss"], [float(x) for x in losses], logged, reads.names))


def test_train_loss_is_the_mean_over_all_ranks_with_bounded_host_reads():
    results = sorted(_run_two_ranks(_epoch_rank, 2), key=lambda r: r[0])
    per_rank = [r[2] for r in results]
    expected = sum(map(sum, per_rank)) / (2 * LOSS_STEPS)  # equal batch sizes: the mean of every step loss
    for rank, train_loss, _, logged, reads in results:
        assert train_loss == pytest.approx(expected, rel=1e-9)
        # At each log point the running mean over both ranks; the LR of that step
        for step, metrics in logged:
            running = sum(sum(losses[:step + 1]) for losses in per_rank) / (2 * (step + 1))
            assert metrics["train_loss_step"] == pytest.approx(running, rel=1e-9)
        assert [step for step, _ in logged] == [1, 3, 5]
        # One read per log point and one at the end: never one per step.
        assert reads == ["tolist"] * (LOSS_STEPS // LOG_EVERY + 1), reads
