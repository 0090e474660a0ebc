"""The GPU paths (design.md §7), skipped without CUDA; `make gpu-check` runs them on a lent device.

Each asserts numbers, not "it ran": decisions on CUDA tensors equal the CPU ones bit for bit, pruned
weights stay exactly zero through bf16 + channels_last and compiled steps, and runs on the GPU (local
runner, Ray Train) end with exactly the masks they decided; export and eval on the GPU agree exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from gmp_dist.pruning.global_mp import kept_budget, min_weights_from_pct
from gmp_dist.pruning.masks import global_magnitude_masks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
REPO = Path(__file__).resolve().parents[1]
GMP90 = REPO / "configs" / "quickstart" / "gmp90.yaml"
SPARSITY = 0.9


def _resnet50_weights(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """ResNet-50's prunable shapes, He-like scales; every third layer on a coarse grid (ties everywhere),
    one layer with exact and negative zeros."""
    import torchvision

    from gmp_dist.pruning.selection import prunable_parameters

    with torch.device("meta"):
        shapes = [tuple(p.shape) for _, p in prunable_parameters(torchvision.models.resnet50())]
    g = torch.Generator().manual_seed(0)
    out = []
    for i, shape in enumerate(shapes):
        t = torch.randn(shape, generator=g) * (2.0 / torch.Size(shape)[1:].numel()) ** 0.5
        if i % 3 == 0:
            t = torch.round(t * 512) / 512
        if i == 1:
            t[t.abs() < 0.01] = 0.0
            t.view(-1)[:7] = -0.0
        out.append(t.to(dtype))
    return out


@pytest.mark.parametrize("path", ["bracket", "radix"])
@pytest.mark.timeout(300)
def test_decision_on_cuda_equals_cpu_bit_for_bit(monkeypatch, path):
    from gmp_dist.pruning import global_mp

    monkeypatch.setattr(global_mp, "BRACKET_FIRST", path == "bracket")
    cpu = _resnet50_weights()
    n = sum(t.numel() for t in cpu)
    m = min_weights_from_pct(n, 0.05)
    masks_cpu, decision_cpu = global_magnitude_masks(cpu, SPARSITY, m)
    masks_gpu, decision_gpu = global_magnitude_masks([t.cuda() for t in cpu], SPARSITY, m)
    assert decision_gpu == decision_cpu
    assert all(mask.is_cuda for mask in masks_gpu)
    assert all(torch.equal(a, b.cpu()) for a, b in zip(masks_cpu, masks_gpu))
    assert sum(int(mask.sum()) for mask in masks_gpu) == kept_budget(n, SPARSITY)


@pytest.mark.timeout(300)
def test_bf16_decision_on_cuda_equals_cpu():
    cpu = _resnet50_weights(torch.bfloat16)[:20]
    masks_cpu, decision_cpu = global_magnitude_masks(cpu, SPARSITY, 500)
    masks_gpu, decision_gpu = global_magnitude_masks([t.cuda() for t in cpu], SPARSITY, 500)
    assert decision_gpu == decision_cpu
    assert all(torch.equal(a, b.cpu()) for a, b in zip(masks_cpu, masks_gpu))


def _masked(model: nn.Module, min_weights: int):
    from gmp_dist.pruning.apply import decide_masks
    from gmp_dist.pruning.pruner import MaskPruner
    from gmp_dist.pruning.selection import prunable_parameters

    named = prunable_parameters(model)
    pruner = MaskPruner(named)
    masks, _ = decide_masks([p.detach() for _, p in named], SPARSITY, min_weights)  # decided on the GPU
    pruner.set_masks(masks)
    return named, pruner, masks


def _train_steps(forward, model, pruner, x, y, steps: int) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        pruner.apply()
    return float(loss.detach())


def _assert_pruned_exactly_zero(named, masks, before) -> None:
    moved = 0
    for (name, param), mask, old in zip(named, masks, before):
        assert mask.is_cuda and mask.shape == param.shape
        assert int((param.detach()[~mask] != 0).sum()) == 0, name
        moved += int((param.detach()[mask] != old[mask]).sum())
    assert moved > 0  # the kept weights did train
    kept = sum(int(mask.sum()) for mask in masks)
    zeros = sum(int((param.detach() == 0).sum()) for _, param in named)
    total = sum(param.numel() for _, param in named)
    assert zeros >= total - kept and kept == kept_budget(total, SPARSITY)


@pytest.mark.timeout(300)
def test_masked_bf16_channels_last_step_keeps_pruned_weights_zero():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=100).cuda().to(memory_format=torch.channels_last)
    named, pruner, masks = _masked(model, 1000)
    before = [param.detach().clone() for _, param in named]
    x = torch.randn(16, 3, 96, 96, device="cuda").to(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (16,), device="cuda")
    loss = _train_steps(model, model, pruner, x, y, 3)
    assert torch.isfinite(torch.tensor(loss))
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_pruned_exactly_zero(named, masks, before)


@pytest.mark.timeout(400)
def test_torch_compile_with_masks_keeps_pruned_weights_zero():
    from gmp_dist.models import build_model

    torch.manual_seed(0)
    model = build_model("digits_cnn").cuda()
    named, pruner, masks = _masked(model, 20)
    before = [param.detach().clone() for _, param in named]
    compiled = torch.compile(model)
    x, y = torch.randn(64, 1, 8, 8, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    _train_steps(compiled, model, pruner, x, y, 4)
    _assert_pruned_exactly_zero(named, masks, before)
    with torch.no_grad():  # the compiled forward computes what the eager one does
        assert torch.allclose(compiled(x), model(x), atol=1e-4, rtol=1e-4)


def _sets(tmp: Path, data: Path, name: str, *extra: str) -> list[str]:
    return [f"name={name}", "model.pretrained=null", f"data.path={data}", "data.loader=torchvision",
            "train.epochs=2", "train.max_steps_per_epoch=6", f"checkpoint.storage_path={tmp / 'runs'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "experiment=gpu-check", "scaling.use_gpu=true",
            "scaling.num_workers=1", *extra]


def _check_checkpoint(folder: Path) -> Path:
    """The newest checkpoint of a run: its weights are zero exactly where its masks say, ~90% of them."""
    from gmp_dist import storage
    from gmp_dist.checkpoint import load_checkpoint

    # The one rule for "newest": Ray runs nest epoch folders in checkpoint_<time>/, the local runner does not.
    newest = storage.newest_checkpoint(storage.locate(folder))
    assert newest is not None, f"no checkpoint under {folder}"
    path = Path(newest.path)
    state = load_checkpoint(path)
    masks = state["pruner"]["masks"]
    kept = total = 0
    for name, mask in masks.items():
        weight = state["model"][name]
        assert int((weight[~mask] != 0).sum()) == 0, name
        kept, total = kept + int(mask.sum()), total + mask.numel()
    assert kept == kept_budget(total, SPARSITY)
    return path


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory, digits_dir) -> Path:
    """The local runner (no Ray), world size 1, ``scaling.use_gpu: true``: it trains in this process."""
    pytest.importorskip("mlflow", reason="the training path needs mlflow (carry its wheels to the GPU machine)")
    from gmp_dist.commands.train import preflight, run_training
    from gmp_dist.config import load_config

    tmp = tmp_path_factory.mktemp("gpu-local")
    cwd = os.getcwd()
    os.chdir(tmp)  # MLflow's sqlite store puts artifacts under ./mlruns of the cwd
    try:
        cfg = load_config(GMP90, _sets(tmp, digits_dir, "gpu-local", "scaling.use_ray=false"))
        preflight(cfg)
        torch.cuda.reset_peak_memory_stats()
        run_training(cfg)
        assert torch.cuda.max_memory_allocated() > 0  # the model and its batches lived on the GPU
    finally:
        os.chdir(cwd)
    return tmp / "runs" / "gpu-local"


@pytest.mark.timeout(400)
def test_local_runner_world_size_1_on_the_gpu(gpu_run):
    _check_checkpoint(gpu_run)


@pytest.mark.timeout(600)
def test_ray_torch_trainer_with_use_gpu_quickstart(tmp_path, digits_dir):
    pytest.importorskip("ray.train", reason="needs ray[train] (carry its wheels to the GPU machine)")
    cmd = [sys.executable, "-m", "gmp_dist", "train", str(GMP90),
           *[a for s in _sets(tmp_path, digits_dir, "gpu-ray") for a in ("--set", s)]]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=560,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    _check_checkpoint(tmp_path / "runs" / "gpu-ray")


@pytest.mark.timeout(300)
def test_export_and_eval_on_the_gpu(gpu_run, tmp_path, digits_dir, monkeypatch):
    from gmp_dist.cli import main

    monkeypatch.chdir(tmp_path)
    checkpoint = _check_checkpoint(gpu_run)
    exported = tmp_path / "model.sparse.pt"
    assert main(["export", str(checkpoint), "--out", str(exported), "--config", str(GMP90)]) == 0
    data = ["--set", f"data.path={digits_dir}", "--set", "data.loader=torchvision"]
    results = {}
    for source, device in ((checkpoint, "cuda"), (exported, "cuda"), (exported, "cpu")):
        out = tmp_path / f"{source.stem}-{device}.json"
        assert main(["eval", str(source), "--config", str(GMP90), *data, "--device", device, "--json", str(out)]) == 0
        results[(source.stem, device)] = json.loads(out.read_text())
    on_gpu, export_gpu, export_cpu = results.values()
    for key in ("val_top1", "val_top5", "val_samples", "sparsity", "zero_weights"):
        assert export_gpu[key] == on_gpu[key], key  # the export holds exactly the checkpoint's weights
    assert export_gpu["val_samples"] == 360
    assert export_gpu["sparsity"] == pytest.approx(SPARSITY, abs=1e-4)
    assert export_gpu["zero_weights"] == export_cpu["zero_weights"]
    assert abs(export_gpu["val_top1"] - export_cpu["val_top1"]) <= 100 / 360 + 1e-9  # GPU conv rounding: ≤ 1 sample
