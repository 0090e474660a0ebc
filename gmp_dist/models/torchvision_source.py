"""``model.name: torchvision/<builder>``: every classification builder torchvision lists.

The builder is ``torchvision.models.get_model(<builder>, weights=None, num_classes=...)``; pretrained
weights come through ``model.pretrained`` as for any model (``torchvision:<Weights>.<NAME>``, a file,
an MLflow URI). Inputs default to 3x224x224, the resolution torchvision's ImageNet weights use.
"""

from __future__ import annotations

import functools

from gmp_dist.errors import UserError
from gmp_dist.models.registry import ModelSpec

PREFIX = "torchvision/"
DEFAULT_INPUT_SHAPE = (3, 224, 224)


@functools.lru_cache(maxsize=1)
def classification_builders() -> tuple[str, ...]:
    import torchvision

    # module=torchvision.models: the classification models only (not detection, segmentation, video).
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


class TorchvisionSource:
    def claims(self, name: str) -> bool:
        return name.startswith(PREFIX)

    def spec(self, name: str) -> ModelSpec:
        builder = name[len(PREFIX):]
        known = classification_builders()
        if builder not in known:
            import difflib

            close = difflib.get_close_matches(builder, known, n=1)
            hint = f"; did you mean {PREFIX}{close[0]!r}?" if close else ""
            raise UserError(f"model.name {name!r}: torchvision has no classification builder {builder!r}{hint}"
                            f" (`gmp-dist models` lists all {len(known)})")
        return ModelSpec(functools.partial(_build, builder), DEFAULT_INPUT_SHAPE, 1000, "imagenet",
                         f"torchvision.models.{builder}")

    def names(self) -> list[str]:
        return [PREFIX + b for b in classification_builders()]

    def describe(self) -> str:
        return f"{PREFIX}<builder> for any of torchvision's {len(classification_builders())} classification models"


def _build(builder: str, **kwargs):
    import torchvision

    return torchvision.models.get_model(builder, weights=None, **kwargs)
