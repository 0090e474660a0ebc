"""The MLflow-overhead figure of ``make bench`` counts a tracker's cost wherever it falls (bench/training.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from bench import training

pytestmark = pytest.mark.skipif(not training.Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


def _spin(cpu_seconds: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < cpu_seconds:
        pass


def test_cpu_of_a_thread_that_already_ended_is_counted():
    threads = training._training_threads()
    before = training._cpu_outside(threads)
    worker = threading.Thread(target=_spin, args=(0.2,))
    worker.start()
    worker.join()
    assert 0.19 <= training._cpu_outside(threads) - before < 0.25


def test_training_threads_are_left_out():
    a = torch.randn(512, 512)
    torch.mm(a, a)  # the intra-op pool exists before the threads are listed, as in the figure
    threads = training._training_threads()
    before, cpu_before = training._cpu_outside(threads), time.process_time()
    deadline = time.perf_counter() + 0.3
    while time.perf_counter() < deadline:
        torch.mm(a, a)
    assert time.process_time() - cpu_before > 0.25  # the work did run
    assert abs(training._cpu_outside(threads) - before) < 0.01


class _SleepyTracker:
    """Logs by sleeping 100 ms: a known cost the figure must find."""

    def __init__(self, uri, run_id):
        pass

    def log_metrics(self, metrics, step):
        time.sleep(0.1)


class _ThreadedTracker(_SleepyTracker):
    """Returns at once and burns 100 ms of CPU in a thread of its own, like asynchronous logging."""

    def log_metrics(self, metrics, step):
        worker = threading.Thread(target=_spin, args=(0.1,))
        worker.start()
        self.worker = worker


# 100 ms per epoch of 4 steps (~0.1-0.2 s each here); the step after the call adds its own noise. A thread's
# CPU is counted on top of the wall time it takes from the step after the call: up to twice, erring high.
@pytest.mark.parametrize(("tracker", "most_ms"), [(_SleepyTracker, 160), (_ThreadedTracker, 300)])
def test_logging_cost_is_found(monkeypatch, tracker, most_ms):
    import gmp_dist.tracking

    monkeypatch.setattr(gmp_dist.tracking, "MlflowTracker", tracker)
    ratios, detail = training.mlflow_overhead_ratios(repeats=1, epochs=2, steps_per_epoch=4)
    assert 70 < detail["logging_ms"] < most_ms
    rest = detail["epoch_s"] * 3 / 4
    assert ratios[0] == pytest.approx(1 + detail["logging_ms"] / 1000 / (rest + detail["epoch_s"] / 4), rel=0.1)
