"""Tensor dumps and numeric traces of chosen sites (`profile.dump`, `profile.trace`).

A dump (`profile/dump/<site>.safetensors`) holds, for the first `dump_samples`
images: `fp32` (the FP32 model's tensor at the site), `input` (the quantized
model's tensor entering the site), `codes` (the NPU's integers), `dequantized`
(codes back to real values), `output` (what the site passed on), and the
site's `scale` / `zero_point` (uniform: dequantized = (codes - zero_point) * scale) or `zero_mask`
(log2: dequantized = 2^(-codes / 2^frac_bits), 0 where flushed; `frac_bits` is in the metadata).
For a weight site `fp32` is the weight, `input` the folded weight W·diag(s)
that is quantized, `output` its dequantized codes Q(W·diag(s)) (the effective
weight is that times diag(1/s)). GPTQ weights (`gptq: true`) and int_softmax
read their codes back from `output`: neither stores the rounding of its input.

A trace prints x -> x/scale -> rounded -> +zp -> clamped code -> dequantized
for a few elements: the worst-error ones first, then the largest |x|, then
evenly spaced ones, so one sees where the values jump.
"""

from __future__ import annotations

import difflib
import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

import torch
from torch import Tensor

from pipeline.artifacts import write_tensors
from pipeline.errors import PipelineError
from pipeline.profile.codes import code_source, code_steps, codes_from_output, is_log2
from pipeline.quant.quantizers import power_of_two_factors
from pipeline.quant.sites import Site, SiteGraph

EXACT_DIGITS = 9  # significant digits that print a float32 exactly: x = 0.2499999 must not read as the tie 0.25


@dataclass
class Capture:
    """The first samples of one site seen in a profiling pass, on the CPU.

    fp32: the FP32 model's tensor at the site (None when not recorded);
    x: the tensor entering the quantized site; y: the tensor it emitted. Shapes (n, ...) for activations.
    """

    fp32: Tensor | None
    x: Tensor
    y: Tensor

    def extend(self, other: "Capture", samples: int) -> "Capture":
        """This capture followed by `other`, cut to `samples` along dim 0."""
        cat = lambda a, b: None if a is None or b is None else torch.cat([a, b])[:samples]  # noqa: E731
        return Capture(cat(self.fp32, other.fp32), cat(self.x, other.x), cat(self.y, other.y))


def quantized_names(graph: SiteGraph) -> list[str]:
    return [n for n, s in graph.sites.items() if s.mode == "quant"]


def resolve_dump(globs: list[str], graph: SiteGraph, quantized: Collection[str] | None = None) -> list[str]:
    """Quantized sites matched by the `profile.dump` globs, in forward order; a glob matching none is an error.

    `quantized`: the names the recipe quantizes, for a check before the model is quantized (before
    any run opens); by default the graph's sites in `quant` mode.
    """
    names = graph.names()
    live = set(quantized_names(graph) if quantized is None else quantized)
    chosen: set[str] = set()
    for pattern in globs:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise PipelineError(f"profile.dump: glob '{pattern}' matches no site (site names look like {_examples(graph)})")
        quantized = [n for n in matched if n in live]
        if not quantized:
            raise PipelineError(f"profile.dump: glob '{pattern}' matches only sites that are not quantized under this recipe ({', '.join(matched[:3])})")
        chosen.update(quantized)
    return [n for n in names if n in chosen]


def check_trace(name: str | None, graph: SiteGraph, quantized: Collection[str] | None = None) -> str | None:
    """The `profile.trace` site, checked: it must exist and be quantized (`quantized` as in `resolve_dump`)."""
    if not name:
        return None
    if name not in graph.sites:
        close = difflib.get_close_matches(name, graph.names(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f" (site names look like {_examples(graph)})"
        raise PipelineError(f"profile.trace: unknown site '{name}'{hint}")
    if name not in (quantized_names(graph) if quantized is None else quantized):
        raise PipelineError(f"profile.trace: site '{name}' is not quantized under this recipe")
    return name


def _examples(graph: SiteGraph) -> str:
    picks = [n for n in ("blocks.0.attn.sv", "blocks.0.mlp.act", "blocks.0.norm1", "blocks.0.attn.qkv.weight") if n in graph.sites]
    return ", ".join(picks or graph.names()[:3])


def dump_tensors(site: Site, capture: Capture) -> dict[str, Tensor]:
    """The tensors of one dump (see the module docstring); codes keep the NPU's integer dtype."""
    steps = code_steps(site, code_source(site, capture.x, capture.y))
    out = {"input": capture.x, "codes": steps.codes, "dequantized": steps.dequantized, "output": capture.y}
    if capture.fp32 is not None:
        out["fp32"] = capture.fp32
    if is_log2(site):
        out["zero_mask"] = steps.shifted > site.qmax
    else:
        out["scale"], out["zero_point"] = site.scale.detach().cpu().reshape(-1), site.zero_point.detach().cpu().reshape(-1)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def write_dump(folder: Path, site: Site, capture: Capture) -> Path:
    """Write `<folder>/<site>.safetensors` with the site's description as string metadata."""
    meta = {
        "site": site.name,
        "role": site.role,
        "quantizer": site.spec.quantizer,
        "bits": str(site.bits),
        "qmin": str(site.qmin),
        "qmax": str(site.qmax),
        "rounding": site.spec.rounding,
        "granularity": site.granularity,
        "axis": str(site.axis),
        "samples": str(capture.x.shape[0]) if site.role != "weight" else "weight",
    }
    if is_log2(site):
        meta["frac_bits"] = str(site.spec.frac_bits)  # levels 2^(-code / 2^frac_bits)
    return write_tensors(folder / f"{site.name}.safetensors", dump_tensors(site, capture), metadata=meta)


def trace_elements(x: Tensor, dequantized: Tensor, n: int) -> list[tuple[int, str]]:
    """Flat indices to trace with their reason: the ceil(n/2) worst |dequantized - x|, the largest |x|, then evenly spaced."""
    x, dq = x.flatten().double(), dequantized.flatten().double()
    n = max(1, min(n, x.numel()))
    err = (dq - x).abs().nan_to_num(nan=math.inf)
    picks: list[tuple[int, str]] = [(int(i), f"worst error #{k + 1}") for k, i in enumerate(err.topk(math.ceil(n / 2)).indices)]
    seen = {i for i, _ in picks}
    biggest = int(x.abs().argmax())
    if biggest not in seen and len(picks) < n:
        picks.append((biggest, "largest |x|"))
        seen.add(biggest)
    last = x.numel() - 1
    for i in (k * last // max(1, n - 1) for k in range(n)):
        if len(picks) >= n:
            break
        if i not in seen:
            picks.append((i, "spread"))
            seen.add(i)
    return picks


def trace_site(site: Site, capture: Capture, elements: int = 8) -> str:
    """A step-by-step numeric trace of `elements` elements of one site (text, one element per line)."""
    steps = code_steps(site, code_source(site, capture.x, capture.y))
    x = capture.x.float()
    granularity = f"{site.granularity} (channel axis {site.axis % x.ndim})" if site.per_channel else site.granularity
    # index = an element's position in this shape: batch first for activations, (out, in, ...) for weights
    lines = [f"trace {site.name}: role={site.role} quantizer={site.spec.quantizer} bits={site.bits} {granularity} qmin={site.qmin} qmax={site.qmax} rounding={site.spec.rounding} shape={tuple(x.shape)}"]
    if is_log2(site):
        f = site.spec.frac_bits
        level = f"2^(-code / 2^{f})" if f else "2^-code"
        lines.append(f"  steps: x (a probability) -> -log2 x{f' * 2^{f}' if f else ''} -> rounded -> code = clamp(rounded, qmin, qmax) -> dequantized = {level} (0 if rounded > qmax: flushed)")
        if site.spec.quantizer == "int_softmax":
            lines.append("  int_softmax: the integer softmax makes the codes (pipeline.quant.intsoftmax); the steps are read back from its output, x is the float softmax")
    else:
        scale = site.scale.reshape(-1)
        what = f"scale={float(scale[0]):.6g} zero_point={int(site.zero_point.reshape(-1)[0])}" if scale.numel() == 1 else "scale / zero_point per channel (columns below)"
        lines.append(f"  steps: x -> x/scale -> rounded -> +zp -> code = clamp(+zp, qmin, qmax) -> dequantized = (code - zp) * scale;  {what}")
        if site.role == "weight" and capture.fp32 is not None and not torch.equal(capture.fp32.float(), x):
            lines.append("  folded: fp32 is the trained W; x is the folded weight W*diag(s) that the NPU stores (the effective weight is dequantized * diag(1/s))")
        if codes_from_output(site):
            lines.append("  gptq: GPTQ chose the codes (not the nearest ones); the steps are read back from the dequantized weight, x is the weight it approximates")
        if site.granularity == "ptf":
            f = site.spec.ptf_frac_bits
            shift, mantissa = power_of_two_factors(scale, site.spec.ptf_shift, f)
            unit = float(scale.max()) / 2 ** (site.spec.ptf_shift + f)  # s_base / 2^f: every scale is unit * (m << k)
            lines.append(
                f"  ptf: scale_c = {unit:.6g} * (m_c << k_c), m_c in {2**f}..{2 ** (f + 1) - 1}, k_c in 0..{site.spec.ptf_shift} "
                f"(ptf_frac_bits={f}); the NPU aligns channels as ((code - zp) * m_c) << k_c at scale {unit:.6g} (note: m<<k per row)"
            )
    log2 = is_log2(site)
    header = ["index", "fp32", "x", (f"-log2 x*2^{site.spec.frac_bits}" if site.spec.frac_bits else "-log2 x") if log2 else "x/scale", "rounded"] + ([] if log2 else ["+zp"]) + ["code", "dequantized", "error"] + ([] if log2 else ["scale", "zp"]) + ["note"]
    rows = [header]
    flat_steps = {k: getattr(steps, k).flatten() for k in ("scaled", "rounded", "shifted", "codes", "dequantized", "scale", "zero_point")}
    for flat, reason in trace_elements(x, steps.dequantized, elements):
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), tuple(x.shape)))
        value = {k: v[flat] for k, v in flat_steps.items()}
        xv, dq = float(x.flatten()[flat]), float(value["dequantized"])
        fp32 = "" if capture.fp32 is None else _num(capture.fp32.flatten()[flat], EXACT_DIGITS)
        row = [str(index), fp32, _num(xv, EXACT_DIGITS), _num(value["scaled"], EXACT_DIGITS), _num(value["rounded"])] + ([] if log2 else [_num(value["shifted"])])
        row += [str(int(value["codes"])), _num(dq), _num(dq - xv)] + ([] if log2 else [_num(value["scale"]), _num(value["zero_point"])])
        factor = [f"m<<k = {int(mantissa[index[site.axis]])}<<{int(shift[index[site.axis]])}"] if site.granularity == "ptf" else []
        rows.append(row + ["; ".join([reason] + _clip_note(site, float(value["shifted"])) + factor)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  " + "  ".join(cell.rjust(w) if i < len(header) - 1 else cell for i, (cell, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines) + "\n"


def _clip_note(site: Site, shifted: float) -> list[str]:
    if shifted > site.qmax:
        return ["flushed to 0" if is_log2(site) else "clipped high"]
    if shifted < site.qmin:
        return ["clipped low"]
    return []


def _num(v, digits: int = 6) -> str:
    v = float(v)
    return f"{v:.{digits}g}" if math.isfinite(v) else str(v)
