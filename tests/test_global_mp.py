"""The exact Global MP + MT decision against brute force (design.md §3.2, §3.4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.utils.prune as torch_prune

from gmp_dist.errors import InfeasibleError
from gmp_dist.pruning.global_mp import Shard, decide, kept_budget
from gmp_dist.pruning.masks import global_magnitude_masks, shard_masks

from pruning_oracle import ThreadWorld, brute_force_masks


def _layers(seed: int, kind: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (50,), (16, 8, 3, 3), (7,), (200, 30), (1, 1)]
    out = []
    for i, shape in enumerate(shapes):
        t = torch.randn(shape, generator=g) * (0.5 + i)
        if kind == "ties":  # few distinct magnitudes: ties everywhere, both signs
            t = torch.randint(-4, 5, shape, generator=g).float() * 0.25
        elif kind == "zeros":  # exact zeros already present (and negative zeros)
            t[torch.rand(shape, generator=g) < 0.4] = 0.0
            t.view(-1)[:1] = -0.0
        out.append(t)
    return out


CASES = [(s, m, kind) for s in (0.0, 0.5, 0.9, 0.99) for m in (0, 5, 40) for kind in ("random", "ties", "zeros")]


def _use_path(monkeypatch, path: str) -> None:
    """``bracket``: the sampled one-pass decision as shipped; ``misled``: a 16-weight sample and no margin, so
    the bracket often misses the cut and the radix fallback runs; ``radix``: the two rounds only."""
    from gmp_dist.pruning import bracket, global_mp

    if path == "misled":
        monkeypatch.setattr(bracket, "SAMPLE_TARGET", 16)
        monkeypatch.setattr(bracket, "MIN_LAYER_SAMPLES", 2)
        monkeypatch.setattr(bracket, "Z_MARGIN", 0.0)
        monkeypatch.setattr(bracket, "LAYER_Z_MARGIN", 0.0)
    monkeypatch.setattr(global_mp, "BRACKET_FIRST", path != "radix")


@pytest.fixture(params=["bracket", "misled", "radix"])
def decision_path(request, monkeypatch):
    _use_path(monkeypatch, request.param)
    return request.param


@pytest.mark.parametrize("sparsity,min_weights,kind", CASES)
def test_single_process_equals_brute_force(sparsity, min_weights, kind, decision_path):
    tensors = _layers(int(sparsity * 100) + min_weights, kind)
    n_total = sum(t.numel() for t in tensors)
    try:
        expected = brute_force_masks(tensors, sparsity, min_weights)
    except AssertionError:  # infeasible for this m
        with pytest.raises(InfeasibleError, match="largest reachable sparsity"):
            global_magnitude_masks(tensors, sparsity, min_weights)
        return
    masks, decision = global_magnitude_masks(tensors, sparsity, min_weights)
    kept = sum(int(m.sum()) for m in masks)
    assert kept == kept_budget(n_total, sparsity) == decision.kept_budget
    for got, want in zip(masks, expected):
        assert got.shape == want.shape
        assert np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("world_size,split", [(2, False), (3, True), (4, True)])
@pytest.mark.parametrize("sparsity,min_weights,kind", [(0.5, 0, "ties"), (0.9, 40, "random"), (0.99, 5, "zeros"),
                                                       (0.9, 40, "ties"), (0.0, 0, "random")])
def test_shards_agree_with_brute_force(world_size, split, sparsity, min_weights, kind, decision_path):
    """Layers dealt to ranks whole (DDP ownership) or cut into contiguous pieces (sharded models)."""
    tensors = _layers(7 + world_size, kind)
    sizes = [t.numel() for t in tensors]
    pieces: list[list[Shard]] = [[] for _ in range(world_size)]
    for layer, t in enumerate(tensors):
        flat = t.reshape(-1)
        if split and flat.numel() >= world_size:
            bounds = np.linspace(0, flat.numel(), world_size + 1).astype(int)
            for r in range(world_size):
                pieces[(r + layer) % world_size].append(Shard(layer, int(bounds[r]), flat[bounds[r]:bounds[r + 1]]))
        else:
            pieces[layer % world_size].append(Shard(layer, 0, flat))
    world = ThreadWorld(world_size)

    def rank_fn(rank, comm):
        decision = decide(pieces[rank], sizes, sparsity, min_weights, comm)
        return decision, shard_masks(pieces[rank], decision, comm)

    results = world.run(rank_fn)
    decisions = [d for d, _ in results]
    assert all(d == decisions[0] for d in decisions)
    _, single = global_magnitude_masks(tensors, sparsity, min_weights)
    assert decisions[0].as_tensor().equal(single.as_tensor())
    expected = brute_force_masks(tensors, sparsity, min_weights)
    for rank, (_, masks) in enumerate(results):
        for shard, mask in zip(pieces[rank], masks):
            want = expected[shard.layer].reshape(-1)[shard.offset:shard.offset + shard.values.numel()]
            assert np.array_equal(mask.reshape(-1).numpy(), want)


def test_mt_zero_equals_torch_global_unstructured():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 16, 3), torch.nn.Linear(16, 10))
    params = [(m, "weight") for m in model if hasattr(m, "weight")]
    tensors = [m.weight.detach().clone() for m, _ in params]
    masks, _ = global_magnitude_masks(tensors, 0.9)
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=0.9)
    for (m, _), ours in zip(params, masks):
        assert torch.equal(m.weight_mask.bool(), ours)


def test_layers_smaller_than_m_stay_dense_and_mt_bound_flagged():
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(10, generator=g) * 1e-3, torch.randn(5000, generator=g), torch.randn(300, generator=g) * 1e-2]
    masks, decision = global_magnitude_masks(tensors, 0.95, min_weights=20)
    assert int(masks[0].sum()) == 10  # smaller than m: dense
    assert int(masks[2].sum()) == 20  # tiny magnitudes: global MP alone would keep ~0, MT keeps exactly m
    assert decision.mt_bound == (True, False, True)
    assert sum(int(m.sum()) for m in masks) == kept_budget(5310, 0.95)


def test_one_layer_and_infeasible_message():
    t = torch.randn(1000)
    masks, decision = global_magnitude_masks([t], 0.9)
    assert int(masks[0].sum()) == 100
    assert decision.threshold == pytest.approx(float(t.abs().sort(descending=True).values[99]))
    with pytest.raises(InfeasibleError, match=r"largest reachable sparsity is 0\.8"):
        global_magnitude_masks([torch.randn(100), torch.randn(900)], 0.9, min_weights=100)


def test_nan_weights_refused():
    with pytest.raises(ValueError, match="NaN"):
        global_magnitude_masks([torch.tensor([1.0, float("nan")])], 0.5)


def test_half_precision_weights():
    t = torch.randn(4096).to(torch.bfloat16)
    masks, _ = global_magnitude_masks([t], 0.75)
    expected = brute_force_masks([t.float()], 0.75, 0)
    assert np.array_equal(masks[0].numpy(), expected[0])


@pytest.mark.parametrize("kind", ["random", "ties", "zeros"])
def test_chunked_threaded_passes_equal_brute_force(monkeypatch, kind):
    """Tiny chunks and lanes, so every layer is cut into many chunks spread over threads (the
    ResNet-scale code path), including uneven chunk counts and bf16 widened chunk by chunk."""
    from gmp_dist.pruning import radix

    monkeypatch.setattr(radix, "CHUNK_ELEMENTS", 37)
    monkeypatch.setattr(radix, "MIN_LANE_ELEMENTS", 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    tensors = _layers(11, kind) + [torch.randn(1000).bfloat16().float() * 3]
    for sparsity, min_weights in [(0.9, 5), (0.5, 40), (0.99, 0)]:
        masks, _ = global_magnitude_masks(tensors, sparsity, min_weights)
        for got, want in zip(masks, brute_force_masks(tensors, sparsity, min_weights)):
            assert np.array_equal(got.numpy(), want)
    half = torch.randn(999).to(torch.bfloat16)
    masks, _ = global_magnitude_masks([half], 0.75, 10)
    assert np.array_equal(masks[0].numpy(), brute_force_masks([half.float()], 0.75, 10)[0])
    big = torch.randn(5000) * 0.01  # chunk-level threads: one call outside any layer lane
    bits = big.abs().view(torch.int32)
    assert torch.equal(radix.high_histogram(big), torch.bincount(bits >> 16, minlength=radix.HIGH_BINS))
    top = int((bits >> 16).mode().values)
    want = np.sort((bits[(bits >> 16) == top] & 0xFFFF).numpy())
    assert np.array_equal(np.sort(radix.lows_in_bin(big, top)), want)


def test_misled_bracket_takes_both_paths(monkeypatch):
    """The fallback is not dead code: a misleading sample sends some decisions to the radix rounds."""
    from gmp_dist.pruning import bracket

    _use_path(monkeypatch, "misled")
    outcomes = []
    real = bracket.decide_in_bracket
    monkeypatch.setattr(bracket, "decide_in_bracket", lambda *a: outcomes.append(real(*a)) or outcomes[-1])
    for sparsity, min_weights, kind in CASES:
        tensors = _layers(int(sparsity * 100) + min_weights, kind)
        try:
            expected = brute_force_masks(tensors, sparsity, min_weights)
        except AssertionError:
            continue
        masks, _ = global_magnitude_masks(tensors, sparsity, min_weights)
        assert all(np.array_equal(got.numpy(), want) for got, want in zip(masks, expected))
    taken = [found is not None for found in outcomes]
    assert any(taken) and not all(taken)


@pytest.mark.parametrize("sparsity,min_weights", [(0.9, 300), (0.5, 2000), (0.99, 50)])
def test_bracket_on_resnet_like_scales(monkeypatch, sparsity, min_weights):
    """Layers whose scales differ 100x (He init), so MT cuts fall above, inside and below the bracket."""
    from gmp_dist.pruning import bracket

    g = torch.Generator().manual_seed(5)
    sizes = [(64, 3, 7, 7), (64, 64, 3, 3), (256, 64), (512, 512, 3, 3), (1000, 512), (37,), (64, 64, 1, 1)]
    tensors = [torch.randn(shape, generator=g) * (2.0 / torch.Size(shape)[1:].numel()) ** 0.5 if len(shape) > 1
               else torch.randn(shape, generator=g) * 1e-4 for shape in sizes]
    outcomes = []
    real = bracket.decide_in_bracket
    monkeypatch.setattr(bracket, "decide_in_bracket", lambda *a: outcomes.append(real(*a)) or outcomes[-1])
    masks, decision = global_magnitude_masks(tensors, sparsity, min_weights)
    assert outcomes and outcomes[0] is not None  # the one-pass decision was taken
    for got, want in zip(masks, brute_force_masks(tensors, sparsity, min_weights)):
        assert np.array_equal(got.numpy(), want)
    monkeypatch.setattr(bracket, "decide_in_bracket", lambda *a: None)
    assert global_magnitude_masks(tensors, sparsity, min_weights)[1] == decision
