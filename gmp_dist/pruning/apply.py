"""One pruning event on replicated weights (DDP): split the work, decide, build every mask.

Under DDP every rank holds all layers. The statistics work is shared by giving each rank whole layers,
balanced by size; the decision comes out identical everywhere (the protocol ends with an all-reduce of
every number it uses), and each rank then builds the masks of all layers locally. Both allocations run
on this protocol: one global cut over any non-negative scores (``global_score_masks``), or an exact cut
per layer at given counts (``per_layer_masks``).

Magnitudes are the same on every rank (DDP keeps the replicas bit-identical), so each rank may build every
mask from its own copy. Scores computed from anything local (SynFlow's flow through a non-deterministic
backward, LAMP's sort on a GPU) need not be: with ``shared=True`` each rank builds the masks of the layers
it owns and broadcasts them (one byte per weight, once per event), so the ranks agree by construction.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import torch

from gmp_dist.pruning.global_mp import LOCAL, Collective, Decision, Shard, decide, layer_top_cut
from gmp_dist.pruning.masks import cut_mask
from gmp_dist.pruning.reference_mt import reference_mt_masks


def owned_layers(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Layers per rank, largest first onto the least-loaded rank (deterministic)."""
    heap = [(0, rank) for rank in range(world_size)]
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for layer in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        load, rank = heapq.heappop(heap)
        owned[rank].append(layer)
        heapq.heappush(heap, (load + sizes[layer], rank))
    return [sorted(layers) for layers in owned]


def share_owned_masks(build, shapes: Sequence[torch.Size], owned: Sequence[Sequence[int]], rank: int,
                      comm: Collective, device: torch.device) -> list[torch.Tensor]:
    """Every layer's mask, built by ``build(i)`` on the rank that owns layer i only and broadcast from it
    (one broadcast per rank, its layers packed as bytes)."""
    masks: list[torch.Tensor] = [None] * len(shapes)  # type: ignore[list-item]
    for src, layers in enumerate(owned):
        if not layers:
            continue
        numels = [int(torch.Size(shapes[i]).numel()) for i in layers]
        if src == rank:
            for i in layers:
                masks[i] = build(i)
            packed = torch.cat([masks[i].reshape(-1) for i in layers]).to(torch.uint8)
        else:
            packed = torch.empty(sum(numels), dtype=torch.uint8, device=device)
        if len(owned) > 1:
            packed = comm.broadcast(packed, src)
        if src != rank:
            for i, piece in zip(layers, packed.split(numels)):
                masks[i] = piece.to(torch.bool).reshape(shapes[i])
    return masks


def global_score_masks(scores: Sequence[torch.Tensor], sparsity: float, min_weights: int = 0,
                       comm: Collective = LOCAL, rank: int = 0, world_size: int = 1, shared: bool = False,
                       ) -> tuple[list[torch.Tensor], Decision]:
    """Keep the top K = N − round(s·N) of all ``scores`` (ranked by |score|), the top ``min_weights`` of
    every layer protected first (design.md §3.2); ties in canonical order. ``shared``: masks built by
    their layers' owners and broadcast (for scores that may differ across ranks)."""
    sizes = [t.numel() for t in scores]
    owned = owned_layers(sizes, world_size)
    decision = decide([Shard(i, 0, scores[i]) for i in owned[rank]], sizes, sparsity, min_weights, comm)

    def build(i: int) -> torch.Tensor:
        return cut_mask(scores[i], decision.layer_cut_bits[i], decision.layer_ties_kept[i])

    if shared and world_size > 1:
        return share_owned_masks(build, [t.shape for t in scores], owned, rank, comm, scores[0].device), decision
    return [build(i) for i in range(len(scores))], decision


def per_layer_masks(scores: Sequence[torch.Tensor], kept: Sequence[int], comm: Collective = LOCAL, rank: int = 0,
                    world_size: int = 1, shared: bool = False) -> list[torch.Tensor]:
    """Keep exactly ``kept[l]`` of layer l, its largest |scores| (ties: lower flat index). Each rank cuts
    the layers it owns; the cuts (two integers per layer) are gathered, so every rank builds every mask
    (``shared``: the owners build and broadcast them instead, for scores that may differ across ranks)."""
    sizes = [t.numel() for t in scores]
    owned = owned_layers(sizes, world_size)
    if shared and world_size > 1:
        return share_owned_masks(lambda i: cut_mask(scores[i], *layer_top_cut(scores[i], int(kept[i]))),
                                 [t.shape for t in scores], owned, rank, comm, scores[0].device)
    cuts: dict[int, tuple[int, int]] = {}
    for rank_cuts in comm.allgather({i: layer_top_cut(scores[i], int(kept[i])) for i in owned[rank]}):
        cuts.update(rank_cuts)
    return [cut_mask(t, *cuts[i]) for i, t in enumerate(scores)]


def decide_masks(tensors: Sequence[torch.Tensor], sparsity: float, min_weights: int = 0, mt_mode: str = "exact",
                 comm: Collective = LOCAL, rank: int = 0, world_size: int = 1,
                 ) -> tuple[list[torch.Tensor], Decision | None]:
    """Global MP: masks for all ``tensors`` (canonical order). ``reference`` MT has no distributed decision:
    every rank runs it on its full replica (deterministic), and the caller verifies the checksums agree."""
    if mt_mode == "reference" and min_weights > 0:
        return reference_mt_masks(tensors, sparsity, min_weights), None
    return global_score_masks(tensors, sparsity, min_weights, comm, rank, world_size)
