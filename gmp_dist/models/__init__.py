"""Model registry and the paper's architectures."""

from gmp_dist.models.registry import (
    ModelSpec,
    build_model,
    get_spec,
    input_shape_of,
    model_names,
    model_sources,
    register,
    register_source,
)

__all__ = ["ModelSpec", "build_model", "get_spec", "input_shape_of", "model_names", "model_sources", "register",
           "register_source"]
