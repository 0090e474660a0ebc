"""``prune.schedule: iterative``: iterative magnitude pruning with rewinding, as rounds of ordinary runs.

Frankle & Carbin, "The Lottery Ticket Hypothesis" (2019); Frankle, Dziugaite, Roy & Carbin, "Linear Mode
Connectivity and the Lottery Ticket Hypothesis" (2020): rewinding to an early epoch, OpenLTH's
``sparse_global`` strategy; Renda, Frankle & Carbin, "Comparing Rewinding and Fine-tuning in Neural Network
Pruning" (2020) for ``rewind: lr``.

Round r = 1..R reaches the cumulative sparsity s_r = 1 − (1 − s)^(r/R). Its masks are decided here, on the
driver, by the pure pruning core (``decide_masks``: the exact Global MP + MT decision) on the weights the
previous round ended with (its ``final.pt``; round 1: the starting model, and ``model.masks_from`` when
given), the previous masks' pruned weights ranked below every alive one (``alive_floor``): the masks are
nested and exactly N − round(s_r·N) weights are kept. The round is then an ordinary run of the engine,
a child run of this run's MLflow parent, with
  model.pretrained = round 1: the starting model; later rounds: ``rewind.pt`` (rewind: weights) or the
                     previous round's ``final.pt`` (rewind: lr, the LR schedule starting again),
  model.masks_from = the round's masks file, prune = one-shot global_mp at s_r.
Its one-shot event decides again on the rewound weights with those masks given; exactly K_r weights are
alive and each outranks every pruned one, so it keeps them (and logs pruned_val_top1 and the layer report).

Under ``<checkpoint.storage_path>/<name>/``::

    iterative.json     the parent run id, the plan, one record per finished round
    start.pt           the starting model (model.pretrained, or the seeded initialisation)
    rewind.pt          rewind: weights: the weights at epoch rewind_epoch of round 1 (0: the starting model)
    round_NN/masks.pt  the round's masks (pruner masks, and the weights they were decided on, masked)
    round_NN/...       the round's own run folder: checkpoints, final.pt, mlflow_run_id.txt
    final.pt           the last round's final.pt

For 0 < rewind_epoch < train.epochs, round 1 runs to that epoch (``train.stop_after_epochs``, with a
checkpoint there), the snapshot is taken from that checkpoint, and round 1 continues from it: the ordinary
resume. Resume (``checkpoint.resume: true``, the same command): rounds recorded in iterative.json are
skipped (their child runs untouched), the interrupted one continues from its newest checkpoint in its own
child run. ``train.stop_after_epochs`` counts epochs over all rounds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import yaml

from gmp_dist import storage
from gmp_dist.commands.iterative_files import (
    STATE_FILE,
    newest_epoch,
    read_masks,
    read_state,
    read_weights,
    save_file,
    write_state,
)
from gmp_dist.config import RunConfig, dump_config, flatten_config, validate_config
from gmp_dist.config.schema import IterativeCfg
from gmp_dist.errors import UserError

log = logging.getLogger(__name__)

START_FILE = "start.pt"
REWIND_FILE = "rewind.pt"
MASKS_FILE = "masks.pt"
TAG_ITERATIVE = "gmp_dist.iterative"  # on the parent: rounds, rewind, rewind_epoch (JSON)
TAG_ROUND = "gmp_dist.iterative.round"  # on each child
TAG_TARGET = "gmp_dist.iterative.target_sparsity"


def round_sparsity(sparsity: float, r: int, rounds: int) -> float:
    """s_r = 1 − (1 − s)^(r/R): each round prunes the same fraction 1 − (1 − s)^(1/R) of what is left."""
    return sparsity if r == rounds else 1.0 - (1.0 - sparsity) ** (r / rounds)


def round_name(r: int) -> str:
    return f"round_{r:02d}"


def decide_round(tensors: Sequence[torch.Tensor], previous: Optional[Sequence[torch.Tensor]], sparsity: float,
                 min_weights: int) -> list[torch.Tensor]:
    """The exact Global MP + MT masks at ``sparsity``, nested in ``previous`` (pruned weights rank lowest)."""
    from gmp_dist.pruning.apply import decide_masks
    from gmp_dist.pruning.schedule import alive_floor

    ranked = list(tensors) if previous is None else alive_floor(tensors, previous)
    masks, _ = decide_masks(ranked, sparsity, min_weights, "exact")
    return masks if previous is None else [m & p for m, p in zip(masks, previous)]


# ----- the seam: train.preflight calls check, train.run_training calls run --------------------------------

def check(cfg: RunConfig) -> None:
    """Before any work: an earlier iterative run in the folder is continued only with checkpoint.resume, and
    only with the plan it was started with."""
    folder = storage.run_folder(cfg)
    state = read_state(folder)
    if not state:
        return
    if not cfg.checkpoint.resume:
        raise UserError(f"run folder {folder} already holds the iterative run {cfg.name!r} ({STATE_FILE}): set"
                        " checkpoint.resume=true to continue it, give another name (--set name=...), or delete"
                        " the folder")
    saved = state.get("plan") or {}
    changed = sorted(k for k in set(saved) | set(_plan(cfg)) if saved.get(k) != _plan(cfg).get(k))
    if changed:
        raise UserError(f"checkpoint.resume: the iterative run in {folder} was started with other settings of"
                        f" {', '.join(changed[:5])}; resume it with the same config, or give another name")


def run(cfg: RunConfig, parent_run_id: Optional[str] = None) -> dict:
    """All rounds not finished yet, under one MLflow parent (itself a child of ``parent_run_id`` in a sweep)."""
    from gmp_dist.tracking import end_run, resolve_tracking_uri

    check(cfg)
    it = _Iterative(cfg, storage.run_folder(cfg),
                    resolve_tracking_uri(cfg.tracking.uri) if cfg.tracking.enabled else None)
    it.state = read_state(it.folder)
    status = "FAILED"
    try:
        it.parent = _open_parent(it, parent_run_id)
        result = _rounds(it)
        status = "KILLED" if result.get("stopped_early") else "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if it.uri is not None and it.parent is not None:
            end_run(it.uri, it.parent, status)


# ----- the rounds -------------------------------------------------------------------------------------------

@dataclass
class _Iterative:
    cfg: RunConfig
    folder: storage.Location
    uri: Optional[str]
    parent: Optional[str] = None
    state: Optional[dict] = None

    def file(self, *parts: str) -> storage.Location:
        return self.folder.child(*parts)


def _rounds(it: _Iterative) -> dict:
    from gmp_dist.pruning.masks import resolve_min_weights

    cfg, rounds, epochs = it.cfg, it.cfg.prune.iterative.rounds, it.cfg.train.epochs
    shapes = _prunable_shapes(cfg)
    min_weights = resolve_min_weights(sum(math.prod(s) for _, s in shapes), cfg.prune.min_weights,
                                      cfg.prune.min_threshold_pct)
    _ensure_start(it)
    last: dict = {}
    for r in range(1, rounds + 1):
        record = it.state["rounds"].get(str(r))
        if record is not None:  # finished in an earlier invocation: its child run stays as it is
            last = record
            continue
        budget = _epochs_left(cfg.train.stop_after_epochs, r, epochs)
        if budget == 0:
            log.info("stopping before round %d (train.stop_after_epochs = %d over all rounds)", r,
                     cfg.train.stop_after_epochs)
            return {**last, "stopped_early": True, "run_id": it.parent, "round": r}
        masks_file = _ensure_masks(it, r, shapes, min_weights)
        out = _train_round(it, r, masks_file, budget)
        if out.get("stopped_early"):
            return {**out, "stopped_early": True, "run_id": it.parent, "round": r, "round_run_id": out.get("run_id")}
        last = _finish_round(it, r, out)
    final = storage.final_model(it.folder)
    with storage.local_file(it.file(round_name(rounds), storage.FINAL_MODEL_NAME)) as local:
        storage.upload(local, final)
    return {**last, "run_id": it.parent, "round_run_id": last.get("run_id"), "final_model": final.text,
            "rounds": rounds}


def _epochs_left(stop_after_epochs: Optional[int], r: int, epochs: int) -> Optional[int]:
    """Epochs round r may train before train.stop_after_epochs (counted over all rounds): None for all of
    them, 0 for none."""
    if stop_after_epochs is None:
        return None
    left = stop_after_epochs - (r - 1) * epochs
    return max(0, left) if left < epochs else None


def _train_round(it: _Iterative, r: int, masks_file: str, budget: Optional[int]) -> dict:
    opts, epochs = it.cfg.prune.iterative, it.cfg.train.epochs
    snapshot_epoch = opts.rewind_epoch if r == 1 and opts.rewind == "weights" else None
    if snapshot_epoch is not None and 0 < snapshot_epoch < epochs and not it.file(REWIND_FILE).is_file():
        done = newest_epoch(it.file(round_name(1)))
        if done > snapshot_epoch:
            raise UserError(f"round 1 of {it.folder} trained past prune.iterative.rewind_epoch {snapshot_epoch}"
                            f" without its snapshot {REWIND_FILE}; delete the folder and start again")
        if done < snapshot_epoch:
            stop = snapshot_epoch if budget is None else min(snapshot_epoch, budget)
            out = _run_child(it, r, masks_file, stop, math.gcd(snapshot_epoch, it.cfg.checkpoint.every_epochs))
            if newest_epoch(it.file(round_name(1))) != snapshot_epoch:
                return {**out, "stopped_early": True}  # train.stop_after_epochs came first
        _save_snapshot(it, _round_checkpoint_model(it, 1))
        if budget is not None and budget <= snapshot_epoch:
            return {"stopped_early": True}
    out = _run_child(it, r, masks_file, budget, None)
    if snapshot_epoch == epochs and not out.get("stopped_early"):
        _save_snapshot(it, _round_checkpoint_model(it, 1))
    return out


def _run_child(it: _Iterative, r: int, masks_file: str, stop: Optional[int], every: Optional[int]) -> dict:
    from gmp_dist.commands.train import run_single

    target = round_sparsity(it.cfg.prune.sparsity, r, it.cfg.prune.iterative.rounds)
    child = round_config(it.cfg, it.folder, r, masks_file, _round_start(it, r), stop, every)
    log.info("iterative round %d/%d: target sparsity %.6f, from %s", r, it.cfg.prune.iterative.rounds, target,
             child.model.pretrained)
    return run_single(child, it.parent, {TAG_ROUND: str(r), TAG_TARGET: f"{target:.6g}"})


def round_config(cfg: RunConfig, folder: storage.Location, r: int, masks_file: str, pretrained: str,
                 stop: Optional[int] = None, every: Optional[int] = None) -> RunConfig:
    """Round r as an ordinary one-shot run: its own folder ``<name>/round_NN``, its own child run."""
    rounds = cfg.prune.iterative.rounds
    label = cfg.tracking.run_name or cfg.name or "run"
    child = cfg.model_copy(update={
        "name": round_name(r),
        "model": cfg.model.model_copy(update={"pretrained": pretrained, "masks_from": masks_file}),
        "prune": cfg.prune.model_copy(update={"schedule": "oneshot", "iterative": IterativeCfg(),
                                              "sparsity": round_sparsity(cfg.prune.sparsity, r, rounds)}),
        "train": cfg.train.model_copy(update={"stop_after_epochs": stop}),
        "tracking": cfg.tracking.model_copy(update={
            "run_name": f"{label}-round{r}",
            "registered_model_name": cfg.tracking.registered_model_name if r == rounds else None}),
        # resume: the round folder is this run's (check() refuses a stale one without checkpoint.resume)
        "checkpoint": cfg.checkpoint.model_copy(update={
            "storage_path": folder.text, "resume": True, "every_epochs": every or cfg.checkpoint.every_epochs}),
    })
    return validate_config(yaml.safe_load(dump_config(child)), source=f"{cfg.name} {round_name(r)}")


def _round_start(it: _Iterative, r: int) -> str:
    if r == 1:
        return it.file(START_FILE).text
    if it.cfg.prune.iterative.rewind == "weights":
        return it.file(REWIND_FILE).text
    return it.file(round_name(r - 1), storage.FINAL_MODEL_NAME).text


def _finish_round(it: _Iterative, r: int, out: dict) -> dict:
    target = round_sparsity(it.cfg.prune.sparsity, r, it.cfg.prune.iterative.rounds)
    keys = ("sparsity", "final_val_top1", "best_val_top1", "pruned_val_top1", "flops_pruned")
    record = {"run_id": out.get("run_id"), "target_sparsity": target, "model_uri": out.get("model_uri"),
              **{k: float(out[k]) for k in keys if isinstance(out.get(k), (int, float))}}
    if it.uri is not None and it.parent is not None:
        from gmp_dist.tracking import MlflowTracker

        per_round = {"target_sparsity": target, **{k: record[k] for k in keys if k in record}}
        if "final_val_top1" in record:
            per_round["val_top1"] = record["final_val_top1"]
        MlflowTracker(it.uri, it.parent).log_metrics(per_round, step=r)
    it.state["rounds"][str(r)] = record
    write_state(it.folder, it.state)
    log.info("iterative round %d/%d finished: sparsity %.4f, val top-1 %s", r, it.cfg.prune.iterative.rounds,
             record.get("sparsity", float("nan")), record.get("final_val_top1"))
    return record


# ----- files: the starting model, the snapshot, the masks ------------------------------------------------

def _ensure_start(it: _Iterative) -> None:
    """``start.pt`` (and, for a rewind to epoch 0, ``rewind.pt``): the model round 1 starts from."""
    from gmp_dist.models.configured import build_configured_model
    from gmp_dist.models.pretrained import load_pretrained

    cfg = it.cfg
    if it.file(START_FILE).is_file():
        return
    with torch.random.fork_rng(devices=[]):  # the engine's initialisation, without touching this process's RNG
        torch.manual_seed(cfg.train.seed)
        model = build_configured_model(cfg)
    if cfg.model.pretrained:
        load_pretrained(model, cfg.model.pretrained, cfg.model.name, cfg.tracking.uri)
    state = model.state_dict()
    save_file(it.file(START_FILE), state)
    if cfg.prune.iterative.rewind == "weights" and cfg.prune.iterative.rewind_epoch == 0:
        save_file(it.file(REWIND_FILE), state)


def _save_snapshot(it: _Iterative, state: dict) -> None:
    save_file(it.file(REWIND_FILE), state)
    log.info("rewind snapshot (epoch %d of round 1) saved as %s", it.cfg.prune.iterative.rewind_epoch,
             it.file(REWIND_FILE))


def _ensure_masks(it: _Iterative, r: int, shapes: list[tuple[str, tuple[int, ...]]], min_weights: int) -> str:
    """Round r's masks file, decided once (a resumed round trains with the file it started with)."""
    target = it.file(round_name(r), MASKS_FILE)
    if target.is_file():
        return target.text
    names = [n for n, _ in shapes]
    sparsity = round_sparsity(it.cfg.prune.sparsity, r, it.cfg.prune.iterative.rounds)
    if r == 1:
        weights = read_weights(it.file(START_FILE))
        previous = _given_masks(it.cfg, shapes)
    else:
        weights = read_weights(it.file(round_name(r - 1), storage.FINAL_MODEL_NAME))
        previous = read_masks(it.file(round_name(r - 1), MASKS_FILE), names)
        for name, w, m in zip(names, (weights[n] for n in names), previous):
            assert not w[~m].any(), f"round {r - 1}'s final.pt holds a pruned weight of {name} that is not 0"
    tensors = [weights[n].detach().float() for n in names]
    masks = decide_round(tensors, previous, sparsity, min_weights)
    masked = dict(weights)
    for name, mask in zip(names, masks):
        masked[name] = weights[name] * mask.to(weights[name].dtype)
    kept, total = sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)
    save_file(target, {"model": masked, "pruner": {"names": names, "masks": dict(zip(names, masks))},
                   "iterative": {"round": r, "target_sparsity": sparsity, "kept": kept}})
    log.info("iterative round %d: Global MP%s to %.6f on %s: %d of %d weights kept", r,
             f" (MT {min_weights} per layer)" if min_weights else "", sparsity,
             "the starting model" if r == 1 else f"round {r - 1}'s final weights", kept, total)
    return target.text


def _given_masks(cfg: RunConfig, shapes) -> Optional[list[torch.Tensor]]:
    if not cfg.model.masks_from:
        return None
    from gmp_dist.mask_sources import read_start_masks

    found = read_start_masks(cfg.model.masks_from, shapes, cfg.tracking.uri)
    return [found.masks[n] for n, _ in shapes]


def _round_checkpoint_model(it: _Iterative, r: int) -> dict:
    """The model of round r's newest checkpoint, as the plain state_dict final.pt would hold."""
    from gmp_dist.checkpoint import load_checkpoint, newest_complete_checkpoint
    from gmp_dist.engine.events import method_options
    from gmp_dist.pruning.methods import get_method

    with contextlib.ExitStack() as downloads:
        local = newest_complete_checkpoint(it.file(round_name(r)), downloads)
        if local is None:
            raise UserError(f"{it.file(round_name(r))} holds no checkpoint to take the rewind snapshot from")
        state = load_checkpoint(local)["model"]
    return get_method(it.cfg.prune.method).plain_state_dict(state, method_options(it.cfg.prune))


def _prunable_shapes(cfg: RunConfig) -> list[tuple[str, tuple[int, ...]]]:
    from gmp_dist.models.configured import build_configured_model
    from gmp_dist.pruning.selection import prunable_parameters

    with torch.device("meta"):
        model = build_configured_model(cfg)
    return [(n, tuple(p.shape)) for n, p in prunable_parameters(model, cfg.prune.exclude)]


# ----- the parent run and the state file -----------------------------------------------------------------

_PLAN_KEYS = ("model.", "prune.method", "prune.sparsity", "prune.min_weights", "prune.min_threshold_pct",
              "prune.mt_mode", "prune.exclude", "prune.iterative.", "train.epochs", "train.seed")


def _plan(cfg: RunConfig) -> dict[str, str]:
    """What finished rounds depend on: the model, the pruning target and MT, the rounds, the epochs per round
    (not other methods' option sections, which a new registration would change)."""
    return {k: json.dumps(v, default=str, sort_keys=True) for k, v in flatten_config(cfg).items()
            if k.startswith(_PLAN_KEYS)}


def _open_parent(it: _Iterative, parent_run_id: Optional[str]) -> Optional[str]:
    """Reopen the parent recorded in iterative.json (same store), else start one named like the run."""
    from gmp_dist.tracking import start_run
    from gmp_dist.tracking.runs import client

    state = it.state
    state.setdefault("rounds", {})
    state["plan"] = _plan(it.cfg)
    parent = None
    if it.uri is not None and state.get("parent_run_id") and state.get("tracking_uri") == it.uri:
        parent = state["parent_run_id"]
        client(it.uri).update_run(parent, status="RUNNING")
        log.info("continuing the iterative run's MLflow parent run %s (%d round(s) finished)", parent,
                 len(state["rounds"]))
    elif it.uri is not None:
        opts = it.cfg.prune.iterative
        parent = start_run(it.cfg, parent_run_id=parent_run_id, extra_tags={TAG_ITERATIVE: json.dumps(
            {"rounds": opts.rounds, "rewind": opts.rewind, "rewind_epoch": opts.rewind_epoch})})
        state.update(parent_run_id=parent, tracking_uri=it.uri)
    write_state(it.folder, state)
    return parent
