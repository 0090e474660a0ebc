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
    """Log ``model`` (eval mode, CPU) as the run's MLflow Model ``model``; return its ``runs:/`` URI.

    ``input_shape`` is one sample as the model was trained (no batch dimension): the input example and
    the MLmodel's ``trained_input_shape``. The graph (pt2, torch.export) takes any batch size and, for an
    image (C, H, W), any height and width the model allows; a model that fixes them (a Linear after a
    flatten) is exported at ``input_shape``, with a warning naming the fixed dims.
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch

    model = model.to("cpu").eval()
    # Two samples: torch.export takes a size-1 dim for a constant, so a batch of 1 would be fixed in the graph.
    example = np.zeros((2, *input_shape), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    try:
        dynamic, fixed_reason = exportable_dims(model, torch.from_numpy(example))
    except Exception as exc:  # a forward torch.export cannot trace (data-dependent control flow, ...)
        dynamic, fixed_reason, export_error = (0,), None, exc
    else:
        export_error = None
    if fixed_reason is not None:  # INFO: a model built for one input size (the digits CNN) is not a problem
        log.info("MLflow Model of %s: spatial dims fixed at %s (the batch stays dynamic): %s",
                    type(model).__name__, "x".join(str(d) for d in input_shape[1:]), fixed_reason)
    # Given explicitly, MLflow skips inferring requirements in a subprocess that re-imports the model
    # (~30 s of a 2-core machine per run; 1-2 s with the list).
    common = dict(name=MODEL_ARTIFACT, input_example=example, signature=_signature(example, output, dynamic),
                  metadata={"trained_input_shape": list(input_shape), "dynamic_dims": list(dynamic)},
                  registered_model_name=registered_model_name,
                  pip_requirements=mlflow.pytorch.get_default_pip_requirements())
    mlflow.set_tracking_uri(uri)
    # log_model attaches the model to the active run. Leaving the block marks the run FINISHED (FAILED on an
    # exception); the driver sets the run's final status right after, so nothing is left RUNNING either way.
    with mlflow.start_run(run_id=run_id):
        if export_error is None:
            try:  # pt2 (torch.export): MLflow 3's default, loads without running pickled code. MLflow marks the
                # signature's -1 dims dynamic (Dim.AUTO): exactly the dims exportable_dims found.
                mlflow.pytorch.log_model(model, serialization_format="pt2", **common)
                return f"runs:/{run_id}/{MODEL_ARTIFACT}"
            except Exception as exc:
                export_error = exc
        log.warning("torch.export could not trace %s (%s: %s); logging the MLflow Model pickled instead",
                    type(model).__name__, type(export_error).__name__, _first_line(export_error))
        mlflow.pytorch.log_model(model, serialization_format="pickle", **common)
    return f"runs:/{run_id}/{MODEL_ARTIFACT}"


def exportable_dims(model: Any, example: Any) -> tuple[tuple[int, ...], Optional[str]]:
    """The dims of ``example`` (a batch) that torch.export can keep dynamic for ``model`` (eval mode), and
    why the spatial ones could not (None when they could, or the input is no image): batch and, for
    (N, C, H, W), height and width; else the batch alone. Raises torch.export's error when even that fails.

    Each try exports with ``Dim.DYNAMIC`` (an error where the code fixes the dim) and runs the graph on a
    batch of 1 (and 1.5x the height and width): guards that tie H and W to constants only fail at run time
    (the digits CNN: ``64 * (W // 2) * (H // 2) == 1024``).
    """
    tries = [(0, 2, 3), (0,)] if example.dim() == 4 else [(0,)]
    reason = None
    for dims in tries:
        try:
            _export_and_run(model, example, dims)
            return dims, reason
        except Exception as exc:
            if dims == tries[-1]:
                raise
            reason = _first_line(exc)
    raise AssertionError("unreachable")


def _export_and_run(model: Any, example: Any, dims: tuple[int, ...]) -> None:
    import torch
    from torch.export import Dim

    program = torch.export.export(model, (example,), dynamic_shapes=({d: Dim.DYNAMIC for d in dims},))
    probe = [1, *example.shape[1:]]
    for d in dims[1:]:
        probe[d] += probe[d] // 2
    with torch.no_grad():
        program.module()(torch.zeros(probe, dtype=example.dtype))


def _signature(example: Any, output: Any, dynamic: Sequence[int]) -> Any:
    """Tensor specs with -1 on the dynamic dims: MLflow's pt2 export makes exactly those dims dynamic."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    shape = tuple(-1 if d in dynamic else n for d, n in enumerate(example.shape))
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(example.dtype), shape)]),
                          outputs=Schema([TensorSpec(np.dtype(output.dtype), (-1, *output.shape[1:]))]))


def _first_line(exc: BaseException) -> str:
    """The line of a torch.export error that says why (its first line is often only a heading)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    detail = next((line[2:] for line in lines if line.startswith("- ")), lines[0] if lines else type(exc).__name__)
    return detail[:300]
