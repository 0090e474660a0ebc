"""Ad-hoc check (not in `make bench`): what masking gradients every step adds to a masked ResNet-32 step.

Run: `PYTHONPATH=. .venv/bin/python -m bench.mask_hooks`. Three steps alternate: dense, masked as before
(weights re-zeroed after the step only), masked as the engine does it now (gradients zeroed before the step
too, design.md §3.10); each line is one repeat of 40 triples, medians over the dense step's median.
"""

from __future__ import annotations

import statistics
import time

import torch.nn as nn

from bench.training import _step_setup

DENSE, WEIGHTS_ONLY, WEIGHTS_AND_GRADIENTS = 0, 1, 2


def main(repeats: int = 3, steps: int = 40) -> None:
    model, opt, pruner, x, y = _step_setup()

    def step(mode: int) -> float:
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if mode == WEIGHTS_AND_GRADIENTS:
            pruner.mask_gradients()
        opt.step()
        if mode != DENSE:
            pruner.apply()
        return time.perf_counter() - start

    for _ in range(5):
        step(WEIGHTS_AND_GRADIENTS)
    for repeat in range(repeats):
        times: dict[int, list[float]] = {DENSE: [], WEIGHTS_ONLY: [], WEIGHTS_AND_GRADIENTS: []}
        for _ in range(steps):
            for mode in times:
                times[mode].append(step(mode))
        dense = statistics.median(times[DENSE])
        print(f"repeat {repeat}: weights only {statistics.median(times[WEIGHTS_ONLY]) / dense:.4f}"
              f"  weights + gradients {statistics.median(times[WEIGHTS_AND_GRADIENTS]) / dense:.4f}")


if __name__ == "__main__":
    main()
