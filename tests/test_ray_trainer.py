"""The trainer class the Ray launcher runs: which Train V2 helpers a Ray started here goes without.

The callback lists and scaling decisions are checked on the real Train V2 objects (no cluster needed);
one slow test trains on a real local Ray and reads the actors it created from Ray's GCS.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gmp_dist.ray_trainer import DATASETS_CALLBACK, LOCAL_RAY_IDLE_CALLBACKS, trainer_class, without_autoscaler_requests

ray = pytest.importorskip("ray")


def _train_fn() -> None:
    pass


def _callback_names(trainer) -> list[str]:
    return [type(cb).__name__ for cb in trainer._create_default_callbacks()]


def _trainer(local_ray: bool, **kwargs):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    cls = TorchTrainer if local_ray is None else trainer_class(ray, TorchTrainer, local_ray=local_ray)
    return cls(_train_fn, scaling_config=ScalingConfig(num_workers=2), **kwargs)


def test_local_ray_drops_exactly_the_idle_helpers():
    stock = _callback_names(_trainer(None))
    # The names we filter on must still exist in this Ray, or the filter silently saves nothing.
    assert {DATASETS_CALLBACK, *LOCAL_RAY_IDLE_CALLBACKS} <= set(stock)
    assert _callback_names(_trainer(True)) == [n for n in stock if n not in {DATASETS_CALLBACK,
                                                                             *LOCAL_RAY_IDLE_CALLBACKS}]
    # A joined cluster keeps the placement-group cleaner; only the datasets callback (no datasets) goes.
    assert _callback_names(_trainer(False)) == [n for n in stock if n != DATASETS_CALLBACK]


def test_datasets_callback_stays_when_datasets_are_given():
    names = _callback_names(_trainer(True, datasets={"train": [1, 2, 3]}))
    assert DATASETS_CALLBACK in names and not LOCAL_RAY_IDLE_CALLBACKS & set(names)


def test_policy_without_autoscaler_decides_as_before_and_never_contacts_ray():
    import ray.cloudpickle
    from ray.train import ScalingConfig
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy, create_scaling_policy
    from ray.train.v2._internal.execution.scaling_policy.scaling_policy import NoopDecision, ResizeDecision

    assert not ray.is_initialized()
    policy = without_autoscaler_requests(create_scaling_policy(
        ScalingConfig(num_workers=3, resources_per_worker={"CPU": 2})))
    assert isinstance(policy, FixedScalingPolicy)
    policy.after_controller_start(None)  # the stock hook would create the coordinator actor here
    assert policy.make_decision_for_non_running_worker_group() == ResizeDecision(
        num_workers=3, resources_per_worker={"CPU": 2})
    # The policy travels to the controller actor by cloudpickle: the patched class must survive it.
    copy = ray.cloudpickle.loads(ray.cloudpickle.dumps(policy))
    assert isinstance(copy, FixedScalingPolicy)
    assert copy.make_decision_for_running_worker_group(None, None) == NoopDecision()
    policy.before_controller_abort()  # cancelling a request never sent is a no-op
    assert not ray.is_initialized(), "a decision contacted Ray (it would have started a local instance)"


def test_policy_without_the_hooks_is_left_alone():
    class Other:
        pass

    policy = Other()
    assert without_autoscaler_requests(policy) is policy and type(policy) is Other


@pytest.mark.slow
def test_run_on_a_ray_started_here_creates_no_idle_helper_actors(digits_dir, tmp_path: Path):
    """Two Ray Train workers, 2 steps, on a real local Ray; afterwards Ray's GCS lists every actor the run
    created (dead ones included): controller, synchronization actor and workers, nothing else."""
    from gmp_dist.commands.train import preflight
    from gmp_dist.config import load_config
    from gmp_dist.ray_launcher import run_with_ray

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs/quickstart/gmp90.yaml", [
        "name=no-helpers", f"data.path={digits_dir}", "data.loader=torchvision", "train.epochs=1",
        "train.max_steps_per_epoch=2", "tracking.enabled=false", f"checkpoint.storage_path={tmp_path / 'runs'}",
        "model.pretrained=null"])
    preflight(cfg)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024 * 1024,
             _node_ip_address="127.0.0.1", logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(repo)}})
    try:
        result = run_with_ray(cfg, None, None, local_ray=True)
        classes = sorted(a["ActorClassName"].rsplit(".", 1)[-1] for a in ray._private.state.actors().values())
    finally:
        ray.shutdown()
    assert result["train_steps"] == 2
    assert classes == ["RayTrainWorker", "RayTrainWorker", "SynchronizationActor", "TrainController"], classes
