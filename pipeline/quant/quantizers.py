"""Stateless quantization primitives: rounding, integer ranges, qparams, (fake) quantization, log2 quantization.

Conventions used throughout:

* A *code* q is an integer in [qmin, qmax]; it stands for the real value (q - zero_point) * scale.
* ``scale`` (float32) is the real-valued size of one integer step, in the units of the data.
* ``zero_point`` (int32) is the code that represents real 0.0 exactly.
* Per tensor: scale and zero_point are 0-d (shape (1,) is accepted too).
  Per channel: shape (C,), with C = x.shape[axis]; they broadcast along dimension ``axis`` of x.
* Every rounding goes through :func:`round_to_int`, so the rounding mode is chosen in one place.
"""

from __future__ import annotations

from numbers import Integral

import torch
from torch import Tensor

ROUNDING_MODES = ("half_up", "half_even")
MIN_BITS = 2
MAX_BITS = 16
MIN_SCALE = torch.finfo(torch.float32).eps
"""Scale choose_qparams gives a range of width 0 when every channel's range is 0 (an all-zero tensor)."""

_LOW_PRECISION_FLOATS = (torch.float16, torch.bfloat16)


def check_rounding_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of ROUNDING_MODES."""
    if mode not in ROUNDING_MODES:
        raise ValueError(f"unknown rounding mode {mode!r}; choose one of {', '.join(ROUNDING_MODES)}")


def round_to_int(x: Tensor, mode: str = "half_up", *, in_place: bool = False) -> Tensor:
    """Round every element to an integral value; THE one rounding function of the package.

    half_up:   floor(x + 0.5), ties go up as NPU hardware does (-2.5 -> -2, -0.5 -> 0, 2.5 -> 3).
               Evaluated in float32 (float64 stays float64), so x + 0.5 is itself rounded in two
               places: the single value 0.5 - 2^-25 (0.49999997) gives 1 instead of 0, and an odd
               integer in [2^23, 2^24) gives itself + 1. Neither is a code: codes lie in
               [-2^16, 2^16], and every caller clamps to that range after rounding. An exact
               variant would cost extra passes on the hot path.
    half_even: banker's rounding, ties go to the even neighbour (-2.5 -> -2, 2.5 -> 2, 1.5 -> 2).

    Args:
        x: any shape; integer, float16 and bfloat16 tensors are converted to float32 first
            (in float16, x + 0.5 would already round every odd integer from 1025 up, in bfloat16
            from 129: inside the code range).
        mode: one of ROUNDING_MODES.
        in_place: overwrite x (a float tensor the caller owns) instead of allocating a result;
            the hot paths (fake_quantize) use it to avoid a full-size temporary.
    Returns:
        float tensor of x's shape holding integral values (float32 for integer, float16 and
        bfloat16 input); +-inf and NaN pass through.
    """
    check_rounding_mode(mode)
    if not x.is_floating_point() or x.dtype in _LOW_PRECISION_FLOATS:
        x, in_place = x.to(torch.float32), True  # the conversion is already a fresh tensor
    if mode == "half_even":
        return x.round_() if in_place else torch.round(x)
    shifted = x.add_(0.5) if in_place else x + 0.5
    return shifted.floor_()


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """Integer code range (qmin, qmax).

    signed:   (-2^(bits-1), 2^(bits-1) - 1), e.g. 8 bits -> (-128, 127)
    unsigned: (0, 2^bits - 1),               e.g. 8 bits -> (0, 255)
    Raises ValueError unless bits is an integer in 2..16.
    """
    if isinstance(bits, bool) or not isinstance(bits, Integral) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    bits = int(bits)
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def int_dtype(bits: int, signed: bool) -> torch.dtype:
    """Smallest torch integer dtype holding every code of qrange(bits, signed).

    signed <= 8 bits -> int8, unsigned <= 8 -> uint8, signed 9..16 -> int16, unsigned 9..16 -> int32.
    """
    qrange(bits, signed)  # validates bits
    if bits <= 8:
        return torch.int8 if signed else torch.uint8
    return torch.int16 if signed else torch.int32


def _check_range_tensors(min_val: Tensor, max_val: Tensor) -> None:
    """min_val/max_val: same shape, 0-d or 1-d, finite, min_val <= max_val elementwise."""
    if min_val.shape != max_val.shape:
        raise ValueError(f"min_val and max_val must have the same shape, got {tuple(min_val.shape)} and {tuple(max_val.shape)}")
    if min_val.ndim > 1:
        raise ValueError(f"min_val/max_val must be 0-d (per tensor) or 1-d (per channel), got shape {tuple(min_val.shape)}")
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError(f"min_val/max_val must be finite, got min {min_val.tolist()} and max {max_val.tolist()}")
    if (min_val > max_val).any():
        raise ValueError(f"min_val must be <= max_val, got min {min_val.tolist()} and max {max_val.tolist()}")


def choose_qparams(
    min_val: Tensor,
    max_val: Tensor,
    bits: int,
    signed: bool,
    symmetric: bool,
    rounding: str = "half_up",
) -> tuple[Tensor, Tensor]:
    """Quantization parameters (scale float32, zero_point int32) for an observed range [min_val, max_val].

    Shapes: min_val and max_val are 0-d (per tensor) or (C,) (per channel); outputs have the same shape.

    1. The range is widened to include 0: lo = min(min_val, 0), hi = max(max_val, 0),
       so that real 0.0 is exactly representable.
    2. symmetric, signed:   scale = max(|lo|, |hi|) / qmax      (qmax = 2^(bits-1) - 1), zero_point = 0
       symmetric, unsigned: scale = hi / qmax                   (qmax = 2^bits - 1),     zero_point = 0
                            (for non-negative data such as softmax outputs; negative values saturate at 0)
       asymmetric:          scale = (hi - lo) / (qmax - qmin),
                            zero_point = clamp(qmin - round_to_int(lo / scale), qmin, qmax)
                            (the integer "zero-point nudge": the representable range shifts by < scale/2)
    3. A range of width 0 (min == max == 0) still gets a usable scale: scales are raised to at least
       float32 eps times the largest scale of the tensor (a dead channel among live ones), or to
       MIN_SCALE when every range is 0. The floor is relative, not absolute: data whose whole range
       is tiny keep their resolution (a weight folded with 16-bit activation scales has steps near
       1e-9, far below eps).
    """
    qmin, qmax = qrange(bits, signed)
    check_rounding_mode(rounding)
    _check_range_tensors(min_val, max_val)
    lo = torch.clamp(min_val.to(torch.float32), max=0.0)
    hi = torch.clamp(max_val.to(torch.float32), min=0.0)
    if symmetric:
        magnitude = torch.maximum(-lo, hi) if signed else hi
        scale = _raise_zero_scales(magnitude / qmax)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = _raise_zero_scales((hi - lo) / (qmax - qmin))
        zero_point = (qmin - round_to_int(lo / scale, rounding)).clamp_(qmin, qmax).to(torch.int32)
    return scale, zero_point


def _raise_zero_scales(scale: Tensor) -> Tensor:
    """Scales (0-d or (C,), >= 0) raised to >= eps * max(scale), or to MIN_SCALE where all are 0 (no host sync)."""
    if scale.numel() == 0:
        return scale
    largest = scale.max()
    floor = torch.where(largest > 0, largest * torch.finfo(torch.float32).eps, torch.full_like(largest, MIN_SCALE))
    return torch.maximum(scale, floor)


def power_of_two_factor_scales(scale: Tensor, max_shift: int, frac_bits: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """FQ-ViT's power-of-two factor (PTF): per-channel scales snapped up to s_base * 2^shift * mantissa / 2^frac_bits.

    s_base = max(scale) / 2^max_shift. frac_bits = 0 is FQ-ViT's grid: factors 2^k, k in 0..max_shift.
    frac_bits = f > 0 adds f mantissa bits: factors 2^k * m / 2^f with the integer m in 2^f..2^(f+1) - 1
    (f = 2: 1, 1.25, 1.5, 1.75, 2, 2.5, ...). Each channel takes the smallest factor >= scale_c / s_base
    (a channel's range only widens, nothing extra clips; channels below s_base take factor 1) and the
    widest channel keeps its scale exactly. On integer hardware the codes of every channel reach one
    common scale s_base / 2^f exactly, as (q_c - z_c) * m_c << shift_c: a shift, and with f > 0 a
    multiply by an (f + 1)-bit integer (f = 2: m in 4..7, itself two shifts and an add), which is how a
    LayerNorm or a residual add consumes them without a per-channel rescaling multiplier.

    Args:
        scale: (C,) positive float32 per-channel scales.
        max_shift: K >= 0; shifts lie in 0..K.
        frac_bits: f >= 0 mantissa bits.
    Returns:
        (scales (C,) float32 = s_base * 2^shift * mantissa / 2^f, shift (C,) int32, mantissa (C,) int32).
    """
    if max_shift < 0:
        raise ValueError(f"max_shift must be >= 0, got {max_shift}")
    if frac_bits < 0:
        raise ValueError(f"frac_bits must be >= 0, got {frac_bits}")
    scale = scale.to(torch.float32)
    base = scale.max() / 2.0**max_shift
    ratio = (scale / base).clamp_(min=1.0)  # in 1..2^K; exactly 2^K for the widest channel
    fraction, exponent = torch.frexp(ratio)  # ratio = fraction * 2^exponent, fraction in [0.5, 1): exact
    shift = exponent - 1
    mantissa = torch.ceil(torch.ldexp(fraction, torch.tensor(frac_bits + 1))).to(torch.int32)  # in 2^f..2^(f+1)
    carry = mantissa == 2 ** (frac_bits + 1)  # rounded up to the next power of two
    shift = torch.where(carry, shift + 1, shift).to(torch.int32)
    mantissa = torch.where(carry, 2**frac_bits, mantissa).to(torch.int32)
    factor = torch.ldexp(mantissa.to(torch.float32), shift - frac_bits)
    return base * factor, shift, mantissa


def power_of_two_factors(snapped: Tensor, max_shift: int, frac_bits: int = 0) -> tuple[Tensor, Tensor]:
    """The (shift, mantissa) of scales already on the PTF grid (the output of `power_of_two_factor_scales`).

    Snapping such scales again is not the inverse: s_base * m * 2^(k-f) rounds to float32 and may land
    just above the grid point, which `ceil` then carries to the next mantissa. Here each scale is divided
    by the exact unit s_base / 2^f (the widest channel's scale / 2^(K+f), a power-of-two division) and
    rounded to the integer n = m << k.

    Returns:
        (shift (C,) int32 in 0..K, mantissa (C,) int32 in 2^f..2^(f+1) - 1).
    """
    unit = snapped.to(torch.float32).max() / 2.0 ** (max_shift + frac_bits)
    n = torch.floor(snapped / unit + 0.5).to(torch.int64)
    shift = (torch.floor(torch.log2(n.to(torch.float64))).to(torch.int64) - frac_bits).clamp_(min=0)
    return shift.to(torch.int32), (n >> shift).to(torch.int32)


def broadcast_to_axis(param: Tensor, ndim: int, axis: int | None) -> Tensor:
    """View of a per-tensor or per-channel parameter shaped to broadcast against an ``ndim``-d tensor.

    axis=None: param has one element (0-d or (1,)) -> 0-d view.
    axis=k:    param has shape (C,) -> view of shape (C, 1, ..., 1) with ndim - 1 - k trailing ones,
               so it lines up with dimension k (negative k counts from the end).
    """
    if axis is None:
        if param.numel() != 1:
            raise ValueError(f"a per-tensor parameter (axis=None) must have one element, got shape {tuple(param.shape)}")
        return param.reshape(())
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis must be in {-ndim}..{ndim - 1} for a {ndim}-d tensor, got {axis}")
    if param.ndim != 1:
        raise ValueError(f"a per-channel parameter must be 1-d, got shape {tuple(param.shape)}")
    return param.reshape((-1,) + (1,) * (ndim - 1 - axis % ndim))


def broadcast_qparams(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None) -> tuple[Tensor, Tensor]:
    """scale and zero_point as views broadcastable against x, on x's device; checks the channel count."""
    if axis is not None and -x.ndim <= axis < x.ndim and scale.numel() != x.shape[axis]:
        raise ValueError(f"per-channel scale has {scale.numel()} entries but x.shape[{axis}] is {x.shape[axis]}")
    if zero_point.shape != scale.shape:
        raise ValueError(f"zero_point shape {tuple(zero_point.shape)} differs from scale shape {tuple(scale.shape)}")
    scale = broadcast_to_axis(scale, x.ndim, axis).to(x.device)
    zero_point = broadcast_to_axis(zero_point, x.ndim, axis).to(x.device)
    return scale, zero_point


def _check_qmin_qmax(qmin: int, qmax: int) -> None:
    if not qmin < qmax:
        raise ValueError(f"qmin must be < qmax, got qmin={qmin}, qmax={qmax}")


def fake_quantize_broadcast(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, rounding: str = "half_up"
) -> Tensor:
    """fake_quantize with scale/zero_point already broadcastable against x (any shapes torch can broadcast).

    (clamp(round_to_int(x / scale) + zp, qmin, qmax) - zp) * scale, computed in float32 for float16/bfloat16
    input and returned in x's dtype. Useful for evaluating many candidate ranges at once, e.g. x of shape
    (1, C, S) against scale of shape (G, C, 1) gives (G, C, S).
    """
    rounded = rounded_quotient(x, scale, rounding)  # the quotient is the only full-size allocation
    return dequantize_rounded_(rounded, scale, zero_point, qmin, qmax).to(x.dtype)


def rounded_quotient(x: Tensor, scale: Tensor, rounding: str) -> Tensor:
    """round_to_int(x / scale) as a fresh tensor, in float32 for float16/bfloat16 x: the pre-clamp codes minus zp."""
    compute_x = x.to(torch.float32) if x.dtype in _LOW_PRECISION_FLOATS else x
    return round_to_int(compute_x / scale, rounding, in_place=True)


def dequantize_rounded_(rounded: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """(clamp(rounded + zp, qmin, qmax) - zp) * scale, in place on `rounded` = round_to_int(x / scale).

    Computed as clamp(rounded, qmin - zp, qmax - zp) * scale: the same numbers (integers below 2^24
    are exact in float32; beyond that both clamp), in three passes instead of four. `rounded` may
    already be clamped to any range containing [qmin - zp, qmax - zp] (the profiler's code counts do).
    """
    return clamp_and_scale_(rounded, scale, *rounded_bounds(zero_point, qmin, qmax, rounded.dtype))


def rounded_bounds(zero_point: Tensor, qmin: int, qmax: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(qmin - zp, qmax - zp) in `dtype`: the range of round_to_int(x / scale) that maps into [qmin, qmax]."""
    zero_point = zero_point.to(dtype)
    return qmin - zero_point, qmax - zero_point


def clamp_and_scale_(rounded: Tensor, scale: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """clamp(rounded, low, high) * scale in place: dequantize_rounded_ with bounds from `rounded_bounds`
    computed once (GPTQ rounds one column at a time on the same grid)."""
    return rounded.clamp_min_(low).clamp_max_(high).mul_(scale)


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    rounding: str = "half_up",
) -> Tensor:
    """Quantize then dequantize; float in, float out (same shape and dtype as x).

    y = (clamp(round_to_int(x / scale) + zp, qmin, qmax) - zp) * scale

    axis=None: per tensor (scale/zero_point 0-d or (1,)); axis=k: per channel, scale/zero_point of shape
    (x.shape[k],) broadcast along dim k. With an integer zero_point in [qmin, qmax], x = 0.0 gives exactly 0.0.
    Rounding has zero gradient, so this is for calibration/evaluation (no straight-through estimator).
    """
    _check_qmin_qmax(qmin, qmax)
    scale, zero_point = broadcast_qparams(x, scale, zero_point, axis)
    return fake_quantize_broadcast(x, scale, zero_point, qmin, qmax, rounding)


def quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    bits: int,
    signed: bool,
    axis: int | None = None,
    rounding: str = "half_up",
) -> Tensor:
    """Integer codes clamp(round_to_int(x / scale) + zp, qmin, qmax) with dtype int_dtype(bits, signed).

    Shapes and axis as in fake_quantize; values beyond the range saturate at qmin / qmax (+-inf
    included). A NaN has no code: ValueError (fake_quantize passes NaN through instead).
    """
    qmin, qmax = qrange(bits, signed)
    scale, zero_point = broadcast_qparams(x, scale, zero_point, axis)
    codes = rounded_quotient(x, scale, rounding)
    if codes.isnan().any():
        raise ValueError(f"quantize: x holds {int(codes.isnan().sum())} NaN value(s), which have no integer code")
    codes.add_(zero_point.to(codes.dtype)).clamp_(qmin, qmax)
    return codes.to(int_dtype(bits, signed))


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: int | None = None) -> Tensor:
    """Real values (codes - zero_point) * scale as float32; shapes and axis as in fake_quantize."""
    scale, zero_point = broadcast_qparams(codes, scale, zero_point, axis)
    return (codes.to(torch.float32) - zero_point.to(torch.float32)) * scale.to(torch.float32)


def neg_log2(p: Tensor, frac_bits: int = 0) -> Tensor:
    """The unrounded log2 code -log2(p) * 2^frac_bits (float32, p's shape; +inf where p == 0).

    frac_bits = 0 is the plain log2 quantizer (levels 2^-k); frac_bits = 1 the log-sqrt2 quantizer
    of RepQ-ViT (levels 2^(-k/2): a shift, and a multiply by 1/sqrt2 for odd codes).
    """
    if not p.is_floating_point() or p.dtype in _LOW_PRECISION_FLOATS:
        p = p.to(torch.float32)
    out = torch.log2(p).neg_()
    return out.mul_(2.0**frac_bits) if frac_bits else out


def exp2_neg(codes: Tensor, frac_bits: int = 0) -> Tensor:
    """The level of each log2 code, 2^(-code / 2^frac_bits), as float32 (codes' shape; codes unchanged)."""
    return _exp2_neg_(codes.to(torch.float32, copy=True), frac_bits)


def _exp2_neg_(codes: Tensor, frac_bits: int) -> Tensor:
    """exp2_neg in place on float32 `codes`."""
    return (codes.mul_(-(2.0**-frac_bits)) if frac_bits else codes.neg_()).exp2_()


def rounded_log2(p: Tensor, rounding: str, frac_bits: int = 0) -> Tensor:
    """round_to_int(neg_log2(p)) as a fresh float32 tensor: the pre-clamp log2 codes (+inf where p == 0)."""
    return round_to_int(neg_log2(p, frac_bits), rounding, in_place=True)


def _log2_codes(p: Tensor, bits: int, rounding: str, frac_bits: int = 0) -> tuple[Tensor, Tensor]:
    """(float codes clamp(round_to_int(neg_log2 p), 0, 2^bits - 1), zero_mask round_to_int(neg_log2 p) > 2^bits - 1)."""
    _, qmax = qrange(bits, False)
    exponent = rounded_log2(p, rounding, frac_bits)
    zero_mask = exponent > qmax
    return exponent.clamp_(0, qmax), zero_mask


def log2_quantize(p: Tensor, bits: int, rounding: str = "half_up", frac_bits: int = 0) -> tuple[Tensor, Tensor]:
    """Log2 quantizer for post-softmax probabilities (role intSoft); fixed scale 1, no observer.

    code = clamp(round_to_int(-log2(p) * 2^frac_bits), 0, 2^bits - 1), standing for the probability
    2^(-code / 2^frac_bits) (frac_bits = 0: 2^-code, the plain log2 quantizer).
    zero_mask marks probabilities below the smallest level (rounded code > 2^bits - 1, p == 0
    included): they dequantize to 0. Probabilities above 1 get code 0.

    Args:
        p: probabilities in [0, 1], any shape.
    Returns:
        (codes of dtype int_dtype(bits, False), zero_mask bool), both of p's shape.
    Raises ValueError for negative or NaN probabilities.
    """
    if not (p >= 0).all():
        raise ValueError(f"probabilities must be >= 0 and not NaN, got min {p.min().item()}")
    codes, zero_mask = _log2_codes(p, bits, rounding, frac_bits)
    return codes.to(int_dtype(bits, False)), zero_mask


def log2_dequantize(codes: Tensor, zero_mask: Tensor, frac_bits: int = 0) -> Tensor:
    """Probabilities 2^(-code / 2^frac_bits) as float32, and 0.0 where zero_mask is set. Codes, zero_mask: same shape."""
    return exp2_neg(codes, frac_bits).masked_fill_(zero_mask, 0.0)


def fake_log2_quantize(p: Tensor, bits: int, rounding: str = "half_up", frac_bits: int = 0) -> Tensor:
    """log2_dequantize(*log2_quantize(p, bits, rounding, frac_bits)) in one float pass; float in, float out (p's dtype).

    No input check (hot path): negative or NaN p gives NaN.
    """
    out = log2_dequantize_rounded_(rounded_log2(p, rounding, frac_bits), bits, frac_bits)
    return out.to(p.dtype if p.is_floating_point() else torch.float32)


def log2_dequantize_rounded_(rounded: Tensor, bits: int, frac_bits: int = 0) -> Tensor:
    """The levels 2^(-clamp(rounded, 0, qmax) / 2^frac_bits), 0.0 where rounded > qmax; in place on float32 `rounded`.

    `rounded` = rounded_log2(p); it may already be clamped to any range containing [0, qmax + 1].
    """
    _, qmax = qrange(bits, False)
    zero_mask = rounded > qmax
    return _exp2_neg_(rounded.clamp_(0, qmax), frac_bits).masked_fill_(zero_mask, 0.0)
