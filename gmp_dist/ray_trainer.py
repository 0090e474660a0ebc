"""The ``TorchTrainer`` the Ray launcher runs: Ray Train V2 with two behaviours of its own.

1. SIGINT stays with :mod:`gmp_dist.signals`. Train V2's ``fit`` installs a SIGINT handler of its own that
   aborts the run and then exits 0 or 1, so the driver could not tell a stop from a success nor end the
   MLflow run KILLED. Keeping the controller's handle instead lets the driver abort the run gracefully
   (workers stopped by Ray Train) on SIGINT and SIGTERM alike.
2. On a Ray this driver started itself (one machine, gone with the driver), no idle helper actors. Train V2
   starts, besides its controller, synchronization actor and workers, a dataset manager (even with no
   Ray Datasets), a placement-group cleaner (removes a dead controller's placement group from a
   long-lived cluster), Ray Data's autoscaling coordinator (passes resource requests to a cluster
   autoscaler) and a preemption watcher. None has work to do on a local Ray, yet each is a Python process
   whose core worker wakes 100 times a second: on a 2-core machine that trains on both cores, stopping
   the first three made epochs 2.7% faster (measured within one run, BENCHMARKS.md). A joined cluster
   keeps all of them.

Both reach into Train V2's private seams (``_register_sigint_handler``, ``_create_default_callbacks``,
``_initialize_and_run_controller``; checked against ray 2.60). Each is matched by name and left alone
when missing, so a Ray that renames them costs only the saving, never the run.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

# Train V2 callbacks that have nothing to do on a Ray started by this driver, by class name.
LOCAL_RAY_IDLE_CALLBACKS = frozenset({"PlacementGroupCleanerCallback"})
# ... and the one that has nothing to do whenever the trainer is given no Ray Datasets.
DATASETS_CALLBACK = "DatasetsCallback"
# Train V2's preemption watcher (an actor) follows node preemption notices; one machine is not preempted
# piecemeal. A user's own setting of the variable wins.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def trainer_class(ray, base, *, local_ray: bool):
    """``base`` (TorchTrainer) with the behaviours above; ``local_ray``: Ray was started by this driver.
    ``ray`` is the module, passed in (as to ``ray_launcher.wait_for_resources``) so that this module does
    not import it: ``ray_launcher`` stays the one importer (design.md §2)."""

    class Trainer(base):
        _controller = None

        def _register_sigint_handler(self, controller) -> None:
            self._controller = controller

        def abort(self) -> None:
            if self._controller is None:
                return
            try:
                ray.get(self._controller.abort.remote(), timeout=15)
            except Exception as exc:  # the controller exits while answering: that is the success case
                log.debug("Train controller abort: %s", exc)

        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            drop = set(LOCAL_RAY_IDLE_CALLBACKS) if local_ray else set()
            if not getattr(self, "datasets", None):
                drop.add(DATASETS_CALLBACK)
            return [cb for cb in callbacks if type(cb).__name__ not in drop]

        def _initialize_and_run_controller(self, **controller_kwargs):
            policy = controller_kwargs.get("scaling_policy")
            if local_ray and policy is not None:
                controller_kwargs["scaling_policy"] = without_autoscaler_requests(policy)
            if local_ray:
                # The controller reads this from the driver's environment, propagated when it is created.
                os.environ.setdefault(PREEMPTION_WATCHER_ENV, "0")
            return super()._initialize_and_run_controller(**controller_kwargs)

    return Trainer


def without_autoscaler_requests(policy):
    """The scaling ``policy`` minus its resource requests to Ray Data's autoscaling coordinator, which
    the first request creates (a detached actor): a Ray started here has no autoscaler to pass them to.
    A policy without the hooks (another Ray version) is returned unchanged."""
    hooks = ("after_controller_start", "_send_resource_request", "_maybe_send_resource_request")
    if not all(hasattr(policy, hook) for hook in hooks):
        return policy

    class NoAutoscalerPolicy(type(policy)):
        def after_controller_start(self, *args, **kwargs) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

        def _maybe_send_resource_request(self) -> None:
            pass

    policy.__class__ = NoAutoscalerPolicy
    return policy
