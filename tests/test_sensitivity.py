"""Sensitivity: Hutchinson on a known Hessian, noise injection ranking, HAWQ scores, the stage."""

from __future__ import annotations

import json
import math

import pytest
import timm
import torch

from pipeline.profile.collect import SuffixRunner
from pipeline.quant.calibration import calibrate
from pipeline.quant.recipe import resolve_recipe
from pipeline.quant.sites import attach_sites
from pipeline.sensitivity.compute import SensitivitySettings
from pipeline.sensitivity.hutchinson import hutchinson_trace
from pipeline.sensitivity.run import compute_sensitivity, measured_at
from tests.conftest import StepTracker, compose

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.rand(n, generator=g, dtype=torch.float64) * 4 + 0.5
    return q @ torch.diag(eig) @ q.T


def test_hutchinson_trace_of_a_quadratic_within_5_percent_at_200_samples():
    a = spd(60)
    x = torch.randn(60, dtype=torch.float64, requires_grad=True)
    result = hutchinson_trace(lambda: 0.5 * x @ a @ x, [x], iters=200, tol=0.0, generator=torch.Generator().manual_seed(1))
    assert result.iters == 200 and not result.converged
    assert result.total == pytest.approx(float(torch.trace(a)), rel=0.05)
    # Rademacher: Var(v.Av) = 2 * sum of the squared off-diagonal entries, so the mean's stderr is known
    expected = (2 * float((a - torch.diag(a.diagonal())).square().sum()) / 200) ** 0.5
    assert result.stderr[0] == pytest.approx(expected, rel=0.2)


def test_hutchinson_block_traces_and_diagonal_of_two_tensors():
    a = spd(40, seed=3)
    x = torch.randn(25, dtype=torch.float64, requires_grad=True)
    y = torch.randn(15, dtype=torch.float64, requires_grad=True)

    def loss():
        z = torch.cat([x, y])
        return 0.5 * z @ a @ z

    result = hutchinson_trace(loss, [x, y], iters=400, tol=0.0, generator=torch.Generator().manual_seed(2), diag_reduce=[lambda p: p, None])
    assert result.traces[0] == pytest.approx(float(torch.trace(a[:25, :25])), rel=0.05)
    assert result.traces[1] == pytest.approx(float(torch.trace(a[25:, 25:])), rel=0.05)
    assert result.diag[1] is None and result.diag[0].shape == (25,)
    torch.testing.assert_close(result.diag[0].double().mean(), a.diagonal()[:25].mean(), rtol=0.05, atol=0)


def test_error_weighted_diagonal_sees_an_uneven_curvature_that_the_average_trace_misses():
    from pipeline.sensitivity.compute import error_weighted_sum

    # a folded weight in miniature: the curvature grows as s^2 where the error shrinks as 1/s
    s = torch.tensor([1.0, 1.0, 1.0, 10.0], dtype=torch.float64)
    h = torch.diag(s.square())
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    errors_sq = torch.stack([(0.1 / s).square(), (0.01 / s).square()])  # two widths
    result = hutchinson_trace(lambda: 0.5 * x @ h @ x, [x], iters=20, tol=0.0, generator=torch.Generator().manual_seed(0), diag_reduce=[error_weighted_sum(errors_sq)])
    exact = (h.diagonal() * errors_sq).sum(1)  # 4 * 0.01 and 4 * 1e-4
    torch.testing.assert_close(result.diag[0].double(), exact, rtol=1e-6, atol=0)  # a diagonal H: v * Hv is exact (float32 out)
    average_trace = float(h.trace()) / 4 * errors_sq.sum(1)
    assert float(average_trace[0]) > 6 * float(exact[0])  # HAWQ-V2's Tr/n * ||e||^2 overrates it


def test_hutchinson_stops_early_at_tolerance():
    a = torch.eye(30, dtype=torch.float64) * 2  # Rademacher: v.Av = 2 * 30 exactly, every sample
    x = torch.zeros(30, dtype=torch.float64, requires_grad=True)
    result = hutchinson_trace(lambda: 0.5 * x @ a @ x, [x], iters=100, tol=1e-6, min_iters=3)
    assert result.converged and result.iters == 3 and result.total == pytest.approx(60.0)


def tiny_outlier_model():
    """A 2-block ViT whose block-1 GELU output has one huge channel (compensated in fc2): that site is fragile at per-tensor INT8."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=10, depth=2).eval()
    with torch.no_grad():
        mlp = model.blocks[1].mlp
        c = 400.0
        mlp.fc1.bias[7] += c  # GELU(z + c) = z + c for large c
        mlp.fc2.bias -= mlp.fc2.weight[:, 7] * c
    return model


def labelled(n: int = 2, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def sensitivity_of(model, recipe: str = "naive", act_widths=(8, 16), **settings):
    graph = attach_sites(model)
    specs = resolve_recipe(compose([f"quant={recipe}"]).quant, graph)
    state = calibrate(graph, specs, labelled(3, 8, seed=5), CPU, [8, 16])
    batches = labelled(1, 8, seed=9)
    s = SensitivitySettings(hutchinson_iters=4, hutchinson_min_iters=2, **settings)
    return compute_sensitivity(attach_sites(model), specs, state, batches, batches, s, [4, 8, 16], list(act_widths), CPU, meta={"model": "tiny"})


def test_suffix_runner_matches_the_full_forward():
    model = tiny_outlier_model()
    graph = attach_sites(model)
    graph.set_mode("fp")
    x = labelled(1)[0][0]
    runner = SuffixRunner(graph, [x], CPU)
    logits = runner.cache()
    with torch.inference_mode():
        for name in ("patch_embed.proj.weight", "blocks.0.in", "blocks.1.attn.sv", "norm", "head.weight"):
            torch.testing.assert_close(runner.run(0, runner.start(name)), logits[0])
        torch.testing.assert_close(logits[0], model(x), rtol=1e-4, atol=1e-5)


def test_noise_injection_ranks_the_artificially_sensitive_site_first():
    result = sensitivity_of(tiny_outlier_model())
    noise = measured_at(result, "noise_kl", "act")
    isolated = measured_at(result, "isolated_kl", "act")
    assert max(noise, key=noise.get) == "blocks.1.mlp.act"
    assert max(isolated, key=isolated.get) == "blocks.1.mlp.act"
    assert result["ranking"]["spearman"]["noise_kl_vs_isolated_kl/act"] > 0.5
    assert "blocks.1.mlp.act" in result["ranking"]["top5"]["noise_kl/act"]


def test_scores_per_site_and_width():
    result = sensitivity_of(tiny_outlier_model(), "recommended", act_widths=(4, 8, 16))  # uniform sites: calibrated at 8, 16 only
    w = result["sites"]["blocks.0.mlp.fc1.weight"]
    assert w["kind"] == "weight" and w["widths"] == [4, 8, 16] and w["elements"] == 192 * 768
    for method in ("noise_kl", "noise_loss", "hessian", "isolated_kl"):
        s = w["scores"][method]
        assert set(s) == {"4", "8", "16"}
        assert abs(s["4"]) > abs(s["8"]) > abs(s["16"])  # coarser weights, larger predicted drop
    a = result["sites"]["blocks.0.attn.sv"]
    assert a["widths"] == [8, 16] and a["hessian_trace"] is not None
    assert all(e["hessian_trace_stderr"] > 0 for e in result["sites"].values() if e["hessian_trace"])  # a noisy estimate says so
    assert a["scores"]["noise_kl"]["16"] < a["scores"]["noise_kl"]["8"] / 1000  # (2^8)^2 less noise energy
    soft = result["sites"]["blocks.0.attn.softmax"]  # log2: more bits add range, not resolution
    assert soft["quantizer"] == "log2" and soft["widths"] == [4, 8, 16]
    for method in ("noise_kl", "hessian"):
        s = soft["scores"][method]
        assert s["8"] == pytest.approx(s["16"], rel=1e-6)  # 8 bits already reach 2^-32 at frac_bits 3
        assert s["4"] > 10 * s["8"]  # 4 bits stop at 2^-1.9: most probabilities flush to zero
    assert result["meta"]["hutchinson"]["iters"] and result["meta"]["suffix_passes"]
    assert all(abs(s["hessian"]["4"]) > 0 for s in (result["sites"][n]["scores"] for n in result["sites"] if n.endswith(".weight")))


@pytest.mark.parametrize(
    "recipe, clips",
    [
        (["quant=recommended"], True),  # weights: an L2 range search per row, which clips
        (["quant=naive", "quant.roles.mlp_act.granularity=per_channel", "quant.weight.granularity=per_tensor"], False),  # min/max: one grid, folded columns
    ],
)
def test_clipped_weight_noise_stays_inside_the_grid_and_any_seed_works(recipe, clips):
    from pipeline.quant.quantizers import qrange
    from pipeline.quant.sites import storage_factor
    from pipeline.sensitivity.compute import SensitivityProbe, _site_gen, weight_noise

    model = tiny_outlier_model()
    graph = attach_sites(model)
    specs = resolve_recipe(compose(recipe).quant, graph)
    state = calibrate(graph, specs, labelled(3, 8, seed=5), CPU, [8, 16])
    probe = SensitivityProbe(attach_sites(model), specs, state, [4, 8], [8, 16], CPU)
    name = "blocks.1.mlp.fc2.weight"  # mlp_act's per-channel scales are folded into it
    w = probe.graph.module("blocks.1.mlp.fc2").weight.detach()
    scale, zero_point = (t.reshape(-1, 1) for t in probe.wgrids[name][4])
    factor = storage_factor(w, probe.folds[name], None)
    qmin, qmax = qrange(4, True)
    clipped = weight_noise(probe, name, 4, SensitivitySettings(noise_clip=True), _site_gen(10**20, 0))  # a seed beyond int64 too
    codes = clipped * factor / scale + zero_point  # the stored weight on the grid's real-valued code axis
    assert codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3
    free = weight_noise(probe, name, 4, SensitivitySettings(noise_clip=False), _site_gen(10**20, 0))
    assert ((free * factor / scale + zero_point).abs() > qmax + 0.5).any() == clips  # where the range clips, the clamp had work to do


def test_no_weights_and_no_activation_hessian_leave_the_hessian_empty():
    model = tiny_outlier_model()
    graph = attach_sites(model)
    specs = resolve_recipe(compose(["quant=naive", "quant.weight.enabled=false"]).quant, graph)
    state = calibrate(graph, specs, labelled(1, 8, seed=5), CPU, [8, 16])
    batches = labelled(1, 8, seed=9)
    s = SensitivitySettings(hutchinson_iters=2, hutchinson_min_iters=1, activation_hessian=False, isolated=False)
    result = compute_sensitivity(attach_sites(model), specs, state, batches, batches, s, [8, 16], [8, 16], CPU, meta={"model": "tiny"})
    assert result["sites"] and all("hessian" not in site["scores"] for site in result["sites"].values())
    assert all(site["scores"]["noise_kl"] for site in result["sites"].values())


def test_stage_writes_json_csv_plots_and_metrics(tmp_path, tiny_overrides, mlflow_uri, caplog):
    from mlflow.tracking import MlflowClient

    from pipeline.runner import run_pipeline

    # noise_batches 3 x 8 images asks for more than the 16 calibration images: said, and the 16 are used
    overrides = [*tiny_overrides, "quant=recommended", "stages=[calibrate,sensitivity]", "data.calib_size=16", "data.batch_size=8", "sensitivity.batch_size=8", "sensitivity.batches=1", "sensitivity.noise_batches=3", "sensitivity.hutchinson_iters=3", "sensitivity.hutchinson_min_iters=2", "threads=1"]
    with caplog.at_level("WARNING"):
        summary = run_pipeline(compose(overrides), tmp_path / "run")
    assert "sensitivity asks for 24 images" in caplog.text and "holds 16: it uses 16" in caplog.text
    folder = tmp_path / "run/sensitivity"
    data = json.loads((folder / "sensitivity.json").read_text())
    assert data["meta"]["recipe"] == "recommended" and len(data["sites"]) == summary["sensitivity_sites"]
    assert (folder / "sensitivity.csv").read_text().startswith("site,role,block,kind")
    assert (folder / "plots/scores_by_site.png").stat().st_size > 1000
    assert "spearman/noise_kl_vs_isolated_kl/act" in summary
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("vit-ptq").experiment_id])
    logged = set(next(r for r in runs if r.info.run_name == "sensitivity").data.metrics)
    assert {k for k in summary if k.startswith(("spearman/", "top5_overlap/"))} <= logged  # the same names as in summary.json
    methods = {m for e in data["sites"].values() for m in e["measured"]}
    assert "isolated_loss" in methods and {k.split("/")[0] for k in logged if k.startswith("sens_")} == {f"sens_{m}" for m in methods}


def test_log_axes_draw_scores_at_or_below_zero_at_a_floor_under_the_smallest_positive_one():
    from pipeline.sensitivity.run import log_floor

    assert log_floor([0.5, -1.0, 2e-3], [0.0]) == pytest.approx(2e-4)
    assert log_floor([-1.0], []) == 1e-12


def test_bad_noise_kind_is_one_clear_error(tmp_path, tiny_overrides):
    from pipeline.errors import PipelineError
    from pipeline.runner import run_pipeline

    with pytest.raises(PipelineError, match="sensitivity.noise: unknown noise 'pink'"):
        run_pipeline(compose([*tiny_overrides, "quant=naive", "stages=[calibrate,sensitivity]", "sensitivity.noise=pink"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_weights_are_quantized_at_the_noise_width_even_when_no_other_setting_names_it():
    """Noise scores of weights are measured at sensitivity.noise_bits: that width must be among the probe's."""
    from pipeline.stages.sensitivity import wanted_widths

    weights, acts = wanted_widths(compose(["sensitivity.noise_bits=6"]))
    assert 6 in weights and 6 not in acts  # activations need a calibration at 6 bits (candidate_bits)


def test_profiler_isolated_figures_of_another_model_are_not_used(tmp_path):
    from types import SimpleNamespace

    from pipeline.stages.sensitivity import profiler_isolated

    table = tmp_path / "evaluate" / "profile" / "isolated.json"
    table.parent.mkdir(parents=True)
    ctx = SimpleNamespace(fp32=SimpleNamespace(fingerprint="abc"), cfg=compose(["quant=naive"]), find=lambda stage, name, required: tmp_path / stage / name)
    for source, expected in (({"model": "abc", "recipe": "naive"}, {"blocks.0.attn.sv": 0.5}), ({"model": "other", "recipe": "naive"}, None), ({"model": "abc", "recipe": "recommended"}, None), ({}, None)):
        table.write_text(json.dumps({"mode": "isolated", **source, "sites": [{"site": "blocks.0.attn.sv", "logit_kl": 0.5}]}))
        assert profiler_isolated(ctx) == expected


def test_series_keys_do_not_change_with_the_sites_a_block_scores():
    from pipeline.stages.sensitivity import log_series

    # block 0 scored only norm2, block 1 both norms: each site keeps one key in every block
    sites = {f"blocks.{b}.{leaf}": ("norm_out", b) for b in range(2) for leaf in ("norm1", "norm2")}
    scored = {"blocks.0.norm2": 0.2, "blocks.1.norm1": 0.3, "blocks.1.norm2": 0.4}
    result = {
        "meta": {"noise_bits": 8},
        "sites": {name: {"role": "norm_out", "block": sites[name][1], "kind": "act", "measured": {"noise_kl": v}, "scores": {}} for name, v in scored.items()},
    }
    tracker = StepTracker()
    log_series(tracker, result, sites)
    assert tracker.logged == {
        0: {"sens_noise_kl/norm_out/norm2": 0.2},
        1: {"sens_noise_kl/norm_out/norm1": 0.3, "sens_noise_kl/norm_out/norm2": 0.4},
    }


def test_hessian_figures_pool_batches_by_their_images(monkeypatch):
    # Each batch's Hutchinson figures are of its mean loss. A stand-in estimator returns that mean
    # loss as every tensor's "trace": pooled correctly, batches of 6 and 2 images give the mean loss
    # over all 8 images, not the mean of the two batch means.
    import torch.nn.functional as F

    from pipeline.sensitivity import compute
    from pipeline.sensitivity.compute import SensitivityProbe, hessian_traces
    from pipeline.sensitivity.hutchinson import HutchinsonResult

    def mean_loss_as_trace(loss_fn, params, diag_reduce=None, **_):
        loss = float(loss_fn().detach())
        return HutchinsonResult([loss] * len(params), [loss] * len(params), 1, True, [torch.tensor([loss])] * len(params))

    monkeypatch.setattr(compute, "hutchinson_trace", mean_loss_as_trace)
    model = tiny_outlier_model()
    graph = attach_sites(model)
    specs = resolve_recipe(compose(["quant=naive"]).quant, graph)
    state = calibrate(graph, specs, labelled(1, 8, seed=5), CPU, [8, 16])
    (x, y), = labelled(1, 8, seed=9)
    probe = SensitivityProbe(graph, specs, state, [8], [8], CPU)
    traces = hessian_traces(probe, [x[:6], x[6:]], [y[:6], y[6:]], SensitivitySettings(activation_hessian=False))
    graph.set_mode("fp")
    with torch.no_grad():
        pooled = float(F.cross_entropy(graph.model(x), y))
        first, second = (float(F.cross_entropy(graph.model(x[s]), y[s])) for s in (slice(0, 6), slice(6, 8)))
    entry = traces["weights"]["head.weight"]
    assert entry["trace"] == pytest.approx(pooled, rel=1e-5)
    assert float(entry["diag"]) == pytest.approx(pooled, rel=1e-5)
    assert entry["stderr"] == pytest.approx(((first * 6 / 8) ** 2 + (second * 2 / 8) ** 2) ** 0.5, rel=1e-5)  # independent batches


def test_hutchinson_stopping_rule_is_relative_and_compares_consecutive_running_means():
    a = spd(40, seed=4)
    runs = []
    for scale in (1e-6, 1.0, 1e6):  # a relative tolerance stops at the same sample whatever the loss's scale
        x = torch.zeros(40, dtype=torch.float64, requires_grad=True)
        r = hutchinson_trace(lambda: 0.5 * scale * x @ a @ x, [x], iters=300, tol=2e-3, min_iters=2, generator=torch.Generator().manual_seed(5))
        runs.append(r)
    assert len({r.iters for r in runs}) == 1 and all(r.converged for r in runs)
    h = runs[1].history
    assert abs(h[-1] - h[-2]) <= 2e-3 * abs(h[-1])  # stopped because the last sample moved the mean less than tol
    assert all(abs(h[k] - h[k - 1]) > 2e-3 * abs(h[k]) for k in range(1, len(h) - 1))  # and not earlier


def _probe(recipe="recommended"):
    from pipeline.sensitivity.compute import SensitivityProbe

    model = tiny_outlier_model()
    graph = attach_sites(model)
    specs = resolve_recipe(compose([f"quant={recipe}"]).quant, graph)
    state = calibrate(graph, specs, labelled(2, 8, seed=5), CPU, [8, 16])
    return SensitivityProbe(attach_sites(model), specs, state, [4, 8], [8, 16], CPU), state


def test_hessian_scores_are_diag_times_squared_error_and_step_squared_over_12(monkeypatch):
    """With a stand-in estimator whose 'diagonal' is known (weights: 1 everywhere; activations: the channel
    index + 1 along the site's channel axis), the scores are the README's formulas computed by hand."""
    from pipeline.sensitivity import compute
    from pipeline.sensitivity.compute import SensitivitySettings, hessian_scores, hessian_traces
    from pipeline.sensitivity.hutchinson import HutchinsonResult

    probe, state = _probe()
    axes = {}

    def known_diag(loss_fn, params, diag_reduce=None, **_):
        diag = []
        for p, red in zip(params, diag_reduce):
            d = torch.ones_like(p)
            if p.dim() == 3 and id(p) in axes:  # activation delta: weight channel c by c + 1
                ax = axes[id(p)]
                shape = [1] * p.dim()
                shape[ax] = -1
                d = d * torch.arange(1, p.shape[ax] + 1, dtype=p.dtype).reshape(shape)
            diag.append(red(d.detach()))
        return HutchinsonResult([0.0] * len(params), [0.0] * len(params), 1, True, diag)

    real = compute._activation_perturbations

    def remember_axes(probe_, images, enabled):
        acts, deltas, reducers = real(probe_, images, enabled)
        for n, d in zip(acts, deltas):
            axes[id(d)] = probe_.graph[n].axis if probe_.graph[n].axis is not None else -1
        return acts, deltas, reducers

    monkeypatch.setattr(compute, "hutchinson_trace", known_diag)
    monkeypatch.setattr(compute, "_activation_perturbations", remember_axes)
    (x, y), = labelled(1, 4, seed=9)
    traces = hessian_traces(probe, [x], [y], SensitivitySettings())
    scores = hessian_scores(probe, traces)
    # weights: sum (Q_b(W) - W)^2 with diag(H) = 1 (the effective weight the quantized model uses)
    name = "blocks.1.mlp.fc2.weight"
    w = probe.graph.module("blocks.1.mlp.fc2").weight.detach().double()
    for b in (4, 8):
        expected = float((probe.qweights[name][b].double() - w).square().sum())
        assert scores[name][b] == pytest.approx(expected, rel=1e-5)
    # a per-channel activation (recommended: mlp_act per channel), B x N x C: sum_c (B*N*(c+1)) * step_c(b)^2 / 12
    act = "blocks.1.mlp.act"
    assert probe.specs[act].channelwise
    tokens = 4 * 17
    for b in (8, 16):
        step_sq = state.qparams(act, b)[0].double().square().flatten()
        weight = torch.arange(1, step_sq.numel() + 1, dtype=torch.float64) * tokens
        assert scores[act][b] == pytest.approx(float((weight * step_sq).sum() / 12), rel=1e-5)


def test_log2_error_energy_and_flush_point_match_the_log2_quantizer():
    from pipeline.quant.quantizers import fake_log2_quantize
    from pipeline.sensitivity.compute import log2_error_sq, log2_flush_point

    # e_b(x)^2 = x^2 (ln 2)^2 / 12 / 4^frac_bits where the grid keeps x
    x = torch.tensor([0.5], dtype=torch.float64)
    assert float(log2_error_sq(x, 8, 3)) == pytest.approx(0.25 * math.log(2) ** 2 / 12 / 64, rel=1e-12)
    assert float(log2_error_sq(x, 8, 0)) == pytest.approx(0.25 * math.log(2) ** 2 / 12, rel=1e-12)
    # the flush point is where the real quantizer starts to output 0
    for bits, frac in ((4, 0), (4, 2), (3, 1), (5, 3)):
        p = log2_flush_point(bits, frac)
        probs = torch.tensor([p * 1.001, p * 0.999], dtype=torch.float64)
        out = fake_log2_quantize(probs, bits, frac_bits=frac)
        assert out[0] > 0 and out[1] == 0, (bits, frac, p)


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_activation_noise_has_the_rounding_noise_variance_and_no_bias(kind):
    from pipeline.sensitivity.compute import SensitivitySettings, _site_gen, act_noise_fn

    probe, state = _probe("naive")  # per-tensor minmax: one step
    name = "blocks.0.attn.sv"
    step = float(state.qparams(name, 8)[0].flatten()[0])
    fn = act_noise_fn(probe, name, 8, SensitivitySettings(noise=kind), _site_gen(0, 0))
    x = torch.zeros(64, 17, 192)
    e = (fn(x) - x).double() / step
    assert abs(float(e.mean())) < 0.01
    assert float(e.var()) == pytest.approx(1 / 12, rel=0.03)
    if kind == "uniform":
        assert float(e.abs().max()) <= 0.5


def test_the_sensitivity_seed_changes_the_noise():
    from pipeline.sensitivity.compute import _site_gen

    a, b = (torch.rand(8, generator=_site_gen(seed, 3)) for seed in (0, 1))
    c = torch.rand(8, generator=_site_gen(0, 4))
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_weight_noise_has_the_stored_weights_unit_step_per_element():
    """Folded weight: the noise, mapped to the stored weight's code axis, is U(-1/2, 1/2) per element."""
    from pipeline.quant.sites import storage_factor
    from pipeline.sensitivity.compute import SensitivityProbe, SensitivitySettings, _site_gen, weight_noise

    model = tiny_outlier_model()
    graph = attach_sites(model)
    specs = resolve_recipe(compose(["quant=naive", "quant.roles.mlp_act.granularity=per_channel", "quant.weight.granularity=per_tensor"]).quant, graph)
    state = calibrate(graph, specs, labelled(2, 8, seed=5), CPU, [8, 16])
    probe = SensitivityProbe(attach_sites(model), specs, state, [8], [8, 16], CPU)
    name = "blocks.1.mlp.fc2.weight"
    w = probe.graph.module("blocks.1.mlp.fc2").weight.detach()
    scale = probe.wgrids[name][8][0].reshape(-1, 1) if probe.wgrids[name][8][0].numel() > 1 else probe.wgrids[name][8][0].reshape(())
    factor = storage_factor(w, probe.folds[name], None)
    assert not torch.allclose(factor, torch.ones_like(factor))  # the per-channel GELU scales are folded in
    e = ((weight_noise(probe, name, 8, SensitivitySettings(), _site_gen(0, 0)) - w) * factor / scale).double()
    assert float(e.abs().max()) <= 0.5 + 1e-4 and float(e.var()) == pytest.approx(1 / 12, rel=0.03)


def test_isolated_activation_scores_use_each_widths_own_qparams():
    result = sensitivity_of(tiny_outlier_model())
    s = result["sites"]["blocks.1.mlp.act"]["scores"]["isolated_kl"]
    assert s["16"] < s["8"] / 100  # INT16 on its own calibrated grid: (2^8)^2 less rounding noise
