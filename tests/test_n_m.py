"""N:M semi-structured sparsity (``prune.method: n_m``): masks against a brute force over the groups on
ResNet-50 and ViT-B/16 shapes, the channels-last group order, ties, layers the pattern does not fit,
``global_first``, 2 ranks, and ``gmp-dist prune`` / ``train`` / ``export --format semi-structured`` end to end;
the conversion by ``to_sparse_semi_structured`` on a GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gmp_dist.cli import main
from gmp_dist.errors import UserError
from gmp_dist.pruning.global_mp import kept_budget
from gmp_dist.pruning.methods import PruneRequest, get_method
from gmp_dist.pruning.n_m import fits_pattern, n_m_mask
from gmp_dist.pruning.selection import prunable_parameters

from pruning_oracle import ThreadWorld, brute_force_masks

REPO = Path(__file__).resolve().parents[1]
# 7x7 stem (147: no multiple of 4), 1x1 convs, 3x3 convs (the largest, 512x512x3x3), a downsample, the fc.
RESNET50_LAYERS = ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight", "layer1.0.downsample.0.weight",
                   "layer3.2.conv2.weight", "layer4.2.conv2.weight", "layer4.2.conv3.weight", "fc.weight"]
# The 16x16 patch conv (3 input channels: channels-last groups run across kernel positions), every kind of
# Linear weight of a block (attention in/out projections, both MLP layers) and the head.
VIT_LAYERS = ["conv_proj.weight", "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
              "encoder.layers.encoder_layer_0.self_attention.out_proj.weight",
              "encoder.layers.encoder_layer_0.mlp.0.weight", "encoder.layers.encoder_layer_0.mlp.3.weight",
              "heads.head.weight"]


def _layers(builder: str, picks: list[str], seed: int = 0) -> tuple[list[str], list[torch.Tensor]]:
    """The named layers' shapes (model built on the meta device), random weights per shape."""
    import torchvision

    with torch.device("meta"):
        shapes = dict((n, tuple(p.shape)) for n, p in prunable_parameters(getattr(torchvision.models, builder)()))
    g = torch.Generator().manual_seed(seed)
    return picks, [torch.randn(shapes[name], generator=g) for name in picks]


def _rows(w: np.ndarray, order: str) -> np.ndarray:
    """[rows, reduction]: channels-last (out, kh, kw, in) for convolutions, or NCHW (out, in, kh, kw)."""
    if w.ndim <= 2 or order == "nchw":
        return w.reshape(w.shape[0] if w.ndim > 1 else 1, -1)
    return np.moveaxis(w, 1, -1).reshape(w.shape[0], -1)


def _unrows(rows: np.ndarray, shape: tuple, order: str) -> np.ndarray:
    if len(shape) <= 2 or order == "nchw":
        return rows.reshape(shape)
    return np.moveaxis(rows.reshape(shape[0], *shape[2:], shape[1]), -1, 1)


def oracle_mask(w: torch.Tensor, n: int, m: int, alive: np.ndarray | None = None, order: str = "channels_last"):
    """The definition by pairwise comparison within each group: element i is kept when fewer than n group
    members beat it (larger |w|, or equal |w| at a lower position); with ``alive``, dead members beat nobody
    and are never kept."""
    rows = _rows(w.detach().double().abs().numpy(), order)
    values = rows.reshape(-1, m)
    if alive is not None:
        live = _rows(alive, order).reshape(-1, m)
        values = np.where(live, values, -1.0)
    pos = np.arange(m)
    vi, vj = values[:, :, None], values[:, None, :]
    beats = (vj > vi) | ((vj == vi) & (pos[None, None, :] < pos[None, :, None]))
    keep = beats.sum(-1) < n
    if alive is not None:
        keep &= live
    return _unrows(keep.reshape(rows.shape), tuple(w.shape), order)


def group_counts(t: np.ndarray, m: int, order: str = "channels_last") -> np.ndarray:
    """Non-zeros per group of m along the reduction axis, in ``order``."""
    return (_rows(np.asarray(t), order).reshape(-1, m) != 0).sum(-1)


def _request(names, tensors, sparsity=0.0, min_weights=0, **options) -> PruneRequest:
    return PruneRequest(list(names), list(tensors), sparsity, min_weights, options=options)


@pytest.mark.parametrize("builder,picks", [("resnet50", RESNET50_LAYERS), ("vit_b_16", VIT_LAYERS)])
def test_every_group_keeps_exactly_n_like_the_brute_force(builder, picks):
    names, tensors = _layers(builder, picks)
    result = get_method("n_m").decide(_request(names, tensors))
    dense = [layer["name"] for layer in result.report["n_m"]["dense_layers"]]
    assert dense == (["conv1.weight"] if builder == "resnet50" else [])  # 3 x 7 x 7 = 147
    for name, tensor, mask in zip(names, tensors, result.masks):
        if name in dense:
            assert bool(mask.all())
            continue
        assert np.array_equal(mask.numpy(), oracle_mask(tensor, 2, 4)), name
        assert set(group_counts(mask.numpy(), 4).tolist()) == {2}, name  # exactly N in every group
    assert result.report["n_m"]["pattern_layers_sparsity"] == 0.5


def test_oracle_agrees_with_plain_loops():
    """The numpy oracle against the definition written as Python loops over the groups (ties included)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randint(-3, 4, (6, 8, 3, 3), generator=g).float()
    want = np.zeros((6, 3, 3, 8), dtype=bool)
    cl = w.permute(0, 2, 3, 1).numpy()
    for o in range(6):
        flat = cl[o].reshape(-1)
        for start in range(0, flat.size, 4):
            order = sorted(range(4), key=lambda i: (-abs(float(flat[start + i])), i))
            for i in order[:2]:
                want[o].reshape(-1)[start + i] = True
    assert np.array_equal(oracle_mask(w, 2, 4), want.transpose(0, 3, 1, 2))
    assert np.array_equal(n_m_mask(w, 2, 4).numpy(), want.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("builder,name", [("resnet50", "layer1.0.conv2.weight"), ("vit_b_16", "conv_proj.weight")])
def test_conv_groups_run_channels_last_and_the_order_matters(builder, name):
    _, (w,) = _layers(builder, [name], seed=3)
    mask = n_m_mask(w, 2, 4).numpy()
    assert set(group_counts(mask, 4, "channels_last").tolist()) == {2}
    nchw = oracle_mask(w, 2, 4, order="nchw")
    assert not np.array_equal(mask, nchw)  # grouping the NCHW order is another mask ...
    assert set(group_counts(nchw, 4, "channels_last").tolist()) != {2}  # ... which no 2:4 kernel runs


def test_ties_go_to_the_lower_position_on_any_dtype():
    assert n_m_mask(torch.tensor([[1.0, 1.0, 1.0, 1.0]]), 2, 4).tolist() == [[True, True, False, False]]
    assert n_m_mask(torch.tensor([[0.0, -0.0, 0.0, -2.0]]), 2, 4).tolist() == [[True, False, False, True]]
    assert n_m_mask(torch.tensor([[-3.0, 3.0, 1.0, -3.0]]), 1, 4).tolist() == [[True, False, False, False]]
    g = torch.Generator().manual_seed(2)
    w = torch.randint(-4, 5, (64, 32, 3, 3), generator=g).float() * 0.25  # few magnitudes: ties everywhere
    mask = n_m_mask(w, 2, 4)
    assert np.array_equal(mask.numpy(), oracle_mask(w, 2, 4))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):  # the values are exact in every dtype
        assert torch.equal(n_m_mask(w.to(dtype), 2, 4), mask)
    assert torch.equal(n_m_mask(w.to(memory_format=torch.channels_last), 2, 4), mask)  # layout is irrelevant


def test_other_patterns_and_alive_groups():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(16, 64, generator=g)
    for n, m in ((1, 4), (1, 2), (4, 8), (3, 32)):
        mask = n_m_mask(w, n, m)
        assert np.array_equal(mask.numpy(), oracle_mask(w, n, m)) and set(group_counts(mask.numpy(), m).tolist()) == {n}
    alive = torch.rand(16, 64, generator=g) < 0.4
    mask = n_m_mask(w, 2, 4, alive)
    assert np.array_equal(mask.numpy(), oracle_mask(w, 2, 4, alive.numpy()))
    live = group_counts(alive.numpy(), 4)
    assert np.array_equal(group_counts(mask.numpy(), 4), np.minimum(live, 2))  # fewer than N where few are alive
    with pytest.raises(ValueError, match="0 < N < M"):
        n_m_mask(w, 4, 4)
    with pytest.raises(ValueError, match="not a multiple of M = 3"):
        n_m_mask(w, 1, 3)


def test_incompatible_layer_is_dense_and_named_or_refused():
    names, tensors = _layers("resnet50", ["conv1.weight", "fc.weight"])
    assert not fits_pattern(tensors[0].shape, 4) and fits_pattern(tensors[1].shape, 4)
    method = get_method("n_m")
    result = method.decide(_request(names, tensors))
    assert bool(result.masks[0].all()) and result.report["n_m"]["dense_layers"] == [
        {"name": "conv1.weight", "reduction_size": 147}]
    assert "conv1.weight (147)" in result.note
    shapes = [tuple(t.shape) for t in tensors]
    for call in (lambda: method.check(shapes, names, 0.0, 0, {"incompatible": "error"}, has_data=False),
                 lambda: method.decide(_request(names, tensors, incompatible="error"))):
        with pytest.raises(UserError, match=r"not a multiple of m = 4: conv1.weight \(147\)"):
            call()
    method.check(shapes[:1], names[:1], 0.0, 0, {"m": 7, "n": 1, "incompatible": "error"}, has_data=False)  # 21 x 7


def test_options_and_what_n_m_takes():
    from pydantic import ValidationError

    from gmp_dist.config import RunConfig

    method = get_method("n_m")
    assert not method.info.accepts_mt and not method.info.uses_sparsity  # listings: a structured method
    assert not method.takes_sparsity({}) and method.takes_sparsity({"global_first": True})
    assert not method.takes_mt({}) and method.takes_mt({"global_first": True})
    for bad in ({"n": 4, "m": 4}, {"n": 0}, {"m": 64, "n": 2}, {"incompatible": "skip"}, {"nn": 2}):
        with pytest.raises(ValidationError):
            RunConfig.model_validate({"prune": {"method": "n_m", "n_m": bad}})
    assert RunConfig.model_validate({"prune": {"method": "n_m", "n_m": {"n": 1, "m": 8}}}).prune.n_m.m == 8
    with pytest.raises(UserError, match="takes no Minimum Threshold"):
        method.check([(8, 8)], ["w"], 0.5, 3, {}, has_data=False)
    with pytest.raises(UserError, match="largest reachable sparsity"):
        method.check([(8, 8)], ["w"], 0.99, 3, {"global_first": True}, has_data=False)


@pytest.mark.parametrize("sparsity,min_weights", [(0.5, 0), (0.8, 40), (0.95, 10)])
def test_global_first_cuts_global_mp_then_n_m_among_the_survivors(sparsity, min_weights):
    names, tensors = _layers("resnet50", ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight",
                                          "fc.weight"], seed=5)
    result = get_method("n_m").decide(_request(names, tensors, sparsity, min_weights, global_first=True))
    global_masks = brute_force_masks(tensors, sparsity, min_weights)  # design.md §3.2 by full sorts
    n_total = sum(t.numel() for t in tensors)
    for name, tensor, mask, alive in zip(names, tensors, result.masks, global_masks):
        mask = mask.numpy()
        assert not (mask & ~alive).any()  # inside the Global MP masks
        if name == "conv1.weight":
            assert np.array_equal(mask, alive)  # left out of the pattern: only the global cut
            continue
        assert np.array_equal(mask, oracle_mask(tensor, 2, 4, alive))
        assert group_counts(mask, 4).max() <= 2
        assert np.array_equal(group_counts(mask, 4), np.minimum(group_counts(alive, 4), 2))
    report = result.report["n_m"]
    assert report["global_sparsity"] == pytest.approx(1 - kept_budget(n_total, sparsity) / n_total, abs=1e-12)
    final = 1 - sum(int(m.sum()) for m in result.masks) / n_total
    assert report["sparsity"] == pytest.approx(final, abs=1e-12) and final >= report["global_sparsity"]
    assert f"Global MP cut first to sparsity {report['global_sparsity']:.4f}" in result.note


@pytest.mark.parametrize("options", [{}, {"global_first": True}])
def test_two_ranks_decide_bit_identically(options):
    names, tensors = _layers("vit_b_16", VIT_LAYERS[:4], seed=6)
    names, tensors = names + ["ties"], tensors + [torch.randint(-2, 3, (64, 48)).float()]
    sparsity, m = (0.9, 50) if options else (0.0, 0)
    single = get_method("n_m").decide(_request(names, tensors, sparsity, m, **options))
    world = ThreadWorld(2)
    results = world.run(lambda rank, comm: get_method("n_m").decide(PruneRequest(
        names, tensors, sparsity, m, options=options, comm=comm, rank=rank, world_size=2)))
    for result in results:
        assert all(torch.equal(a, b) for a, b in zip(result.masks, single.masks))
        assert result.mt_bound == single.mt_bound and result.report == single.report


def _run(*argv: str) -> int:
    return main(list(argv))


def _assert_2to4(state: dict, names: list[str], n: int = 2, m: int = 4) -> list[str]:
    """Every prunable tensor the pattern fits holds exactly n non-zeros per group (random init: no zeros
    but the pruned ones); the others are fully dense. Returns the dense ones."""
    dense = []
    for name in names:
        w = state[name].numpy()
        if fits_pattern(w.shape, m):
            assert set(group_counts(w, m).tolist()) == {n}, name
        else:
            assert (w != 0).all(), name
            dense.append(name)
    return dense


@pytest.mark.parametrize("pattern", ["2:4", "1:8"])
def test_prune_cli_writes_the_pattern(pattern, tmp_path, capsys):
    out = tmp_path / "o.pt"
    assert _run("prune", "--model", "digits_cnn", "--method", "n_m", "--n-m", pattern, "--out", str(out)) == 0
    n, m = (int(x) for x in pattern.split(":"))
    report = json.loads(out.with_suffix(".json").read_text())
    state = torch.load(out, weights_only=True)
    names = [layer["name"] for layer in report["layers"]]
    assert _assert_2to4(state, names, n, m) == ["features.0.weight"]  # 1 x 3 x 3 = 9
    assert report["n_m"]["pattern"] == pattern and report["target_sparsity"] is None
    assert report["n_m"]["dense_layers"] == [{"name": "features.0.weight", "reduction_size": 9}]
    assert report["n_m"]["global_sparsity"] is None
    assert report["n_m"]["pattern_layers_sparsity"] == pytest.approx(1 - n / m)
    assert report["n_m"]["sparsity"] == pytest.approx(report["sparsity"])
    printed = capsys.readouterr().out
    assert f"N:M {pattern}" in printed and "features.0.weight (9)" in printed


def test_prune_cli_global_first_reports_both_sparsities(tmp_path):
    out = tmp_path / "o.pt"
    assert _run("prune", "--model", "digits_cnn", "--method", "n_m", "--global-first", "--sparsity", "0.8",
                "--min-weights", "20", "--out", str(out)) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    n_total = report["prunable_weights"]
    assert report["n_m"]["global_sparsity"] == pytest.approx(1 - kept_budget(n_total, 0.8) / n_total)
    assert report["sparsity"] == pytest.approx(report["n_m"]["sparsity"]) and report["sparsity"] > 0.8
    state = torch.load(out, weights_only=True)
    for layer in report["layers"]:
        if fits_pattern(layer["shape"], 4):
            assert group_counts(state[layer["name"]].numpy(), 4).max() <= 2


@pytest.mark.parametrize("value", ["3:2", "2-4", "0:4", "2:64", "a:b", "2:4:8", "4:4"])
def test_prune_cli_bad_n_m_exits_2(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _run("prune", "--model", "digits_cnn", "--method", "n_m", "--n-m", value, "--out", str(tmp_path / "o.pt"))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--n-m" in err and "N:M" in err and "2:4" in err


def test_prune_cli_refuses_what_n_m_would_ignore(tmp_path, capsys):
    out = str(tmp_path / "o.pt")
    cfg = tmp_path / "strict.yaml"
    cfg.write_text("model:\n  name: digits_cnn\nprune:\n  n_m:\n    incompatible: error\n")
    cases = [
        (["--method", "global_mp", "--sparsity", "0.5", "--n-m", "2:4"], "options of --method n_m"),
        (["--method", "n_m", "--sparsity", "0.5"], "--sparsity 0.5: --method n_m sets its sparsity itself"),
        (["--method", "n_m", "--global-first"], "--sparsity S is required"),
        (["--method", "n_m", "--min-threshold-pct", "0.2"], "takes no Minimum Threshold"),
        (["--method", "n_m", "--config", str(cfg)], r"features.0.weight (9)"),
    ]
    for extra, needle in cases:
        model = [] if "--config" in extra else ["--model", "digits_cnn"]
        assert _run("prune", *model, *extra, "--out", out) == 2, extra
        assert needle in capsys.readouterr().err, extra
    assert not Path(out).exists()


def test_train_fine_tunes_on_two_ranks_and_keeps_the_pattern(tmp_path, digits_dir, monkeypatch):
    """One-shot n_m in `gmp-dist train` on 2 gloo processes (the controller's mask checksum across ranks),
    a few fine-tuning steps: final.pt still holds exactly 2 of every 4."""
    from gmp_dist.commands.train import preflight, run_training
    from gmp_dist.config import load_config
    from gmp_dist.models import build_model

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(build_model("digits_cnn").state_dict(), tmp_path / "dense.pt")
    cfg = load_config(REPO / "configs/quickstart/gmp90.yaml", [
        "name=n-m", "prune.method=n_m", "prune.min_threshold_pct=null", f"model.pretrained={tmp_path / 'dense.pt'}",
        f"data.path={digits_dir}", "data.loader=torchvision", "scaling.use_ray=false", "scaling.num_workers=2",
        "train.epochs=1", "train.max_steps_per_epoch=4", "tracking.enabled=false",
        f"checkpoint.storage_path={tmp_path / 'runs'}"])
    preflight(cfg)
    result = run_training(cfg)
    assert result["train_steps"] == 4
    state = torch.load(tmp_path / "runs" / "n-m" / "final.pt", weights_only=True)
    names = [n for n, _ in prunable_parameters(build_model("digits_cnn"))]
    dense = torch.load(tmp_path / "dense.pt", weights_only=True)
    assert _assert_2to4(state, names) == ["features.0.weight"]
    assert not torch.equal(state["classifier.1.weight"], dense["classifier.1.weight"] * (state["classifier.1.weight"] != 0))
    n_total = sum(state[n].numel() for n in names)
    assert result["sparsity"] == pytest.approx(sum(int((state[n] == 0).sum()) for n in names) / n_total)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA message; the GPU test covers CUDA")
def test_semi_structured_export_without_cuda_exits_2(tmp_path, capsys):
    out = tmp_path / "o.pt"
    assert _run("prune", "--model", "digits_cnn", "--method", "n_m", "--out", str(out)) == 0
    assert _run("export", str(out), "--out", str(tmp_path / "semi.pt"), "--format", "semi-structured") == 2
    err = capsys.readouterr().err
    assert ("semi-structured export needs a CUDA device with sparse tensor cores (compute capability ≥ 8.0); this"
            " machine has none; the 2:4 masks are in the state_dict already") in err
    assert not (tmp_path / "semi.pt").exists()


def test_semi_structured_export_names_a_layer_that_is_not_2to4(tmp_path, capsys):
    out = tmp_path / "g.pt"
    assert _run("prune", "--model", "digits_cnn", "--sparsity", "0.5", "--out", str(out)) == 0
    assert _run("export", str(out), "--out", str(tmp_path / "semi.pt"), "--format", "semi-structured") == 2
    err = capsys.readouterr().err
    assert "not 2:4: classifier.1.weight (" in err and "--method n_m --n-m 2:4" in err
    assert not (tmp_path / "semi.pt").exists()


def test_semi_structured_plan_says_what_stays_dense():
    from gmp_dist.semi_structured import linear_weight_names, plan_layers

    g = torch.Generator().manual_seed(7)

    def two_four(*shape):
        w = torch.randn(shape, generator=g)
        return w * n_m_mask(w, 2, 4)

    weights = {"conv.weight": two_four(8, 4, 3, 3), "attn.in_proj_weight": two_four(96, 32),
               "attn.out_proj.weight": two_four(32, 32), "mlp.weight": two_four(64, 32), "odd.weight": torch.randn(16, 6),
               "mlp.bias": torch.randn(64)}
    masks = {k: v != 0 for k, v in weights.items() if k != "mlp.bias"}
    convert, dense = plan_layers(weights, masks)
    assert convert == ["mlp.weight"]
    assert list(dense) == ["conv.weight", "attn.in_proj_weight", "attn.out_proj.weight", "odd.weight"]
    assert "convolution" in dense["conv.weight"] and "in-features 6" in dense["odd.weight"]
    assert "MultiheadAttention" in dense["attn.out_proj.weight"]
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.MultiheadAttention(8, 2))
    assert linear_weight_names(model) == {"0.weight"}  # not the attention's out_proj
    weights["mlp.weight"][0, :3] = 1.0  # 3 non-zeros in one group of 4
    with pytest.raises(UserError, match=r"not 2:4: mlp.weight \(1 of 512 groups of 4 hold more than 2"):
        plan_layers(weights, {**masks, "mlp.weight": weights["mlp.weight"] != 0})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_semi_structured_export_converts_and_matches_dense(tmp_path):
    from torch.sparse import SparseSemiStructuredTensor

    from gmp_dist.models import build_model
    from gmp_dist.semi_structured import load_semi_structured

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no sparse tensor cores (compute capability < 8.0)")
    out = tmp_path / "o.pt"
    assert _run("prune", "--model", "digits_cnn", "--method", "n_m", "--seed", "1", "--out", str(out)) == 0
    assert _run("export", str(out), "--out", str(tmp_path / "semi.pt"), "--format", "semi-structured") == 0
    exported = torch.load(tmp_path / "semi.pt", weights_only=True)
    assert exported["semi_structured"] == ["classifier.1.weight"]  # [10, 128] is below the kernels' 16 rows
    assert set(exported["dense"]) == {"features.0.weight", "features.3.weight", "classifier.3.weight"}
    reference = build_model("digits_cnn")
    reference.load_state_dict(torch.load(out, weights_only=True))
    reference = reference.to("cuda", torch.bfloat16).eval()
    model = load_semi_structured(build_model("digits_cnn"), exported)
    assert isinstance(model.classifier[1].weight, SparseSemiStructuredTensor)
    x = torch.randn(64, 1, 8, 8, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        want, got = reference(x).float(), model(x).float()
    assert torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    # The layer alone: the sparse product equals the dense one within bf16 rounding.
    w = reference.classifier[1].weight.detach()
    from torch.sparse import to_sparse_semi_structured

    h = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
    dense_out = torch.nn.functional.linear(h, w).float()
    sparse_out = torch.nn.functional.linear(h, to_sparse_semi_structured(w)).float()
    assert torch.allclose(sparse_out, dense_out, rtol=2e-2, atol=2e-2 * float(dense_out.abs().max()))
