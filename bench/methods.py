"""The LAMP decision on ResNet-50-sized weights against concatenate-and-kthvalue (the naive Global MP).

``lamp_selection_time_ratio``: LAMP's whole decision (scores + the exact global selection + masks) over
the same baseline as ``selection_time_ratio``, alternating A and B, medians. It also prints where LAMP's
time goes: the per-layer scores (a sort per layer) against the selection on those scores.
"""

from __future__ import annotations

import statistics
import time

from bench.selection import SPARSITY, naive, resnet50_weights


def figures(repeats: int = 5) -> dict:
    from gmp_dist.pruning.apply import global_score_masks
    from gmp_dist.pruning.methods import PruneRequest, get_method

    tensors = resnet50_weights()
    lamp = get_method("lamp")
    request = PruneRequest([str(i) for i in range(len(tensors))], tensors, SPARSITY)
    lamp.decide(request), naive(tensors)  # warm-up
    t_lamp, t_naive, t_scores, t_select = [], [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        lamp.decide(request)
        t_lamp.append(time.perf_counter() - start)
        start = time.perf_counter()
        naive(tensors)
        t_naive.append(time.perf_counter() - start)
        start = time.perf_counter()
        scores = lamp.scores(request)
        t_scores.append(time.perf_counter() - start)
        start = time.perf_counter()
        global_score_masks(scores, SPARSITY)
        t_select.append(time.perf_counter() - start)
    med = statistics.median
    print(f"   LAMP decision {med(t_lamp) * 1e3:.0f} ms (scores {med(t_scores) * 1e3:.0f} ms, selection + masks"
          f" {med(t_select) * 1e3:.0f} ms); kthvalue {med(t_naive) * 1e3:.0f} ms (median of {repeats})")
    return {"lamp_selection_time_ratio": {"value": med(t_lamp) / med(t_naive), "target": None, "better": "lower",
                                          "unit": "x"}}


if __name__ == "__main__":
    for key, fig in figures().items():
        print(key, fig)
