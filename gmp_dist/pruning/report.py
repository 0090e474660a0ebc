"""Per-layer report, layer-collapse verdict and FLOPs pruned (design.md §3.8).

FLOPs convention (matches the paper's tables, taken from STR): multiply-accumulates of conv and linear
layers only; a layer's sparse MACs are its dense MACs times its density; FLOPs pruned = 1 − sparse/dense.
Collapse: a layer with no weight left cuts the network in two (paper §4). Dead output units (an output
channel or row with every weight pruned) are counted per layer; they are reported, not refused, because
at high sparsity many healthy networks have some.
"""

from __future__ import annotations

from typing import Sequence

import torch


def pruning_report(model_name: str, names: Sequence[str], masks: Sequence[torch.Tensor],
                   dense_macs: dict[str, int] | None = None, min_weights_per_layer: int = 0,
                   mt_bound: Sequence[bool] | None = None, threshold: float | None = None) -> dict:
    layers = []
    for i, (name, mask) in enumerate(zip(names, masks)):
        n, kept = mask.numel(), int(mask.sum())
        macs = int((dense_macs or {}).get(name, 0))
        dead = int((mask.reshape(mask.shape[0], -1).sum(1) == 0).sum()) if mask.dim() > 1 else 0
        layers.append({
            "name": name, "shape": list(mask.shape), "weights": n, "kept": kept,
            "sparsity": 1.0 - kept / n if n else 0.0, "dense_macs": macs,
            "sparse_macs": int(round(macs * kept / n)) if n else 0,
            "mt_bound": bool(mt_bound[i]) if mt_bound is not None else False,
            "dead_output_units": dead,
        })
    n_total = sum(layer["weights"] for layer in layers)
    kept_total = sum(layer["kept"] for layer in layers)
    dense_total = sum(layer["dense_macs"] for layer in layers)
    sparse_total = sum(layer["sparse_macs"] for layer in layers)
    return {
        "model": model_name,
        "prunable_weights": n_total,
        "kept_weights": kept_total,
        "sparsity": 1.0 - kept_total / n_total if n_total else 0.0,
        "threshold": None if threshold is None or threshold != threshold or abs(threshold) == float("inf") else threshold,
        "min_weights_per_layer": int(min_weights_per_layer),
        "dense_macs": dense_total,
        "sparse_macs": sparse_total,
        "flops_pruned": 1.0 - sparse_total / dense_total if dense_total else 0.0,
        "collapsed_layers": collapsed_layers(layers),
        "mt_bound_layers": [layer["name"] for layer in layers if layer["mt_bound"]],
        "layers": layers,
    }


def collapsed_layers(layers: Sequence[dict]) -> list[str]:
    return [layer["name"] for layer in layers if layer["kept"] == 0]


def format_report(report: dict, max_rows: int = 60) -> str:
    """A fixed-width table for terminals."""
    lines = [f"{'layer':40s} {'shape':>18s} {'weights':>10s} {'kept':>10s} {'sparsity':>9s} {'MT':>3s}"]
    for layer in report["layers"][:max_rows]:
        flag = "!" if layer["kept"] == 0 else ("*" if layer["mt_bound"] else "")
        lines.append(f"{layer['name'][:40]:40s} {str(tuple(layer['shape'])):>18s} {layer['weights']:>10,d}"
                     f" {layer['kept']:>10,d} {layer['sparsity']:>9.4f} {flag:>3s}")
    if len(report["layers"]) > max_rows:
        lines.append(f"... {len(report['layers']) - max_rows} more layers")
    lines.append(f"total: {report['kept_weights']:,} of {report['prunable_weights']:,} kept, sparsity"
                 f" {report['sparsity']:.4f}, FLOPs pruned {report['flops_pruned']:.4f},"
                 f" collapsed: {', '.join(report['collapsed_layers']) or 'none'}")
    return "\n".join(lines)
