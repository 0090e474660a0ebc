"""The typed, frozen run configuration.

Every section forbids unknown keys and is strict about types, so a YAML trap such as
``lr: 1e-3`` (PyYAML reads it as a string) is reported instead of silently coerced.
Loading, overrides and error formatting live in ``config.load``.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# Pydantic's strict mode refuses ints for float fields; an int is a perfectly good float in
# a config file, so floats are declared through this alias that allows exactly that.
Float = float


class ModelCfg(Section):
    # A registered name (`gmp-dist models`), "torchvision/<builder>", or "<module>:<callable>".
    name: str = "digits_cnn"
    # Local path to a state_dict, "torchvision:<WeightsEnum.NAME>", or an MLflow URI
    # ("runs:/<run_id>/<path>", "models:/<name>/<version>", "mlflow-artifacts:/...").
    pretrained: Optional[str] = None
    # Start from the masks of an earlier run (a final.pt or training checkpoint path, an MLflow run id,
    # "runs:/<run_id>/<path>", "models:/<name>/<version>"): zeros of its weights are pruned (a training
    # checkpoint's own masks win). Installed as fixed masks on the model.pretrained weights before training;
    # prune.method none keeps exactly them, another static method prunes on top (the given positions stay
    # pruned); dynamic methods (rigl, dpf, str) refuse it. Shapes must match the model's prunable tensors.
    masks_from: Optional[str] = None
    num_classes: Optional[int] = Field(default=None, ge=1)
    # One input sample without the batch dimension, e.g. [3, 224, 224]; required for <module>:<callable>,
    # defaults to the model's own (3x224x224 for torchvision/...). FLOPs and the MLflow Model use the shape
    # the data feeds (data.resolution for images: models.configured.trained_input_shape).
    input_shape: Optional[list[int]] = Field(default=None, min_length=1)
    # Extra keyword arguments for the model constructor (e.g. {"dropout": 0.3}).
    kwargs: dict[str, object] = Field(default_factory=dict)


class DataCfg(Section):
    name: Literal["digits", "imagenet", "imagefolder", "cifar10", "har2", "synthetic"] = "digits"
    # Folder that holds the converted files (train/val .beton or tensors). None: the data
    # set's default under ./data/<name> (digits is converted on first use).
    path: Optional[str] = None
    loader: Literal["auto", "ffcv", "torchvision"] = "auto"
    batch_size_per_worker: int = Field(default=64, ge=1)
    val_batch_size_per_worker: Optional[int] = Field(default=None, ge=1)
    num_workers: int = Field(default=0, ge=0)
    os_cache: bool = True
    batches_ahead: int = Field(default=3, ge=1)
    # imagenet/imagefolder/synthetic: the training crop and validation size in pixels.
    resolution: int = Field(default=224, ge=8)
    # Validation images are resized to this (short side), then centre-cropped to data.resolution;
    # None: resolution x 256/224, the ImageNet convention.
    val_resize: Optional[int] = Field(default=None, ge=8)
    # Synthetic data only: how many samples to generate.
    synthetic_samples: int = Field(default=512, ge=8)


class GradualCfg(Section):
    initial_sparsity: Float = Field(default=0.0, ge=0.0, lt=1.0)
    start: int = Field(default=0, ge=0)
    end: int = Field(default=10, ge=0)
    every: int = Field(default=1, ge=1)
    unit: Literal["epoch", "step"] = "epoch"
    shape: Literal["cubic", "linear"] = "cubic"

    @model_validator(mode="after")
    def _ordered(self) -> "GradualCfg":
        if self.end < self.start:
            raise ValueError(f"gradual.end ({self.end}) must be >= gradual.start ({self.start})")
        return self


class IterativeCfg(Section):
    """prune.schedule: iterative — iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle
    et al. 2020; Renda et al. 2020 for ``rewind: lr``). Round r of ``rounds`` prunes to the cumulative
    sparsity 1 - (1 - prune.sparsity)^(r/rounds) by the exact Global MP + MT decision on the weights the
    previous round ended with (round 1: the starting model; pruned weights rank below every alive one, so
    the masks are nested), rewinds, then trains train.epochs (gmp_dist.commands.iterative)."""

    rounds: int = Field(default=3, ge=1)
    # weights: the surviving weights go back to their values at epoch rewind_epoch of round 1's training
    # (0: the starting model), saved as <storage_path>/<name>/rewind.pt; lr: the weights stay as trained
    # and only the LR schedule starts again (rewind_epoch must then be 0).
    rewind: Literal["weights", "lr"] = "weights"
    rewind_epoch: int = Field(default=0, ge=0)  # at most train.epochs


class _PruneSection(Section):
    # One of gmp_dist.pruning.methods.available(): global_mp, uniform, uniform_plus, erk, lamp, random,
    # snip, synflow, rigl, dpf, str, n_m, structured, none (README "Pruning methods"). A method's own options
    # are the section named after it (prune.snip, prune.rigl, ...): its MethodOptions model, added below.
    method: str = "global_mp"
    # oneshot (prune once before training), gradual (prune.gradual) or iterative (prune.iterative: rounds of
    # prune, rewind, train under one MLflow parent run with a child run per round; global_mp only).
    schedule: Literal["oneshot", "gradual", "iterative"] = "oneshot"
    sparsity: Float = Field(default=0.9, ge=0.0, lt=1.0)
    min_weights: Optional[int] = Field(default=None, ge=0)
    min_threshold_pct: Optional[Float] = Field(default=None, ge=0.0, le=100.0)
    mt_mode: Literal["exact", "reference"] = "exact"
    exclude: list[str] = Field(default_factory=list)
    allow_collapse: bool = False
    gradual: GradualCfg = Field(default_factory=GradualCfg)
    iterative: IterativeCfg = Field(default_factory=IterativeCfg)

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        from gmp_dist.pruning.methods import get_method

        get_method(name)  # a UserError (a ValueError) naming the valid methods, with a did-you-mean hint
        return name

    @model_validator(mode="after")
    def _one_mt(self) -> "PruneCfg":
        if self.min_weights is not None and self.min_threshold_pct is not None:
            raise ValueError("give at most one of prune.min_weights and prune.min_threshold_pct")
        return self

    @model_validator(mode="after")
    def _iterative_keys(self) -> "PruneCfg":
        if self.schedule != "iterative":
            if self.iterative != IterativeCfg():
                raise ValueError(f"prune.iterative applies to prune.schedule: iterative only (the schedule is"
                                 f" {self.schedule}); remove it or set prune.schedule: iterative")
            return self
        if self.method != "global_mp":
            raise ValueError(f"prune.schedule: iterative ranks weights by the exact Global MP + MT decision; set"
                             f" prune.method: global_mp (got {self.method})")
        if self.mt_mode != "exact":
            raise ValueError("prune.schedule: iterative needs prune.mt_mode: exact (the reference MT procedure is"
                             " one-shot and does not nest the masks of successive rounds)")
        if self.gradual != GradualCfg():
            raise ValueError("prune.gradual has no meaning with prune.schedule: iterative (its rounds are set by"
                             " prune.iterative); remove the prune.gradual keys")
        if self.iterative.rewind == "lr" and self.iterative.rewind_epoch != 0:
            raise ValueError(f"prune.iterative.rewind_epoch ({self.iterative.rewind_epoch}) applies to rewind:"
                             " weights; rewind: lr always restarts the LR schedule from its start (set it to 0)")
        return self


def _method_sections() -> dict:
    """``prune.<name>`` for every registered method that declares options: adding a method with options
    is one module and one registration, never an edit here."""
    from gmp_dist.pruning.methods import available

    sections = {info.name: (info.options, Field(default_factory=info.options)) for info in available() if info.options}
    clash = sorted(set(sections) & set(_PruneSection.model_fields))
    if clash:  # a method named like a prune key would shadow it
        raise ValueError(f"pruning method(s) {clash} clash with prune.* keys; register them under another name")
    return sections


PruneCfg = create_model("PruneCfg", __base__=_PruneSection, __module__=__name__, **_method_sections())
PruneCfg.__doc__ = "The prune section: method, target, schedule, MT, and each method's own options."


class TrainCfg(Section):
    epochs: int = Field(default=10, ge=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: Float = Field(default=0.1, gt=0.0)
    momentum: Float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: Float = Field(default=0.0, ge=0.0)
    no_decay_on_bn_and_bias: bool = False
    # The LR is set at every optimizer step from the global step alone (engine/optim.py): a linear warm-up
    # over warmup_epochs x steps-per-epoch steps, then the schedule over the remaining steps; step decay
    # multiplies by gamma every step_size epochs' worth of steps.
    lr_schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_epochs: int = Field(default=0, ge=0)
    step_size: int = Field(default=30, ge=1)
    gamma: Float = Field(default=0.1, gt=0.0)
    label_smoothing: Float = Field(default=0.0, ge=0.0, lt=1.0)
    amp: Literal["auto", "bf16", "off"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    seed: int = 0
    # torch.use_deterministic_algorithms (warn-only where no deterministic kernel exists) and fixed cuDNN
    # algorithms; bit-identical reruns on the same hardware, at some speed cost on GPUs.
    deterministic: bool = False
    # Stop after this many optimizer steps per epoch (smoke tests); None runs full epochs.
    max_steps_per_epoch: Optional[int] = Field(default=None, ge=1)
    # Stop (as if interrupted) after this many epochs; the LR schedule still spans train.epochs.
    stop_after_epochs: Optional[int] = Field(default=None, ge=1)
    log_every_steps: int = Field(default=50, ge=1)


class ScalingCfg(Section):
    num_workers: int = Field(default=1, ge=1)
    use_gpu: bool = False
    cpus_per_worker: Float = Field(default=1.0, gt=0.0)
    gpus_per_worker: Float = Field(default=1.0, ge=0.0)
    # Run the engine in this process without Ray (debugging, single-process tests).
    use_ray: bool = True
    # On a joined Ray cluster whose free nodes cannot hold the workers yet (an autoscaler may add some),
    # wait this long before exiting 2. A Ray started by gmp-dist itself, or no Ray, never waits.
    resource_wait_s: Float = Field(default=600.0, ge=0.0)


class TrackingCfg(Section):
    enabled: bool = True
    # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.
    uri: Optional[str] = None
    run_name: Optional[str] = None
    log_checkpoint_artifact: bool = True
    # Log the final masked model as the run's MLflow Model "model" (off: e.g. benchmarks timing the loop only).
    log_model: bool = True
    # Register the final model (the run's MLflow Model "model") as a new version of this registered model.
    registered_model_name: Optional[str] = Field(default=None, min_length=1)


class CheckpointCfg(Section):
    every_epochs: int = Field(default=1, ge=1)
    # Ray Train storage (a shared filesystem path or s3:// URI on a cluster).
    storage_path: str = "./runs"
    num_to_keep: int = Field(default=2, ge=1)
    max_failures: int = Field(default=0, ge=-1)
    # Resume a previous run with the same name under storage_path.
    resume: bool = False


class ReferenceCfg(Section):
    """The paper's reported result for this recipe, for reports to compare against.

    Units are the paper's: ``top1`` and ``flops_pruned`` in percent (metrics logged by runs use a
    fraction for ``flops_pruned`` and ``sparsity``; reports convert).
    """

    table: Optional[str] = None
    top1: Optional[Float] = None
    flops_pruned: Optional[Float] = None
    params: Optional[str] = None
    note: Optional[str] = None


class RunConfig(Section):
    experiment: str = "default"
    # Ray Train run name; None derives one from the config file name.
    name: Optional[str] = None
    model: ModelCfg = Field(default_factory=ModelCfg)
    data: DataCfg = Field(default_factory=DataCfg)
    prune: PruneCfg = Field(default_factory=PruneCfg)
    train: TrainCfg = Field(default_factory=TrainCfg)
    scaling: ScalingCfg = Field(default_factory=ScalingCfg)
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)
    checkpoint: CheckpointCfg = Field(default_factory=CheckpointCfg)
    reference: ReferenceCfg = Field(default_factory=ReferenceCfg)

    @model_validator(mode="after")
    def _iterative_training(self) -> "RunConfig":
        it = self.prune.iterative
        if self.prune.schedule == "iterative" and self.train.epochs < 1:
            raise ValueError("prune.schedule: iterative trains train.epochs epochs per round: set train.epochs >= 1")
        if self.prune.schedule == "iterative" and it.rewind_epoch > self.train.epochs:
            raise ValueError(f"prune.iterative.rewind_epoch ({it.rewind_epoch}) lies past round 1's training"
                             f" (train.epochs = {self.train.epochs}); set it to at most {self.train.epochs}")
        return self
