"""Every registered pruning method against brute force, on one process and on 2-4 ranks (design.md §3.9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmp_dist.errors import InfeasibleError, UserError
from gmp_dist.pruning.global_mp import Shard, decide, kept_budget
from gmp_dist.pruning.masks import shard_masks
from gmp_dist.pruning.methods import PruneRequest, available, get_method
from gmp_dist.pruning.methods.budgets import apportion, erk_kept, uniform_kept, uniform_plus_kept
from gmp_dist.pruning.methods.lamp import lamp_scores

from method_oracles import erk_targets_bisection, lamp_scores_bruteforce, top_k_per_layer
from pruning_oracle import ThreadWorld, brute_force_masks

SHAPES = [(8, 3, 3, 3), (50,), (16, 8, 3, 3), (7, 1), (200, 30), (10, 16)]


def _layers(seed: int, kind: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(SHAPES):
        t = torch.randn(shape, generator=g) * (0.5 + i)
        if kind == "ties":  # few distinct magnitudes, both signs
            t = torch.randint(-4, 5, shape, generator=g).float() * 0.25
        elif kind == "zeros":
            t[torch.rand(shape, generator=g) < 0.4] = 0.0
            t.view(-1)[:1] = -0.0
        out.append(t)
    return out


def _request(tensors, sparsity, min_weights=0, **kw) -> PruneRequest:
    return PruneRequest([f"l{i}" for i in range(len(tensors))], tensors, sparsity, min_weights, **kw)


def _np(masks) -> list[np.ndarray]:
    return [m.numpy() for m in masks]


def _expected(method: str, tensors, sparsity, min_weights, seed=0) -> list[np.ndarray]:
    shapes = [tuple(t.shape) for t in tensors]
    if method == "global_mp":
        return brute_force_masks(tensors, sparsity, min_weights)
    if method == "lamp":
        return brute_force_masks([torch.from_numpy(lamp_scores_bruteforce(t)) for t in tensors], sparsity, min_weights)
    mags = [t.abs().numpy() for t in tensors]
    if method == "uniform":
        return top_k_per_layer(mags, [t.numel() - int(np.floor(sparsity * t.numel() + 0.5)) for t in tensors])
    if method == "uniform_plus":
        return top_k_per_layer(mags, uniform_plus_kept(shapes, sparsity))
    if method == "erk":
        return top_k_per_layer(mags, erk_kept(shapes, sparsity))
    raise KeyError(method)


CASES = [(method, s, kind) for method in ("global_mp", "lamp", "uniform", "uniform_plus", "erk")
         for s in (0.0, 0.5, 0.9, 0.99) for kind in ("random", "ties", "zeros")]


@pytest.mark.parametrize("method,sparsity,kind", CASES)
def test_single_process_equals_brute_force(method, sparsity, kind):
    tensors = _layers(int(sparsity * 100), kind)
    m = 5 if get_method(method).info.accepts_mt else 0
    try:
        expected = _expected(method, tensors, sparsity, m)
    except (AssertionError, InfeasibleError):
        with pytest.raises(InfeasibleError, match="largest reachable sparsity"):
            get_method(method).decide(_request(tensors, sparsity, m))
        return
    result = get_method(method).decide(_request(tensors, sparsity, m))
    for got, want in zip(_np(result.masks), expected):
        assert got.shape == want.shape and np.array_equal(got, want)
    n = sum(t.numel() for t in tensors)
    kept = sum(int(mask.sum()) for mask in result.masks)
    if method == "uniform":
        assert kept == sum(kept_budget(t.numel(), sparsity) for t in tensors)
    else:
        assert kept == kept_budget(n, sparsity)  # exactly K


@pytest.mark.parametrize("world_size", [2, 3, 4])
@pytest.mark.parametrize("method", ["global_mp", "lamp", "uniform", "uniform_plus", "erk", "random"])
def test_ranks_agree_bit_for_bit(method, world_size):
    tensors = _layers(3, "ties")
    m = 5 if get_method(method).info.accepts_mt else 0
    single = get_method(method).decide(_request(tensors, 0.9, m, seed=7))
    world = ThreadWorld(world_size)
    results = world.run(lambda rank, comm: get_method(method).decide(
        _request(tensors, 0.9, m, seed=7, comm=comm, rank=rank, world_size=world_size)))
    for result in results:
        for got, want in zip(result.masks, single.masks):
            assert torch.equal(got, want)
        assert result.mt_bound == single.mt_bound


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("kind", ["random", "ties", "zeros"])
def test_lamp_scores_through_split_shards(world_size, kind):
    """A global method's scores go through the same sharded protocol as |w| (layers cut across ranks)."""
    tensors = _layers(11, kind)
    scores = [lamp_scores(t) for t in tensors]
    sizes = [s.numel() for s in scores]
    pieces: list[list[Shard]] = [[] for _ in range(world_size)]
    for layer, s in enumerate(scores):
        flat = s.reshape(-1)
        bounds = np.linspace(0, flat.numel(), world_size + 1).astype(int)
        for r in range(world_size):
            pieces[(r + layer) % world_size].append(Shard(layer, int(bounds[r]), flat[bounds[r]:bounds[r + 1]]))
    world = ThreadWorld(world_size)
    results = world.run(lambda rank, comm: shard_masks(pieces[rank], decide(pieces[rank], sizes, 0.9, 5, comm), comm))
    expected = _expected("lamp", tensors, 0.9, 5)
    for rank, masks in enumerate(results):
        for shard, mask in zip(pieces[rank], masks):
            want = expected[shard.layer].reshape(-1)[shard.offset:shard.offset + shard.values.numel()]
            assert np.array_equal(mask.reshape(-1).numpy(), want)


@pytest.mark.parametrize("kind", ["random", "ties", "zeros"])
def test_lamp_scores_equal_the_definition(kind):
    for t in _layers(5, kind):
        assert np.array_equal(lamp_scores(t).numpy(), lamp_scores_bruteforce(t))
    assert lamp_scores(torch.zeros(4)).tolist() == [0.0] * 4  # an all-zero layer scores 0, not NaN


def test_uniform_plus_budget_rule():
    shapes = [tuple(t.shape) for t in _layers(0, "random")]
    sizes = [int(np.prod(s)) for s in shapes]
    for s in (0.5, 0.8, 0.9):
        kept = uniform_plus_kept(shapes, s)
        assert sum(kept) == kept_budget(sum(sizes), s)
        assert kept[0] == sizes[0]  # first layer dense
        assert 1 - kept[-1] / sizes[-1] <= 0.8 + 1e-12  # last at most 80% sparse
        middle = [1 - k / n for k, n in zip(kept[1:-1], sizes[1:-1])]
        common = (sum(sizes[1:-1]) - sum(kept[1:-1])) / sum(sizes[1:-1])
        assert all(abs(x - common) * n <= 1 for x, n in zip(middle, sizes[1:-1]))  # one common sparsity
    with pytest.raises(InfeasibleError, match="largest reachable sparsity"):
        uniform_plus_kept(shapes, 0.99)  # dense first layer + 80% cap on the last cannot reach it


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.99])
def test_erk_budget_matches_bisection(sparsity):
    shapes = [tuple(t.shape) for t in _layers(0, "random")] + [(3, 3)]  # (3, 3): density would exceed 1
    sizes = [int(np.prod(s)) for s in shapes]
    budget = kept_budget(sum(sizes), sparsity)
    kept = erk_kept(shapes, sparsity)
    assert sum(kept) == budget
    for k, target, n in zip(kept, erk_targets_bisection(shapes, budget), sizes):
        assert 0 <= k <= n and abs(k - target) < 1.0 + 1e-6


def test_apportion_respects_caps_and_total():
    assert apportion([0.5, 0.5, 0.5, 0.5], 2, [1, 1, 1, 1]) == [1, 1, 0, 0]  # ties: lower index first
    assert apportion([2.6, 0.2, 1.2], 4, [3, 1, 5]) == [3, 0, 1]


def test_random_counts_positions_and_ranks():
    tensors = _layers(1, "random")
    method = get_method("random")
    a = method.decide(_request(tensors, 0.9, seed=1)).masks
    b = method.decide(_request([t * 0 + 1 for t in tensors], 0.9, seed=1)).masks  # other weights, same seed
    c = method.decide(_request(tensors, 0.9, seed=2)).masks
    assert [int(m.sum()) for m in a] == uniform_kept([tuple(t.shape) for t in tensors], 0.9)
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # positions do not depend on the weights
    assert not all(torch.equal(x, y) for x, y in zip(a, c))  # they do depend on the seed
    big = max(a, key=lambda m: m.numel())
    kept_rows = big.float().mean(1)
    assert 0.0 < float(kept_rows.std()) and abs(float(big.float().mean()) - 0.1) < 1e-3  # spread, 10% kept


def test_registry_lists_every_method_with_its_needs():
    infos = {i.name: i for i in available()}
    assert list(infos)[:8] == ["global_mp", "uniform", "uniform_plus", "erk", "lamp", "snip", "synflow", "random"]
    assert {n for n, i in infos.items() if i.accepts_mt} == {"global_mp", "lamp", "snip", "synflow", "dpf"}
    assert {n for n, i in infos.items() if i.dynamic} == {"rigl", "dpf", "str"}
    assert {n for n, i in infos.items() if i.sparsity_is_outcome} == {"str"}
    assert {n for n, i in infos.items() if i.needs_data} == {"snip"}
    assert {"structured", "none"} <= set(infos)
    for name in ("uniform", "uniform_plus", "erk", "random"):
        with pytest.raises(UserError, match="takes no Minimum Threshold"):
            get_method(name).check([(10, 10)], ["w"], 0.5, 3, {}, has_data=True)
    with pytest.raises(UserError, match="--config"):
        get_method("snip").check([(10, 10)], ["w"], 0.5, 0, {}, has_data=False)
    with pytest.raises(UserError, match="did you mean 'lamp'"):
        get_method("lammp")


def test_dynamic_method_seam_installs_masks_from_gradients():
    """A RigL-shaped method plugs in through ``at_step`` alone: the controller hands it the gradients after
    backward and installs what it returns (checksum, weights zeroed, report) — no loop change needed."""
    from gmp_dist.config import load_config
    from gmp_dist.dist import DistContext
    from gmp_dist.engine.events import PruningController
    from gmp_dist.models import build_model
    from gmp_dist.pruning.methods import MethodInfo, PruningMethod, register, registry as method_registry

    class DropLargestGradient(PruningMethod):
        info = MethodInfo("test_drop_largest_grad", "test only", "-", "per_layer", dynamic=True)
        seen_steps: list[int] = []

        def at_step(self, ctx):
            self.seen_steps.append(ctx.step)
            if ctx.step != 1:
                return None
            masks = []
            for p in ctx.params:  # drop each layer's weight with the largest |grad|
                mask = torch.ones(p.shape, dtype=torch.bool)
                mask.view(-1)[int(p.grad.abs().argmax())] = False
                masks.append(mask)
            return masks

    method = register(DropLargestGradient())
    try:
        cfg = load_config(None, ["prune.method=test_drop_largest_grad"])
        torch.manual_seed(0)
        model = build_model("digits_cnn")
        controller = PruningController(cfg.prune, model, "digits_cnn", DistContext())
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
            grads = [p.grad.clone() for p in controller.pruner.params]
            controller.after_backward(step, optimizer)
            if step == 1:
                dropped = [int(g.abs().argmax()) for g in grads]
            optimizer.step()
            controller.pruner.apply()
        assert method.seen_steps == [0, 1, 2]
        for p, index in zip(controller.pruner.params, dropped):
            assert float(p.detach().view(-1)[index]) == 0.0 and int((p.detach() == 0).sum()) == 1
        assert controller.last_report["method"] == "test_drop_largest_grad"
        assert controller.last_report["kept_weights"] == controller.last_report["prunable_weights"] - len(dropped)
    finally:
        del method_registry._METHODS["test_drop_largest_grad"]
