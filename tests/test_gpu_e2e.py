"""bench/gpu_e2e.py (the end-to-end part of `make gpu-check`) on the CPU with small sizes: the JPEGs are
written and converted, every figure is there, and the loader epochs deliver the batches asked for."""

from __future__ import annotations

import pytest

from bench import gpu_e2e


def test_endtoend_part_runs_on_cpu_with_every_figure(monkeypatch):
    seen = []
    rate = gpu_e2e._rate

    def counting(step, batches, device):
        seen.append(len(batches) if hasattr(batches, "__len__") else None)
        return rate(step, batches, device)

    monkeypatch.setattr(gpu_e2e, "_rate", counting)
    figures = gpu_e2e.endtoend_figures(device="cpu", model_name="resnet18", batch=4, steps=2, rounds=1, classes=2,
                                       jpeg_size=(96, 72), compile_model=False, workers=2)
    kind = next(k for k in ("ffcv", "torchvision") if f"resnet18_e2e_images_per_sec_{k}" in figures)
    assert set(figures) == {"resnet18_eager_images_per_sec_dense", "resnet18_eager_images_per_sec_masked",
                            "resnet18_eager_masked_over_dense", f"resnet18_e2e_images_per_sec_{kind}",
                            f"resnet18_e2e_over_synthetic_{kind}"}
    assert all(len(f["repeats"]) == 1 and f["value"] > 0 for f in figures.values())
    # 2 rounds (warm-up + 1) x (dense, masked, loader), each steps + 1 = 3 batches: ceil(4 x 3 / 2) = 6 JPEGs
    # per class, 12 in all, 3 loader batches of 4 per epoch.
    assert seen == [3, 3, 3] * 2
    assert figures["resnet18_e2e_over_synthetic_" + kind]["target"] == pytest.approx(0.8)
