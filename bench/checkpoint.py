"""``checkpoint_stall_ratio``: epoch time of a training loop that checkpoints every epoch / the same loop
without checkpoints (CPU).

The epoch is ``STEPS`` masked ResNet-32 steps (batch 64, CIFAR shapes, synthetic tensors; the step of
``masked_step_ratio``, bench/training.py). The checkpoint is the engine's: :class:`CheckpointWriter`
snapshots the model and optimizer state (SGD momentum) to host memory, writes it in its thread (temp file,
fsync, rename) and the loop waits for it at its next save. Epochs with and without checkpoint alternate
A B, B A within a repeat; an epoch with checkpoint opens with the save and closes the write's window with
the wait, so the window holds exactly what a checkpoint costs the loop (blocked time, and the CPU the
write takes from the steps beside it) and a write never spills into an epoch without checkpoint. How an
epoch is timed on a shared machine: ``checkpoint_stall_ratios``. The figure is the median of
``MIN_REPEATS`` repeats, with their spread (``bench.figures``); the loop's blocked time per save and a
save's own duration are printed beside it.
"""

from __future__ import annotations

import statistics
import tempfile
import time

from bench.figures import MIN_REPEATS, repeated
from bench.training import _step_setup, train_step

STEPS = 20  # steps per epoch
PAIRS = 2  # epochs with and without checkpoint per repeat (A B B A)
HEAD_STEPS = 2  # steps timed with the save; more while the write is still running


def checkpoint_stall_ratios(repeats: int = MIN_REPEATS, steps: int = STEPS,
                            pairs: int = PAIRS) -> tuple[list[float], dict]:
    """Per repeat: estimated epoch with checkpoint / epoch without, from epochs alternating A B, B A.

    An epoch's *head* is timed whole: the save (snapshot, write started), the first ``HEAD_STEPS`` steps and
    any further ones until the write is done, then the wait for it; so the head holds the loop's blocked
    time and whatever CPU the write took from training. The remaining steps are the same work in both and
    are pooled: epoch = ``steps`` x the repeat's median step + the least excess of the heads of that kind
    (head time minus as many of the same epoch's median steps; another job on the machine only ever adds).
    Whole-epoch wall times swung 0.34-8.3 between repeats on this shared 2-core machine (other jobs come
    and go within seconds), and a median of heads once gave 2.45.
    """
    from gmp_dist.engine.checkpoint_writer import CheckpointWriter
    from gmp_dist.storage import checkpoint_file

    model, opt, pruner, x, y = _step_setup()
    writer = CheckpointWriter()
    blocked: list[float] = []
    writes: list[float] = []
    ratios: list[float] = []

    def step() -> float:
        start = time.perf_counter()
        train_step(model, opt, x, y, pruner)
        return time.perf_counter() - start

    def epoch(path, checkpoint: bool) -> tuple[float, int, list[float]]:
        """(head seconds, steps in the head, the other steps' seconds)."""
        start = time.perf_counter()
        if checkpoint:
            writer.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
            saved = time.perf_counter()
        head = 0
        while head < steps and (head < HEAD_STEPS or (checkpoint and not writer.idle())):
            step()
            head += 1
        if checkpoint:
            waiting = time.perf_counter()
            writer.wait()
            blocked.append(saved - start + time.perf_counter() - waiting)
        head_s = time.perf_counter() - start
        return head_s, head, [step() for _ in range(steps - head)]

    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        for _ in range(3):  # warm-up: the intra-op pool, the writer's thread, the first file in the folder
            step()
        for number in range(2):  # a save alone, nothing beside it
            start = time.perf_counter()
            writer.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, checkpoint_file(tmp, number))
            writer.wait()
            writes.append(time.perf_counter() - start)
        number = 2
        for repeat in range(repeats):
            excess: dict[bool, list[float]] = {True: [], False: []}
            rest: list[float] = []
            for pair in range(pairs):
                for checkpoint in (True, False) if (repeat + pair) % 2 == 0 else (False, True):
                    head_s, head, others = epoch(checkpoint_file(tmp, number), checkpoint)
                    number += 1
                    # What the head took beyond as many of this epoch's typical steps: drift between
                    # epochs (another job on the machine) cancels.
                    excess[checkpoint].append(head_s - head * statistics.median(others))
                    rest.extend(others)
            per_step = statistics.median(rest)
            ratios.append((steps * per_step + min(excess[True])) / (steps * per_step + min(excess[False])))
        writer.close()
    return ratios, {"blocked_ms": 1000 * statistics.median(blocked), "write_ms": 1000 * min(writes),
                    "epoch_s": steps * per_step}


def figures(repeats: int = MIN_REPEATS) -> dict:
    ratios, detail = checkpoint_stall_ratios(repeats)
    print(f"   checkpoint: loop blocked {detail['blocked_ms']:.1f} ms per save (snapshot + wait), a save alone"
          f" {detail['write_ms']:.1f} ms, epoch {detail['epoch_s']:.2f} s")
    return {"checkpoint_stall_ratio": {**repeated(ratios, 1.02, "lower", "x"),
                                       **{k: round(v, 3) for k, v in detail.items()}}}


if __name__ == "__main__":
    for key, fig in figures().items():
        print(key, fig)
