"""Compact sparse model files (design.md §5): kept values plus a 1-bit mask per pruned tensor.

Layout (``format: "gmp-dist-sparse/1"``), readable with ``torch.load(weights_only=True)``::

    {
      "format": "gmp-dist-sparse/1",
      "bit_order": "big",            # like numpy.packbits: bit 7 of byte 0 is element 0
      "order": [state_dict keys in their original order],
      "sparse": {name: {"shape": [int, ...], "dtype": "float32", "numel": int,
                        "values": 1-D tensor of the kept values in flat (row-major) order, same dtype,
                        "mask_bits": 1-D uint8 tensor, ceil(numel / 8) bytes}},
      "dense": {name: tensor},       # unmasked tensors: BN statistics, biases, ...
    }

A float32 tensor at sparsity s takes (1 - s) + 1/32 of its dense size; ``import_sparse`` rebuilds the
dense state_dict bit for bit, with exact zeros at pruned positions.
"""

from __future__ import annotations

import math

import torch

SPARSE_FORMAT = "gmp-dist-sparse/1"
BIT_ORDER = "big"
# Bit weights of one packed byte, most significant first (numpy.packbits' default order).
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
_BIT_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flat bool mask -> uint8 bytes, big bit order, zero-padded to a whole byte."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # uint8 products of 0/1 by distinct powers of two never overflow when summed within a byte.
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.int32).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a flat bool tensor."""
    bits = (packed.reshape(-1, 1) >> _BIT_SHIFTS) & 1
    return bits.reshape(-1)[:numel].to(torch.bool)


def export_sparse(state_dict: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> dict:
    """Pack every masked tensor as kept values + mask bits; store the others dense."""
    unknown = [name for name in masks if name not in state_dict]
    if unknown:
        raise ValueError(f"masks name tensors the state_dict does not hold: {', '.join(unknown[:8])}")
    sparse: dict[str, dict] = {}
    dense: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        mask = masks.get(name)
        if mask is None:
            dense[name] = tensor.clone()  # a view would make torch.save write its whole storage
            continue
        mask = mask.detach().cpu().to(torch.bool)
        if tuple(mask.shape) != tuple(tensor.shape):
            raise ValueError(f"mask of {name} has shape {tuple(mask.shape)}, the tensor {tuple(tensor.shape)}")
        flat_mask = mask.reshape(-1)
        sparse[name] = {
            "shape": [int(d) for d in tensor.shape],
            "dtype": str(tensor.dtype).removeprefix("torch."),
            "numel": int(tensor.numel()),
            "values": tensor.reshape(-1)[flat_mask].clone(),
            "mask_bits": pack_bits(flat_mask),
        }
    return {"format": SPARSE_FORMAT, "bit_order": BIT_ORDER, "order": list(state_dict),
            "sparse": sparse, "dense": dense}


def import_sparse(exported: dict) -> dict[str, torch.Tensor]:
    """Rebuild the dense state_dict (pruned positions are exact zeros)."""
    if not is_sparse_export(exported):
        raise ValueError(f"not a {SPARSE_FORMAT} export (format={exported.get('format')!r})"
                         if isinstance(exported, dict) else f"not a {SPARSE_FORMAT} export")
    rebuilt: dict[str, torch.Tensor] = {}
    for name, entry in exported["sparse"].items():
        numel = int(entry["numel"])
        flat_mask = unpack_bits(entry["mask_bits"], numel)
        values = entry["values"]
        kept = int(flat_mask.sum())
        if kept != values.numel():
            raise ValueError(f"sparse export entry {name}: mask keeps {kept} values but {values.numel()} are stored")
        dtype = getattr(torch, entry["dtype"])
        flat = torch.zeros(numel, dtype=dtype)
        flat[flat_mask] = values.to(dtype)
        rebuilt[name] = flat.reshape(entry["shape"])
    rebuilt.update(exported["dense"])
    order = [name for name in exported.get("order", []) if name in rebuilt]
    return {name: rebuilt[name] for name in order + [n for n in rebuilt if n not in set(order)]}


def is_sparse_export(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == SPARSE_FORMAT


def masks_of(exported: dict) -> dict[str, torch.Tensor]:
    """The bool masks an export carries, shaped like their tensors."""
    return {name: unpack_bits(entry["mask_bits"], int(entry["numel"])).reshape(entry["shape"])
            for name, entry in exported["sparse"].items()}


def sparse_stats(exported: dict) -> dict[str, float]:
    """Kept and total counts over the masked tensors, and the resulting sparsity."""
    total = sum(int(entry["numel"]) for entry in exported["sparse"].values())
    kept = sum(int(entry["values"].numel()) for entry in exported["sparse"].values())
    return {"masked_weights": total, "kept_weights": kept,
            "sparsity": (1.0 - kept / total) if total else math.nan}
