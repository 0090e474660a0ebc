"""Typed run configuration: schema and loading."""

from gmp_dist.config.load import dump_config, flatten_config, load_config, validate_config
from gmp_dist.config.schema import RunConfig

__all__ = ["RunConfig", "dump_config", "flatten_config", "load_config", "validate_config"]
