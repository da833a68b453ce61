"""Hand-computed tests for pipeline.profile.metrics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.profile.metrics import (
    SiteMetrics,
    argmax_agreement,
    bit_utilization,
    compute_site_metrics,
    cosine_from_dots,
    histogram_kl,
    logit_kl,
    mse,
    saturation_from_values,
    saturation_rate,
    sqnr_db,
    token_cosine,
    topk_hit_rate,
    topk_hit_rates,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _alternating(n: int, amp: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """+amp, -amp, +amp, ... of length n (noise power amp^2)."""
    signs = 1.0 - 2.0 * (torch.arange(n) % 2).to(dtype)
    return amp * signs


# ---------------------------------------------------------------- SQNR / MSE


@pytest.mark.parametrize("device", DEVICES)
def test_sqnr_known_powers_is_20db(device: str) -> None:
    # signal power 2^2 = 4, noise power 0.2^2 = 0.04 -> 10*log10(100) = 20 dB
    ref = torch.full((100,), 2.0, dtype=torch.float64, device=device)
    test = ref + _alternating(100, 0.2).to(device)
    assert sqnr_db(ref, test) == pytest.approx(20.0, abs=1e-9)


def test_sqnr_float32_input_computed_in_float64() -> None:
    ref = torch.full((10, 10), 2.0)
    test = ref + _alternating(100, 0.2, torch.float32).reshape(10, 10)
    assert sqnr_db(ref, test) == pytest.approx(20.0, abs=1e-5)


def test_sqnr_identical_is_inf_and_zero_signal_is_minus_inf() -> None:
    x = torch.randn(4, 8)
    assert sqnr_db(x, x.clone()) == math.inf
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf


def test_mse_hand_computed() -> None:
    ref = torch.tensor([1.0, 2.0, 3.0, 4.0])
    test = torch.tensor([1.0, 2.5, 2.0, 4.0])  # errors 0, .25, 1, 0 -> 1.25/4
    assert mse(ref, test) == pytest.approx(0.3125)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-100, 100), min_size=2, max_size=32),
    st.floats(0.01, 100),
)
def test_sqnr_invariant_to_common_scale(values: list[float], scale: float) -> None:
    ref = torch.tensor(values, dtype=torch.float64) + 0.5
    test = ref.round()
    base = sqnr_db(ref, test)
    assert sqnr_db(ref * scale, test * scale) == pytest.approx(base, rel=1e-9, abs=1e-9)


# ---------------------------------------------------------------- cosine


def test_token_cosine_orthogonal_scaled_and_45_degrees() -> None:
    ref = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
    test = torch.tensor([[0.0, 2.0], [6.0, 8.0], [1.0, 1.0]])
    # cosines: 0 (orthogonal), 1 (scaled), cos 45 deg = 1/sqrt(2)
    mean, low = token_cosine(ref, test)
    assert mean == pytest.approx((0.0 + 1.0 + 1.0 / math.sqrt(2.0)) / 3.0)
    assert low == pytest.approx(0.0)


def test_token_cosine_zero_vector_conventions() -> None:
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
    test = torch.tensor([[0.0, 0.0], [1.0, 0.0], [-1.0, -2.0]])
    # both zero -> 1, one zero -> 0, opposite -> -1
    mean, low = token_cosine(ref, test)
    assert mean == pytest.approx(0.0)
    assert low == pytest.approx(-1.0)


def test_cosine_from_dots_per_token_conventions_and_nan() -> None:
    norm_ref = torch.tensor([0.0, 0.0, 1.0, 2.0, math.nan])
    norm_test = torch.tensor([0.0, 3.0, 0.0, 2.0, 1.0])
    dot = torch.tensor([0.0, 0.0, 0.0, -4.0, 1.0])
    cos = cosine_from_dots(dot, norm_ref, norm_test)
    assert cos[:4].tolist() == [1.0, 0.0, 0.0, -1.0]  # both zero, one zero, one zero, opposite
    assert math.isnan(cos[4])  # a NaN is shown, not hidden as a zero-vector case


@pytest.mark.parametrize("device", DEVICES)
def test_token_cosine_3d_and_dim_argument(device: str) -> None:
    ref = torch.randn(2, 3, 4, device=device)
    # each (b, n) token scaled by a positive factor -> every cosine is 1
    test = ref * torch.rand(2, 3, 1, device=device).add(0.5)
    assert token_cosine(ref, test) == pytest.approx((1.0, 1.0))
    # along dim=1 the vectors are (b, :, c); scaling per (b, c) keeps cos = 1
    test_dim1 = ref * torch.rand(2, 1, 4, device=device).add(0.5)
    assert token_cosine(ref, test_dim1, dim=1) == pytest.approx((1.0, 1.0))


# ---------------------------------------------------------------- histogram KL


def test_histogram_kl_identical_is_zero() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert histogram_kl(x, x.clone()) == 0.0
    assert histogram_kl(torch.ones(5), torch.ones(5)) == 0.0  # lo == hi


def test_histogram_kl_shifted_is_positive() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert histogram_kl(x, x + 0.5) > 0.0


def test_histogram_kl_hand_computed_two_bins() -> None:
    # range [0, 1], 2 bins: ref counts (2, 2) -> p = (.5, .5);
    # test counts (3, 1) -> q = (.75, .25); eps=0 disables smoothing.
    ref = torch.tensor([0.0, 0.1, 0.9, 1.0])
    test = torch.tensor([0.0, 0.1, 0.2, 1.0])
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert histogram_kl(ref, test, bins=2, eps=0.0) == pytest.approx(expected)


def test_histogram_kl_empty_test_bin_is_finite() -> None:
    ref = torch.tensor([0.0, 1.0])
    test = torch.tensor([0.0, 0.0])
    kl = histogram_kl(ref, test, bins=2)
    assert math.isfinite(kl) and kl > 1.0


# ---------------------------------------------------------------- saturation


@pytest.mark.parametrize("device", DEVICES)
def test_saturation_rate_known_counts(device: str) -> None:
    codes = torch.zeros(100, dtype=torch.int32, device=device)
    codes[:3] = -128  # 3 of 100 at qmin
    codes[3:8] = 127  # 5 of 100 at qmax
    low, high = saturation_rate(codes, -128, 127)
    assert low == pytest.approx(3.0)
    assert high == pytest.approx(5.0)


def test_saturation_from_values_ignores_exact_boundary() -> None:
    # pre-clamp values: two exactly on the ends (not clipped), 1 below, 2 above
    x = torch.tensor([-128.0, 127.0, -130.0, 128.0, 300.0, 0.0, 1.0, 2.0, 3.0, 4.0])
    assert saturation_from_values(x, -128, 127) == pytest.approx((10.0, 20.0))
    # after clamping, the boundary values and the clipped ones look the same:
    # low: -128, -130 -> 2 of 10; high: 127, 128, 300 -> 3 of 10
    codes = x.clamp(-128, 127)
    assert saturation_rate(codes, -128, 127) == pytest.approx((20.0, 30.0))


def test_saturation_bad_range_raises() -> None:
    with pytest.raises(ValueError):
        saturation_rate(torch.zeros(3), 5, 5)


# ---------------------------------------------------------------- bit utilisation


@pytest.mark.parametrize("device", DEVICES)
def test_bit_utilization_16_of_256(device: str) -> None:
    codes = (torch.arange(1000, device=device) % 16) * 3 - 20  # 16 distinct values
    assert bit_utilization(codes, 8) == (16, 4.0, 0.0625)


def test_bit_utilization_single_level() -> None:
    assert bit_utilization(torch.full((7,), 5), 4) == (1, 0.0, 1.0 / 16.0)


# ---------------------------------------------------------------- top-k / logits


def _topk_rows() -> tuple[torch.Tensor, torch.Tensor]:
    ref = torch.arange(10.0).repeat(3, 1)  # every ref row: top-5 = {9,8,7,6,5}, argmax 9
    test = torch.empty(3, 10)
    test[0] = torch.arange(10.0)  # identical: top-5 hit 5/5, argmax hit
    test[1] = torch.arange(10.0).flip(0)  # top-5 = {0..4}: 0/5, argmax 0 -> miss
    test[2] = -torch.arange(10.0)  # filler below the planted top-5
    test[2, [9, 8, 7, 0, 1]] = torch.tensor([100.0, 99.0, 98.0, 97.0, 96.0])  # 3/5, argmax hit
    return ref, test


def test_topk_hit_rate_k1_and_k5() -> None:
    ref, test = _topk_rows()
    assert topk_hit_rate(ref, test, k=1) == pytest.approx(2.0 / 3.0)
    assert topk_hit_rate(ref, test, k=5) == pytest.approx((1.0 + 0.0 + 0.6) / 3.0)
    assert argmax_agreement(ref, test) == pytest.approx(2.0 / 3.0)


def test_topk_hit_rate_splits_ties_in_the_quantized_row_fairly() -> None:
    # The FP32 argmax (index 0 or 1) ties with the other on the quantized maximum: half a hit either
    # way, whatever the index order (torch.topk alone would give 1.0 for one order and 0.0 for the other).
    ref = torch.tensor([[0.31, 0.30, 0.10, 0.05, 0.02, 0.01, 0.01], [0.30, 0.31, 0.10, 0.05, 0.02, 0.01, 0.01]])
    test = torch.tensor([[0.25, 0.25, 0.125, 0.0625, 0.0, 0.0, 0.0]] * 2)
    assert topk_hit_rate(ref, test, k=1) == pytest.approx(0.5)
    # k = 5: 0.25, 0.25, 0.125, 0.0625 are in; one place is left for the three zeros. The ref's
    # top 5 are indices 0..4, of which index 4 is one of the three zeros: (4 + 1/3) / 5.
    assert topk_hit_rate(ref, test, k=5) == pytest.approx((4 + 1 / 3) / 5)
    # a flat quantized row scores the chance level k / C
    flat = torch.zeros(1, 7)
    assert topk_hit_rates(ref[:1], flat, (1, 5)) == pytest.approx([1 / 7, 5 / 7])
    # the deployed argmax takes the first maximal index: row 0 agrees, row 1 does not
    assert argmax_agreement(ref, test) == pytest.approx(0.5)
    # ties in the FP32 row: each tied entry is a top-k entry, so a row matches itself
    tied = torch.tensor([[0.4, 0.4, 0.2], [2.0, 2.0, 0.0]])
    assert topk_hit_rate(tied, tied.clone(), k=1) == 1.0 and topk_hit_rates(torch.zeros(1, 7), torch.zeros(1, 7), (1, 5)) == pytest.approx([1.0, 1.0])
    # and a k's rate does not depend on the other ks asked for with it
    ref2, test2 = torch.tensor([[2.0, 2.0, 0.0, 3.0, 1.0]]), torch.tensor([[2.0, 0.0, 0.0, 0.0, 1.0]])
    assert topk_hit_rate(ref2, test2, k=2) == topk_hit_rates(ref2, test2, (2, 5))[0] == pytest.approx(0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_hit_rate_leading_dims_and_dim(device: str) -> None:
    ref, test = _topk_rows()
    # (3, 10) -> (1, 3, 10): leading dims flattened, same answer
    assert topk_hit_rate(ref[None].to(device), test[None].to(device), k=5) == pytest.approx(
        1.6 / 3.0
    )
    # rows along dim 0 after transposing
    assert topk_hit_rate(ref.T, test.T, k=5, dim=0) == pytest.approx(1.6 / 3.0)


def test_topk_bad_k_raises() -> None:
    ref, test = _topk_rows()
    with pytest.raises(ValueError):
        topk_hit_rate(ref, test, k=11)


@pytest.mark.parametrize("device", DEVICES)
def test_logit_kl_two_class_hand_calculation(device: str) -> None:
    # p = softmax(0, 0) = (.5, .5); q = softmax(ln 3, 0) = (.75, .25)
    # KL = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3)
    ref = torch.tensor([[0.0, 0.0], [1.0, 2.0]], device=device)
    test = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]], device=device)  # row 2: KL 0
    assert logit_kl(ref, test) == pytest.approx(0.5 * 0.5 * math.log(4.0 / 3.0))
    assert logit_kl(ref, ref.clone()) == pytest.approx(0.0, abs=1e-15)


def test_logit_kl_minus_inf_ref_logit_contributes_zero() -> None:
    ref = torch.tensor([[0.0, -math.inf]])
    test = torch.tensor([[0.0, 0.0]])  # p = (1, 0), q = (.5, .5) -> ln 2
    assert logit_kl(ref, test) == pytest.approx(math.log(2.0))


# ---------------------------------------------------------------- shape checks


@pytest.mark.parametrize(
    "fn",
    [sqnr_db, mse, token_cosine, histogram_kl, topk_hit_rate, argmax_agreement, logit_kl],
)
def test_shape_mismatch_raises(fn) -> None:
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        fn(torch.zeros(2, 3), torch.zeros(3, 2))


# ---------------------------------------------------------------- site bundle


def test_compute_site_metrics_minimal_leaves_optional_none() -> None:
    ref = torch.full((4, 8), 2.0)
    test = ref + _alternating(32, 0.2, torch.float32).reshape(4, 8)
    m = compute_site_metrics(ref, test)
    assert isinstance(m, SiteMetrics)
    assert m.sqnr_db == pytest.approx(20.0, abs=1e-5)
    assert m.sat_low_pct is None and m.levels_used is None and m.top1_agreement is None
    d = m.to_dict()
    assert set(d) >= {"sqnr_db", "mse", "cos_mean", "cos_min", "hist_kl", "logit_kl"}
    assert d["logit_kl"] is None


def test_compute_site_metrics_full() -> None:
    ref, test = _topk_rows()
    codes = torch.tensor([-128, 127, 0, 1] * 25)
    m = compute_site_metrics(ref, test, codes=codes, bits=8, qmin=-128, qmax=127, topk_rows=True)
    assert (m.sat_low_pct, m.sat_high_pct) == pytest.approx((25.0, 25.0))
    assert (m.levels_used, m.effective_bits, m.level_fraction) == (4, 2.0, 4 / 256)
    assert m.top1_agreement == pytest.approx(2.0 / 3.0)
    assert m.top5_hit_rate == pytest.approx(1.6 / 3.0)
    assert m.logit_kl is not None and m.logit_kl > 0.0
