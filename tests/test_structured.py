"""Structured column pruning (FastGRNN, paper.md §2.5) against a brute-force numpy ranking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gmp_dist.models import build_model
from gmp_dist.pruning.selection import prunable_parameters
from gmp_dist.pruning.structured import column_masks, kept_columns


def _brute_force(t: torch.Tensor, rank: int) -> np.ndarray:
    a = t.double().numpy()
    scores = np.abs(a).sum(axis=0)
    # Descending score, ties -> lower index: sort on (-score, index).
    order = sorted(range(a.shape[1]), key=lambda j: (-scores[j], j))
    mask = np.zeros(a.shape, dtype=bool)
    mask[:, order[:rank]] = True
    return mask


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("shape,rank", [((9, 9), 8), ((80, 80), 7), ((80, 80), 80), ((3, 17), 1), ((1, 5), 3)])
def test_matches_brute_force(seed, shape, rank):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g)
    masks = column_masks({"w": t, "other": t.clone()}, {"w": rank})
    assert masks["w"].dtype == torch.bool and masks["w"].shape == t.shape
    assert np.array_equal(masks["w"].numpy(), _brute_force(t, rank))
    assert kept_columns(masks["w"]) == rank
    assert masks["w"].sum() == rank * shape[0]  # whole columns
    assert masks["other"].all()  # not in ranks: all kept


def test_ties_go_to_lower_index():
    t = torch.tensor([[1.0, -1.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    # Column scores 1, 1, 2, 1, 0: keep column 2, then the lowest-index ties 0 and 1.
    mask = column_masks({"w": t}, {"w": 3})["w"]
    assert mask[0].tolist() == [True, True, True, False, False]
    assert np.array_equal(mask.numpy(), _brute_force(t, 3))


def test_quantised_ties_match_brute_force():
    g = torch.Generator().manual_seed(3)
    t = torch.randint(-2, 3, (6, 40), generator=g).float()  # many equal column sums
    for rank in (1, 7, 20, 39, 40):
        assert np.array_equal(column_masks({"w": t}, {"w": rank})["w"].numpy(), _brute_force(t, rank))


def test_bad_requests_name_every_problem():
    tensors = {"a": torch.ones(3, 4), "b": torch.ones(3, 4), "v": torch.ones(4)}
    with pytest.raises(ValueError) as err:
        column_masks(tensors, {"a": 0, "b": 5, "nope": 2, "v": 1})
    msg = str(err.value)
    assert "'a'" in msg and "'b'" in msg and "'nope'" in msg and "'v'" in msg
    assert "[1, 4]" in msg and "2-D" in msg
    with pytest.raises(ValueError, match="'a'"):
        column_masks(tensors, {"a": 2.5})


def test_empty_ranks_keeps_everything_and_input_untouched():
    t = torch.randn(4, 6)
    before = t.clone()
    masks = column_masks({"x": t}, {})
    assert masks["x"].all() and torch.equal(t, before)


def test_fastgrnn_ranks_become_matrix_ranks():
    torch.manual_seed(0)
    model = build_model("fastgrnn")
    tensors = {n: p.detach().double() for n, p in prunable_parameters(model)}
    for r_w, r_u in [(9, 8), (9, 7), (8, 7)]:
        masks = column_masks(tensors, {"cell.W1": r_w, "cell.U1": r_u})
        W = (tensors["cell.W1"] * masks["cell.W1"]) @ tensors["cell.W2"]
        U = (tensors["cell.U1"] * masks["cell.U1"]) @ tensors["cell.U2"]
        assert torch.linalg.matrix_rank(W) == r_w
        assert torch.linalg.matrix_rank(U) == r_u
        assert all(masks[n].all() for n in ("cell.W2", "cell.U2", "fc.weight"))
