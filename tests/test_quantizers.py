"""Tests of pipeline.quant.quantizers: hand-computed cases, compared bit-exactly, plus hypothesis properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.quant.quantizers import (
    MIN_SCALE,
    broadcast_to_axis,
    choose_qparams,
    dequantize,
    fake_log2_quantize,
    fake_quantize,
    int_dtype,
    log2_dequantize,
    log2_quantize,
    power_of_two_factor_scales,
    power_of_two_factors,
    qrange,
    quantize,
    round_to_int,
)

PROPERTY = settings(max_examples=50, deadline=None)


def t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# ---------------------------------------------------------------------------------------------- rounding


def test_half_up_and_half_even_on_ties():
    ties = t([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    assert torch.equal(round_to_int(ties, "half_up"), t([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]))
    assert torch.equal(round_to_int(ties, "half_even"), t([-2.0, -2.0, 0.0, 0.0, 2.0, 2.0]))


def test_rounding_away_from_ties_and_default_mode():
    x = t([-1.7, -1.2, -0.2, 0.2, 1.2, 1.7])
    expected = t([-2.0, -1.0, 0.0, 0.0, 1.0, 2.0])
    assert torch.equal(round_to_int(x), expected)
    assert torch.equal(round_to_int(x, "half_even"), expected)


def test_half_up_float_quirk_just_below_one_half_is_documented():
    # floor(x + 0.5) in float32: 0.49999997 + 0.5 rounds to 1.0, so this one value rounds up (see docstring);
    # the next value below is fine.
    below_half = torch.nextafter(t(0.5), t(0.0))
    assert round_to_int(below_half.reshape(1)).item() == 1.0
    assert round_to_int(torch.nextafter(below_half, t(0.0)).reshape(1)).item() == 0.0


def test_half_up_on_16_bit_floats_rounds_in_float32():
    # In bfloat16, 129 + 0.5 is a tie between 129 and 130 and rounds to 130; in float16 the same
    # happens from 1025. Both lie inside the code range, so 16-bit floats are rounded in float32.
    for dtype, odd in ((torch.bfloat16, 129.0), (torch.float16, 1025.0)):
        x = torch.tensor([odd, odd + 2, -odd, 2.5, -2.5], dtype=dtype)
        rounded = round_to_int(x)
        assert rounded.dtype == torch.float32
        assert torch.equal(rounded, t([odd, odd + 2, -odd, 3.0, -2.0]))


def test_quantize_refuses_nan_and_saturates_infinities():
    scale, zp = t(0.1), torch.tensor(3, dtype=torch.int32)
    codes = quantize(t([-math.inf, 0.0, math.inf]), scale, zp, 16, False)
    assert codes.dtype == torch.int32 and codes.tolist() == [0, 3, 65535]
    with pytest.raises(ValueError, match="1 NaN value"):
        quantize(t([0.0, math.nan]), scale, zp, 16, False)


def test_in_place_rounding_overwrites_and_matches():
    x = t([-2.5, -0.5, 0.5, 1.7])
    for mode in ("half_up", "half_even"):
        expected = round_to_int(x, mode)
        buffer = x.clone()
        assert round_to_int(buffer, mode, in_place=True) is buffer
        assert torch.equal(buffer, expected)


def test_rounding_passes_infinities_and_converts_integers():
    assert torch.equal(round_to_int(t([-math.inf, math.inf])), t([-math.inf, math.inf]))
    rounded = round_to_int(torch.tensor([3, -4]))
    assert rounded.dtype == torch.float32 and torch.equal(rounded, t([3.0, -4.0]))


def test_unknown_rounding_mode_raises():
    with pytest.raises(ValueError, match="unknown rounding mode 'nearest'; choose one of half_up, half_even"):
        round_to_int(t([1.0]), "nearest")
    with pytest.raises(ValueError, match="unknown rounding mode"):
        choose_qparams(t(0.0), t(1.0), 8, False, False, rounding="up")


# ---------------------------------------------------------------------------------------------- ranges


def test_qrange_values():
    assert qrange(2, True) == (-2, 1)
    assert qrange(8, True) == (-128, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(16, True) == (-32768, 32767)
    assert qrange(16, False) == (0, 65535)


@pytest.mark.parametrize("bits", [1, 17, 0, 8.0, True, "8"])
def test_bad_bits_raise(bits):
    with pytest.raises(ValueError, match=f"bits must be an integer in 2..16, got {bits!r}"):
        qrange(bits, True)


def test_bits_are_validated_everywhere():
    with pytest.raises(ValueError, match="got 17"):
        int_dtype(17, False)
    with pytest.raises(ValueError, match="got 1"):
        choose_qparams(t(0.0), t(1.0), 1, True, True)
    with pytest.raises(ValueError, match="got 17"):
        log2_quantize(t([0.5]), 17)


def test_int_dtype_table():
    assert int_dtype(4, True) == torch.int8
    assert int_dtype(8, True) == torch.int8
    assert int_dtype(8, False) == torch.uint8
    assert int_dtype(9, True) == torch.int16
    assert int_dtype(16, True) == torch.int16
    assert int_dtype(9, False) == torch.int32
    assert int_dtype(16, False) == torch.int32


# ---------------------------------------------------------------------------------------------- qparams


def test_asymmetric_zero_point_nudge_by_hand():
    # scale = 1.3 / 255 = 0.00509804; min / scale = -58.846 -> round -59 -> zero_point = 0 - (-59) = 59
    scale, zero_point = choose_qparams(t(-0.3), t(1.0), 8, signed=False, symmetric=False)
    assert scale.shape == () and zero_point.shape == ()
    assert scale.dtype == torch.float32 and zero_point.dtype == torch.int32
    assert torch.equal(scale, (t(1.0) - t(-0.3)) / 255)
    assert zero_point.item() == 59
    # quant(0) -> code 59 -> exactly 0.0; the range becomes [-59, 196] * scale (the nudge clips 1.0 slightly)
    x = t([0.0, -0.3, 1.0])
    expected = torch.stack([t(0.0), -59 * scale, 196 * scale])
    assert torch.equal(fake_quantize(x, scale, zero_point, 0, 255), expected)
    assert fake_quantize(x, scale, zero_point, 0, 255)[0].item() == 0.0


def test_symmetric_signed_zero_point_is_exactly_zero():
    scale, zero_point = choose_qparams(t(-0.5), t(2.54), 8, signed=True, symmetric=True)
    assert torch.equal(zero_point, torch.tensor(0, dtype=torch.int32))
    assert torch.equal(scale, t(2.54) / 127)
    scale, zero_point = choose_qparams(t(-3.0), t(1.0), 4, signed=True, symmetric=True)
    assert torch.equal(scale, t(3.0 / 7)) and zero_point.item() == 0


def test_unsigned_symmetric_uses_max_over_qmax():
    scale, zero_point = choose_qparams(t(0.0), t(2.55), 8, signed=False, symmetric=True)
    assert torch.equal(scale, t(2.55) / 255) and zero_point.item() == 0


def test_range_is_widened_to_include_zero():
    # min=0.5,max=2.0 behaves like [0, 2]: asymmetric unsigned -> scale 2/255, zero point 0
    scale, zero_point = choose_qparams(t(0.5), t(2.0), 8, signed=False, symmetric=False)
    assert torch.equal(scale, t(2.0) / 255) and zero_point.item() == 0
    # min=-2,max=-1 behaves like [-2, 0]: signed asymmetric -> zero point at qmax
    scale, zero_point = choose_qparams(t(-2.0), t(-1.0), 8, signed=True, symmetric=False)
    assert torch.equal(scale, t(2.0) / 255) and zero_point.item() == 127


def test_constant_zero_range_gets_eps_scale():
    for symmetric in (True, False):
        scale, zero_point = choose_qparams(t(0.0), t(0.0), 8, signed=False, symmetric=symmetric)
        assert scale.item() == MIN_SCALE and zero_point.item() == 0
        assert torch.equal(fake_quantize(torch.zeros(3), scale, zero_point, 0, 255), torch.zeros(3))


def test_tiny_ranges_keep_their_resolution_and_dead_channels_a_relative_scale():
    # A weight folded with 16-bit activation scales spans ~1e-6: its step must not be floored at eps.
    scale, _ = choose_qparams(t(-1e-6), t(1e-6), 16, signed=True, symmetric=True)
    assert torch.equal(scale, t(1e-6) / 32767)
    # A dead channel (range 0) among live ones: eps times the largest scale, so dividing by it stays finite.
    scale, zero_point = choose_qparams(t([0.0, -2e-6]), t([0.0, 1e-6]), 8, signed=False, symmetric=False)
    live = t(3e-6) / 255
    assert torch.equal(scale, torch.stack([live * MIN_SCALE, live])) and zero_point.tolist() == [0, 170]
    scale, zero_point = choose_qparams(torch.empty(0), torch.empty(0), 8, signed=True, symmetric=True)
    assert scale.shape == zero_point.shape == (0,)  # no channels, no scales


def test_per_channel_qparams_shapes():
    scale, zero_point = choose_qparams(t([-1.0, 0.0, -4.0]), t([1.0, 2.55, 2.0]), 8, True, True)
    assert scale.shape == (3,) and zero_point.shape == (3,)
    assert torch.equal(scale, t([1.0, 2.55, 4.0]) / 127)
    assert torch.equal(zero_point, torch.zeros(3, dtype=torch.int32))


def test_power_of_two_factors_by_hand():
    # s_base = 8 / 2^3 = 1; ceil(log2(s / 1)) clamped to 0..3: 0.3 -> 0, 1 -> 0, 1.5 -> 1, 2 -> 1, 5 -> 3, 8 -> 3
    scale, shift, mantissa = power_of_two_factor_scales(t([0.3, 1.0, 1.5, 2.0, 5.0, 8.0]), 3)
    assert torch.equal(shift, torch.tensor([0, 0, 1, 1, 3, 3], dtype=torch.int32))
    assert torch.equal(scale, t([1.0, 1.0, 2.0, 2.0, 8.0, 8.0])) and mantissa.tolist() == [1] * 6
    scale, shift, _ = power_of_two_factor_scales(t([0.3, 6.0]), 1)  # s_base = 3: 0.3 -> 3 (shift 0), 6 -> 6
    assert torch.equal(scale, t([3.0, 6.0])) and shift.tolist() == [0, 1]
    with pytest.raises(ValueError, match="max_shift must be >= 0"):
        power_of_two_factor_scales(t([1.0]), -1)
    with pytest.raises(ValueError, match="frac_bits must be >= 0"):
        power_of_two_factor_scales(t([1.0]), 3, -1)


def test_power_of_two_factors_with_mantissa_bits_by_hand():
    # s_base = 1, f = 2: factors 2^k * m / 4, m in 4..7 -> 1, 1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8
    scale, shift, mantissa = power_of_two_factor_scales(t([0.3, 1.0, 1.1, 1.3, 1.5, 1.8, 2.0, 5.0, 7.2, 8.0]), 3, 2)
    assert torch.equal(scale, t([1.0, 1.0, 1.25, 1.5, 1.5, 2.0, 2.0, 5.0, 8.0, 8.0]))
    assert shift.tolist() == [0, 0, 0, 0, 0, 1, 1, 2, 3, 3]  # 1.8 -> 2.0 and 7.2 -> 8.0 carry into the next octave
    assert mantissa.tolist() == [4, 4, 5, 6, 6, 4, 4, 5, 4, 4]


@PROPERTY
@given(st.lists(st.floats(1e-6, 1e3), min_size=1, max_size=16), st.integers(0, 6), st.integers(0, 4))
def test_power_of_two_factors_never_narrow_a_channel(scales, max_shift, frac_bits):
    scale = t(scales)
    snapped, shift, mantissa = power_of_two_factor_scales(scale, max_shift, frac_bits)
    base = scale.max() / 2**max_shift
    assert (snapped >= scale).all() and snapped.max() == scale.max()
    # exactly s_base / 2^f times an integer (m << k): the codes align on integer hardware without rounding
    assert torch.equal(snapped, base / 2**frac_bits * (mantissa << shift).float())
    assert ((shift >= 0) & (shift <= max_shift)).all()
    assert ((mantissa >= 2**frac_bits) & (mantissa < 2 ** (frac_bits + 1))).all()
    # the smallest such factor: one mantissa step less would narrow the channel (or leave 1..2^K)
    smaller = base / 2**frac_bits * ((mantissa << shift) - (1 << shift)).float()
    assert ((smaller < scale) | (snapped == base)).all()
    # the factors read back from the snapped scales (as the trace does) are the ones chosen
    read_shift, read_mantissa = power_of_two_factors(snapped, max_shift, frac_bits)
    assert torch.equal(read_shift, shift) and torch.equal(read_mantissa, mantissa)


def test_bad_ranges_raise():
    with pytest.raises(ValueError, match="same shape"):
        choose_qparams(t([0.0, 1.0]), t(1.0), 8, True, True)
    with pytest.raises(ValueError, match="finite"):
        choose_qparams(t(math.inf), t(-math.inf), 8, True, True)
    with pytest.raises(ValueError, match="min_val must be <= max_val"):
        choose_qparams(t(2.0), t(1.0), 8, True, True)
    with pytest.raises(ValueError, match="0-d .* or 1-d"):
        choose_qparams(torch.zeros(2, 2), torch.ones(2, 2), 8, True, True)


# ---------------------------------------------------------------------------------------------- fake quant


def test_per_channel_fake_quant_axis_0_by_hand():
    # 8-bit signed symmetric, row ranges 127/64 and 127/16 -> scales 1/64 and 1/16 (exact powers of two)
    x = t([[-1.984375, 0.5, 0.0078125], [7.9375, -3.09375, 0.03125]])
    scale, zero_point = choose_qparams(x.amin(dim=1), x.amax(dim=1), 8, signed=True, symmetric=True)
    assert torch.equal(scale, t([1 / 64, 1 / 16]))
    # row 0 in steps: [-127, 32, 0.5]; row 1: [127, -49.5, 0.5]
    half_up = t([[-1.984375, 0.5, 0.015625], [7.9375, -3.0625, 0.0625]])
    half_even = t([[-1.984375, 0.5, 0.0], [7.9375, -3.125, 0.0]])
    assert torch.equal(fake_quantize(x, scale, zero_point, -128, 127, axis=0), half_up)
    assert torch.equal(fake_quantize(x, scale, zero_point, -128, 127, axis=0, rounding="half_even"), half_even)


def test_per_channel_fake_quant_last_axis_by_hand():
    # columns are the channels: 4-bit signed symmetric, scales 1/4, 1, 1/2 (ranges 7/4, 7, 7/2)
    x = t([[1.75, -7.0, 0.2], [-0.375, 2.5, 3.5]])
    scale, zero_point = choose_qparams(x.amin(dim=0), x.amax(dim=0), 4, signed=True, symmetric=True)
    assert torch.equal(scale, t([0.25, 1.0, 0.5]))
    # steps: col0 [7, -1.5], col1 [-7, 2.5], col2 [0.4, 7]
    expected = t([[1.75, -7.0, 0.0], [-0.25, 3.0, 3.5]])
    assert torch.equal(fake_quantize(x, scale, zero_point, -8, 7, axis=-1), expected)
    assert torch.equal(fake_quantize(x, scale, zero_point, -8, 7, axis=1), expected)


def test_fake_quant_saturates_and_keeps_dtype():
    scale, zero_point = t(0.5), torch.tensor(0, dtype=torch.int32)
    x = t([-100.0, -4.25, 3.75, 100.0])
    assert torch.equal(fake_quantize(x, scale, zero_point, -8, 7), t([-4.0, -4.0, 3.5, 3.5]))
    y = fake_quantize(x.to(torch.bfloat16), scale, zero_point, -8, 7)
    assert y.dtype == torch.bfloat16 and torch.equal(y.float(), t([-4.0, -4.0, 3.5, 3.5]))
    assert fake_quantize(x.double(), scale, zero_point, -8, 7).dtype == torch.float64


def test_fake_quant_parameter_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="per-channel scale has 2 entries but x.shape\\[1\\] is 3"):
        fake_quantize(x, torch.ones(2), torch.zeros(2, dtype=torch.int32), -8, 7, axis=1)
    with pytest.raises(ValueError, match="axis must be in -2..1"):
        fake_quantize(x, torch.ones(2), torch.zeros(2, dtype=torch.int32), -8, 7, axis=2)
    with pytest.raises(ValueError, match="one element"):
        fake_quantize(x, torch.ones(2), torch.zeros(2, dtype=torch.int32), -8, 7)
    with pytest.raises(ValueError, match="qmin must be < qmax"):
        fake_quantize(x, t(1.0), torch.tensor(0), 7, -8)


def test_broadcast_to_axis_shapes():
    param = torch.arange(3.0)
    assert broadcast_to_axis(param, 3, 1).shape == (3, 1)
    assert broadcast_to_axis(param, 3, -1).shape == (3,)
    assert broadcast_to_axis(param, 4, 0).shape == (3, 1, 1, 1)
    assert broadcast_to_axis(t([2.0]), 4, None).shape == ()


# ---------------------------------------------------------------------------------------------- integer codes


def test_int16_extremes_saturate_exactly():
    assert qrange(16, True) == (-32768, 32767)
    scale, zero_point = t(1 / 256), torch.tensor(0, dtype=torch.int32)
    x = t([-1000.0, -128.0, -127.99609375, 0.0, 127.99609375, 1000.0])
    codes = quantize(x, scale, zero_point, 16, signed=True)
    assert codes.dtype == torch.int16
    assert torch.equal(codes, torch.tensor([-32768, -32768, -32767, 0, 32767, 32767], dtype=torch.int16))
    assert torch.equal(dequantize(codes, scale, zero_point), t([-128.0, -128.0, -127.99609375, 0.0, 127.99609375, 127.99609375]))


def test_unsigned_16_bit_codes_are_int32():
    scale, zero_point = t(1 / 256), torch.tensor(0, dtype=torch.int32)
    codes = quantize(t([-5.0, 0.0, 255.99609375, 1e6]), scale, zero_point, 16, signed=False)
    assert codes.dtype == torch.int32
    assert torch.equal(codes, torch.tensor([0, 0, 65535, 65535], dtype=torch.int32))


def test_quantize_dequantize_matches_fake_quantize_per_channel():
    x = torch.linspace(-3, 3, 24).reshape(2, 3, 4)
    scale, zero_point = choose_qparams(x.amin(dim=(0, 2)), x.amax(dim=(0, 2)), 8, signed=False, symmetric=False)
    codes = quantize(x, scale, zero_point, 8, signed=False, axis=1)
    assert codes.dtype == torch.uint8
    roundtrip = dequantize(codes, scale, zero_point, axis=1)
    assert roundtrip.dtype == torch.float32
    assert torch.equal(roundtrip, fake_quantize(x, scale, zero_point, 0, 255, axis=1))


# ---------------------------------------------------------------------------------------------- log2


def test_log2_level_boundaries_4_bit():
    p = t([1.0, 0.5, 2**-1.5, 0.0, 2**-15, 2**-16, 0.75, 0.7])
    codes, zero_mask = log2_quantize(p, 4)
    assert codes.dtype == torch.uint8 and zero_mask.dtype == torch.bool
    # float32(2^-1.5) lies just below the true 2^-1.5, so -log2 p is 1.5 (+ float error) -> 2 either way;
    # 0.75 -> 0.415 -> 0; 0.7 -> 0.515 -> 1
    assert codes.tolist() == [0, 1, 2, 15, 15, 15, 0, 1]
    assert zero_mask.tolist() == [False, False, False, True, False, True, False, False]
    assert torch.equal(log2_dequantize(codes, zero_mask), t([1.0, 0.5, 0.25, 0.0, 2**-15, 0.0, 1.0, 0.5]))


def test_log2_half_up_tie_on_exact_log():
    # -log2(2^-2.5 as float32) evaluates to 2.5 (or just above) -> half_up picks 3
    codes, _ = log2_quantize(t([2**-2.5]), 8)
    assert codes.item() == 3


def test_log2_codes_dtypes_and_probabilities_above_one():
    codes, zero_mask = log2_quantize(t([2.0, 1e-30]), 16)
    assert codes.dtype == torch.int32
    assert codes.tolist() == [0, 100] and not zero_mask.any()


def test_fake_log2_matches_quantize_dequantize():
    p = torch.softmax(torch.linspace(-8, 8, 200).reshape(4, 50), dim=-1)
    for bits in (3, 4, 8):
        codes, zero_mask = log2_quantize(p, bits)
        assert torch.equal(fake_log2_quantize(p, bits), log2_dequantize(codes, zero_mask))


def test_log_sqrt2_levels_with_one_fractional_bit():
    # code = round(2 * -log2 p), level 2^(-code/2): 0.5 -> 2 -> 0.5; 0.6 -> 1.474 -> 1 -> 2^-0.5;
    # 2^-1.25 -> 2.5, a tie: half_up 3 -> 2^-1.5, half_even 2 -> 0.5; 4 bits reach 2^-7.5, 2^-7.8 -> 15.6 -> 16: flushed
    p = t([1.0, 0.5, 0.6, 2**-1.25, 2**-7.5, 2**-7.8])
    codes, zero_mask = log2_quantize(p, 4, frac_bits=1)
    assert codes.tolist() == [0, 2, 1, 3, 15, 15]
    assert zero_mask.tolist() == [False] * 5 + [True]
    expected = t([1.0, 0.5, 2**-0.5, 2**-1.5, 2**-7.5, 0.0])
    assert torch.allclose(log2_dequantize(codes, zero_mask, frac_bits=1), expected, rtol=1e-6, atol=0)
    assert log2_quantize(t([2**-1.25]), 4, "half_even", frac_bits=1)[0].item() == 2
    assert torch.equal(fake_log2_quantize(p, 4, frac_bits=1), log2_dequantize(codes, zero_mask, frac_bits=1))


def test_log2_rejects_negative_and_nan():
    with pytest.raises(ValueError, match="probabilities must be >= 0"):
        log2_quantize(t([0.5, -0.1]), 8)
    with pytest.raises(ValueError, match="probabilities must be >= 0"):
        log2_quantize(t([math.nan]), 8)


# ---------------------------------------------------------------------------------------------- properties

settings_strategy = st.tuples(
    st.integers(2, 16),  # bits
    st.booleans(),  # signed
    st.booleans(),  # symmetric
    st.sampled_from(["half_up", "half_even"]),
)
finite = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


def _qparams(low: float, high: float, bits: int, signed: bool, symmetric: bool, rounding: str):
    low, high = min(low, high), max(low, high)
    scale, zero_point = choose_qparams(t(low), t(high), bits, signed, symmetric, rounding)
    return scale, zero_point, *qrange(bits, signed)


@PROPERTY
@given(settings_strategy, finite, finite)
def test_zero_is_always_exact(config, low, high):
    bits, signed, symmetric, rounding = config
    scale, zero_point, qmin, qmax = _qparams(low, high, bits, signed, symmetric, rounding)
    assert qmin <= zero_point.item() <= qmax
    assert fake_quantize(torch.zeros(4), scale, zero_point, qmin, qmax, rounding=rounding).eq(0.0).all()


@PROPERTY
@given(settings_strategy, finite, finite, st.lists(st.floats(0.0, 1.0), min_size=1, max_size=64))
def test_error_is_at_most_half_a_step_inside_the_range(config, low, high, fractions):
    bits, signed, symmetric, rounding = config
    scale, zero_point, qmin, qmax = _qparams(low, high, bits, signed, symmetric, rounding)
    lowest, highest = (qmin - zero_point) * scale, (qmax - zero_point) * scale
    x = (lowest + t(fractions) * (highest - lowest)).clamp(lowest, highest)
    error = (fake_quantize(x, scale, zero_point, qmin, qmax, rounding=rounding) - x).abs()
    tolerance = 0.5 * scale * (1 + 1e-5) + 1e-6 * x.abs()
    assert (error <= tolerance).all()


@PROPERTY
@given(settings_strategy, finite, finite, st.lists(finite, min_size=2, max_size=64))
def test_fake_quant_is_monotonic(config, low, high, values):
    bits, signed, symmetric, rounding = config
    scale, zero_point, qmin, qmax = _qparams(low, high, bits, signed, symmetric, rounding)
    x = t(sorted(values))
    y = fake_quantize(x, scale, zero_point, qmin, qmax, rounding=rounding)
    assert (y[1:] >= y[:-1]).all()


@PROPERTY
@given(st.integers(2, 16), st.floats(1e-3, 1e3), st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=64))
def test_symmetric_half_even_is_odd(bits, absmax, fractions):
    # No bias for symmetric data: fq(-x) == -fq(x) exactly inside the symmetric range [-qmax, qmax] * scale.
    scale, zero_point, qmin, qmax = _qparams(-absmax, absmax, bits, True, True, "half_even")
    x = t(fractions) * (qmax * scale)
    y = fake_quantize(x, scale, zero_point, qmin, qmax, rounding="half_even")
    assert torch.equal(fake_quantize(-x, scale, zero_point, qmin, qmax, rounding="half_even"), -y)


@PROPERTY
@given(st.integers(2, 16), st.floats(1e-3, 1e3), st.lists(st.floats(-1.0, 1.0), min_size=1, max_size=64))
def test_symmetric_half_up_is_odd_except_on_ties(bits, absmax, fractions):
    # half_up(-t) = -half_up(t) + [t is a tie], so fq(x) + fq(-x) is 0, or one step up on exact ties.
    scale, zero_point, qmin, qmax = _qparams(-absmax, absmax, bits, True, True, "half_up")
    x = t(fractions) * (qmax * scale)
    steps = x.abs() / scale
    near_tie = ((steps - steps.floor()) - 0.5).abs() <= 1e-7  # ties, and the float32 x + 0.5 quirk
    total = fake_quantize(x, scale, zero_point, qmin, qmax) + fake_quantize(-x, scale, zero_point, qmin, qmax)
    assert total[~near_tie].eq(0.0).all()
    # (k + 1) * scale - k * scale is one step up to the float rounding of the two products, or 0
    one_step = (total - scale).abs() <= 1e-6 * (x.abs() + scale)
    assert (one_step | total.eq(0.0))[near_tie].all()
    assert one_step[steps - steps.floor() == 0.5].all()


def test_half_up_bias_only_comes_from_ties():
    # Continuous symmetric data: ties have probability 0, so the mean error is ~0 (here < 1e-3 scale).
    scale, zero_point = choose_qparams(t(-1.0), t(1.0), 8, True, True)
    x = torch.rand(5000, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = torch.cat([x, -x])
    assert (fake_quantize(x, scale, zero_point, -128, 127) - x).mean().abs() < 1e-3 * scale
    # Data on the half-step grid: every other value is a tie; half_up pushes each tie up by scale / 2,
    # half_even has no bias. A power-of-two scale (1/64) keeps the grid exact.
    scale, zero_point = choose_qparams(t(-127 / 64), t(127 / 64), 8, True, True)
    assert scale.item() == 1 / 64
    steps = torch.arange(-200, 201, dtype=torch.float32) / 2  # -100.0, -99.5, ..., 100.0
    grid = steps * scale
    up_bias = (fake_quantize(grid, scale, zero_point, -128, 127) - grid).mean()
    even_bias = (fake_quantize(grid, scale, zero_point, -128, 127, rounding="half_even") - grid).mean()
    assert torch.allclose(up_bias, 200 * (scale / 2) / 401, rtol=1e-5)
    assert even_bias.item() == 0.0


# ---------------------------------------------------------------------------------------------- review-mutq gaps


def test_zero_point_nudge_follows_the_rounding_mode_on_a_tie():
    # 2-bit unsigned asymmetric over [-1.5, 1.5]: scale = 3 / 3 = 1, lo / scale = -1.5 is a tie.
    # half_up: floor(-1.5 + 0.5) = -1 -> zp = 0 - (-1) = 1; half_even: -2 -> zp = 2. Both keep 0.0 exact.
    for rounding, expected_zp in (("half_up", 1), ("half_even", 2)):
        scale, zero_point = choose_qparams(t(-1.5), t(1.5), 2, signed=False, symmetric=False, rounding=rounding)
        assert scale.item() == 1.0 and zero_point.item() == expected_zp
        assert fake_quantize(t([0.0]), scale, zero_point, 0, 3, rounding=rounding).item() == 0.0


def test_integer_codes_follow_the_rounding_mode():
    ties, scale, zp = t([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]), t(1.0), torch.tensor(0, dtype=torch.int32)
    assert quantize(ties, scale, zp, 8, True).tolist() == [-2, -1, 0, 1, 2, 3]
    assert quantize(ties, scale, zp, 8, True, rounding="half_even").tolist() == [-2, -2, 0, 0, 2, 2]


def test_unsigned_symmetric_ignores_the_negative_side():
    # documented: symmetric unsigned scale = hi / qmax; negative values saturate at 0
    scale, zero_point = choose_qparams(t(-3.0), t(1.0), 8, signed=False, symmetric=True)
    assert torch.equal(scale, t(1.0) / 255) and zero_point.item() == 0
    assert torch.equal(fake_quantize(t([-3.0, 1.0]), scale, zero_point, 0, 255), t([0.0, 1.0]))


def test_bfloat16_input_is_divided_in_float32():
    # 1.0 / (1 / 300.6) = 300.6 -> code 301; in bfloat16 (step 2 at 300) the quotient would be 300.
    codes = quantize(torch.tensor([1.0], dtype=torch.bfloat16), t(1 / 300.6), torch.tensor(0, dtype=torch.int32), 16, True)
    assert codes.tolist() == [301]


def test_log2_with_three_fractional_bits_by_hand():
    # recommended uses frac_bits=3: code = round(8 * -log2 p), level 2^(-code/8); 4 bits reach code 15.
    # 0.6 -> 5.90 -> 6; 0.3 -> 13.90 -> 14; 0.27 -> 15.11 -> 15; 0.26 -> 15.55 -> 16 > 15: flushed
    p = t([1.0, 0.5, 0.6, 0.3, 0.27, 0.26])
    codes, zero_mask = log2_quantize(p, 4, frac_bits=3)
    assert codes.tolist() == [0, 8, 6, 14, 15, 15]
    assert zero_mask.tolist() == [False] * 5 + [True]
    expected = t([1.0, 0.5, 2**-0.75, 2**-1.75, 2**-1.875, 0.0])
    assert torch.allclose(log2_dequantize(codes, zero_mask, frac_bits=3), expected, rtol=1e-6, atol=0)
    assert torch.equal(fake_log2_quantize(p, 4, frac_bits=3), log2_dequantize(codes, zero_mask, frac_bits=3))
