"""STR: Kusupati, Ramanujan, Somani, Wortsman, Jain, Kakade & Farhadi, "Soft Threshold Weight
Reparameterization for Learnable Sparsity" (ICML 2020); reference code RAIVNLab/STR.

Every prunable tensor is used as sign(w) · relu(|w| − sigmoid(s)), with one learnable s per layer
(``s_init`` at the start; its own weight decay, which pulls s up towards 0 and so raises the threshold).
The sparsity is an outcome of training, not a target: ``prune.sparsity`` is ignored, the run reports the
sparsity it reached, and a study gives STR points by ``s_init``.

The reparameterisation is a ``torch.nn.utils.parametrize`` parametrisation registered by ``transform``
before DDP, ``torch.compile`` and the optimizer, so s is an ordinary parameter (all-reduced by DDP,
checkpointed with the model). ``plain_state_dict`` folds it away: ``final.pt``, the MLflow Model and the
sparse export hold plain weights whose zeros are exactly the reported sparsity.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
from pydantic import Field
from torch.nn.utils import parametrize

from gmp_dist.pruning.methods.base import LEARNED, MethodInfo, MethodOptions, PruneRequest, PruneResult, PruningMethod
from gmp_dist.pruning.methods.registry import register

_THRESHOLD = ".parametrizations.{}.0.s"


class StrOptions(MethodOptions):
    """prune.str: the threshold parameters' start and weight decay."""

    s_init: float = -5.0  # sigmoid(-5) = 0.0067: the initial threshold on |w|
    # Weight decay of s; None: train.weight_decay (as the reference code's --st-decay default).
    s_weight_decay: Optional[float] = Field(default=None, ge=0.0)


def soft_threshold(weight: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """sign(w) · relu(|w| − sigmoid(s)): exact zeros below the threshold."""
    return torch.sign(weight) * torch.relu(weight.abs() - torch.sigmoid(s).to(weight.dtype))


class SoftThreshold(nn.Module):
    def __init__(self, s_init: float, device: torch.device):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(float(s_init), device=device))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return soft_threshold(weight, self.s)


def _split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


class STR(PruningMethod):
    info = MethodInfo("str", "learned per-layer soft thresholds: sign(w)·relu(|w| − sigmoid(s)); sparsity is learned",
                      "Kusupati et al. 2020, Soft Threshold Weight Reparameterization (ICML)", LEARNED, dynamic=True,
                      options=StrOptions)

    def __init__(self) -> None:
        self.names: list[str] = []

    def decide(self, request: PruneRequest) -> PruneResult:
        """No mask: the thresholds make the zeros (all-true masks keep the engine's bookkeeping uniform)."""
        masks = [torch.ones(t.shape, dtype=torch.bool, device=t.device) for t in request.tensors]
        return PruneResult(masks, [False] * len(masks))

    def transform(self, model: nn.Module, names: Sequence[str], options) -> None:
        opts = self.opts(options)
        self.names = list(names)
        for name in self.names:
            module_name, attr = _split(name)
            module = model.get_submodule(module_name)
            device = getattr(module, attr).device
            parametrize.register_parametrization(module, attr, SoftThreshold(opts.s_init, device))

    def thresholds(self, model: nn.Module) -> list[nn.Parameter]:
        return [model.get_submodule(_split(n)[0]).parametrizations[_split(n)[1]][0].s for n in self.names]

    def optimizer_groups(self, model: nn.Module, options) -> list[dict]:
        opts = self.opts(options)
        group: dict = {"params": self.thresholds(model)}
        if opts.s_weight_decay is not None:
            group["weight_decay"] = opts.s_weight_decay
        return [group]

    def effective_weights(self, model, names, params) -> list[torch.Tensor]:
        with torch.no_grad():
            return [getattr(model.get_submodule(_split(n)[0]), _split(n)[1]).detach() for n in names]

    def plain_state_dict(self, state: dict, options) -> dict:
        out = {}
        for key, value in state.items():
            if ".parametrizations." not in key:
                out[key] = value
        for key, value in state.items():
            head, sep, tail = key.partition(".parametrizations.")
            if sep and tail.endswith(".original"):
                attr = tail[: -len(".original")]
                out[f"{head}.{attr}"] = soft_threshold(value, state[head + _THRESHOLD.format(attr)])
        return out


register(STR())
