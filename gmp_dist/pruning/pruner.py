"""Masks held during training (design.md §3.6, §3.10): gradients masked before every optimizer step,
weights re-zeroed after it, optimizer state zeroed wherever a mask changes.

The invariant this keeps at every step, for SGD momentum and Adam moments alike: a pruned position holds
weight 0, gradient 0 (after :meth:`mask_gradients`) and optimizer state 0. Masking the gradient is what
keeps the state at 0 between mask changes (the update of a zero weight with a zero gradient is zero,
weight decay included); a mask change zeroes the state of every position that was pruned before or is
pruned now, so a grown weight starts at 0 with no stale momentum.

``torch.nn.utils.prune`` re-multiplies on every forward and keeps a second copy of every weight; we
keep one bool mask per tensor (the state that is checkpointed) plus a multiplier in the weight's dtype
and device, so :meth:`apply` is one fused ``torch._foreach_mul_`` over all pruned tensors.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn


class MaskPruner:
    def __init__(self, named_params: Sequence[tuple[str, nn.Parameter]]):
        self.names = [name for name, _ in named_params]
        self.params = [param for _, param in named_params]
        self.masks: dict[str, torch.Tensor] = {}
        self._weights: list[torch.Tensor] = []
        self._multipliers: list[torch.Tensor] = []

    @property
    def has_masks(self) -> bool:
        return bool(self.masks)

    def set_masks(self, masks: Sequence[torch.Tensor] | dict[str, torch.Tensor], grow_only: bool = True) -> None:
        """Install masks (canonical order or by name). ``grow_only``: a pruned weight stays pruned."""
        by_name = masks if isinstance(masks, dict) else dict(zip(self.names, masks))
        for name, param in zip(self.names, self.params):
            new = by_name[name].to(device=param.device, dtype=torch.bool)
            if new.shape != param.shape:
                raise ValueError(f"mask for {name} has shape {tuple(new.shape)}, the weight {tuple(param.shape)}")
            if grow_only and name in self.masks:
                new = new & self.masks[name].to(param.device)
            self.masks[name] = new
        self._weights = [p.data for p in self.params]
        self._multipliers = [self.masks[n].to(p.dtype) for n, p in zip(self.names, self.params)]
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights in place; call right after ``optimizer.step()``."""
        if self._weights:
            torch._foreach_mul_(self._weights, self._multipliers)

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero the gradients of pruned weights; call between ``loss.backward()`` and ``optimizer.step()``."""
        if not self._weights:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        mults = [m for p, m in zip(self.params, self._multipliers) if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, mults)

    @torch.no_grad()
    def zero_optimizer_state(self, optimizer: torch.optim.Optimizer,
                             keep: Optional[Sequence[torch.Tensor]] = None) -> None:
        """Zero momentum (SGD) / moments (Adam) outside ``keep`` (bool, canonical order; default: the
        current masks), so pruned weights are not pushed back and grown ones start without stale state."""
        keeps = self._multipliers if keep is None else [k.to(p.device, p.dtype) for k, p in zip(keep, self.params)]
        for param, mult in zip(self.params, keeps):
            state = optimizer.state.get(param, {})
            for key in ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                buf = state.get(key)
                if isinstance(buf, torch.Tensor) and buf.shape == mult.shape:
                    buf.mul_(mult.to(buf.dtype))

    @torch.no_grad()
    def reset_outside(self, keep: Sequence[torch.Tensor], optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Weight 0 and optimizer state 0 wherever ``keep`` is False (pruned, or grown just now)."""
        torch._foreach_mul_([p.data for p in self.params], [k.to(p.device, p.dtype) for k, p in zip(keep, self.params)])
        if optimizer is not None:
            self.zero_optimizer_state(optimizer, keep)

    def mask_list(self) -> list[torch.Tensor]:
        return [self.masks[name] for name in self.names]

    def measured_sparsity(self) -> float:
        """Zeros among prunable weights / prunable weights, from the tensors themselves."""
        zeros = sum(int((p.detach() == 0).sum()) for p in self.params)
        return zeros / max(1, sum(p.numel() for p in self.params))

    def state_dict(self) -> dict:
        return {"names": list(self.names), "masks": {n: m.cpu() for n, m in self.masks.items()}}

    def load_state_dict(self, state: dict) -> None:
        masks = state.get("masks") or {}
        if not masks:
            return
        missing = [n for n in self.names if n not in masks]
        unexpected = [n for n in masks if n not in self.names]
        if missing or unexpected:
            raise ValueError(f"masks do not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        self.masks = {}
        self.set_masks(masks, grow_only=False)
