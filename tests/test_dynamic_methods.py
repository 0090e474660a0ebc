"""The dynamic methods (RigL, DPF, STR) and the seam under them (design.md §3.10), against brute force.

- RigL: every update's dropped and grown sets equal a numpy reference; counts never change; grown weights
  and their momentum are zero after the update.
- The optimizer contract, checked at every step of the real training loop (SGD momentum and Adam): no
  pruned position holds a non-zero weight, gradient (after the hook) or optimizer state.
- DPF: pruned weights come back between updates; the final mask is at the target.
- Ranks agree by construction: LAMP and SynFlow on 2 ranks with deliberately different local scores.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from gmp_dist.config import load_config
from gmp_dist.dist import DistContext
from gmp_dist.engine.events import PruningController
from gmp_dist.errors import InfeasibleError
from gmp_dist.pruning.methods import PruneRequest, get_method
from gmp_dist.pruning.methods.rigl import drop_fraction, initial_kept
from gmp_dist.pruning.schedule import SMALLEST_ALIVE

from pruning_oracle import ThreadWorld


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10))


def _batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(count)]


def _controller(model, method: str, *sets: str) -> PruningController:
    cfg = load_config(None, [f"prune.method={method}", "prune.sparsity=0.8", *sets])
    return PruningController(cfg.prune, model, "mlp", DistContext())


def _rigl_reference(weight: np.ndarray, grad: np.ndarray, mask: np.ndarray, count: int) -> np.ndarray:
    """Drop the ``count`` active weights of smallest |w|, grow the ``count`` largest |grad| among the rest
    (ties: lower flat index kept / grown first), by sorting — no radix, no torch."""
    w, g, m = np.abs(weight.reshape(-1)), np.abs(grad.reshape(-1)), mask.reshape(-1)
    active = np.flatnonzero(m)
    order = sorted(active, key=lambda i: (-max(w[i], SMALLEST_ALIVE), i))
    kept = np.zeros_like(m)
    kept[order[: len(active) - count]] = True
    candidates = np.flatnonzero(~kept)
    grow = sorted(candidates, key=lambda i: (-max(g[i], SMALLEST_ALIVE), i))[:count]
    new = kept.copy()
    new[grow] = True
    return new.reshape(mask.shape)


def test_rigl_updates_equal_brute_force_and_keep_counts():
    model = _mlp()
    controller = _controller(model, "rigl", "prune.rigl.update_every=3", "prune.rigl.alpha=0.4")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    controller.set_horizon(1, 30)  # T_end = 0.75 x 30 = 22: updates at 3, 6, ..., 21
    controller.prune(0, optimizer)
    shapes = [tuple(p.shape) for p in controller.pruner.params]
    counts = [int(m.sum()) for m in controller.pruner.mask_list()]
    assert counts == initial_kept(shapes, 0.8, "erk", False)
    updates, changed = 0, 0
    for step, (inputs, targets) in enumerate(_batches(30)):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        before = [m.clone() for m in controller.pruner.mask_list()]
        state = [(p.detach().numpy().copy(), p.grad.numpy().copy()) for p in controller.pruner.params]
        controller.after_backward(step, optimizer)
        after = controller.pruner.mask_list()
        if step % 3 == 0 and 0 < step < 22:
            updates += 1
            fraction = drop_fraction(step, 22, 0.4)
            for (w, g), old, new, p in zip(state, before, after, controller.pruner.params):
                want = _rigl_reference(w, g, old.numpy(), math.floor(fraction * int(old.sum())))
                assert np.array_equal(new.numpy(), want)
                grown = new & ~old
                changed += int(grown.sum())
                assert bool((p.detach()[grown] == 0).all())
                buf = optimizer.state[p]["momentum_buffer"]
                assert bool((buf[grown] == 0).all()) and bool((buf[~new] == 0).all())
        else:
            assert all(torch.equal(a, b) for a, b in zip(before, after))
        assert [int(m.sum()) for m in after] == counts  # per-layer counts never change
        optimizer.step()
        controller.after_step(step, optimizer)
    assert updates == 7 and changed > 0 and controller.method.updates == 7


def test_rigl_initial_allocation_dense_first_layer_and_mt_floor():
    shapes = [(48, 64), (32, 48), (10, 32)]
    kept = initial_kept(shapes, 0.3, "erk", True)
    n = sum(math.prod(s) for s in shapes)
    assert kept[0] == 48 * 64 and sum(kept) == n - round(0.3 * n)
    with pytest.raises(InfeasibleError, match="dense_first_layer"):
        initial_kept(shapes, 0.8, "erk", True)
    floored = initial_kept(shapes, 0.9, "uniform", False, min_weights=100)
    assert sum(floored) == n - round(0.9 * n) and min(floored) >= 100


class _InvariantController(PruningController):
    """The real controller, asserting design.md §3.10 after each hook the loop calls."""

    checks = 0

    def after_backward(self, step, optimizer):
        super().after_backward(step, optimizer)
        if self.pruner.has_masks and not self.method.dense_updates_now(step, self.total_steps):
            for p, m in zip(self.pruner.params, self.pruner.mask_list()):
                assert p.grad is None or bool((p.grad[~m] == 0).all()), f"gradient at a pruned position, step {step}"

    def after_step(self, step, optimizer):
        super().after_step(step, optimizer)
        if not self.pruner.has_masks or self.method.dense_updates_now(step + 1, self.total_steps):
            return
        for p, m in zip(self.pruner.params, self.pruner.mask_list()):
            assert bool((p.detach()[~m] == 0).all()), f"weight at a pruned position, step {step}"
            for key, buf in optimizer.state[p].items():
                if isinstance(buf, torch.Tensor) and buf.shape == p.shape:
                    assert bool((buf[~m] == 0).all()), f"{key} at a pruned position, step {step}"
        type(self).checks += 1


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", ["global_mp", "rigl", "dpf"])
def test_pruned_positions_hold_zero_weight_gradient_and_state_every_step(method, optimizer, digits_dir, tmp_path,
                                                                          monkeypatch):
    from gmp_dist.commands.train import run_training
    from gmp_dist.engine import loop

    monkeypatch.setattr(loop, "PruningController", _InvariantController)
    _InvariantController.checks = 0
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [
        "name=invariant", "scaling.use_ray=false", "data.loader=torchvision", f"data.path={digits_dir}",
        f"checkpoint.storage_path={tmp_path / 'runs'}", "tracking.enabled=false", f"prune.method={method}",
        "prune.sparsity=0.9", "train.epochs=2", "train.max_steps_per_epoch=12", f"train.optimizer={optimizer}",
        "train.lr=0.01", "train.weight_decay=0.001", "prune.rigl.update_every=4", "prune.dpf.update_every=4",
        "prune.dpf.end_fraction=0.5"])
    result = run_training(cfg)
    expected = 24 if method != "dpf" else 12  # DPF: fixed-mask rules from its last update (step 12) on
    assert _InvariantController.checks == expected
    assert abs(result["sparsity"] - 0.9) < 1e-4


def test_dpf_pruned_weights_come_back_and_the_final_mask_is_at_the_target():
    model = _mlp()
    controller = _controller(model, "dpf", "prune.dpf.update_every=2", "prune.dpf.end_fraction=0.8")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    controller.set_horizon(1, 40)  # last update at step 32
    controller.prune(0, optimizer)
    masks_seen = []
    for step, (inputs, targets) in enumerate(_batches(40)):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        controller.after_backward(step, optimizer)
        optimizer.step()
        controller.after_step(step, optimizer)
        masks_seen.append([m.clone() for m in controller.pruner.mask_list()])
        for p, m in zip(controller.pruner.params, controller.pruner.mask_list()):
            assert bool((p.detach()[~m] == 0).all())  # the forward pass always sees exact zeros
    revived = sum(int((later & ~earlier).sum()) for a, b in zip(masks_seen[4:33], masks_seen[5:33])
                  for earlier, later in zip(a, b))
    assert revived > 0  # a pruned weight whose dense value grew back is kept again at a later update
    total = sum(p.numel() for p in controller.pruner.params)
    kept = sum(int(m.sum()) for m in controller.pruner.mask_list())
    assert abs(kept - (total - round(0.8 * total))) <= 1
    assert all(torch.equal(a, b) for a, b in zip(masks_seen[32], masks_seen[-1]))  # final from step 32 on
    assert controller.method.residual is None


def _perturbed_decide(method: str, rank: int, comm, world_size: int = 2) -> list[np.ndarray]:
    """Each rank scores a copy of the model whose weights differ from the others by ~1%."""
    model = _mlp()
    with torch.no_grad():
        g = torch.Generator().manual_seed(100 + rank)
        for p in model.parameters():
            p.mul_(1 + 1e-2 * torch.randn(p.shape, generator=g))
    params = [m.weight for m in model if isinstance(m, nn.Linear)]
    request = PruneRequest([f"l{i}" for i in range(len(params))], [p.detach() for p in params], 0.9, 0,
                           options={"iterations": 5}, model=model, params=params, input_shape=(1, 8, 8),
                           comm=comm, rank=rank if world_size > 1 else 0, world_size=world_size)
    request.names = [n for n, p in model.named_parameters() if n.endswith("weight")]
    return [m.numpy() for m in get_method(method).decide(request).masks]


@pytest.mark.parametrize("method", ["lamp", "synflow"])
def test_ranks_agree_by_construction_with_different_local_scores(method):
    results = ThreadWorld(2).run(lambda rank, comm: _perturbed_decide(method, rank, comm))
    assert all(np.array_equal(a, b) for a, b in zip(*results))
    # ...where each rank building every mask from its own scores would have disagreed:
    from gmp_dist.pruning.global_mp import LOCAL

    alone = [_perturbed_decide(method, rank, LOCAL, world_size=1) for rank in range(2)]
    assert not all(np.array_equal(a, b) for a, b in zip(*alone))


def _rigl_rank(rank: int, port: int, out) -> None:
    from gmp_dist.dist import local_group

    torch.set_num_threads(1)
    with local_group(rank, 2, port):
        model = _mlp()
        controller = PruningController(load_config(None, ["prune.method=rigl", "prune.sparsity=0.8",
                                                          "prune.rigl.update_every=2"]).prune,
                                       model, "mlp", DistContext(rank, 2))
        net = nn.parallel.DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        controller.set_horizon(1, 12)
        controller.prune(0, optimizer)
        for step, (inputs, targets) in enumerate(_batches(12, seed=10 + rank)):  # each rank its own batches
            optimizer.zero_grad()
            nn.functional.cross_entropy(net(inputs), targets).backward()
            controller.after_backward(step, optimizer)
            optimizer.step()
            controller.after_step(step, optimizer)
        inputs, targets = _batches(1, seed=10 + rank)[0]
        local_loss = float(nn.functional.cross_entropy(model(inputs), targets))  # differs: the data differ
        out.put((rank, [m.numpy() for m in controller.pruner.mask_list()], controller.method.updates, local_loss))


def test_rigl_on_two_gloo_ranks_with_different_batches_keeps_identical_masks():
    import socket

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rigl_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, rest) for r, *rest in (queue.get() for _ in range(2)))
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    (masks0, updates0, loss0), (masks1, updates1, loss1) = results[0], results[1]
    assert updates0 == updates1 == 4  # steps 2, 4, 6, 8 (T_end = 9)
    assert loss0 != loss1  # the ranks did see different data
    assert all(np.array_equal(a, b) for a, b in zip(masks0, masks1))
    initial = get_method("rigl").decide(PruneRequest(
        [str(i) for i in range(3)], [m.weight.detach() for m in _mlp() if isinstance(m, nn.Linear)], 0.8)).masks
    assert any(not np.array_equal(a, b.numpy()) for a, b in zip(masks0, initial))  # the updates moved masks


def test_gradual_event_keeps_exactly_k_when_the_cut_lands_on_zero():
    """Alive weights that trained to exactly 0 must outrank pruned ones, or ``new & old`` keeps fewer than K."""
    model = nn.Sequential(nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1, 101, dtype=torch.float32).reshape(10, 10))  # |w| rises with index
    cfg = load_config(None, ["prune.schedule=gradual", "prune.sparsity=0.55", "prune.gradual.initial_sparsity=0.5",
                             "prune.gradual.start=0", "prune.gradual.end=1", "prune.gradual.shape=linear",
                             "prune.gradual.unit=step"])
    controller = PruningController(cfg.prune, model, "one", DistContext())
    controller.prune(0, None)  # keeps the top 50: flat indices 50..99
    first = controller.pruner.mask_list()[0].clone()
    assert int(first.sum()) == 50 and bool(first.view(-1)[50:].all())
    with torch.no_grad():
        model[0].weight.view(-1)[50:95] = 0.0  # 45 alive weights reach exactly zero; 5 non-zero remain
    controller.prune(1, None)  # K = 45: the cut lands on the value 0, where pruned positions come first by index
    second = controller.pruner.mask_list()[0]
    assert int(second.sum()) == 45 and not bool((second & ~first).any())
