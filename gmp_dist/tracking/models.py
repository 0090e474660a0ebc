"""MLflow Models: the final masked network logged as an MLflow pytorch model, and models read back.

``log_final_model`` logs it at the run's artifact path ``model`` (``runs:/<run_id>/model``) with an input
example and a signature, and registers a new version when a registered-model name is given.
``load_pytorch_model`` reads a downloaded MLflow Model folder back (downloads: ``tracking.downloads``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
MLFLOW_URI_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/", "mlflow-artifacts:")
RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_MLMODEL = "MLmodel"


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(MLFLOW_URI_SCHEMES)


def is_run_id(source: str) -> bool:
    return bool(RUN_ID.match(source))


def is_mlflow_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / _MLMODEL).is_file()


def load_pytorch_model(local_dir: Path) -> Any:
    """The ``torch.nn.Module`` of a downloaded MLflow pytorch model folder, on the CPU."""
    import mlflow.pytorch

    return mlflow.pytorch.load_model(str(local_dir), map_location="cpu")


def log_final_model(uri: str, run_id: str, model: Any, input_shape: Sequence[int],
                    registered_model_name: Optional[str] = None) -> str:
    """Log ``model`` (eval mode, CPU) as the run's MLflow Model ``model``; return its ``runs:/`` URI."""
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    model = model.to("cpu").eval()
    # Two samples: MLflow exports the model with torch.export (pt2), which would fix a batch of 1 in the graph.
    example = np.zeros((2, *input_shape), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    signature = infer_signature(example, output)
    # Given explicitly, MLflow skips inferring requirements in a subprocess that re-imports the model
    # (~30 s of a 2-core machine per run; 1-2 s with the list).
    common = dict(name=MODEL_ARTIFACT, input_example=example, signature=signature,
                  registered_model_name=registered_model_name,
                  pip_requirements=mlflow.pytorch.get_default_pip_requirements())
    mlflow.set_tracking_uri(uri)
    # log_model attaches the model to the active run. Leaving the block marks the run FINISHED (FAILED on an
    # exception); the driver sets the run's final status right after, so nothing is left RUNNING either way.
    with mlflow.start_run(run_id=run_id):
        try:  # pt2 (torch.export): MLflow 3's default, loads without running pickled code
            mlflow.pytorch.log_model(model, serialization_format="pt2", **common)
        except Exception as exc:  # a forward torch.export cannot trace (data-dependent control flow, ...)
            log.warning("torch.export could not trace %s (%s: %s); logging the MLflow Model pickled instead",
                        type(model).__name__, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            mlflow.pytorch.log_model(model, serialization_format="pickle", **common)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"
