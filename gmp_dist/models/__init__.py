"""Model registry and the paper's architectures."""

from gmp_dist.models.registry import ModelSpec, build_model, get_spec, model_names, register

__all__ = ["ModelSpec", "build_model", "get_spec", "model_names", "register"]
