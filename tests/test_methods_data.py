"""SNIP and SynFlow against brute force, and SNIP's gradient all-reduce on 2 real gloo processes."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from gmp_dist.dist import DistContext, TorchCollective, local_group
from gmp_dist.models import build_model, get_spec
from gmp_dist.pruning.global_mp import kept_budget
from gmp_dist.pruning.methods import DataSource, PruneRequest, get_method
from gmp_dist.pruning.selection import prunable_parameters

from pruning_oracle import brute_force_masks


def _snip_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(42)
    return [(torch.randn(5, 1, 8, 8, generator=g), torch.randint(0, 10, (5,), generator=g)) for _ in range(count)]


def _snip_request(model, batches, sparsity, min_weights, comm=None, rank=0, world_size=1, n=None) -> PruneRequest:
    named = prunable_parameters(model)
    extra = {} if comm is None else {"comm": comm, "rank": rank, "world_size": world_size}
    return PruneRequest([k for k, _ in named], [p.detach() for _, p in named], sparsity, min_weights,
                        options={"batches": n or len(batches)}, model=model, params=[p for _, p in named],
                        data=DataSource(lambda: iter(batches), nn.CrossEntropyLoss()), **extra)


@pytest.mark.parametrize("sparsity,min_weights", [(0.5, 0), (0.9, 5), (0.99, 3)])
def test_snip_equals_brute_force(sparsity, min_weights):
    model, batches = _snip_model(), _batches(3)
    bn_before = model[1].running_mean.clone()
    result = get_method("snip").decide(_snip_request(model, batches, sparsity, min_weights, n=2))
    assert torch.equal(model[1].running_mean, bn_before)  # scoring leaves BatchNorm statistics alone
    assert all(p.grad is None for p in model.parameters())  # and the optimizer's .grad
    oracle = _snip_model()
    for inputs, targets in batches[:2]:  # .backward() accumulates: Σ over the first `batches` batches only
        nn.CrossEntropyLoss()(oracle(inputs), targets).backward()
    named = prunable_parameters(oracle)
    scores = [(p.detach() * p.grad).abs() for _, p in named]
    for got, want in zip(result.masks, brute_force_masks(scores, sparsity, min_weights)):
        assert np.array_equal(got.numpy(), want)


def _snip_rank(rank: int, port: int, out, count: int) -> None:
    torch.set_num_threads(1)
    with local_group(rank, 2, port):
        model, batches = _snip_model(), _batches(count)
        comm = TorchCollective(DistContext(rank, 2))
        mine = batches[rank::2]  # what a DistributedSampler deals each rank of the same global batches
        result = get_method("snip").decide(_snip_request(model, mine, 0.9, 5, comm, rank, 2, n=count))
        out.put((rank, torch.cat([m.reshape(-1) for m in result.masks]).numpy()))


@pytest.mark.parametrize("count", [2, 4])
def test_snip_gradients_all_reduced_across_two_gloo_processes(count):
    """``prune.snip.batches`` counts global batches: 2 ranks, each scoring its share (rank r: batches r, r + 2,
    ...), give the masks of one process scoring on all of them."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_snip_rank, args=(r, port, queue, count)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get() for _ in range(2))
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = get_method("snip").decide(_snip_request(_snip_model(), _batches(count), 0.9, 5))
    finally:
        torch.set_num_threads(threads)
    want = torch.cat([m.reshape(-1) for m in single.masks]).numpy()
    assert np.array_equal(results[0], want) and np.array_equal(results[1], want)
    one_batch = get_method("snip").decide(_snip_request(_snip_model(), _batches(1), 0.9, 5))
    assert not np.array_equal(torch.cat([m.reshape(-1) for m in one_batch.masks]).numpy(), want)


def _mlp() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 20, bias=False), nn.ReLU(), nn.Linear(20, 15, bias=False), nn.ReLU(),
                         nn.Linear(15, 4, bias=False))


def _synflow_oracle(weights: list[np.ndarray], sparsity: float, min_weights: int, rounds: int) -> list[np.ndarray]:
    """SynFlow on a bias-free ReLU MLP by hand: with |W| and an all-ones input every ReLU passes, so
    R = 1ᵀ W3 W2 W1 1 and ∂R/∂W_l = (upstream row sums) ⊗ (downstream activations)."""
    absw = [np.abs(w).astype(np.float64) for w in weights]
    masks = [np.ones(w.shape, dtype=bool) for w in weights]
    smallest = np.array([1], dtype=np.int32).view(np.float32)[0]
    for k in range(1, rounds + 1):
        wm = [w * m for w, m in zip(absw, masks)]
        acts = [np.ones(weights[0].shape[1])]
        for w in wm:
            acts.append(w @ acts[-1])
        back = [np.ones(weights[-1].shape[0])]
        for w in reversed(wm[1:]):
            back.insert(0, w.T @ back[0])
        raw = [np.abs(np.outer(b, a) * w) for b, a, w in zip(back, acts[:-1], wm)]
        top = max(r.max() for r in raw)
        scores = [np.where(m, np.maximum((r / top).astype(np.float32), smallest), np.float32(0))
                  for r, m in zip(raw, masks)]
        target = sparsity if k == rounds else 1 - (1 - sparsity) ** (k / rounds)
        masks = brute_force_masks([torch.from_numpy(s) for s in scores], target, min_weights)
    return masks


@pytest.mark.parametrize("sparsity,min_weights,rounds", [(0.9, 0, 3), (0.95, 4, 5), (0.5, 0, 1)])
def test_synflow_equals_hand_computed_flow(sparsity, min_weights, rounds):
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    named = prunable_parameters(model)
    result = get_method("synflow").decide(PruneRequest(
        [n for n, _ in named], [p.detach() for _, p in named], sparsity, min_weights,
        options={"iterations": rounds}, model=model, input_shape=(6,)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # scored on a copy
    expected = _synflow_oracle([p.detach().numpy() for _, p in named], sparsity, min_weights, rounds)
    for got, want in zip(result.masks, expected):
        assert np.array_equal(got.numpy(), want)


def test_synflow_on_a_conv_net_with_batchnorm_keeps_exactly_k():
    torch.manual_seed(0)
    model = build_model("digits_cnn")
    named = prunable_parameters(model)
    n = sum(p.numel() for _, p in named)
    result = get_method("synflow").decide(PruneRequest(
        [k for k, _ in named], [p.detach() for _, p in named], 0.9, 0, options={"iterations": 10}, model=model,
        input_shape=tuple(get_spec("digits_cnn").input_shape)))
    assert sum(int(m.sum()) for m in result.masks) == kept_budget(n, 0.9)
