"""Integer-only softmax with a log2-quantized output, as an integer NPU computes attention probabilities.

Follows I-BERT (Kim et al., 2021, "I-BERT: Integer-only BERT Quantization") and I-ViT: exp is approximated
with a shift and a second-order polynomial, the row sum and the division are integer, and the output is
the log2 code of the probability (see pipeline.quant.quantizers.log2_quantize for the code convention).

Everything on the integer path is an int64 tensor op (add, multiply, floor division, shifts, comparisons);
only the constants derived from the float ``scale`` are computed in Python.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
from torch import Tensor

from pipeline.quant.quantizers import int_dtype, log2_dequantize, qrange, round_to_int

EXP_POLY_A = 0.3585
EXP_POLY_B = 1.353
EXP_POLY_C = 0.344
"""exp(p) ~= A (p + B)^2 + C for p in (-ln 2, 0] (I-BERT's second-order fit)."""
MAX_SHIFT = 62
"""Right-shift counts are capped here: every exp code is < 2^62 (checked), so the result is then 0."""
MAX_FRAC_BITS = 30
EXP_INPUT_STEP = 2.0**-12
"""int_softmax_log2 left-shifts the score codes until one step is at most this (in the scores' real
units) before int_exp: I-BERT's exp is exact enough only on a fine input grid (its inputs are 32-bit
accumulators). On 8-bit scores (steps near 0.1) q_ln2 = floor(ln2 / scale) would be off by up to
15% and the polynomial would hold about 8 bits, flushing probabilities near 2^-9 to zero."""
MAX_SCORE_CODE = 2**40
"""int_softmax_fake clamps score codes to +-2^40, so -inf (masked) scores get probability 0."""
_INT64_LIMIT = 2**63


def exp_constants(scale: float) -> tuple[int, int, int, float]:
    """Integer constants of int_exp for input scale ``scale`` (real value per input code).

    q_ln2 = floor(ln2 / scale), q_b = floor(B / scale), q_c = floor(C / (A scale^2)), scale_out = A scale^2.
    Raises ValueError unless 0 < scale <= ln 2 (q_ln2 >= 1) and every exp code fits below 2^62.
    """
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale <= math.log(2.0):
        raise ValueError(f"scale must be a float in (0, ln 2], got {scale!r}")
    q_ln2 = math.floor(math.log(2.0) / scale)
    q_b = math.floor(EXP_POLY_B / scale)
    q_c = math.floor(EXP_POLY_C / (EXP_POLY_A * scale**2))
    if q_b**2 + q_c >= 2**MAX_SHIFT:
        raise ValueError(f"scale {scale!r} is too small: exp codes would not fit in int64")
    return q_ln2, q_b, q_c, EXP_POLY_A * scale**2


def exp_input_shift(scale: float) -> int:
    """Left shift k >= 0 of the score codes that brings one step to scale / 2^k <= EXP_INPUT_STEP."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0.0 < scale < math.inf:
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    mantissa, exponent = math.frexp(scale / EXP_INPUT_STEP)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    return max(0, exponent - 1 if mantissa == 0.5 else exponent)


def _check_integer_tensor(name: str, values: Tensor) -> None:
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {values.dtype}")


def _int_exp_nonpositive(q: Tensor, scale: float) -> tuple[Tensor, float]:
    """int_exp without the input checks; q: int64, every element <= 0."""
    q_ln2, q_b, q_c, scale_out = exp_constants(scale)
    z = torch.div(-q, q_ln2, rounding_mode="floor")  # number of whole ln2 steps, >= 0
    q_p = q + z * q_ln2  # remainder, in (-q_ln2, 0]
    shifted = q_p + q_b
    q_l = shifted * shifted + q_c  # polynomial a (p + b)^2 + c, in units of scale_out
    return q_l >> z.clamp_(max=MAX_SHIFT), scale_out


def int_exp(q: Tensor, scale: float) -> tuple[Tensor, float]:
    """Integer-only exp (I-BERT): codes q <= 0 with real value x = q * scale -> (q_out int64, scale_out).

    exp(x) ~= q_out * scale_out. Decompose x = -z ln2 + p with p in (-ln2, 0]:
      q_ln2 = floor(ln2 / scale), z = floor(-q / q_ln2), q_p = q + z q_ln2 (p = q_p * scale);
    exp(p) ~= a (p + b)^2 + c with a = 0.3585, b = 1.353, c = 0.344:
      q_b = floor(b / scale), q_c = floor(c / (a scale^2)), q_L = (q_p + q_b)^2 + q_c, scale_out = a scale^2;
    exp(x) = 2^-z exp(p):  q_out = q_L >> z (z capped at 62, where the shift already gives 0).

    Args:
        q: integer tensor (any shape), every element <= 0; converted to int64.
        scale: input scale, 0 < scale <= ln 2 (accuracy needs it much smaller, e.g. 1/64).
    """
    _check_integer_tensor("q", q)
    q = q.to(torch.int64)
    if q.numel() and q.max() > 0:
        raise ValueError(f"int_exp needs codes <= 0, got max {q.max().item()}")
    return _int_exp_nonpositive(q, scale)


def floor_log2(v: Tensor) -> Tensor:
    """floor(log2 v) for int64 v in [1, 2^32) (0 for v == 0), by a 5-step binary search with shifts.

    Like a hardware count-leading-zeros: at each step, if v has bits above position ``shift``,
    add ``shift`` to the result and drop those low bits. Loops over the 5 shift widths, never over elements.
    """
    exponent = torch.zeros_like(v)
    rest = v
    for shift in (16, 8, 4, 2, 1):
        has_high_bits = (rest >> shift) > 0
        exponent += has_high_bits * shift
        rest = torch.where(has_high_bits, rest >> shift, rest)
    return exponent


def round_log2_half_up(v: Tensor) -> Tensor:
    """round(log2 v), ties up, for int64 v in [1, 2^31), with integer ops only.

    With e = floor(log2 v): log2 v >= e + 1/2  <=>  v >= 2^(e + 1/2)  <=>  v * v >= 2^(2e + 1).
    (v * v == 2^(2e+1) is impossible for an integer v, so the tie rule never matters here.)
    """
    exponent = floor_log2(v)
    rounds_up = v * v >= torch.ones_like(v) << (2 * exponent + 1)
    return exponent + rounds_up


def int_softmax_log2(
    scores_q: Tensor, scale: float, out_bits: int, dim: int = -1, frac_bits: int = 16
) -> tuple[Tensor, Tensor]:
    """Integer softmax with log2-coded output along ``dim``, as an NPU computes it.

    1. q = scores_q - max(scores_q along dim)                     (int64, <= 0)
       saturated at the code whose exp is 0 anyway (x <= -63 ln 2), then q << k with
       k = exp_input_shift(scale), so that int_exp sees the fine step scale / 2^k <= 2^-12
    2. e = int_exp(q << k, scale / 2^k)                             (int64 codes of exp)
    3. v = floor(e * 2^frac_bits / sum(e along dim))                (fixed-point probability, 0..2^frac_bits)
    4. code = frac_bits - round(log2 v), half up (round_log2_half_up), clamped at 0
    5. zero_mask = (v == 0) | (code > 2^out_bits - 1); codes are clamped to [0, 2^out_bits - 1].
    The probability is 2^-code (0 where zero_mask): quantizers.log2_dequantize turns the outputs into
    probabilities. Probabilities below 2^-frac_bits are flushed to zero, so with frac_bits < 2^out_bits - 1
    the smallest log2 levels are never produced.

    Args:
        scores_q: integer attention scores, e.g. (B, H, N, N); real value scores_q * scale.
        scale: input scale (real value per score code), any positive float: the codes are shifted
            onto a fine grid first (exp_input_shift), as an NPU widens 8-bit scores before its exp.
        out_bits: bits of the log2 code (2..16).
        frac_bits: fractional bits of the fixed-point probability v (1..30).
    Returns:
        (codes of dtype int_dtype(out_bits, False), zero_mask bool), both of scores_q's shape.
    """
    _check_integer_tensor("scores_q", scores_q)
    _, code_max = qrange(out_bits, False)
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, Integral) or not 1 <= frac_bits <= MAX_FRAC_BITS:
        raise ValueError(f"frac_bits must be an integer in 1..{MAX_FRAC_BITS}, got {frac_bits!r}")
    shift = exp_input_shift(scale)
    fine_scale = math.ldexp(scale, -shift)
    q_ln2, q_b, q_c, _ = exp_constants(fine_scale)
    row_length = scores_q.shape[dim] if scores_q.ndim else 1
    if ((q_b**2 + q_c) << frac_bits) >= _INT64_LIMIT or (q_b**2 + q_c) * row_length >= _INT64_LIMIT:
        raise ValueError(f"scale {scale!r} is too small for frac_bits={frac_bits}: intermediates overflow int64")

    q = scores_q.to(torch.int64)
    q = q - q.amax(dim=dim, keepdim=True)
    if shift:  # below -63 ln2 every exp code is 0 (z >= 63): saturating there keeps q << shift inside int64
        floor = math.ceil(63 * math.log(2.0) / scale) + 1
        if floor << shift >= 2**62:
            raise ValueError(f"scale {scale!r} is too large: shifted score codes would overflow int64")
        q = q.clamp_(min=-floor) << shift
    exp_codes, _ = _int_exp_nonpositive(q, fine_scale)
    row_sum = exp_codes.sum(dim=dim, keepdim=True)  # >= 1: the row maximum has q = 0 and exp code q_b^2 + q_c
    probability = torch.div(exp_codes << frac_bits, row_sum, rounding_mode="floor")
    codes = frac_bits - round_log2_half_up(probability)
    zero_mask = (probability == 0) | (codes > code_max)
    codes = codes.clamp_(0, code_max).to(int_dtype(out_bits, False))
    return codes, zero_mask


def int_softmax_fake(scores: Tensor, scale: float, out_bits: int, dim: int = -1) -> Tensor:
    """Float scores -> probabilities through the integer softmax; float in, float out (scores' dtype).

    scores_q = clamp(round_to_int(scores / scale), -2^40, 2^40) (symmetric, zero point 0, no bit-width clamp),
    then int_softmax_log2 and log2_dequantize. -inf scores (masks) give probability 0.
    """
    exp_input_shift(scale)  # validates scale before dividing by it
    compute = scores.to(torch.float32) if scores.dtype in (torch.float16, torch.bfloat16) else scores
    scores_q = round_to_int(compute / scale, in_place=True).clamp_(-MAX_SCORE_CODE, MAX_SCORE_CODE).to(torch.int64)
    codes, zero_mask = int_softmax_log2(scores_q, scale, out_bits, dim)
    return log2_dequantize(codes, zero_mask).to(scores.dtype)
