"""The MLflow-overhead figure of ``make bench`` counts a tracker's cost wherever it falls (bench/training.py)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from bench import training

needs_proc = pytest.mark.skipif(training._training_threads() is None, reason="needs Linux /proc")


def _spin(cpu_seconds: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < cpu_seconds:
        pass


@needs_proc
def test_cpu_of_a_thread_that_already_ended_is_counted():
    threads = training._training_threads()
    before = training._cpu_outside(threads)
    worker = threading.Thread(target=_spin, args=(0.2,))
    worker.start()
    worker.join()
    assert 0.19 <= training._cpu_outside(threads) - before < 0.25


@needs_proc
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
        threading.Thread(target=_spin, args=(0.1,)).start()


# Steps that sleep 10 ms: no CPU taken from the tracker's thread, so the known cost is found to a few ms.
@pytest.mark.parametrize("tracker", [_SleepyTracker, pytest.param(_ThreadedTracker, marks=needs_proc)])
def test_logging_cost_is_found(monkeypatch, tracker):
    import gmp_dist.tracking

    monkeypatch.setattr(gmp_dist.tracking, "MlflowTracker", tracker)
    ratios, detail = training.mlflow_overhead_ratios(repeats=2, epochs=2, steps_per_epoch=40,
                                                     step=lambda: time.sleep(0.01))
    assert 95 < detail["logging_ms"] < 130
    assert 0.39 < detail["epoch_s"] < 0.5
    for ratio in ratios:  # (39 steps + 100 ms + a step) / (39 steps + a step)
        assert ratio == pytest.approx(1 + 0.1 / detail["epoch_s"], abs=0.06)
