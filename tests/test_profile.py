"""The per-site profiler: codes, streaming statistics, flags, trace, dump, errors, and one run end to end."""

from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors import safe_open

from pipeline.artifacts import read_tensors
from pipeline.errors import PipelineError
from pipeline.profile.codes import code_counts, code_index, code_plan, code_steps, column_values, count_axis, level_counts, levels_in_use
from pipeline.profile.dump import Capture, check_trace, resolve_dump, trace_site, write_dump
from pipeline.profile.flags import Thresholds, flag_counts, flag_rows, site_flags
from pipeline.profile.metrics import bit_utilization, compute_site_metrics, histogram_kl, kl_from_counts, saturation_from_values, sqnr_db, token_cosine, topk_hit_rates
from pipeline.profile.profiler import hist_grid, observe_site
from pipeline.profile.series import SERIES, log_rows, series_keys, summary_metrics
from pipeline.profile.stats import SiteStats, spread_sample, token_norms
from pipeline.quant.quantizers import fake_log2_quantize, fake_quantize, log2_quantize, quantize, round_to_int
from pipeline.quant.recipe import SiteSpec
from pipeline.quant.calibration import bind
from pipeline.quant.sites import Site, attach_sites
from pipeline.runner import run_pipeline
from tests.conftest import StepTracker, compose
from tests.test_calibration import tiny_model

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("one_thread")

# -- constructed sites ------------------------------------------------------------------


def uniform_site(scale, zero_point, bits: int = 8, name: str = "blocks.0.attn.sv", role: str = "sv_attn", axis: int = -1) -> Site:
    site = Site(name, role, axis=axis)
    site.bind(SiteSpec(bits=bits), bits, torch.tensor(scale, dtype=torch.float32), torch.tensor(zero_point, dtype=torch.float32))
    site.mode = "quant"
    return site


def log2_site(bits: int = 4, frac_bits: int = 0) -> Site:
    site = Site("blocks.0.attn.softmax", "intSoft")
    site.bind(SiteSpec(quantizer="log2", frac_bits=frac_bits), bits, None, None)
    site.mode = "quant"
    return site


# scale 0.1, zero point 10, codes 0..255: -2 -> -10 (clipped low), 30 -> 310 (clipped high), 0 and 0.04 -> 10,
# 0.05 -> 0.5 steps, a tie that half_up rounds to 1 -> 11, 1.0 -> 20.
X = torch.tensor([-2.0, 30.0, 0.0, 0.04, 0.05, 1.0])
CODES = [0, 255, 10, 10, 11, 20]


def test_codes_follow_quantize_with_known_clipping():
    site = uniform_site(0.1, 10.0)
    steps = code_steps(site, X)
    assert steps.codes.tolist() == CODES and steps.codes.dtype == torch.uint8
    assert steps.shifted.tolist() == [-10.0, 310.0, 10.0, 10.0, 11.0, 20.0]
    assert torch.equal(steps.codes, quantize(X, site.scale, site.zero_point, 8, False))
    assert torch.equal(steps.dequantized, fake_quantize(X, site.scale, site.zero_point, 0, 255))
    counts = code_counts(site, X)  # [clipped low, codes 0..255, clipped high]
    assert counts.shape == (1, 258)
    assert counts[0, 0] == 1 and counts[0, -1] == 1 and counts[0, 11] == 2 and counts[0, 12] == 1 and counts[0, 21] == 1
    assert counts.sum() == 6
    assert level_counts(counts)[0, [0, 10, 11, 20, 255]].tolist() == [1, 2, 1, 1, 1]


def test_bincount_equals_torch_bincount_and_starts_no_thread():
    from pipeline.quant import counts

    g = torch.Generator().manual_seed(0)
    before = set(threading.enumerate())
    for n in (7, 2**18 + 3, 2**20):
        index = torch.randint(0, 777, (n,), generator=g, dtype=torch.int32)
        torch.testing.assert_close(counts.bincount(index, 800), torch.bincount(index, minlength=800), rtol=0, atol=0)
        # the GPU path (a scatter-add: CUDA's bincount syncs with the host), checked here on the CPU
        torch.testing.assert_close(counts.scatter_count(index, 800), torch.bincount(index, minlength=800), rtol=0, atol=0)
    grid = index.view(-1, 64).t()  # non-contiguous: copied, same counts
    torch.testing.assert_close(counts.bincount(grid, 800), torch.bincount(grid.flatten(), minlength=800), rtol=0, atol=0)
    # torch ops on a thread of its own start a second OpenMP team (see pipeline/quant/counts.py)
    assert not set(threading.enumerate()) - before


def test_per_channel_codes_and_counts():
    site = uniform_site([0.1, 0.2, 0.5], [0.0, 5.0, 10.0])
    x = torch.tensor([[0.3, -1.2, 100.0], [-0.3, 0.7, 1.2]])
    steps = code_steps(site, x)
    assert torch.equal(steps.codes, quantize(x, site.scale, site.zero_point, 8, False, axis=-1))
    assert steps.codes.tolist() == [[3, 0, 210], [0, 9, 12]]  # 0.7/0.2 = 3.5 rounds half up to 4, + 5
    counts = code_counts(site, x, count_axis(site, x))
    assert counts.shape == (3, 258) and counts.sum(1).tolist() == [2, 2, 2]
    assert counts[0, 0] == 1 and counts[1, 0] == 1  # -0.3 and -1.2 clip low in channels 0 and 1
    values = column_values(site)
    assert values.shape == (3, 258)
    assert values[2, 1 + 12].item() == pytest.approx(1.0)  # code 12 of channel 2: (12 - 10) * 0.5


def test_log2_codes_flush_to_zero_as_clipped_high():
    site = log2_site(bits=4)  # codes 0..15
    p = torch.tensor([1.0, 0.5, 0.25, 0.3, 2.0**-20, 0.0])
    codes, zero_mask = log2_quantize(p, 4)
    steps = code_steps(site, p)
    assert torch.equal(steps.codes, codes) and steps.codes.tolist() == [0, 1, 2, 2, 15, 15]
    assert torch.equal(steps.dequantized, fake_log2_quantize(p, 4))
    assert torch.equal(steps.shifted > 15, zero_mask)
    counts = code_counts(site, p)
    assert counts[0, 0] == 0 and counts[0, -1] == 2  # two flushed to zero
    values = column_values(site)[0]
    assert values[0] == 1.0 and values[1 + 2] == 0.25 and values[-1] == 0.0


def test_log_sqrt2_codes_match_the_quantizer():
    site = log2_site(bits=4, frac_bits=1)  # levels 2^(-code/2), codes 0..15
    p = torch.tensor([1.0, 0.6, 0.5, 0.3, 2.0**-7.8, 0.0])
    codes, zero_mask = log2_quantize(p, 4, frac_bits=1)
    steps = code_steps(site, p)
    assert torch.equal(steps.codes, codes) and steps.codes.tolist() == [0, 1, 2, 3, 15, 15]
    assert torch.equal(steps.dequantized, fake_log2_quantize(p, 4, frac_bits=1))
    assert torch.equal(steps.shifted > 15, zero_mask)
    assert code_counts(site, p)[0, -1] == 2  # 2^-7.8 and 0 flushed
    values = column_values(site)[0]
    assert values[1 + 1].item() == pytest.approx(2**-0.5) and values[1 + 3].item() == pytest.approx(2**-1.5)


def test_saturation_and_utilization_match_the_metric_functions():
    site = uniform_site(0.1, 10.0)
    stats = SiteStats()
    y = fake_quantize(X, site.scale, site.zero_point, 0, 255)
    observe_site(stats, site, X, X, y)
    r = stats.result(8)
    pre_clamp = round_to_int(X / site.scale) + site.zero_point
    low, high = saturation_from_values(pre_clamp, 0, 255)
    assert (low, high) == pytest.approx((100 / 6, 100 / 6))
    assert (r["sat_low_pct"], r["sat_high_pct"]) == pytest.approx((low, high))
    levels, effective, fraction = bit_utilization(quantize(X, site.scale, site.zero_point, 8, False), 8)
    assert (r["levels_used"], r["levels_total"]) == (levels, 256) == (5, 256)
    assert r["effective_bits"] == pytest.approx(effective) and effective == pytest.approx(math.log2(5))
    assert r["level_pct"] == pytest.approx(100 * fraction)


def test_channel_levels_count_out_of_the_levels_a_channel_can_reach():
    # 4 values per channel (head.in-like: one per image): a channel cannot use more than 4 of the 256 levels
    site = uniform_site([0.1, 0.1, 0.1], [0.0, 0.0, 0.0])
    x = torch.tensor([[0.0, 0.0, 0.0], [0.1, 0.1, 0.0], [0.2, 0.1, 0.0], [0.3, 0.0, 0.0]])
    stats = SiteStats()
    observe_site(stats, site, x, x, fake_quantize(x, site.scale, site.zero_point, 0, 255, axis=-1))
    r = stats.result(8)
    assert r["channel_level_pct"] == pytest.approx(50.0)  # channels use 4, 2 and 1 of 4 reachable levels: median 2/4
    assert r["level_pct"] == pytest.approx(100 * 4 / 256)  # the tensor's share stays out of 2^bits


def test_levels_in_use_count_a_clipped_end_once():
    # columns: [clipped low, codes 0..3, clipped high]
    counts = torch.tensor([
        [2, 0, 1, 0, 0, 0],  # clipped low lands on code 0, unused otherwise: codes 0 and 1
        [2, 5, 1, 0, 0, 0],  # code 0 used already: still 2
        [0, 0, 0, 0, 0, 3],  # only clipped high: code 3
        [0, 0, 0, 0, 4, 1],  # code 3 used already: 1
        [0, 0, 0, 0, 0, 0],  # an empty channel: 0
    ])
    assert levels_in_use(counts).tolist() == [2, 2, 1, 1, 0]
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(0, 3, (64, 10), generator=g) * (torch.rand(64, 10, generator=g) < 0.4)
    assert torch.equal(levels_in_use(counts), (level_counts(counts) > 0).sum(1))


def test_token_norms_along_the_channels_of_an_image_batch():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 5, 7, generator=g)  # vectors: the 3 colour channels of each pixel
    assert torch.allclose(token_norms(images, 1), torch.linalg.vector_norm(images, dim=1), rtol=1e-6)
    tokens = torch.randn(2, 5, 8, generator=g)
    assert torch.equal(token_norms(tokens, -1), torch.linalg.vector_norm(tokens, dim=-1))
    test = images + 0.1 * torch.randn(images.shape, generator=g)
    stats = SiteStats(token_dim=1)
    stats.add_pair(images, test)
    cos_mean, cos_min = token_cosine(images, test, dim=1)
    assert stats.result()["cos_mean"] == pytest.approx(cos_mean, rel=1e-6)
    assert stats.result()["cos_min"] == pytest.approx(cos_min, rel=1e-6)


def test_streaming_stats_match_the_metric_functions():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 17, 32, generator=g) * torch.linspace(0.1, 3, 32) for _ in range(2)]
    site = uniform_site(0.02, 128.0)
    stats, plan = SiteStats(), None
    tests = [fake_quantize(b, site.scale, site.zero_point, 0, 255) for b in batches]
    for ref, test in zip(batches, tests):
        plan = observe_site(stats, site, ref, ref, test, plan)
    r = stats.result(8)
    ref, test = torch.cat(batches), torch.cat(tests)
    expected = compute_site_metrics(ref, test)
    assert r["sqnr_db"] == pytest.approx(sqnr_db(ref, test), rel=1e-5)
    assert r["mse"] == pytest.approx(expected.mse, rel=1e-5)
    assert r["cos_mean"] == pytest.approx(expected.cos_mean, rel=1e-6)
    assert r["cos_min"] == pytest.approx(expected.cos_min, rel=1e-6)
    one = SiteStats()  # one batch: same range as histogram_kl, so the same KL
    observe_site(one, site, batches[0], batches[0], tests[0])
    assert one.result(8)["hist_kl"] == pytest.approx(histogram_kl(batches[0], tests[0]), rel=1e-3)


def test_value_histograms_follow_the_level_grid_so_the_kl_sees_clipping_not_the_bin_width():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, 64, generator=g)  # 2,048 values per image: every value enters the FP32 histogram
    fine = uniform_site(0.05, 128.0)  # step 0.05 over about [-4.5, 4.5]: 256 plain bins are narrower than a step
    y = fine.fake_quant(x)
    assert histogram_kl(x, y) > 0.3  # plain bins: empty quantized bins between the levels make the KL
    stats = SiteStats(grid=hist_grid(fine))
    observe_site(stats, fine, x, x, y)
    assert stats.result(8)["hist_kl"] < 1e-3  # bins of whole cells: rounding moves no value to another bin
    lo, hi = stats.hist_range  # the grid's 256 levels, edges halfway between them, and one bin each side for clipped values
    assert stats.bins == 258 and (lo, hi) == pytest.approx(((-128 - 1.5) * 0.05, (127 + 1.5) * 0.05), abs=1e-6)
    clipped = uniform_site(0.005, 128.0)  # range about [-0.64, 0.64]: most of x is clipped onto the end levels
    stats = SiteStats(grid=hist_grid(clipped))
    observe_site(stats, clipped, x, x, clipped.fake_quant(x))
    assert stats.result(8)["hist_kl"] > 1.0
    soft = log2_site(bits=4)  # levels 2^0..2^-15 on -log2 p, then the underflow bin
    p = torch.randn(4, 3, 65, 65, generator=g).mul(3).softmax(-1)
    stats = SiteStats(grid=hist_grid(soft))
    observe_site(stats, soft, p, p, soft.fake_quant(p))
    assert stats.bins == 17 and stats.result()["hist_kl"] < 1e-3
    assert histogram_kl(p, soft.fake_quant(p)) > 0.3
    assert stats.histograms()["axis"].startswith("-log2(x)")
    logits = SiteStats(bins=None)  # 2 x 10 values: sqrt-sized bins, at least 8
    logits.add_pair(torch.randn(2, 10, generator=g), torch.randn(2, 10, generator=g))
    logits.histograms()
    assert logits.bins == 8


def test_value_histograms_do_not_depend_on_how_the_images_are_batched(monkeypatch):
    # The bins span the site's grid (known before any data), not the first batch's range; the FP32 sample
    # takes the same share of every batch; its bias, (occupied bins - 1) / 2n, is taken off the KL.
    import pipeline.profile.stats as stats_module

    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 65, 192, generator=g)  # 12,480 values per image: the FP32 histogram is a sample
    x_in = x + 0.2 * torch.randn(x.shape, generator=g)  # what reaches the site: FP32 plus upstream error
    site = uniform_site(0.05, 128.0)

    def profiled(batch: int, ref: torch.Tensor = x, inputs: torch.Tensor = x_in) -> SiteStats:
        stats = SiteStats(grid=hist_grid(site))
        for start in range(0, 16, batch):
            part = slice(start, start + batch)
            observe_site(stats, site, ref[part], inputs[part], site.fake_quant(inputs[part]))
        return stats

    whole, small, reversed_ = profiled(16), profiled(2), profiled(4, x.flip(0), x_in.flip(0))
    assert whole.hist_range == small.hist_range == reversed_.hist_range
    kls = [stats.result(8)["hist_kl"] for stats in (whole, small, reversed_)]
    monkeypatch.setattr(stats_module, "HIST_SAMPLES_PER_IMAGE", 10**9)
    exact = profiled(16).result(8)["hist_kl"]  # every FP32 value counted: nothing to take off
    monkeypatch.setattr(stats_module, "HIST_SAMPLES_PER_IMAGE", 2**11)
    biased = kl_from_counts(whole._ref_counts, whole.test_counts())
    assert biased - exact > 0.002  # the sample's bias alone is larger than the KL (~0.0012) here
    assert all(abs(kl - exact) < 0.001 for kl in kls), (kls, exact)  # within the sample's noise (sd ~0.0004)
    logits = SiteStats(bins=None)  # few values: every one is kept and binned over the range of all of them
    first, second = torch.randn(4, 10, generator=g), 5 + torch.randn(4, 10, generator=g)
    logits.add_pair(first, first)
    logits.add_pair(second, second + 0.01)
    histograms = logits.histograms()
    assert histograms["range"][0] == first.min() and histograms["range"][1] == pytest.approx(float(second.max() + 0.01))
    assert histograms["ref"].sum() == 80 and logits.bins == 8


def test_histogram_sample_takes_whole_rows_spread_over_every_token():
    x = torch.arange(8 * 65 * 192, dtype=torch.float32).view(8, 65, 192)  # value = memory position
    sample = spread_sample(x, 4096)
    values = sample.reshape(-1).long()
    rows = values.view(-1, 192)
    assert values.numel() <= 4096 and 4096 // 192 // 2 <= sample.shape[0] <= 4096 // 192
    assert torch.equal(rows % 192, torch.arange(192).expand_as(rows))  # whole rows: every channel of a picked token
    tokens = (rows[:, 0] // 192) % 65
    assert tokens.unique().numel() == rows.shape[0]  # the stride is coprime with 65: no token position twice
    assert torch.equal(spread_sample(x[:1, :2], 4096), x[:1, :2].flatten())  # small tensors: every value
    q = torch.randn(2, 65, 3, 64).permute(0, 2, 1, 3)  # a permuted view (attention heads): rows in memory order
    picked = spread_sample(q, 1024)
    assert picked.numel() <= 1024 and set(picked.reshape(-1).tolist()) <= set(q.reshape(-1).tolist())
    long_rows = torch.arange(2 * 5000, dtype=torch.float32).view(2, 5000)
    assert 0 < spread_sample(long_rows, 1000).numel() <= 1000  # rows longer than the limit: every k-th value


def test_softmax_rows_get_top_k_agreement():
    stats = SiteStats()
    # row 0: the argmax moves (2 -> 0) and index 2 leaves the top 5 (index 3 enters); row 1 is unchanged
    ref = torch.tensor([[0.1, 0.2, 0.3, 0.05, 0.04, 0.15, 0.16], [0.5, 0.2, 0.1, 0.09, 0.06, 0.03, 0.02]])
    test = torch.tensor([[0.3, 0.2, 0.01, 0.05, 0.04, 0.15, 0.16], [0.5, 0.2, 0.1, 0.09, 0.06, 0.03, 0.02]])
    stats.add_pair(ref, test)
    stats.add_rows(ref, test)
    r = stats.result()
    assert r["top1_agreement"] == 0.5 and r["top5_hit_rate"] == pytest.approx((4 / 5 + 1) / 2)


def test_row_limit_takes_evenly_strided_rows():
    ref = torch.eye(3).repeat(4, 1)  # 12 rows of length 3, argmax 0, 1, 2, 0, ...
    test = ref.clone()
    test[1::2] = test[1::2].roll(1, dims=1)  # odd rows change their argmax
    full, sampled = SiteStats(), SiteStats()
    full.add_rows(ref, test)
    sampled.add_rows(ref, test, limit=6)  # stride 2: rows 0, 2, ..., 10, all unchanged
    assert full.top1 / full.rows == 0.5 and sampled.rows == 12 and sampled.top1 / sampled.rows == 1.0


def test_sampled_batches_weigh_by_their_size():
    """Batches of different sizes (a last, short batch): sampled top-1 rates and FP32 histograms weigh each by its size."""
    torch.manual_seed(0)
    rows = SiteStats()
    big, small = torch.rand(3000, 8), torch.rand(1000, 8)
    rows.add_rows(big, big.clone(), limit=500)  # every argmax kept
    rows.add_rows(small, -small, limit=500)  # every argmax moved
    assert rows.rows == 4000 and rows.top1 / rows.rows == 0.75  # not 0.5, the mean of the two sampled batches
    hist = SiteStats()
    low, high = torch.rand(4, 800, 100) * 0.5, torch.rand(1, 800, 100) * 0.5 + 0.5  # both sampled: > 2,048 values per image
    low[0, 0, 0], low[0, 0, 1] = 0.0, 1.0  # without a grid, the histogram's range is set on the first batch: [0, 1]
    hist.add_pair(low, low.clone())
    hist.add_pair(high, high.clone())
    ref = hist.histograms()["ref"]
    assert float(ref[128:].sum() / ref.sum()) == pytest.approx(0.2, abs=0.005)  # 80,000 of 400,000 values lie in [0.5, 1]


# -- flags ------------------------------------------------------------------------------


def row(**metrics):
    base = {"quantizer": "uniform", "sqnr_db": 30.0, "cos_mean": 0.999, "sat_pct": 0.0, "level_pct": 80.0, "channel_level_pct": 50.0}
    return {**base, **metrics}


@pytest.mark.parametrize(
    "metrics, flags",
    [
        ({}, []),
        ({"cos_mean": 0.98}, ["cosine"]),
        ({"sat_pct": 6.0}, ["clipping"]),
        ({"sat_pct": 0.005, "channel_level_pct": 3.0}, ["wasted"]),  # no clipping and a typical channel uses 3 % of the levels
        ({"sat_pct": 0.005, "channel_level_pct": None, "level_pct": 3.0}, ["wasted"]),  # no per-channel counts: the whole tensor
        ({"sat_pct": 0.5, "channel_level_pct": 3.0}, []),  # clips a little: neither too wide nor too tight
        ({"quantizer": "log2", "channel_level_pct": 3.0}, []),  # a log2 grid is fixed, not calibrated
        ({"sqnr_db": 9.0, "cos_mean": 0.95, "sat_pct": 7.0}, ["cosine", "clipping", "low_sqnr"]),
        ({"sqnr_db": None, "cos_mean": None, "sat_pct": None}, []),
    ],
)
def test_flag_rules(metrics, flags):
    assert site_flags(row(**metrics), Thresholds()) == flags


def test_flag_thresholds_come_from_config():
    cfg = compose(["profile.sqnr_min_db=40", "profile.cos_min=0.5", "profile.wasted_levels_pct=60"]).profile
    th = Thresholds.from_config(cfg)
    assert (th.sqnr_min_db, th.cos_min, th.wasted_levels_pct, th.saturation_max_pct) == (40.0, 0.5, 60.0, 5.0)
    rows = flag_rows([row(cos_mean=0.9), row(sqnr_db=50.0, channel_level_pct=70.0)], th)
    assert [r["flags"] for r in rows] == [["wasted", "low_sqnr"], []]
    assert flag_counts(rows) == {"flagged": 1, "cosine": 0, "clipping": 0, "wasted": 1, "low_sqnr": 1}


def test_mlflow_keys_name_the_leaf_when_a_block_has_several_sites_of_a_role():
    sites = {"blocks.0.attn.sv": ("sv_attn", 0), "blocks.0.norm1": ("norm_out", 0), "blocks.0.norm2": ("norm_out", 0), "head.in": ("head_in", None)}
    assert series_keys(sites, "cos") == {"blocks.0.attn.sv": "cos/sv_attn", "blocks.0.norm1": "cos/norm_out/norm1", "blocks.0.norm2": "cos/norm_out/norm2"}

    # a recipe leaving some sites FP32: one site of a role per block, but not the same kind in every block
    partial = {"blocks.0.attn.v": ("qkv", 0), "blocks.1.attn.q": ("qkv", 1), "blocks.2.attn.q": ("qkv", 2), "blocks.2.attn.v": ("qkv", 2), "blocks.3.attn.sv": ("sv_attn", 3)}
    assert series_keys(partial, "sqnr") == {
        "blocks.0.attn.v": "sqnr/qkv/attn_v", "blocks.1.attn.q": "sqnr/qkv/attn_q", "blocks.2.attn.q": "sqnr/qkv/attn_q", "blocks.2.attn.v": "sqnr/qkv/attn_v", "blocks.3.attn.sv": "sqnr/sv_attn",
    }


def test_summary_metrics_keep_weights_out_of_the_activation_figures():
    from pipeline.profile.series import summary_metrics

    rows = [
        {"site": "blocks.0.attn.sv", "role": "sv_attn", "block": 0, "sqnr_db": 10.0, "flags": ["low_sqnr"]},
        {"site": "blocks.0.mlp.act", "role": "mlp_act", "block": 0, "sqnr_db": 20.0, "flags": []},
        {"site": "blocks.0.mlp.act2", "role": "mlp_act", "block": 0, "sqnr_db": math.inf, "flags": []},
        {"site": "blocks.0.mlp.fc1.weight", "role": "weight", "block": 0, "sqnr_db": 50.0, "flags": []},
    ]
    m = summary_metrics(rows)
    assert (m["sqnr_min"], m["profile/worst_sqnr"], m["profile/sqnr_mean"]) == (10.0, 10.0, 15.0)  # not (10 + 20 + 50) / 3
    assert (m["sqnr_min/weight"], m["profile/sqnr_mean/weight"], m["profile/sqnr_mean/mlp_act"]) == (50.0, 50.0, 20.0)
    assert m["profile/flagged"] == 1 and m["profile/flagged/low_sqnr"] == 1


def test_mlflow_keys_do_not_depend_on_which_sites_are_quantized():
    from pipeline.profile.series import log_rows

    # every site of the model; the recipe quantized res2 only, so only res2 has a row
    sites = {f"blocks.{b}.{leaf}": ("residual", b) for b in range(2) for leaf in ("res1", "res2")}
    rows = [{"site": f"blocks.{b}.res2", "role": "residual", "block": b, "sqnr_db": 20.0 + b} for b in range(2)]
    tracker = StepTracker()
    log_rows(tracker, rows, {"sqnr": "sqnr_db"}, sites)
    assert tracker.logged == {0: {"sqnr/residual/res2": 20.0}, 1: {"sqnr/residual/res2": 21.0}}  # not sqnr/residual


def test_artifacts_are_readable_like_a_plain_write(tmp_path):
    import os
    import stat

    from pipeline.artifacts import write_text

    (tmp_path / "plain.txt").write_text("x")
    write_text(tmp_path / "atomic.txt", "x")
    mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)  # noqa: E731
    assert mode("atomic.txt") == mode("plain.txt")


# -- trace, dump, errors ----------------------------------------------------------------


def test_trace_shows_every_step_and_the_worst_element_first():
    site = uniform_site(0.1, 10.0)
    y = fake_quantize(X, site.scale, site.zero_point, 0, 255)
    text = trace_site(site, Capture(X, X, y), elements=4)
    lines = text.splitlines()
    assert "scale=0.1 zero_point=10" in lines[1]
    for step in ("x/scale", "rounded", "+zp", "code", "dequantized", "error"):
        assert step in lines[2]
    worst = lines[3].split()
    assert worst[:8] == ["(1,)", "30", "30", "300", "300", "310", "255", "24.5"]  # 30 clips to code 255 = 24.5
    assert "worst error #1; clipped high" in lines[3]
    assert len(lines) == 3 + 4 and "clipped low" in text and "largest |x|" not in text  # 30 is already traced


def test_trace_prints_inputs_that_round_down_below_a_tie_exactly():
    site = uniform_site(1.0, 0.0)
    x = torch.tensor([2.4999998])  # float32 2.49999976: half_up gives 2, not the 3 of the tie 2.5
    line = trace_site(site, Capture(None, x, fake_quantize(x, site.scale, site.zero_point, 0, 255)), elements=1).splitlines()[3]
    assert line.split()[1:4] == ["2.49999976", "2.49999976", "2"]  # x, x/scale, rounded (no fp32 column)


def test_log2_trace_shows_the_flush_to_zero():
    site = log2_site(bits=4)
    p = torch.tensor([1.0, 0.3, 2.0**-20, 0.25])
    text = trace_site(site, Capture(None, p, fake_log2_quantize(p, 4)), elements=4)
    lines = text.splitlines()
    assert lines[2].split()[:5] == ["index", "fp32", "x", "-log2", "x"] and "+zp" not in lines[2]
    assert lines[3].split()[0] == "(1,)" and "worst error #1" in lines[3]  # 0.3 -> 2^-2: the largest error
    flushed = next(line for line in lines if line.split()[0] == "(2,)")
    assert flushed.split()[2:6] == ["20", "20", "15", "0"] and "flushed to 0" in flushed  # -log2, rounded, code, dequantized (no fp32 column here)


def test_ptf_trace_names_each_channels_mantissa_and_shift():
    # s_base = 8 / 2^3 = 1, f = 2: unit 0.25; channel scales 8 = 0.25 * (4 << 3), 1.25 = 0.25 * (5 << 0), 5 = 0.25 * (5 << 2), 1.5 = 0.25 * (6 << 0)
    site = Site("blocks.0.res1", "residual", axis=-1)
    site.bind(SiteSpec(granularity="ptf", ptf_shift=3, ptf_frac_bits=2, signed=True, symmetric=True), 6, torch.tensor([8.0, 1.25, 5.0, 1.5]), torch.zeros(4))
    site.mode = "quant"
    x = torch.tensor([[100.0, 3.0, -7.0, 0.4], [1.0, -50.0, 9.0, 2.0]])
    text = trace_site(site, Capture(None, x, site(x)), elements=8)
    lines = text.splitlines()
    assert site.granularity == "ptf" and "ptf: scale_c = 0.25 * (m_c << k_c), m_c in 4..7, k_c in 0..3 (ptf_frac_bits=2)" in lines[2]
    expected = {0: "4<<3", 1: "5<<0", 2: "5<<2", 3: "6<<0"}  # by channel
    traced = [line for line in lines[4:] if line.strip().startswith("(")]
    assert len(traced) == 8
    for line in traced:
        channel = int(line.split(")")[0].split(",")[1])  # index "(row, channel)"
        assert f"m<<k = {expected[channel]}" in line


def test_dump_writes_fp32_codes_dequantized_and_qparams(tmp_path):
    site = uniform_site([0.1, 0.2, 0.5], [0.0, 5.0, 10.0])
    x = torch.randn(2, 5, 3)
    y = fake_quantize(x, site.scale, site.zero_point, 0, 255, axis=-1)
    path = write_dump(tmp_path, site, Capture(x + 0.01, x, y))
    assert path.name == "blocks.0.attn.sv.safetensors"
    t = read_tensors(path)
    assert set(t) == {"fp32", "input", "codes", "dequantized", "output", "scale", "zero_point"}
    assert torch.equal(t["codes"], quantize(x, site.scale, site.zero_point, 8, False, axis=-1))
    assert torch.equal(t["dequantized"], y) and torch.equal(t["fp32"], x + 0.01)
    assert t["scale"].tolist() == pytest.approx([0.1, 0.2, 0.5]) and t["zero_point"].tolist() == [0.0, 5.0, 10.0]
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["granularity"] == "per_channel" and f.metadata()["bits"] == "8"


def test_a_log2_dump_decodes_with_the_frac_bits_it_records(tmp_path):
    site = log2_site(bits=4, frac_bits=1)  # levels 2^(-code/2), codes 0..15
    p = torch.tensor([[0.9, 0.3, 0.05, 2.0**-12]])
    y = fake_log2_quantize(p, 4, frac_bits=1)
    t = read_tensors(write_dump(tmp_path, site, Capture(None, p, y)))
    with safe_open(str(tmp_path / f"{site.name}.safetensors"), "pt") as f:
        frac_bits = int(f.metadata()["frac_bits"])
    decoded = torch.where(t["zero_mask"], 0.0, torch.exp2(-t["codes"].float() / 2**frac_bits))
    assert frac_bits == 1 and t["zero_mask"].tolist() == [[False, False, False, True]] and torch.equal(decoded, t["dequantized"])
    text = trace_site(site, Capture(None, p, y), elements=4)
    assert "dequantized = 2^(-code / 2^1)" in text and "-log2 x*2^1" in text.splitlines()[2]


def test_bad_dump_glob_and_trace_site_end_with_one_clear_line():
    graph = attach_sites(tiny_model())
    graph.set_mode("quant", ["blocks.0.attn.sv"])
    assert resolve_dump(["blocks.*.attn.sv"], graph) == ["blocks.0.attn.sv"]  # only quantized sites are dumped
    cases = [
        (lambda: resolve_dump(["blocks.*.attn.out"], graph), r"profile.dump: glob 'blocks.\*.attn.out' matches no site"),
        (lambda: resolve_dump(["blocks.1.mlp.act"], graph), "matches only sites that are not quantized"),
        (lambda: check_trace("blocks.0.attn.svv", graph), "profile.trace: unknown site 'blocks.0.attn.svv'"),
        (lambda: check_trace("blocks.1.mlp.act", graph), "profile.trace: site 'blocks.1.mlp.act' is not quantized"),
    ]
    for call, message in cases:
        with pytest.raises(PipelineError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


# -- end to end -------------------------------------------------------------------------


def test_evaluate_profiles_every_site_into_tables_html_plots_and_mlflow(tmp_path, tiny_overrides, mlflow_uri, capsys):
    base = [*tiny_overrides, "quant=naive", "threads=1", "data.eval_size=16", "data.calib_size=16"]
    overrides = [
        *base, "stages=[calibrate,quantize,evaluate]", "tracking.run_name=profiled", "profile.images=8",
        "profile.dump=[blocks.1.attn.sv,blocks.0.mlp.fc1.weight]", "profile.trace=blocks.1.mlp.act", "profile.worst_k=1",
    ]
    summary = run_pipeline(compose(overrides), tmp_path / "run")
    folder = tmp_path / "run/evaluate/profile"
    table = json.loads((folder / "cumulative.json").read_text())
    assert table["mode"] == "cumulative" and table["images"] == 8
    by_site = {r["site"]: r for r in table["sites"]}
    metrics = ("sqnr_db", "cos_mean", "cos_min", "mse", "hist_kl", "sat_low_pct", "sat_high_pct", "levels_used", "effective_bits", "channel_level_pct", "scale_min", "zero_point_min")
    for name in ("blocks.0.attn.sv", "blocks.1.attn.sv", "blocks.0.mlp.act", "blocks.1.mlp.act"):
        assert all(by_site[name][m] is not None for m in metrics), name
    assert by_site["blocks.1.attn.softmax"]["top1_agreement"] is not None and by_site["blocks.0.mlp.fc1.weight"]["role"] == "weight"
    assert [r["rank"] for r in table["sites"]] == list(range(1, len(table["sites"]) + 1))
    sqnrs = [r["sqnr_db"] for r in table["sites"]]
    assert sqnrs == sorted(sqnrs)  # worst first
    assert (folder / "cumulative.csv").read_text().startswith("rank,site,role,block")
    for plot in ("sqnr_by_block", "cos_by_block", "saturation_by_block", "utilization_by_block", "channel_utilization_by_block"):
        assert (folder / "plots" / f"{plot}.png").stat().st_size > 1000, plot
    assert len(list((folder / "plots").glob("hist_*.png"))) == 1
    page = (folder / "profile.html").read_text()
    # self-contained: every src/href is inline (base64 data may hold "http" by chance, so only links are checked)
    assert page.count("data:image/png;base64,") == 6 and not re.search(r"""(src|href)\s*=\s*(?!["']?data:)""", page)
    assert {p.name for p in (folder / "dump").iterdir()} == {"blocks.1.attn.sv.safetensors", "blocks.0.mlp.fc1.weight.safetensors"}
    assert read_tensors(folder / "dump/blocks.1.attn.sv.safetensors")["codes"].shape[0] == 4  # dump_samples
    assert "trace blocks.1.mlp.act" in (folder / "trace.txt").read_text() and "trace blocks.1.mlp.act" in capsys.readouterr().out
    assert summary["profile_s"] > 0 and summary["profile/flagged"] >= 0 and "profile/sqnr_mean/sv_attn" in summary

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("vit-ptq")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "profiled")
    evaluate = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and r.info.run_name == "evaluate")
    for key in ("sqnr/sv_attn", "cos/mlp_act", "sat/sv_attn", "levels/norm_out/norm1", "sqnr/weight/mlp_fc1_weight"):
        assert sorted(m.step for m in client.get_metric_history(evaluate.info.run_id, key)) == [0, 1], key
    assert "profile/flagged" in evaluate.data.metrics and "profile_s" in evaluate.data.metrics
    assert "evaluate/profile/profile.html" in {a.path for a in client.list_artifacts(evaluate.info.run_id, "evaluate/profile")}

    # the profiled images' logits come from the profile's quantized forward, the rest from predict:
    # the same evaluation as without the profile (every image through predict)
    plain = run_pipeline(compose([*base, "stages=[evaluate]", f"from_run={tmp_path / 'run'}", "profile.enabled=false"]), tmp_path / "plain")
    for key in ("top1", "top5", "agreement", "images"):
        assert summary[key] == plain[key], key
    for key in ("loss", "logit_kl"):
        assert summary[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-9), key


def test_bad_profile_request_fails_before_any_stage_runs(tmp_path, tiny_overrides):
    cfg = compose([*tiny_overrides, "quant=naive", "stages=[calibrate,quantize,evaluate]", "threads=1", "profile.trace=blocks.0.attn.svv"])
    with pytest.raises(PipelineError, match="profile.trace: unknown site 'blocks.0.attn.svv'; did you mean blocks.0.attn.sv"):
        run_pipeline(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # a site the recipe leaves in FP32: known from the recipe before calibration, not after it
    fp32_site = [*tiny_overrides, "quant=naive", "stages=[calibrate,quantize,evaluate]", "threads=1", "+quant.sites={blocks.0.attn.sv:{enabled:false}}"]
    with pytest.raises(PipelineError, match="profile.trace: site 'blocks.0.attn.sv' is not quantized"):
        run_pipeline(compose([*fp32_site, "profile.trace=blocks.0.attn.sv"]), tmp_path / "run")
    with pytest.raises(PipelineError, match="profile.dump: glob 'blocks.0.attn.sv' matches only sites that are not quantized"):
        run_pipeline(compose([*fp32_site, "profile.dump=[blocks.0.attn.sv]"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cumulative_pass_pairs_each_site_with_the_fp32_tensor_of_the_same_site():
    from pipeline.profile.collect import BatchRecorder
    from pipeline.profile.profiler import cumulative_pass
    from tests.test_calibration import batches, calibrated

    model, graph, specs, state = calibrated("naive")
    bind(graph, specs, state)
    fp_graph = attach_sites(model)
    images = batches(1, size=3)[0][0]
    result = cumulative_pass(fp_graph, graph, [images], CPU)  # the two graphs block by block in lockstep
    whole = {}
    with torch.inference_mode():  # the reference: whole forwards, one graph after the other
        for key, g in (("fp", fp_graph), ("quant", graph)):
            recorder = BatchRecorder()
            g.set_tap(recorder)
            whole[key] = (g.model(images), recorder.take())
            g.set_tap(None)
    assert torch.equal(result.fp_logits[0], whole["fp"][0]) and torch.equal(result.logits[0], whole["quant"][0])
    rows = {r["site"]: r for r in result.rows}
    assert set(rows) == set(whole["quant"][1])
    for name in ("patch_embed.proj.in", "blocks.0.in", "blocks.0.attn.sv", "blocks.1.mlp.act", "blocks.1.res2", "norm", "head.in"):
        assert rows[name]["sqnr_db"] == pytest.approx(sqnr_db(whole["fp"][1][name], whole["quant"][1][name]), abs=1e-4), name


def test_isolated_mode_quantizes_one_site_at_a_time_and_restores_the_modes():
    from pipeline.profile.profiler import cumulative_pass, isolated_pass, weight_pass
    from pipeline.profile.report import ranked
    from tests.test_calibration import batches, calibrated

    model, graph, specs, state = calibrated("naive")
    bind(graph, specs, state)
    modes = {n: s.mode for n, s in graph.sites.items()}
    images = [b[0] for b in batches(1, size=4)]
    fp = cumulative_pass(attach_sites(model), graph, images, CPU)
    weights = weight_pass(graph)
    chosen = ["blocks.0.attn.sv", "blocks.1.attn.sv", "blocks.1.mlp.fc2.weight"]
    result = isolated_pass(graph, images, fp.fp_logits, CPU, {r["site"]: r for r in weights.rows}, names=chosen)
    assert {n: s.mode for n, s in graph.sites.items()} == modes and all(s.tap is None for s in graph)
    rows = {r["site"]: r for r in result.rows}
    assert list(rows) == chosen and all(r["mode"] == "isolated" for r in rows.values())
    for r in rows.values():
        assert r["logit_sqnr_db"] > fp.output["sqnr_db"]  # one site alone hurts the output less than all of them
        assert 0.0 <= r["logit_agreement"] <= 1.0 and r["sqnr_db"] is not None and r["sat_pct"] is not None
    # alone, the site sees its FP32 input: its own error only, at least as good as with every site quantized
    assert rows["blocks.1.attn.sv"]["sqnr_db"] > {r["site"]: r for r in fp.rows}["blocks.1.attn.sv"]["sqnr_db"]
    assert rows["blocks.1.mlp.fc2.weight"]["sqnr_db"] == pytest.approx({r["site"]: r for r in weights.rows}["blocks.1.mlp.fc2.weight"]["sqnr_db"])
    worst = ranked(result.rows, "logit_sqnr_db")[0]
    assert worst["rank"] == 1 and worst["logit_sqnr_db"] == min(r["logit_sqnr_db"] for r in result.rows)


def test_isolated_rows_rerun_from_the_sites_block_match_a_full_forward():
    from pipeline.profile.metrics import logit_kl, sqnr_db
    from pipeline.profile.profiler import cumulative_pass, isolated_pass
    from tests.test_calibration import batches, calibrated

    model, graph, specs, state = calibrated("naive")
    bind(graph, specs, state)
    images = [b[0] for b in batches(2, size=3)]
    fp_logits = cumulative_pass(attach_sites(model), graph, images, CPU).fp_logits
    chosen = ["patch_embed.proj.in", "blocks.0.in", "blocks.1.attn.softmax", "blocks.1.mlp.fc1.weight", "head.in"]
    rows = {r["site"]: r for r in isolated_pass(graph, images, fp_logits, CPU, names=chosen).rows}
    assert list(rows) == chosen
    modes = {n: s.mode for n, s in graph.sites.items()}
    ref = torch.cat(fp_logits)
    try:
        for name in chosen:  # the same site alone, whole forward from the image
            graph.set_mode("fp")
            graph[name].mode = "quant"
            with torch.inference_mode():
                logits = torch.cat([graph.model(x) for x in images])
            assert rows[name]["logit_kl"] == pytest.approx(logit_kl(ref, logits), rel=1e-4, abs=1e-9), name
            assert rows[name]["logit_sqnr_db"] == pytest.approx(sqnr_db(ref, logits), abs=1e-3), name
    finally:
        for n, mode in modes.items():
            graph.sites[n].mode = mode


@pytest.mark.parametrize("make", [lambda: uniform_site([0.05, 0.2, 0.5], [5, 0, 10]), lambda: log2_site(4, 1)])
def test_codes_handed_over_by_the_site_match_recomputed_codes(make):
    site = make()
    x = torch.rand(2, 7, 3) * (1.0 if site.role == "intSoft" else 40.0) - (0.0 if site.role == "intSoft" else 10.0)
    plan = code_plan(site, x, count_axis(site, x))
    handed = []
    y = site.fake_quant(x, lambda s, t, rounded: handed.append(code_index(plan, t, rounded)))  # clamps `rounded` in place
    assert torch.equal(y, site.fake_quant(x))  # the in-place clamp leaves the output unchanged
    assert len(handed) == 1 and torch.equal(handed[0], code_index(plan, x))


def test_compare_draws_two_profiles_and_rejects_a_bad_table(tmp_path):
    from pipeline.profile.compare import main as compare_main

    def table(sqnr: float) -> Path:
        rows = [{"site": f"blocks.{b}.attn.sv", "role": "sv_attn", "block": b, "sqnr_db": sqnr + b, "sat_pct": 0.0, "channel_level_pct": 50.0} for b in range(3)]
        path = tmp_path / f"p{sqnr}.json"
        path.write_text(json.dumps({"sites": rows}))
        return path

    out = tmp_path / "new_folder" / "cmp.png"  # the folder is created
    compare_main([f"naive={table(5.0)}", f"recommended={table(30.0)}", "--roles", "sv_attn", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["cmp.png"]  # no temp file left
    with pytest.raises(SystemExit, match="unknown metric.* saturation .*choose from sqnr_db"):
        compare_main([f"a={table(5.0)}", "--roles", "sv_attn", "--metrics", "sqnr_db,saturation", "--out", str(out)])
    with pytest.raises(SystemExit, match="no sites of role"):
        compare_main([f"a={table(5.0)}", "--roles", "mlp_act", "--out", str(out)])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a profile table"):
        compare_main([f"a={tmp_path / 'bad.json'}", "--out", str(out)])
    with pytest.raises(SystemExit, match="--out .*new_folder is a folder"):
        compare_main([f"a={table(5.0)}", "--roles", "sv_attn", "--out", str(out.parent)])
    for row, message in [({"role": "sv_attn", "block": 0}, "site row 0 needs a 'site' and a 'role'"),
                         ({"site": "blocks.x", "role": "sv_attn", "block": 0}, "site row 0 \\(blocks.x\\): 'block' 0 needs an integer and a site named"),
                         ({"site": "blocks.0.attn.sv", "role": "sv_attn", "block": "0"}, "'block' '0' needs an integer")]:
        (tmp_path / "rows.json").write_text(json.dumps({"sites": [row]}))
        with pytest.raises(SystemExit, match=message):  # a hand-edited row: one line, not a KeyError while drawing
            compare_main([f"a={tmp_path / 'rows.json'}", "--roles", "sv_attn", "--out", str(out)])


def test_wasted_threshold_is_drawn_only_on_panels_of_uniform_sites():
    from pipeline.profile.report import _judged_roles, block_figure

    rows = [{"site": f"blocks.{b}.{leaf}", "role": role, "block": b, "quantizer": q, "channel_level_pct": 40.0}
            for b in range(2) for leaf, role, q in (("attn.softmax", "intSoft", "log2"), ("mlp.act", "mlp_act", "uniform"))]
    fig = block_figure(rows, "channel_level_pct", "t", "%", 10.0, _judged_roles(rows, "wasted_levels_pct"))
    dashed = {ax.get_title(): sum(line.get_linestyle() == "--" for line in ax.get_lines()) for ax in fig.axes}
    assert dashed == {"intSoft": 0, "mlp_act": 1}  # a log2 grid is fixed: the wasted flag never judges it
    assert _judged_roles(rows, "saturation_max_pct") is None  # other thresholds: every panel


def test_compare_keeps_one_colour_per_profile_across_panels():
    from pipeline.profile.compare import compare_figure

    def rows(offset: float) -> list[dict]:  # residual has two sites a block (res1, res2), sv_attn one
        sites = [(f"blocks.{b}.{leaf}", role) for b in range(2) for leaf, role in (("res1", "residual"), ("res2", "residual"), ("attn.sv", "sv_attn"))]
        return [{"site": s, "role": role, "block": int(s.split(".")[1]), "sqnr_db": offset + i} for i, (s, role) in enumerate(sites)]

    fig = compare_figure({"naive": rows(0.0), "recommended": rows(20.0)}, ("residual", "sv_attn"), ("sqnr_db",))
    colours: dict[str, set[str]] = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            colours.setdefault(line.get_label().split()[0], set()).add(line.get_color())
        assert ax.get_legend() is not None  # every role's panel names its own lines
    assert len(colours["naive"]) == len(colours["recommended"]) == 1 and colours["naive"] != colours["recommended"]


def test_weight_rows_compare_the_stored_folded_weight_and_read_gptq_codes_back():
    from pipeline.profile.dump import dump_tensors
    from pipeline.profile.profiler import weight_pass
    from tests.test_calibration import calibrated

    model, graph, specs, state = calibrated("recommended")  # gptq weights; per-channel mlp_act folded into fc2
    bind(graph, specs, state)
    name = "blocks.1.mlp.fc2.weight"
    site, fc2 = graph[name], graph.module("blocks.1.mlp.fc2")
    s = graph.fold_scale("blocks.1.mlp.fc2")
    assert site.spec.gptq and s is not None and float(s.max() / s.min()) > 1.5
    folded, stored = fc2.weight * s, fc2.qweight * s  # W·diag(s) and its dequantized codes
    weights = weight_pass(graph, capture=[name])
    row = {r["site"]: r for r in weights.rows}[name]
    assert row["sqnr_db"] == pytest.approx(sqnr_db(folded, stored), abs=1e-6)
    assert abs(sqnr_db(fc2.weight, fc2.qweight) - row["sqnr_db"]) > 1e-3  # not the unfolded weight space
    dumped = dump_tensors(site, weights.captures[name])
    codes = dumped["codes"].float()
    scale = site.scale.reshape(-1, 1)
    assert torch.allclose(codes * scale, stored, rtol=0, atol=1e-3 * float(scale.min()))  # the codes GPTQ stored (to a 1000th of a step)
    nearest = round_to_int(folded / scale, site.spec.rounding).clamp(site.qmin, site.qmax)
    assert not torch.equal(codes, nearest)  # GPTQ moved some codes off the nearest ones
    assert row["levels_used"] == int(torch.unique(codes).numel())


# ---------------------------------------------------------------- metrics.py


def test_token_cosine_of_tiny_vectors_is_scale_free() -> None:
    # cos = <r, t> / (|r| |t|) has no epsilon: tiny tokens (|r| = 1e-4) still give exactly 1
    ref = torch.tensor([[1e-4, 0.0], [0.0, 3e-5]])
    assert token_cosine(ref, ref * 2) == pytest.approx((1.0, 1.0), abs=1e-12)


def test_histogram_kl_default_smoothing_is_1e_10() -> None:
    # 2 bins: p = (0.5, 0.5), q = (1, 0); p_i = (c_i/n + eps) / (1 + 2 eps), eps = 1e-10
    eps = 1e-10
    p = [(0.5 + eps) / (1 + 2 * eps)] * 2
    q = [(1 + eps) / (1 + 2 * eps), eps / (1 + 2 * eps)]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))  # ~ 0.5 ln(2.5e9) = 10.83
    assert histogram_kl(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]), bins=2) == pytest.approx(expected, rel=1e-9)
    assert kl_from_counts(torch.tensor([1, 1]), torch.tensor([2, 0])) == pytest.approx(expected, rel=1e-9)  # the streaming path's default


def test_top5_is_left_none_for_rows_of_five_or_fewer() -> None:
    ref = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5]])
    m = compute_site_metrics(ref, ref.flip(-1), topk_rows=True)
    assert m.top1_agreement == 0.0 and m.top5_hit_rate is None


# ---------------------------------------------------------------- codes.py


def test_log2_smallest_level_is_kept_not_flushed() -> None:
    site = log2_site(bits=4)  # codes 0..15: 2^-15 is the smallest level, below it flushes to 0
    steps = code_steps(site, torch.tensor([2.0**-15, 2.0**-16]))
    assert steps.codes.tolist() == [15, 15] and steps.dequantized.tolist() == [2.0**-15, 0.0]


def test_signed_site_codes_are_int8() -> None:
    site = Site("blocks.0.attn.sv", "sv_attn")
    site.bind(SiteSpec(bits=8, signed=True, symmetric=True), 8, torch.tensor(0.5), torch.tensor(0.0))
    site.mode = "quant"
    steps = code_steps(site, torch.tensor([-1.0, 0.5, -100.0]))
    assert steps.codes.dtype == torch.int8 and steps.codes.tolist() == [-2, 1, -128]


# ---------------------------------------------------------------- stats.py


def _observe(site, x):
    stats = SiteStats(grid=hist_grid(site))
    observe_site(stats, site, x, x, site.fake_quant(x))
    return stats


def test_channel_levels_reachable_is_capped_at_two_to_the_bits() -> None:
    # 4-bit, 2 channels, 100 values each over codes 0..15: every channel uses all 16 reachable levels -> 100 %
    site = uniform_site([1.0, 1.0], [0.0, 0.0], bits=4)
    x = (torch.arange(100.0) % 16).unsqueeze(1).repeat(1, 2)
    assert _observe(site, x).result(4)["channel_level_pct"] == pytest.approx(100.0)


def test_channel_levels_count_a_clipped_end_level() -> None:
    # 8-bit, 3 channels of 4 values; channel 0: 0, 1, 2 and one value clipped onto 255 -> 4 of 4 levels
    site = uniform_site([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [2.0, 2.0, 0.0], [900.0, 3.0, 1.0]])
    r = _observe(site, x).result(8)
    assert r["channel_level_pct"] == pytest.approx(100.0)  # channels: 4/4, 4/4, 2/4 -> median 100
    assert r["sat_high_pct"] == pytest.approx(100 / 12)


def test_kl_bias_correction_uses_the_finite_population_factor() -> None:
    # (1, 2, 2048): one of the two rows is sampled (n = 2048 of N = 4096), weighted x2.
    # FP32: row values 0 (first half) and 1 (second half) -> 2 occupied bins, P = (.5, .5).
    # Codes from the site's input x_in = 0 everywhere -> Q = (1, 0).
    site = uniform_site(1.0, 128.0)
    ref = torch.cat([torch.zeros(1024), torch.ones(1024)]).repeat(1, 2, 1)
    x_in = torch.zeros_like(ref)
    stats = SiteStats(grid=hist_grid(site))
    observe_site(stats, site, ref, x_in, site.fake_quant(x_in))
    bins = stats.bins
    p = torch.zeros(bins, dtype=torch.float64)
    q = torch.zeros(bins, dtype=torch.float64)
    p[0], p[1], q[0] = 2048, 2048, 4096
    expected = kl_from_counts(p, q) - (2 - 1) / (2 * 2048) * (1 - 2048 / 4096)
    assert stats.result(8)["hist_kl"] == pytest.approx(expected, rel=0, abs=1e-9)


def test_bins_hold_whole_cells_and_stay_at_most_256_plus_two() -> None:
    # 9-bit per-tensor: 512 levels over 256 bins -> 2 levels per bin, edges halfway between levels
    site = uniform_site(0.05, 256.0, bits=9)
    stats = _observe(site, torch.randn(2, 4, 8))
    lo, hi = stats.hist_range
    assert stats.bins == 258 and (hi - lo) == pytest.approx(258 * 2 * 0.05)
    assert lo == pytest.approx((-256 - 0.5) * 0.05 - 2 * 0.05)


def test_log2_histogram_bins_follow_frac_bits() -> None:
    # log-sqrt2 (frac_bits 1): level c is 2^(-c/2) and sits in bin c of -log2(x) * 2
    site = log2_site(bits=4, frac_bits=1)
    p = torch.tensor([[1.0, 2**-0.5, 2**-1.0, 2**-1.5]])
    stats = _observe(site, p)
    assert stats.histograms()["ref"][:4].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_logit_kl_is_the_mean_over_rows_across_batches() -> None:
    # rows 0 and 2: KL(softmax(0, 0) || softmax(ln 3, 0)) = 0.5 ln(4/3); row 1: 0. Batches [0, 1] and [2].
    stats = SiteStats()
    ref = torch.zeros(3, 2)
    test = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [math.log(3.0), 0.0]])
    for part in (slice(0, 2), slice(2, 3)):
        stats.add_pair(ref[part], test[part])
        stats.add_rows(ref[part], test[part], kl=True)
    assert stats.result()["logit_kl"] == pytest.approx(2 * 0.5 * math.log(4 / 3) / 3)


def test_row_limit_never_takes_more_than_limit_rows() -> None:
    # 13 rows, limit 6: stride ceil(13/6) = 3 -> rows 0, 3, 6, 9, 12 (all agree); stride 2 would also take 2, 4, 8, 10
    ref = torch.eye(3).repeat(5, 1)[:13]
    test = ref.clone()
    for i in (2, 4, 8, 10):
        test[i] = test[i].roll(1)
    stats = SiteStats()
    stats.add_rows(ref, test, limit=6)
    assert stats.rows == 13 and stats.top1 / stats.rows == 1.0


# ---------------------------------------------------------------- flags.py


@pytest.mark.parametrize(
    "metrics, flags",
    [
        ({"cos_mean": 0.99}, []),  # cosine < 0.99 (strict)
        ({"sqnr_db": 10.0}, []),  # SQNR < 10 dB (strict)
        ({"sat_pct": 5.0}, []),  # saturation > 5 % (strict)
        ({"sat_pct": 0.01, "channel_level_pct": 10.0}, []),  # levels < 10 % (strict)
        ({"sat_pct": 0.01, "channel_level_pct": 9.9}, ["wasted"]),  # no clipping: sat <= 0.01 %
        ({"quantizer": "int_softmax", "sat_pct": 0.0, "channel_level_pct": 3.0}, []),  # wasted: uniform sites only
        ({"sat_pct": None, "channel_level_pct": 3.0}, []),  # a missing metric does not fire
    ],
)
def test_flag_boundaries_and_quantizers(metrics, flags) -> None:
    assert site_flags(row(**metrics), Thresholds()) == flags


# ---------------------------------------------------------------- series.py


def test_per_role_minimum_and_series_read_the_documented_keys() -> None:
    rows = [
        {"site": "blocks.0.mlp.act", "role": "mlp_act", "block": 0, "sqnr_db": 20.0, "flags": [], "sat_pct": 1.0, "sat_high_pct": 0.25,
         "level_pct": 80.0, "channel_level_pct": 50.0},
        {"site": "blocks.1.mlp.act", "role": "mlp_act", "block": 1, "sqnr_db": math.inf, "flags": []},
    ]
    assert summary_metrics(rows)["sqnr_min/mlp_act"] == 20.0
    tracker = StepTracker()
    log_rows(tracker, rows[:1], SERIES, {"blocks.0.mlp.act": ("mlp_act", 0)})
    assert tracker.logged[0]["channel_levels/mlp_act"] == 50.0 and tracker.logged[0]["levels/mlp_act"] == 80.0
    assert tracker.logged[0]["sat/mlp_act"] == 1.0


def test_top1_read_from_a_multi_k_call_uses_the_first_cut() -> None:
    # the FP32 argmax (index 0) is only second in the quantized row: top-1 misses, even when k = 5 is asked too
    ref = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    test = torch.tensor([[5.0, 6.0, 4.0, 3.0, 2.0, 1.0]])
    assert topk_hit_rates(ref, test, (1, 5)) == pytest.approx([0.0, 1.0])
    stats = SiteStats()  # the profiler's intSoft rows: add_rows asks for (1, 5)
    stats.add_pair(ref, test)
    stats.add_rows(ref, test)
    assert stats.result()["top1_agreement"] == 0.0


def test_quantized_histogram_from_codes_puts_clipped_values_on_the_end_levels() -> None:
    # scale 0.1, zp 10 (8-bit): -2 clips to code 0 (-1.0), 30 clips to 255 (24.5); the code-derived histogram
    # must equal the histogram of the dequantized tensor itself
    site = uniform_site(0.1, 10.0)
    x = torch.tensor([[-2.0, 30.0, 0.0, 0.04, 0.05, 1.0]])
    y = site.fake_quant(x)
    from_codes = _observe(site, x)
    direct = SiteStats(grid=hist_grid(site))
    direct.add_pair(x, y)  # no codes: the quantized histogram is counted from y's values
    assert torch.equal(from_codes.test_counts(), direct.test_counts())


def test_int_softmax_codes_follow_the_log2_convention() -> None:
    site = Site("blocks.0.attn.softmax", "intSoft")
    site.bind(SiteSpec(quantizer="int_softmax"), 4, None, None)
    site.mode = "quant"
    p = torch.tensor([1.0, 0.5, 0.25, 2.0**-15, 0.0])  # int_softmax output is exactly 2^-code (0: flushed)
    counts = code_counts(site, p)
    assert counts.shape == (1, 18) and counts[0, [1, 2, 3, 16, 17]].tolist() == [1, 1, 1, 1, 1]


def test_a_log2_dump_keeps_the_smallest_level_out_of_the_zero_mask(tmp_path):
    """zero_mask marks only values flushed to 0 (rounded code > qmax); a value on the smallest level 2^(-qmax/2^f) is kept."""
    from pipeline.artifacts import read_tensors
    from pipeline.profile.dump import Capture, write_dump
    from pipeline.quant.quantizers import fake_log2_quantize
    from tests.test_profile import log2_site

    site = log2_site(bits=4, frac_bits=1)  # qmax 15: smallest level 2^-7.5
    p = torch.tensor([[2.0**-7.5, 2.0**-7.74, 2.0**-7.76]])  # code 15 exactly, rounds to 15, rounds to 16 (flushed)
    y = fake_log2_quantize(p, 4, frac_bits=1)
    t = read_tensors(write_dump(tmp_path, site, Capture(None, p, y)))
    assert t["zero_mask"].tolist() == [[False, False, True]]
    assert t["codes"].tolist() == [[15, 15, 15]] and torch.equal(t["dequantized"][0, :2], torch.full((2,), 2.0**-7.5)) and float(t["dequantized"][0, 2]) == 0.0


def test_dumped_codes_keep_an_integer_dtype(tmp_path):
    """dump.py: 'codes keep the NPU's integer dtype' (torch.equal alone does not see a float copy)."""
    from pipeline.artifacts import read_tensors
    from pipeline.profile.dump import Capture, write_dump
    from pipeline.quant.quantizers import fake_log2_quantize, fake_quantize
    from tests.test_profile import log2_site, uniform_site

    site = uniform_site([0.1, 0.2, 0.5], [0.0, 5.0, 10.0])
    x = torch.randn(2, 5, 3)
    t = read_tensors(write_dump(tmp_path / "u", site, Capture(None, x, fake_quantize(x, site.scale, site.zero_point, 0, 255, axis=-1))))
    p = torch.tensor([[0.9, 0.3, 0.05]])
    t2 = read_tensors(write_dump(tmp_path / "l", log2_site(bits=4), Capture(None, p, fake_log2_quantize(p, 4))))
    for codes in (t["codes"], t2["codes"]):
        assert codes.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32), codes.dtype


def test_compare_draws_each_metric_from_its_own_column():
    """Each row of panels plots its metric's column (not the SQNR everywhere), labelled with its unit."""
    from pipeline.profile.compare import METRICS, compare_figure

    rows = [{"site": f"blocks.{b}.attn.sv", "role": "sv_attn", "block": b, "sqnr_db": 30.0 + b, "sat_pct": 0.5 * b, "channel_level_pct": 90.0 - b} for b in range(3)]
    fig = compare_figure({"a": rows}, ["sv_attn"], list(METRICS))
    for ax, metric in zip(fig.axes, METRICS):
        assert list(ax.lines[0].get_ydata()) == [row[metric] for row in rows], metric
        assert ax.get_ylabel() == METRICS[metric]
    assert set(METRICS) == {"sqnr_db", "sat_pct", "channel_level_pct"}  # the column names the profile tables carry


def test_report_ranks_missing_last_and_isolated_tables_keep_their_logit_columns(tmp_path):
    """report.ranked: worst first, missing / NaN last; isolated.csv carries the logit columns it is ranked by."""
    import csv
    import json
    import math

    from pipeline.profile.flags import Thresholds
    from pipeline.profile.report import ISOLATED_COLUMNS, ranked, write_report

    rows = [{"site": "a", "sqnr_db": math.nan}, {"site": "b", "sqnr_db": 12.0}, {"site": "c", "sqnr_db": None}, {"site": "d", "sqnr_db": 3.0}]
    assert [r["site"] for r in ranked(rows)][:2] == ["d", "b"] and [r["rank"] for r in ranked(rows)] == [1, 2, 3, 4]
    site_rows = [{"site": "head", "role": "linear_in", "block": None, "sqnr_db": 20.0, "logit_sqnr_db": 30.0}, {"site": "blocks.0.attn.sv", "role": "sv_attn", "block": 0, "sqnr_db": 10.0, "logit_sqnr_db": 35.0}]
    write_report(tmp_path, site_rows, {"sqnr_db": math.inf, "logit_kl": 0.0}, {}, Thresholds(), isolated=site_rows, worst_k=0)
    strict = json.loads((tmp_path / "cumulative.json").read_text(), parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert strict["output"]["sqnr_db"] == "inf"  # an exact model output: the string, as in summary.json
    with open(tmp_path / "isolated.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == list(ISOLATED_COLUMNS) and [r["site"] for r in table] == ["head", "blocks.0.attn.sv"] and table[0]["logit_sqnr_db"] == "30"  # ranked by logit SQNR, not site SQNR
