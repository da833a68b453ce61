"""Tests of pipeline.quant.observers: hand-computed statistics per tensor and per channel, and range searches."""

import math

import pytest
import torch

from pipeline.quant.observers import (
    OBSERVERS,
    EmaObserver,
    KlObserver,
    MinMaxObserver,
    NonFiniteError,
    OmseObserver,
    PercentileObserver,
    build_observer,
    channel_rows,
    coprime_stride,
    histogram_prefix_sums,
    kl_divergence_for_threshold,
    row_quantile,
    spread_column_subsample,
)


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


def gaussian(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- helpers


def test_channel_rows_layouts():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(channel_rows(x, "per_tensor", -1), x.reshape(1, 24))
    rows = channel_rows(x, "per_channel", -1)
    assert rows.shape == (4, 6) and torch.equal(rows[1], t([1.0, 5.0, 9.0, 13.0, 17.0, 21.0]))
    assert torch.equal(channel_rows(x, "per_channel", 0), x.reshape(2, 12))
    with pytest.raises(ValueError, match="unknown granularity 'per_row'"):
        channel_rows(x, "per_row", 0)


def test_coprime_subsample_is_spread_distinct_and_deterministic():
    assert math.gcd(coprime_stride(768), 768) == 1
    rows = torch.arange(10.0).reshape(1, 10)
    picked = spread_column_subsample(rows, 4)
    assert picked.shape == (1, 4)
    assert len(set(picked[0].tolist())) == 4
    assert torch.equal(picked, spread_column_subsample(rows, 4))
    assert spread_column_subsample(rows, 10) is rows


def test_row_quantile_matches_torch_quantile():
    rows = gaussian(3, 101)
    for q in (0.0, 0.01, 0.5, 0.9, 0.9999, 1.0):
        assert torch.allclose(row_quantile(rows, q), torch.quantile(rows, q, dim=1))


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("name", sorted(OBSERVERS))
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_forward_returns_input_unchanged(name, granularity):
    observer = build_observer(name, granularity=granularity)
    x = gaussian(2, 5, 6)
    before = x.clone()
    assert observer(x) is x
    assert torch.equal(x, before)
    scale, zero_point = observer.calculate_qparams(8, True, True)
    expected_shape = () if granularity == "per_tensor" else (6,)
    assert scale.shape == expected_shape and zero_point.shape == expected_shape
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    assert observer.batches_seen == 1


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_non_finite_input_raises(name):
    observer = build_observer(name)
    with pytest.raises(NonFiniteError, match="observed NaN or Inf values"):
        observer(t([1.0, math.nan]))
    with pytest.raises(ValueError, match="observed NaN or Inf values"):
        observer(t([1.0, -math.inf]))
    assert observer.batches_seen == 0


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_no_data_raises(name):
    with pytest.raises(ValueError, match="observer has seen no data"):
        build_observer(name).calculate_qparams(8, True, True)


def test_unknown_observer_and_arguments_raise():
    with pytest.raises(ValueError, match="unknown observer 'mse'; choose one of minmax, ema, percentile, omse, kl, histogram"):
        build_observer("mse")
    with pytest.raises(ValueError, match="unknown argument\\(s\\) sigma for observer 'minmax'; accepted: granularity, axis"):
        build_observer("minmax", sigma=0.1)
    assert isinstance(build_observer("histogram"), KlObserver)
    assert isinstance(build_observer("ema", sigma=0.5, warmup=2), EmaObserver)


def test_bad_constructor_arguments_raise():
    with pytest.raises(ValueError, match="unknown granularity"):
        MinMaxObserver(granularity="channel")
    with pytest.raises(ValueError, match="sigma must be in \\(0, 1\\], got 0"):
        EmaObserver(sigma=0)
    with pytest.raises(ValueError, match="warmup must be an integer >= 1, got 0"):
        EmaObserver(warmup=0)
    with pytest.raises(ValueError, match="alpha must be in"):
        PercentileObserver(alpha=0.3)
    with pytest.raises(ValueError, match="unknown omse loss 'l3'; choose one of l1, l2, huber"):
        OmseObserver(loss="l3")
    with pytest.raises(ValueError, match="bins must be"):
        KlObserver(bins=4)


def test_channel_count_change_and_empty_input_raise():
    observer = MinMaxObserver(granularity="per_channel")
    observer(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="saw 3 channels before, now 4"):
        observer(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="empty tensor"):
        observer(torch.zeros(0, 3))


# ---------------------------------------------------------------------------------------------- minmax / ema / percentile


def test_minmax_two_batches_per_tensor_and_per_channel():
    first, second = t([[1.0, -2.0], [3.0, 0.5]]), t([[-5.0, 2.0], [0.0, 1.0]])
    per_tensor, per_channel = MinMaxObserver(), MinMaxObserver(granularity="per_channel", axis=-1)
    for batch in (first, second):
        per_tensor(batch)
        per_channel(batch)
    assert per_tensor.stats()["min"].item() == -5.0 and per_tensor.stats()["max"].item() == 3.0
    assert torch.equal(per_channel.stats()["min"], t([-5.0, -2.0]))
    assert torch.equal(per_channel.stats()["max"], t([3.0, 2.0]))
    assert per_channel.stats()["batches_seen"].item() == 2
    scale, zero_point = per_channel.calculate_qparams(8, signed=True, symmetric=True)
    assert torch.equal(scale, t([5.0, 2.0]) / 127) and torch.equal(zero_point, torch.zeros(2, dtype=torch.int32))
    scale, _ = per_tensor.calculate_qparams(8, signed=True, symmetric=True)
    assert scale.shape == () and torch.equal(scale, t(5.0) / 127)
    # one calibration pass serves several bit widths
    scale16, _ = per_tensor.calculate_qparams(16, signed=True, symmetric=True)
    assert torch.equal(scale16, t(5.0) / 32767)


def test_minmax_weight_axis_0():
    weight = t([[0.5, -1.0, 0.25], [4.0, 2.0, -8.0]])  # (out, in)
    observer = MinMaxObserver(granularity="per_channel", axis=0)
    observer(weight)
    assert torch.equal(observer.stats()["min"], t([-1.0, -8.0]))
    assert torch.equal(observer.stats()["max"], t([0.5, 4.0]))


def test_ema_warmup_then_ema_by_hand():
    observer = EmaObserver(sigma=0.25, warmup=2)
    observer(t([-1.0, 1.0]))
    observer(t([-2.0, 0.5]))
    assert observer.stats()["min"].item() == -2.0 and observer.stats()["max"].item() == 1.0  # plain min/max
    observer(t([-4.0, 3.0]))
    # min = 0.75 * -2 + 0.25 * -4 = -2.5; max = 0.75 * 1 + 0.25 * 3 = 1.5
    assert observer.stats()["min"].item() == -2.5 and observer.stats()["max"].item() == 1.5


def test_ema_per_channel_by_hand():
    observer = EmaObserver(granularity="per_channel", sigma=0.5, warmup=1)
    observer(t([[-1.0, 0.0], [1.0, 4.0]]))  # channels (columns): [-1, 1], [0, 4]
    observer(t([[-3.0, -2.0], [3.0, 0.0]]))  # channels: [-3, 3], [-2, 0]
    assert torch.equal(observer.stats()["min"], t([-2.0, -1.0]))
    assert torch.equal(observer.stats()["max"], t([2.0, 2.0]))


def test_percentile_known_quantiles():
    observer = PercentileObserver(alpha=0.9)
    observer(torch.arange(101.0))  # quantile(q) of 0..100 is 100 q
    assert observer.stats()["min"].item() == 10.0 and observer.stats()["max"].item() == 90.0
    observer(torch.arange(101.0) + 50)  # [60, 140]; during warm-up: min of lower, max of upper
    assert observer.stats()["min"].item() == 10.0 and observer.stats()["max"].item() == 140.0


def test_percentile_per_channel_and_ema_after_warmup():
    base = torch.arange(101.0)
    observer = PercentileObserver(granularity="per_channel", axis=-1, alpha=0.9, sigma=0.5, warmup=1)
    observer(torch.stack([base, 2 * base], dim=-1))  # channel 0: [10, 90], channel 1: [20, 180]
    assert torch.equal(observer.stats()["min"], t([10.0, 20.0]))
    assert torch.equal(observer.stats()["max"], t([90.0, 180.0]))
    observer(torch.stack([base + 100, 2 * base], dim=-1))  # channel 0: [110, 190]
    # EMA with sigma 0.5: channel 0 min = (10 + 110) / 2, max = (90 + 190) / 2
    assert torch.equal(observer.stats()["min"], t([60.0, 20.0]))
    assert torch.equal(observer.stats()["max"], t([140.0, 180.0]))
    scale, _ = observer.calculate_qparams(8, signed=False, symmetric=False)
    assert scale.shape == (2,) and scale[0] != scale[1]


# ---------------------------------------------------------------------------------------------- omse


def outlier_data():
    x = gaussian(10000, seed=1)
    x[:10] = t([20.0, -20.0, 18.0, -19.0, 20.0, -17.0, 19.0, 20.0, -20.0, 20.0])
    return x


@pytest.mark.parametrize("bits", [4, 8])
def test_omse_clips_outliers_l1_more_than_l2(bits):
    x = outlier_data()
    qmax = 2 ** (bits - 1) - 1
    full_range_scale = 20.0 / qmax
    scales = {}
    for loss in ("l1", "l2"):
        observer = OmseObserver(loss=loss)
        observer(x)
        scales[loss], zero_point = observer.calculate_qparams(bits, signed=True, symmetric=True)
        assert zero_point.item() == 0
    assert scales["l1"] < scales["l2"] < full_range_scale


def test_omse_huber_sits_between_or_at_l1():
    x = outlier_data()
    observer = OmseObserver(loss="huber", huber_delta=1.0)
    observer(x)
    scale, _ = observer.calculate_qparams(4, signed=True, symmetric=True)
    assert scale < 20.0 / 7


def test_omse_uniform_data_keeps_about_the_full_range():
    x = torch.rand(20000, generator=torch.Generator().manual_seed(2)) * 2 - 1
    full_range_scale = x.abs().max() / 127
    for loss in ("l1", "l2", "huber"):
        observer = OmseObserver(loss=loss)
        observer(x)
        scale, _ = observer.calculate_qparams(8, signed=True, symmetric=True)
        assert 0.97 * full_range_scale <= scale <= full_range_scale


def test_omse_per_channel_scales_follow_channel_ranges():
    x = gaussian(4, 50, 3) * t([1.0, 10.0, 100.0])
    observer = OmseObserver(granularity="per_channel", loss="l2")
    observer(x)
    scale, zero_point = observer.calculate_qparams(8, signed=False, symmetric=False)
    assert scale.shape == (3,) and zero_point.shape == (3,)
    assert scale[0] < scale[1] < scale[2]


def test_omse_sample_is_bounded_and_deterministic():
    def run():
        observer = OmseObserver(granularity="per_channel", max_samples=50)
        for seed in range(3):
            observer(gaussian(40, 3, seed=seed))
        return observer

    first, second = run(), run()
    assert first.samples.shape == (3, 50)
    assert torch.equal(first.samples, second.samples)
    seen = torch.cat([gaussian(40, 3, seed=seed) for seed in range(3)])
    assert torch.isin(first.samples, seen).all()
    # every batch is represented (uniform sampling over all 120 columns, not just the first batch)
    from_each_batch = [torch.isin(first.samples[0], gaussian(40, 3, seed=s)[:, 0]).sum().item() for s in range(3)]
    assert min(from_each_batch) > 0


def test_omse_keeps_a_row_that_fits_whole_and_draws_distinct_columns():
    """A weight is observed once: a row no longer than the sample enters whole (no column twice, none missed)."""
    from pipeline.quant.observers import DISTINCT_DRAW_FACTOR, sample_columns

    weight = torch.arange(4 * 192, dtype=torch.float32).view(4, 192)  # every value distinct
    observer = OmseObserver(granularity="per_channel", axis=0, max_samples=512)
    observer(weight)
    assert observer.samples.shape == (4, 192)
    assert torch.equal(observer.samples.sort(dim=1).values, weight)
    generator = torch.Generator().manual_seed(0)
    drawn = sample_columns(DISTINCT_DRAW_FACTOR * 50, 50, generator)
    assert drawn.unique().numel() == 50 and drawn.max() < DISTINCT_DRAW_FACTOR * 50


# ---------------------------------------------------------------------------------------------- kl


def naive_kl(hist: list, i: int, levels: int, eps: float = 1e-8) -> float:
    """KL(P||Q) straight from the definition in kl_divergence_for_threshold, bin by bin."""
    reference = hist[:i]
    reference[-1] += sum(hist[i:])
    width = i // levels
    group = [min(j // width, levels - 1) for j in range(i)]
    mass, nonzero = [0.0] * levels, [0] * levels
    for j in range(i):
        mass[group[j]] += hist[j]
        nonzero[group[j]] += reference[j] > 0
    quantized = [mass[group[j]] / nonzero[group[j]] if reference[j] > 0 else 0.0 for j in range(i)]
    total_p, total_q = sum(reference), sum(quantized)
    divergence = 0.0
    for j in range(i):
        if reference[j] > 0:
            p = reference[j] / total_p
            q = quantized[j] / total_q if quantized[j] > 0 else eps
            divergence += p * math.log(p / q)
    return divergence


def test_kl_divergence_matches_the_definition():
    hist = torch.randint(0, 5, (3, 64), generator=torch.Generator().manual_seed(0)).double()
    hist[hist < 2] = 0
    hist[1, 20:40] = 0  # clipping makes an empty bin non-zero
    hist[2] = 0
    hist[2, 50] = 7  # all mass beyond small thresholds
    prefix = histogram_prefix_sums(hist)
    for i in (8, 13, 20, 31, 40, 64):
        fast = kl_divergence_for_threshold(hist, prefix, i, 8)
        expected = t([naive_kl(hist[c].tolist(), i, 8) for c in range(3)], torch.float64)
        assert torch.allclose(fast, expected, rtol=1e-9, atol=1e-12)


def test_kl_histogram_rebinning_is_exact():
    observer = KlObserver(bins=16)
    first = t([0.0, 0.1, 0.5, -0.7, 1.0])
    second = t([-3.0, 2.9, 0.2])
    observer(first)
    assert observer.hist_max.item() == 2.0  # smallest power of two above 1.0
    observer(second)
    assert observer.hist_max.item() == 4.0  # doubled once: bins merge pairwise
    everything = torch.cat([first, second]).abs()
    direct = torch.bincount((everything * 16 / 4).long().clamp(max=15), minlength=16)
    assert torch.equal(observer.histogram[0], direct)
    assert observer.stats()["histogram"].sum().item() == 8


def test_kl_gaussian_with_outliers_clips_well_below_max():
    x = gaussian(100000, seed=3)
    x[:5] = t([50.0, -50.0, 45.0, 48.0, -49.0])
    observer = KlObserver()
    observer(x)
    scale, zero_point = observer.calculate_qparams(8, signed=True, symmetric=True)
    threshold = scale * 127
    assert 2.5 < threshold < 0.2 * 50.0 and zero_point.item() == 0
    # 16 bits: 32768 levels >= 2048 bins, nothing to gain from clipping -> full range
    scale16, _ = observer.calculate_qparams(16, signed=True, symmetric=True)
    assert torch.equal(scale16, t(50.0) / 32767)


def test_kl_nonnegative_data_uses_upper_threshold():
    x = gaussian(20000, seed=4).abs()
    x[:3] = 40.0
    observer = KlObserver()
    observer(x)
    scale, zero_point = observer.calculate_qparams(8, signed=False, symmetric=False)
    assert zero_point.item() == 0 and scale * 255 < 0.25 * 40.0


def test_kl_per_channel_different_ranges_get_different_scales():
    x = gaussian(2000, 3, seed=5) * t([1.0, 4.0, 16.0])
    x[0] = t([30.0, 120.0, 480.0])  # one outlier row
    observer = KlObserver(granularity="per_channel", bins=512)
    observer(x)
    scale, _ = observer.calculate_qparams(8, signed=True, symmetric=True)
    assert scale.shape == (3,)
    assert scale[0] < scale[1] < scale[2]
    assert (scale * 127 < t([30.0, 120.0, 480.0]) / 2).all()


# ---------------------------------------------------------------------------------------------- review-mutq gaps


def test_observer_qparams_pass_the_rounding_mode_to_the_zero_point():
    observer = MinMaxObserver()
    observer(t([-1.5, 1.5]))  # 2-bit unsigned: scale 1, lo / scale = -1.5, a tie
    assert observer.calculate_qparams(2, False, False)[1].item() == 1  # half_up: -1 -> zp 1
    assert observer.calculate_qparams(2, False, False, "half_even")[1].item() == 2  # half_even: -2 -> zp 2


def test_huber_by_hand():
    from pipeline.quant.observers import huber

    errors = t([0.5, -2.0, 3.0])
    assert torch.equal(huber(errors, t(1.0)), t([0.125, 1.5, 2.5]))  # 0.5 e^2 | 1 * (|e| - 0.5)
    assert torch.equal(huber(errors, t(2.0)), t([0.125, 2.0, 4.0]))  # 0.5 * 4 | 2 * (3 - 1)


def test_omse_huber_delta_is_used_and_measured_in_steps():
    x = outlier_data()

    def scale_of(data, **kwargs):
        observer = OmseObserver(**kwargs)
        observer(data)
        return observer.calculate_qparams(4, signed=True, symmetric=True)[0]

    l2 = scale_of(x, loss="l2")
    # a delta of 1e4 steps holds every error in the quadratic part: Huber = 0.5 e^2, the l2 choice
    assert torch.equal(scale_of(x, loss="huber", huber_delta=1e4), l2)
    huber_1 = scale_of(x, loss="huber", huber_delta=1.0)
    assert huber_1 < l2  # one step: clipping errors count linearly, so it clips more than l2
    # delta in steps makes the search scale-free: data x 1024 or / 1024 (exact) give the same range in units
    assert torch.equal(scale_of(x * 1024, loss="huber", huber_delta=1.0), huber_1 * 1024)
    assert torch.equal(scale_of(x / 1024, loss="huber", huber_delta=1.0), huber_1 / 1024)
    # a tiny delta puts every error in the linear part (delta * |e| + const, the same delta for every
    # candidate): the l1 choice. Scaled by each candidate's own step it had clipped 84% of the Gaussian.
    assert torch.equal(scale_of(x, loss="huber", huber_delta=1e-4), scale_of(x, loss="l1"))
    assert scale_of(x, loss="l1") <= huber_1


def kl_test_data(outlier: float) -> torch.Tensor:
    # |x| histogram with bins=16 over [0, 16) (bin width 1): bins 0..3 hold 400, 200, 100, 50; one outlier in bin 12
    values = [0.5] * 400 + [1.5] * 200 + [2.5] * 100 + [3.5] * 50
    return t([v if k % 2 else -v for k, v in enumerate(values)] + [outlier])


def test_kl_threshold_by_hand():
    # 4 levels (3-bit signed): at threshold bin i = 4 each level covers one occupied bin, so Q equals P up to
    # the one clipped outlier (KL ~ 1e-5); every other candidate merges unequal bins (KL >= 0.04, see naive_kl).
    observer = KlObserver(bins=16, threshold_stride=1)
    observer(kl_test_data(-12.5))  # min -12.5, max 3.5
    assert observer.hist_max.item() == 16.0
    hist = observer.histogram[0].double().tolist()
    divergences = {i: naive_kl(list(hist), i, 4) for i in list(range(4, 16)) + [16]}
    assert min(divergences, key=divergences.get) == 4 and sorted(divergences.values())[1] > 0.04
    assert observer.thresholds(3, True, True).tolist() == [4.0]  # T = 4 bins * 16 / 16
    scale, zero_point = observer.calculate_qparams(3, signed=True, symmetric=True)
    assert torch.equal(scale, t(4.0 / 3)) and zero_point.item() == 0
    # asymmetric: [max(min, -T), min(max, T)] = [-4, 3.5] -> scale 7.5 / 7, zp = -4 - round(-4 / scale) = 0
    scale, zero_point = observer.calculate_qparams(3, signed=True, symmetric=False)
    assert torch.equal(scale, t(7.5) / 7) and zero_point.item() == 0


def test_kl_nonnegative_data_uses_all_levels_by_hand():
    # |data| with a 12.5 outlier; unsigned 2 bits = 4 levels over [0, T]: T = 4 as above -> scale 4 / 3.
    # (With the two-sided 2 levels the search would pick i = 3.)
    observer = KlObserver(bins=16, threshold_stride=1)
    observer(kl_test_data(12.5).abs())
    scale, zero_point = observer.calculate_qparams(2, signed=False, symmetric=False)
    assert torch.equal(scale, t(4.0) / 3) and zero_point.item() == 0
