"""Integer codes of a quantization site: the numbers the NPU stores, and the steps that make them.

Uniform site (scale s, zero point zp, range [qmin, qmax], per tensor or per channel along `site.axis`):

    x -> x / s -> rounded = round_to_int(x / s) -> shifted = rounded + zp -> code = clamp(shifted, qmin, qmax)
      -> dequantized = (code - zp) * s

log2 site (intSoft, probabilities p, fixed scale 1, range [0, 2^bits - 1]):

    p -> -log2 p -> rounded = round_to_int(-log2 p) -> code = clamp(rounded, 0, 2^bits - 1)
      -> dequantized = 2^-code, and 0 where rounded > 2^bits - 1 (flushed to zero)
    (with `frac_bits` f: -log2 p is scaled by 2^f and the level is 2^(-code / 2^f))

Clipping is counted in code terms: "low" = the pre-clamp code fell below qmin,
"high" = above qmax. For log2 codes "high" is the flush to zero (p below the
smallest level 2^-qmax) and "low" is rounded < 0 (p > sqrt 2, never for a probability).
An int_softmax site computes its codes on the integer path
(pipeline.quant.intsoftmax); its output is exactly 2^-code, so its codes are
read back from the output with the log2 steps above.

The pre-clamp integer (`shifted`) is what saturation is counted on: below
qmin was clipped low, above qmax clipped high. `code_index` is the hot path
(histogram indices of a whole batch); `code_steps` keeps every intermediate
for dumps and traces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.quant.counts import bincount
from pipeline.quant.quantizers import broadcast_to_axis, exp2_neg, int_dtype, neg_log2, round_to_int, rounded_log2, rounded_quotient
from pipeline.quant.sites import Site


def is_log2(site: Site) -> bool:
    """True for sites whose codes follow the log2 convention (log2 and int_softmax quantizers)."""
    return site.spec.quantizer in ("log2", "int_softmax")


def codes_from_output(site: Site) -> bool:
    """True where the stored codes are not the rounding of the input: int_softmax (integer path) and GPTQ weights.

    GPTQ picks each weight's code to lower the layer's output error, not the nearest one; the
    output (the dequantized folded weight) lies exactly on the grid, so rounding it gives its codes back.
    """
    return site.spec.quantizer == "int_softmax" or (site.role == "weight" and site.spec.gptq)


def code_source(site: Site, x: Tensor, y: Tensor) -> Tensor:
    """The tensor a site's codes are computed from: its input x, or its output y (see `codes_from_output`)."""
    return y if codes_from_output(site) else x


def qparams_like(site: Site, x: Tensor) -> tuple[Tensor, Tensor]:
    """The site's scale and zero point (float32) as views broadcastable against x (uniform sites only).

    Per channel: shape (C, 1, ..., 1) lined up with `site.axis`; per tensor: 0-d.
    """
    axis = site.axis if site.per_channel else None
    scale = broadcast_to_axis(site.scale, x.ndim, axis).to(x.device, torch.float32)
    zero_point = broadcast_to_axis(site.zero_point, x.ndim, axis).to(x.device, torch.float32)
    return scale, zero_point


MAX_COUNT_BINS = 2**21
"""A per-channel code histogram (channels x (levels + 2)) is kept only up to this many bins (8-bit: 8,128 channels)."""


@dataclass(frozen=True)
class CodePlan:
    """A site's constants for turning tensors of one rank into code-histogram indices (built once per pass).

    The rounded value r = round_to_int(t / s) (log2: round_to_int(-log2 t)) is clamped to
    [`low`, `high`] = [qmin - 1 - zp, qmax + 1 - zp] and `offset` = zp - qmin + 1 (+ channel x width
    for per-channel counts) is added, so column 0 = clipped low, 1 + code - qmin = code, L + 1 =
    clipped high. Counts have `rows` x `width` entries, width = qmax - qmin + 3. All broadcastable.
    """

    log2: bool
    rounding: str
    frac_bits: int
    scale: Tensor | None
    low: Tensor | float
    high: Tensor | float
    offset: Tensor
    rows: int
    width: int


def count_axis(site: Site, t: Tensor) -> int | None:
    """Axis for per-channel code counts of `t`: the site's channel axis, or None when that histogram would be too big."""
    axis = site.axis if -t.ndim <= site.axis < t.ndim else None
    if axis is None or t.shape[axis] * (site.qmax - site.qmin + 3) > MAX_COUNT_BINS:
        return None
    return axis


def code_plan(site: Site, t: Tensor, axis: int | None = None) -> CodePlan:
    """The CodePlan of `site` for tensors shaped like `t` (its code source); per channel along `axis` when given."""
    width = site.qmax - site.qmin + 3
    if is_log2(site):
        scale, zero_point = None, torch.zeros((), device=t.device)
    else:
        scale, zero_point = qparams_like(site, t)
    offset = (zero_point - (site.qmin - 1)).to(torch.int32)
    rows = 1
    if axis is not None:
        rows = t.shape[axis]
        offset = offset + broadcast_to_axis(torch.arange(rows, device=t.device, dtype=torch.int32) * width, t.ndim, axis)
    low, high = (site.qmin - 1) - zero_point, (site.qmax + 1) - zero_point
    if low.numel() == 1:  # a scalar clamp is cheaper than a broadcast one
        low, high = float(low), float(high)
    return CodePlan(is_log2(site), site.spec.rounding, site.spec.frac_bits, scale, low, high, offset, rows, width)


def code_index(plan: CodePlan, t: Tensor, rounded: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Histogram index of every element of `t` (int32, t's shape): row offset + column of its pre-clamp code.

    Column = clamp(round_to_int(t / s) + zp, qmin - 1, qmax + 1) - qmin + 1 (log2: round_to_int(-log2 t)),
    computed as clamp(rounded, qmin - 1 - zp, qmax + 1 - zp) + zp - qmin + 1 (exact: integers).
    `t` is not modified; `rounded`, when given, is round_to_int(t / s) (log2: of -log2 t) as the
    site's quantizer computed it (Site.fake_quant's `on_rounded`) and is clamped in place to
    [qmin - 1 - zp, qmax + 1 - zp], which leaves the quantizer's output unchanged. `out`, when
    given, is an int32 tensor of t's shape that receives the result (no fresh allocation).
    """
    if rounded is None:  # the quantizer's own rounding steps (log2: +inf where t == 0)
        t = t.float()
        rounded = rounded_log2(t, plan.rounding, plan.frac_bits) if plan.log2 else rounded_quotient(t, plan.scale, plan.rounding)
    rounded = rounded.clamp_(plan.low, plan.high)
    index = rounded.int() if out is None else out.copy_(rounded)  # exact: integral values
    return index.add_(plan.offset)


def code_counts(site: Site, t: Tensor, axis: int | None = None) -> Tensor:
    """Histogram of a site's pre-clamp codes of `t` (its code source): (K, L + 2) int64, L = qmax - qmin + 1.

    Column 0 counts values clipped low (pre-clamp code < qmin), columns 1..L the codes qmin..qmax,
    column L + 1 values clipped high (> qmax; for log2: flushed to zero). K = 1 (the whole tensor)
    or, with `axis`, one row per index along that axis (per channel).
    """
    plan = code_plan(site, t, axis)
    return bincount(code_index(plan, t), plan.rows * plan.width).view(plan.rows, plan.width)


def level_counts(counts: Tensor) -> Tensor:
    """Counts per stored code qmin..qmax (clipped values land on qmin / qmax): (K, L + 2) -> (K, L)."""
    levels = counts[..., 1:-1].clone()
    levels[..., 0] += counts[..., 0]
    levels[..., -1] += counts[..., -1]
    return levels


def levels_in_use(counts: Tensor) -> Tensor:
    """Distinct stored codes per row of a (K, L + 2) code histogram: (K,) int64.

    The same as counting the nonzero entries of `level_counts(counts)` per row, without building it:
    a clipped column adds a level only where its end code (qmin / qmax) was not used already.
    """
    inner = counts[:, 1:-1]
    extra = (counts[:, 0] > 0) & (inner[:, 0] == 0)
    extra = extra.long() + ((counts[:, -1] > 0) & (inner[:, -1] == 0))
    return torch.count_nonzero(inner, dim=1) + extra


def column_values(site: Site, device: torch.device | None = None) -> Tensor:
    """The dequantized value of every column of `code_counts`: (K, L + 2) float32, K = channels or 1.

    Uniform: (code - zp) * scale for qmin, qmin..qmax, qmax (clipped values take the end values),
    computed as fake_quantize computes it. log2: 1, 2^-0..2^-qmax, 0 (flushed to zero).
    A site's quantized tensor takes only these values, so its histogram follows from its code counts.
    """
    device = device or (site.scale.device if site.scale is not None else torch.device("cpu"))
    codes = torch.arange(site.qmin, site.qmax + 1, device=device, dtype=torch.float32)
    if is_log2(site):
        values = exp2_neg(codes, site.spec.frac_bits)
        one, zero = torch.ones(1, device=device), torch.zeros(1, device=device)
        return torch.cat([one, values, zero]).unsqueeze(0)
    scale = site.scale.reshape(-1, 1).to(device, torch.float32)
    zero_point = site.zero_point.reshape(-1, 1).to(device, torch.float32)
    values = (codes.unsqueeze(0) - zero_point).mul_(scale)  # (K, L)
    return torch.cat([values[:, :1], values, values[:, -1:]], dim=1)


@dataclass
class CodeSteps:
    """Every intermediate of one site's quantization, element by element (all of the input's shape).

    `scaled` is x / scale (uniform) or -log2 p (log2); `shifted` is rounded + zp
    (equal to `rounded` for log2); `codes` has the NPU's integer dtype.
    `scale` / `zero_point` are broadcast to the input's shape (log2: 1 and 0).
    """

    x: Tensor
    scaled: Tensor
    rounded: Tensor
    shifted: Tensor
    codes: Tensor
    dequantized: Tensor
    scale: Tensor
    zero_point: Tensor


def code_steps(site: Site, t: Tensor) -> CodeSteps:
    """All steps from the code source `t` to the dequantized value, for dumps and traces (not the hot path)."""
    t = t.detach().float()
    signed = bool(site.spec.signed) if not is_log2(site) else False
    if is_log2(site):
        scaled = neg_log2(t, site.spec.frac_bits)
        rounded = round_to_int(scaled, site.spec.rounding)
        shifted = rounded
        clamped = shifted.clamp(site.qmin, site.qmax)
        dequantized = exp2_neg(clamped, site.spec.frac_bits).masked_fill_(shifted > site.qmax, 0.0)
        scale, zero_point = torch.ones_like(t), torch.zeros_like(t)
    else:
        scale, zero_point = (p.expand_as(t) for p in qparams_like(site, t))
        scaled = t / scale
        rounded = round_to_int(scaled, site.spec.rounding)
        shifted = rounded + zero_point
        clamped = shifted.clamp(site.qmin, site.qmax)
        dequantized = (clamped - zero_point) * scale
    codes = clamped.to(int_dtype(site.bits, signed))
    return CodeSteps(t, scaled, rounded, shifted, codes, dequantized, scale, zero_point)
