"""Integer codes of a quantization site: the numbers the NPU stores, and the steps that make them.

Uniform site (scale s, zero point zp, range [qmin, qmax], per tensor or per channel along `site.axis`):

    x -> x / s -> rounded = round_to_int(x / s) -> shifted = rounded + zp -> code = clamp(shifted, qmin, qmax)
      -> dequantized = (code - zp) * s

log2 site (intSoft, probabilities p, fixed scale 1, range [0, 2^bits - 1]):

    p -> -log2 p -> rounded = round_to_int(-log2 p) -> code = clamp(rounded, 0, 2^bits - 1)
      -> dequantized = 2^-code, and 0 where rounded > 2^bits - 1 (flushed to zero)

For log2 codes "low" clipping is the flush to zero (p below the smallest level)
and "high" clipping is rounded < 0 (p > sqrt 2, never for a probability).
An int_softmax site computes its codes on the integer path
(pipeline.quant.intsoftmax); its output is exactly 2^-code, so its codes are
read back from the output with the log2 steps above.

`shifted` (the pre-clamp integer, float dtype) is what saturation is counted
on: `shifted < qmin` was clipped low, `shifted > qmax` clipped high.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.quant.quantizers import broadcast_to_axis, int_dtype, round_to_int
from pipeline.quant.sites import Site


def is_log2(site: Site) -> bool:
    """True for sites whose codes follow the log2 convention (log2 and int_softmax quantizers)."""
    return site.spec.quantizer in ("log2", "int_softmax")


def code_source(site: Site, x: Tensor, y: Tensor) -> Tensor:
    """The tensor a site's codes are computed from: its input x, or its output y for int_softmax."""
    return y if site.spec.quantizer == "int_softmax" else x


def qparams_like(site: Site, x: Tensor) -> tuple[Tensor, Tensor]:
    """The site's scale and zero point (float32) as views broadcastable against x (uniform sites only).

    Per channel: shape (C, 1, ..., 1) lined up with `site.axis`; per tensor: 0-d.
    """
    axis = site.axis if site.per_channel else None
    scale = broadcast_to_axis(site.scale, x.ndim, axis).to(x.device, torch.float32)
    zero_point = broadcast_to_axis(site.zero_point, x.ndim, axis).to(x.device, torch.float32)
    return scale, zero_point


def shifted_codes(site: Site, t: Tensor) -> Tensor:
    """Pre-clamp integer codes (float32, t's shape): round_to_int(t / s) + zp, or round_to_int(-log2 t).

    `t` is the site's code source (see `code_source`); it is not modified.
    """
    t = t.float()
    if is_log2(site):
        return round_to_int(torch.log2(t).neg_(), site.spec.rounding, in_place=True)  # +inf where t == 0
    scale, zero_point = qparams_like(site, t)
    return round_to_int(t / scale, site.spec.rounding, in_place=True).add_(zero_point)


def code_counts(shifted: Tensor, qmin: int, qmax: int) -> Tensor:
    """Histogram of pre-clamp codes: (qmax - qmin + 3,) float32 counts.

    Entry 0 counts values clipped low (shifted < qmin), entries 1..L count the
    codes qmin..qmax before clipping, the last entry counts values clipped high.
    Overwrites `shifted` (clamps it in place).
    """
    lo, hi = qmin - 1, qmax + 1
    return torch.histc(shifted.clamp_(lo, hi), bins=hi - lo + 1, min=lo - 0.5, max=hi + 0.5)


def level_counts(counts: Tensor) -> Tensor:
    """Counts per stored code qmin..qmax (clipped values land on qmin / qmax): (qmax - qmin + 1,)."""
    levels = counts[1:-1].clone()
    levels[0] += counts[0]
    levels[-1] += counts[-1]
    return levels


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
        scaled = torch.log2(t).neg_()
        rounded = round_to_int(scaled, site.spec.rounding)
        shifted = rounded
        clamped = shifted.clamp(site.qmin, site.qmax)
        dequantized = torch.exp2(-clamped).masked_fill_(shifted > site.qmax, 0.0)
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
