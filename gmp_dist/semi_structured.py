"""2:4 semi-structured export (``gmp-dist export --format semi-structured``) and its loader.

What the file holds, and why. ``torch.sparse.to_sparse_semi_structured`` turns a 2:4 CUDA matrix into a
``SparseSemiStructuredTensor`` (cuSPARSELt's compressed values + metadata, or CUTLASS's). That object
pickles by class reference, which ``torch.load(weights_only=True)`` refuses (gmp-dist loads every file that
way; checked with torch 2.14), and its compressed layout belongs to the backend and library build that
made it (torch calls the API a prototype). So the file holds the plain state_dict, whose 2:4 weights carry
their exact zeros, plus a manifest naming the Linear weights that the exporting machine's torch accepted:
each is converted there with ``to_sparse_semi_structured`` on the GPU, so a layer that cannot be (shape
below the kernels' minimum, say) is named as dense instead of failing at load time.
:func:`load_semi_structured` converts the named weights on the loading machine's GPU, torch's documented
recipe (``module.weight = nn.Parameter(to_sparse_semi_structured(weight))``). The file is as large as the
dense state_dict; for a small file use the default ``--format sparse`` (kept values + 1-bit masks).

Layout (``format: "gmp-dist-semi-structured/1"``), readable with ``torch.load(weights_only=True)``::

    {"format": "gmp-dist-semi-structured/1", "pattern": "2:4", "dtype": "bfloat16",
     "backend": "cusparselt" | "cutlass", "torch": "2.14.1+cu130",
     "semi_structured": [Linear weight names, converted at load],
     "dense": {name: why it stays dense},          # convolutions, in-features not a multiple of 4, ...
     "state_dict": {name: tensor}}                  # the model's state_dict as exported, dtypes kept

Which tensors must be 2:4: every masked Linear weight whose in-features are a multiple of 4 (a layer the
pattern cannot fit is left dense, as ``prune.method: n_m`` leaves it); one with more than 2 non-zeros in
any group of 4 refuses the export, named. Convolutions keep their (channels-last) 2:4 zeros in dense
storage: torch has no semi-structured convolution.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn

from gmp_dist.errors import UserError
from gmp_dist.pruning.n_m import group_nonzeros

SEMI_FORMAT = "gmp-dist-semi-structured/1"
N, M = 2, 4
NO_DEVICE = ("semi-structured export needs a CUDA device with sparse tensor cores (compute capability ≥ 8.0);"
             " this machine has none; the 2:4 masks are in the state_dict already")


def plan_layers(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                linear_names: Optional[set[str]] = None) -> tuple[list[str], dict[str, str]]:
    """``(Linear weights to convert, {name: why it stays dense})`` in state_dict order. ``linear_names``:
    the model's nn.Linear weights outside attention modules (:func:`linear_weight_names`); without a model, a
    2-D tensor called ``<module>.weight``, but not ``out_proj.weight`` (nn.MultiheadAttention's fused path
    reads its projections directly, so they stay dense). A Linear weight that should be 2:4 and is not
    raises :class:`UserError` naming it."""
    convert: list[str] = []
    dense: dict[str, str] = {}
    not_2to4: list[str] = []
    for name in [k for k in weights if k in masks]:
        tensor = weights[name] * masks[name].to(torch.bool)
        linear = name in linear_names if linear_names is not None else (
            tensor.dim() == 2 and name.rsplit(".", 1)[-1] == "weight" and not name.endswith("out_proj.weight"))
        if not linear:
            dense[name] = ("a convolution (torch has no semi-structured convolution; its zeros stay as they are)"
                           if tensor.dim() > 2 else "not an nn.Linear weight outside attention (nn.MultiheadAttention"
                                                    " reads its projections directly)")
        elif tensor.shape[1] % M:
            dense[name] = f"in-features {tensor.shape[1]} not a multiple of {M}"
        else:
            counts = group_nonzeros(tensor, M)
            bad = int((counts > N).sum())
            if bad:
                not_2to4.append(f"{name} ({bad:,} of {counts.numel():,} groups of {M} hold more than {N} non-zeros)")
            else:
                convert.append(name)
    if not_2to4:
        raise UserError(f"not 2:4: {'; '.join(not_2to4[:8])}{' and more' if len(not_2to4) > 8 else ''}. Prune"
                        " with `gmp-dist prune --method n_m --n-m 2:4` (or prune.method: n_m), or use --format"
                        " sparse")
    if not convert:
        raise UserError(f"no Linear weight to convert to 2:4 semi-structured: {_reasons(dense)}")
    return convert, dense


def linear_weight_names(model: nn.Module) -> set[str]:
    """``<module>.weight`` of every nn.Linear that is not part of an nn.MultiheadAttention."""
    attention = {f"{name}.{child}" if name else child for name, module in model.named_modules()
                 if isinstance(module, nn.MultiheadAttention) for child, _ in module.named_modules() if child}
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name not in attention}


def _reasons(dense: dict[str, str]) -> str:
    shown = "; ".join(f"{name}: {why}" for name, why in list(dense.items())[:8])
    return shown + (f" and {len(dense) - 8} more" if len(dense) > 8 else "") if dense else "no masked tensors"


def require_sparse_tensor_cores() -> None:
    """UserError unless this machine has a CUDA device of compute capability >= 8.0 (Ampere or later)."""
    if not torch.cuda.is_available():
        raise UserError(NO_DEVICE)
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise UserError(f"semi-structured export needs a CUDA device with sparse tensor cores (compute capability"
                        f" ≥ 8.0); this machine's {torch.cuda.get_device_name()} has {major}.{minor}; the 2:4 masks"
                        " are in the state_dict already")


def _to_semi_structured(weight: torch.Tensor) -> torch.Tensor:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if not torch.backends.cusparselt.is_available():
        SparseSemiStructuredTensor._FORCE_CUTLASS = True  # torch's documented fallback without cuSPARSELt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "prototype stage" notice
        return to_sparse_semi_structured(weight.contiguous())


def export_semi_structured(weights: dict[str, torch.Tensor], convert: list[str], dense: dict[str, str],
                           dtype: torch.dtype = torch.bfloat16) -> dict:
    """The export file's contents (see the module docstring); converts every layer once on CUDA to check it."""
    require_sparse_tensor_cores()
    dense = dict(dense)
    accepted, backend = [], None
    for name in convert:
        try:
            sparse = _to_semi_structured(weights[name].detach().to("cuda", dtype))
        except RuntimeError as exc:
            dense[name] = f"not accepted by to_sparse_semi_structured: {str(exc).strip().splitlines()[0]}"
            continue
        accepted.append(name)
        backend = type(sparse).BACKEND
        del sparse
    if not accepted:
        raise UserError(f"to_sparse_semi_structured accepted none of the 2:4 Linear weights: {_reasons(dense)}")
    return {"format": SEMI_FORMAT, "pattern": f"{N}:{M}", "dtype": str(dtype).removeprefix("torch."),
            "backend": backend, "torch": torch.__version__, "semi_structured": accepted, "dense": dense,
            "state_dict": {k: v.detach().cpu().clone() for k, v in weights.items()}}


def is_semi_structured_export(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == SEMI_FORMAT


def load_semi_structured(model: nn.Module, exported: dict, device: str | torch.device = "cuda") -> nn.Module:
    """Load an export into ``model`` (in place), move it to ``device`` in the export's dtype, and replace each
    named Linear weight by its ``to_sparse_semi_structured`` form. Inference only (the weights are frozen)."""
    if not is_semi_structured_export(exported):
        raise ValueError(f"not a {SEMI_FORMAT} export")
    model.load_state_dict(exported["state_dict"], strict=True)
    model.to(device=device, dtype=getattr(torch, exported["dtype"])).eval()
    for name in exported["semi_structured"]:
        owner, _, local = name.rpartition(".")
        module = model.get_submodule(owner)
        if not isinstance(module, nn.Linear) or local != "weight":
            raise ValueError(f"{name}: not the weight of an nn.Linear in this model")
        module.weight = nn.Parameter(_to_semi_structured(module.weight.detach()), requires_grad=False)
    return model
