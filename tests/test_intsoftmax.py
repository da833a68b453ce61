"""Tests of pipeline.quant.intsoftmax: hand-computed integer steps, accuracy bounds, and the log2 softmax."""

import math

import pytest
import torch

from pipeline.quant.intsoftmax import (
    EXP_POLY_A,
    EXP_POLY_B,
    EXP_POLY_C,
    exp_constants,
    exp_input_shift,
    floor_log2,
    int_exp,
    int_softmax_fake,
    int_softmax_log2,
    round_log2_half_up,
)
from pipeline.quant.quantizers import fake_log2_quantize, log2_dequantize, log2_quantize, round_to_int


def ints(values):
    return torch.tensor(values, dtype=torch.int64)


def scores(*shape, std=1.0, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


# ---------------------------------------------------------------------------------------------- int_exp


def test_exp_constants_by_hand():
    # scale 1/64: ln2 * 64 = 44.36 -> 44; 1.353 * 64 = 86.59 -> 86; 0.344 * 4096 / 0.3585 = 3930.3 -> 3930
    q_ln2, q_b, q_c, scale_out = exp_constants(1 / 64)
    assert (q_ln2, q_b, q_c) == (44, 86, 3930)
    assert scale_out == 0.3585 / 4096


def test_int_exp_by_hand():
    # q=0: z=0, q_p=0: 86^2 + 3930 = 11326
    # q=-44: z=1, q_p=0: 11326 >> 1 = 5663
    # q=-50: z=1, q_p=-6: 80^2 + 3930 = 10330 >> 1 = 5165
    # q=-1000: z=22, q_p=-32: (54^2 + 3930) >> 22 = 6846 >> 22 = 0
    out, scale_out = int_exp(ints([0, -44, -50, -1000]), 1 / 64)
    assert out.dtype == torch.int64
    assert torch.equal(out, ints([11326, 5663, 5165, 0]))
    assert scale_out == 0.3585 / 4096


def test_int_exp_huge_negative_inputs_give_zero():
    out, _ = int_exp(ints([-(2**40), -(2**20)]), 1 / 64)
    assert torch.equal(out, ints([0, 0]))


def polynomial_relative_error() -> float:
    """max |a (p + b)^2 + c - exp(p)| / exp(p) over p in [-ln2, 0] (about 0.31%)."""
    p = torch.linspace(-math.log(2), 0, 100001, dtype=torch.float64)
    return ((EXP_POLY_A * (p + EXP_POLY_B) ** 2 + EXP_POLY_C - p.exp()).abs() / p.exp()).max().item()


@pytest.mark.parametrize("scale", [1 / 64, 1 / 256, 1 / 1024])
def test_int_exp_error_bound(scale):
    """Derived bound, for x = q * scale in [-10, 0]:

    * the polynomial is within eps_poly (0.31%) of exp on (-ln2, 0];
    * flooring b and c to codes lowers the polynomial by at most a((p+b)^2 - (p+b-s)^2) + a s^2, i.e. by a
      relative s (2 a (p + b) / poly(p) <= 0.98 on the interval) + s^2;
    * ln2 is replaced by q_ln2 * s = ln2 - delta, so 2^-z = exp(-z ln2) undershoots exp(-z q_ln2 s) by exp(-z delta);
    * the final shift floors: at most one output step scale_out.
    Hence |approx - exp(x)| <= exp(x) * (1 - (1 - eps_poly)(1 - s - s^2) exp(-z delta)) + scale_out.
    """
    eps_poly = polynomial_relative_error()
    assert eps_poly < 0.0032
    q_ln2, _, _, scale_out = exp_constants(scale)
    delta = math.log(2) - q_ln2 * scale
    q = torch.arange(-round(10 / scale), 1, dtype=torch.int64)
    out, _ = int_exp(q, scale)
    x = q.double() * scale
    approx, exact = out.double() * scale_out, x.exp()
    z = torch.div(-q, q_ln2, rounding_mode="floor").double()
    relative = 1 - (1 - eps_poly) * (1 - scale - scale**2) * torch.exp(-z * delta)
    assert ((approx - exact).abs() <= exact * relative + scale_out).all()


def test_int_exp_relative_error_below_one_percent_at_fine_scale():
    # At scale 1/1024 the bound above is < 1% for x in [-3, 0] (measured 0.58%).
    scale = 1 / 1024
    q = torch.arange(-3 * 1024, 1, dtype=torch.int64)
    out, scale_out = int_exp(q, scale)
    exact = (q.double() * scale).exp()
    assert ((out.double() * scale_out - exact).abs() / exact).max() < 0.01


def test_int_exp_rejects_bad_input():
    with pytest.raises(ValueError, match="int_exp needs codes <= 0, got max 3"):
        int_exp(ints([0, 3]), 1 / 64)
    with pytest.raises(ValueError, match="q must be an integer tensor"):
        int_exp(torch.tensor([-1.0]), 1 / 64)
    with pytest.raises(ValueError, match="scale must be a float in \\(0, ln 2\\], got 1.0"):
        int_exp(ints([0]), 1.0)
    with pytest.raises(ValueError, match="too small"):
        int_exp(ints([0]), 1e-12)


# ---------------------------------------------------------------------------------------------- integer log2


def test_floor_and_rounded_log2_by_hand():
    v = ints([0, 1, 2, 3, 5, 6, 1023, 1024, 1448, 1449, 2**30])
    assert floor_log2(v).tolist() == [0, 0, 1, 1, 2, 2, 9, 10, 10, 10, 30]
    # 3: 9 >= 2^3 -> 2; 5: 25 < 2^5 -> 2; 6: 36 >= 32 -> 3; 1448^2 = 2096704 < 2^21 -> 10; 1449^2 >= 2^21 -> 11
    assert round_log2_half_up(v[1:]).tolist() == [0, 1, 2, 2, 3, 10, 10, 10, 11, 30]


def test_rounded_log2_matches_float_log2():
    v = torch.arange(1, 200001, dtype=torch.int64)
    expected = torch.floor(torch.log2(v.double()) + 0.5).long()
    assert torch.equal(round_log2_half_up(v), expected)


# ---------------------------------------------------------------------------------------------- softmax


def test_exp_input_shift_reaches_the_fine_step():
    assert [exp_input_shift(x) for x in (2**-12, 2**-12 * 1.01, 1 / 64, 0.0944, 1e-6, 1000.0)] == [0, 1, 6, 9, 0, 22]
    with pytest.raises(ValueError, match="scale must be a positive finite float"):
        exp_input_shift(0.0)


def test_int_softmax_by_hand():
    # scale 1/64 -> the codes shift left by 6 onto the step 2^-12, where q_ln2 = floor(ln2 * 4096) = 2839,
    # q_b = floor(1.353 * 4096) = 5541, q_c = floor(0.344 * 2^24 / 0.3585) = 16098639.
    assert exp_input_shift(1 / 64) == 6 and exp_constants(2**-12)[:3] == (2839, 5541, 16098639)
    # codes [0, -44] -> [0, -2816]: z = 0 for both (2816 < 2839); exp codes 5541^2 + q_c = 46801320 and
    # (5541 - 2816)^2 + q_c = 23524264, sum 70325584
    codes, zero_mask = int_softmax_log2(ints([[0, -44]]), 1 / 64, out_bits=8)
    v0, v1 = (46801320 << 16) // 70325584, (23524264 << 16) // 70325584
    assert (v0, v1) == (43613, 21922)
    # floor(log2 43613) = 15, 43613^2 < 2^31 -> 15 -> code 1; floor(log2 21922) = 14, 21922^2 < 2^29 -> code 2
    assert codes.dtype == torch.uint8 and zero_mask.dtype == torch.bool
    assert codes.tolist() == [[1, 2]] and not zero_mask.any()
    # the float softmax agrees: softmax([0, -0.6875]) = [0.665, 0.335] -> -log2 = [0.59, 1.58] -> [1, 2]
    reference, _ = log2_quantize(torch.softmax(torch.tensor([0.0, -44 / 64]), dim=0), 8)
    assert reference.tolist() == [1, 2]


def test_equal_scores_give_equal_probabilities():
    codes, zero_mask = int_softmax_log2(torch.full((2, 4), 7, dtype=torch.int64), 1 / 64, out_bits=8)
    # v = 2^16 / 4 = 2^14 exactly -> code 2 -> probability 1/4 exactly
    assert torch.equal(codes, torch.full((2, 4), 2, dtype=torch.uint8))
    assert torch.equal(log2_dequantize(codes, zero_mask), torch.full((2, 4), 0.25))
    codes, _ = int_softmax_log2(torch.full((3, 5), -3, dtype=torch.int64), 1 / 64, out_bits=4)
    assert (codes == codes[0, 0]).all()


def test_dominant_score_gets_code_zero_and_tiny_ones_flush_to_zero():
    # scale 1/64 (shift 6, constants as in test_int_softmax_by_hand; row maximum's exp code 46801320)
    codes, zero_mask = int_softmax_log2(ints([[640, 0, 0, 0], [768, 0, 0, 0], [0, 0, 0, 64]]), 1 / 64, out_bits=4)
    # row 0: the others are 10 below the max: q = -640 << 6 = -40960, z = 14, q_p = -1214:
    # (4327^2 + q_c) >> 14 = 2125; v = floor(2125 * 2^16 / 46807695) = 2 -> code 16 - 1 = 15, the last 4-bit level
    # (float: e^-10 = 2^-14.4; v's 16 fractional bits hold it as 2)
    assert codes[0].tolist() == [0, 15, 15, 15] and not zero_mask[0].any()
    # row 1: 12 below: q = -49152, z = 17, q_p = -889: (4652^2 + q_c) >> 17 = 287; v = floor(287 * 2^16 / 46802181) = 0 -> flushed
    assert codes[1, 0].item() == 0 and zero_mask[1].tolist() == [False, True, True, True]
    # row 2: the others are 1 below: q = -4096, z = 1, q_p = -1257: (4284^2 + q_c) >> 1 = 17225647;
    # v = floor(46801320 * 2^16 / (46801320 + 3 * 17225647)) = 31145, 31145^2 >= 2^29 -> round(log2 v) = 15 -> code 1
    # (float: softmax = e / (e + 3) = 0.475 -> -log2 = 1.07 -> 1)
    assert codes[2].tolist() == [3, 3, 3, 1] and not zero_mask[2].any()


def test_int_softmax_on_coarse_8_bit_scores_matches_the_float_log2_softmax():
    # 8-bit scores of a real ViT have steps near 0.1, and above ln 2 for wide ranges: without the shift onto
    # a fine grid, q_ln2 = floor(ln2 / 0.0944) = 7 (ln2 read as 0.661) and p = 2^-9 flushed to zero.
    for scale in (0.0944, 1.5):
        s = round_to_int(scores(2, 3, 16, 16, std=3.0, seed=4) / scale) * scale
        integer = int_softmax_fake(s, scale, 8)
        reference = fake_log2_quantize(torch.softmax(s, dim=-1), 8)
        large = reference >= 2**-12
        assert (integer[large] == reference[large]).float().mean() >= 0.97
        assert ((integer == 0) & large).sum() == 0  # nothing above 2^-12 is flushed
    with pytest.raises(ValueError, match="too large: shifted score codes would overflow int64"):
        int_softmax_fake(torch.tensor([[0.0, -math.inf]]), 2.0**52, 8)


def test_int_softmax_along_another_dim():
    q = round_to_int(scores(3, 5, seed=1) * 64).long()
    codes_last, mask_last = int_softmax_log2(q.T.contiguous(), 1 / 64, 8, dim=-1)
    codes_first, mask_first = int_softmax_log2(q, 1 / 64, 8, dim=0)
    assert torch.equal(codes_first, codes_last.T) and torch.equal(mask_first, mask_last.T)


def test_int_softmax_matches_float_log2_softmax():
    s = scores(2, 3, 32, 32, std=1.0, seed=2)
    for bits in (4, 8):
        integer = int_softmax_fake(s, 1 / 64, bits)
        reference = fake_log2_quantize(torch.softmax(s, dim=-1), bits)
        assert integer.dtype == torch.float32
        assert (integer == reference).float().mean() >= 0.95  # measured 0.98
        # a log2 level is within a factor 2^(+-1/2) of the probability, so the row sums are too
        # (up to the exp approximation error, a few %):
        row_sums = integer.sum(dim=-1)
        assert ((row_sums > 2**-0.5 * 0.95) & (row_sums < 2**0.5 * 1.05)).all()


def test_int_softmax_matches_float_on_the_large_probabilities_of_peaky_rows():
    # With std 3, many probabilities fall below the exp/fixed-point resolution and flush to 0 (the float
    # reference keeps levels down to 2^-255); the probabilities that matter agree.
    s = scores(2, 3, 32, 32, std=3.0, seed=3)
    integer = int_softmax_fake(s, 1 / 64, 8)
    reference = fake_log2_quantize(torch.softmax(s, dim=-1), 8)
    large = reference >= 2**-8
    assert (integer[large] == reference[large]).float().mean() >= 0.95  # measured 0.97


def test_int_softmax_fake_masks_and_dtype():
    s = torch.tensor([[0.0, -math.inf, 0.0, -math.inf]], dtype=torch.bfloat16)
    probabilities = int_softmax_fake(s, 1 / 64, 8)
    assert probabilities.dtype == torch.bfloat16
    assert probabilities.float().tolist() == [[0.5, 0.0, 0.5, 0.0]]


def test_int_softmax_rejects_bad_input():
    with pytest.raises(ValueError, match="scores_q must be an integer tensor"):
        int_softmax_log2(torch.zeros(2, 2), 1 / 64, 8)
    with pytest.raises(ValueError, match="bits must be an integer in 2..16, got 17"):
        int_softmax_log2(torch.zeros(2, 2, dtype=torch.int64), 1 / 64, 17)
    with pytest.raises(ValueError, match="frac_bits must be an integer in 1..30, got 31"):
        int_softmax_log2(torch.zeros(2, 2, dtype=torch.int64), 1 / 64, 8, frac_bits=31)
    with pytest.raises(ValueError, match="intermediates overflow int64"):
        int_softmax_log2(torch.zeros(2, 2, dtype=torch.int64), 2**-20, 8, frac_bits=30)


# ---------------------------------------------------------------------------------------------- review-mutq gaps


def test_int_softmax_subtracts_each_rows_own_max():
    # rows [0, -1] and [64, 63] (scale 1/64) have the same softmax [0.731, 0.269] -> -log2 [0.45, 1.89] -> [0, 2].
    # Integer: e = [46801320, 17225647] (see test_dominant_score...), v = [47904, 17631] -> codes [0, 2].
    # A max over the whole tensor would leave row 0 at -64 below it: every exp code 0, a zero row sum.
    codes, zero_mask = int_softmax_log2(ints([[0, -64], [4096, 4032]]), 1 / 64, out_bits=8)
    assert codes.tolist() == [[0, 2], [0, 2]] and not zero_mask.any()


def test_int_softmax_flushes_codes_beyond_the_last_level():
    # out_bits=2 (codes 0..3): scores [0, -3] -> e = [46801320, 37341520 >> 4 = 2333845], v1 = 3112,
    # round(log2 3112) = 12 -> code 16 - 12 = 4 > 3 -> probability 0 (float: p = 0.047 -> 4.4 -> 4 > 3, too)
    codes, zero_mask = int_softmax_log2(ints([[0, -192]]), 1 / 64, out_bits=2)
    assert codes.tolist() == [[0, 3]] and zero_mask.tolist() == [[False, True]]
    assert log2_dequantize(codes, zero_mask).tolist() == [[1.0, 0.0]]
