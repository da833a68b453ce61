"""Compute every sensitivity score of a calibrated model and write the report (JSON, CSV, plots).

`compute_sensitivity` is what the `sensitivity` stage runs (and `search` when no scores exist);
the result is a plain dict, saved as `sensitivity.json`:

    {"meta": {model, model_name, recipe, noise_bits, ...},
     "sites": {site: {role, block, kind, quantizer, elements, hessian_trace, hessian_trace_stderr,
                      measured: {noise_kl, noise_loss, noise_agreement, isolated_kl, isolated_loss, isolated_agreement},
                      scores: {method: {"<bits>": value}}}},
     "ranking": {"spearman": {...}, "top5_overlap": {...}, "top5": {...}}}

Scores are increases over FP32 in nats (see pipeline.sensitivity.compute). Noise injection is
measured at `noise_bits` and extrapolated to the other widths by the rounding-noise energy
ratio; the isolated quantization (the site really quantized alone) is measured at every width.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from pipeline.artifacts import atomic_path, write_json
from pipeline.profile.collect import SuffixRunner
from pipeline.quant.calibration import CalibState
from pipeline.quant.recipe import SiteSpec
from pipeline.quant.sites import SiteGraph
from pipeline.sensitivity.compute import (
    SensitivityProbe,
    SensitivitySettings,
    hessian_scores,
    hessian_traces,
    isolated_quantization,
    noise_injection,
    spearman,
    top_k,
)
from pipeline.sensitivity.probe import weight_of

log = logging.getLogger(__name__)

PAIRS = (
    ("noise_kl", "isolated_kl"),
    ("noise_loss", "isolated_loss"),
    ("hessian", "isolated_loss"),
    ("hessian", "isolated_kl"),
    ("hessian", "noise_loss"),
    ("noise_kl", "noise_loss"),
)


def compute_sensitivity(
    graph: SiteGraph,
    specs: Mapping[str, SiteSpec],
    state: CalibState,
    hessian_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    noise_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    settings: SensitivitySettings,
    weight_widths: Sequence[int],
    act_widths: Sequence[int],
    device: torch.device,
    meta: Mapping[str, Any] | None = None,
    profiler_isolated: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Scores per site and width (see the module docstring). `graph` is a fresh `attach_sites` graph."""
    t0 = time.perf_counter()
    probe = SensitivityProbe(graph, specs, state, weight_widths, act_widths, device)
    nb = settings.noise_bits
    runner = SuffixRunner(graph, [b[0] for b in noise_batches], device)
    fp_logits = [x.float().cpu() for x in runner.cache()]
    labels = [b[1] for b in noise_batches]
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    noise = noise_injection(probe, runner, fp_logits, labels, settings)
    seconds["noise"] = time.perf_counter() - t
    isolated: dict[str, dict[str, float]] = {}
    isolated_at: dict[int, dict[str, dict[str, float]]] = {}  # every width a site can take, measured
    if settings.isolated:
        t = time.perf_counter()
        widths_all = sorted({b for n in probe.weights for b in probe.qweights[n]} | {b for n in probe.acts for b in probe.act_bits[n]})
        for b in sorted(widths_all, key=lambda b: (b != nb, b)):
            isolated_at[b] = isolated_quantization(probe, runner, fp_logits, labels, b)
        isolated = isolated_at.get(nb, {})
        seconds["isolated"] = time.perf_counter() - t
    runner.inputs = []  # free the cached block inputs before the double backward
    traces: dict[str, Any] = {"weights": {}, "acts": {}, "iters": [], "converged": [], "seconds": 0.0}
    hess: dict[str, dict[int, float]] = {}
    if settings.hutchinson_iters > 0 and hessian_batches:
        traces = hessian_traces(probe, [b[0] for b in hessian_batches], [b[1] for b in hessian_batches], settings)
        hess = hessian_scores(probe, traces)
        seconds["hutchinson"] = traces["seconds"]

    sites: dict[str, Any] = {}
    for name in probe.names:
        site = graph[name]
        kind = "weight" if site.role == "weight" else "act"
        widths = sorted(probe.qweights[name]) if kind == "weight" else probe.act_bits[name]
        measured = {f"{key}_{m}": source[name][m] for key, source in (("noise", noise), ("isolated", isolated)) if name in source for m in ("kl", "loss", "agreement")}
        scores = _site_scores(probe, name, widths, measured, isolated_at, hess.get(name), nb)
        entry = traces["weights" if kind == "weight" else "acts"].get(name) or {}
        sites[name] = {
            "role": site.role,
            "block": site.block,
            "kind": kind,
            "quantizer": specs[name].quantizer,
            "granularity": specs[name].granularity,
            "elements": weight_of(graph, name).numel() if kind == "weight" else None,
            "hessian_trace": entry.get("trace"),
            "hessian_trace_stderr": entry.get("stderr"),
            "widths": list(widths),
            "measured": measured,
            "scores": scores,
        }
    if profiler_isolated:
        for name, v in profiler_isolated.items():
            if name in sites and v is not None:
                sites[name]["measured"]["profiler_isolated_kl"] = v
    result = {
        "meta": {
            **(meta or {}),
            "noise_bits": nb,
            "noise": settings.noise,
            "noise_clip": settings.noise_clip,
            "noise_images": sum(int(b[0].shape[0]) for b in noise_batches),
            "hessian_images": sum(int(b[0].shape[0]) for b in hessian_batches),
            "hutchinson": {"iters": traces["iters"], "converged": traces["converged"], "max_iters": settings.hutchinson_iters, "tol": settings.hutchinson_tol},
            "suffix_passes": runner.ok,
            "seconds": {k: round(v, 2) for k, v in {**seconds, "total": time.perf_counter() - t0}.items()},
        },
        "sites": sites,
    }
    result["ranking"] = rank_statistics(result)
    return result


def _site_scores(
    probe: SensitivityProbe, name: str, widths: Sequence[int], measured: Mapping[str, float], isolated_at: Mapping[int, Mapping[str, Mapping[str, float]]], hess: Mapping[int, float] | None, noise_bits: int
) -> dict[str, dict[str, float]]:
    """One site's scores {method: {width: score}}: noise scores scaled from `noise_bits` to each width by
    the quantizer's noise power, isolated scores measured at every width, Hessian scores as computed."""
    scores: dict[str, dict[str, float]] = {}
    for method in ("noise_kl", "noise_loss"):
        if method in measured and noise_bits in widths:
            scores[method] = {str(b): measured[method] * probe.noise_factor(name, b, noise_bits) for b in widths}
    for method, key in (("isolated_kl", "kl"), ("isolated_loss", "loss")):
        if widths and all(name in isolated_at.get(b, {}) for b in widths):
            scores[method] = {str(b): isolated_at[b][name][key] for b in widths}
    if hess is not None:
        scores["hessian"] = {str(b): v for b, v in sorted(hess.items())}
    return scores


def measured_at(result: Mapping[str, Any], method: str, kind: str | None = None) -> dict[str, float]:
    """{site: value} of `method` at noise_bits (measured or second-order), optionally only weights or acts."""
    nb = str(result["meta"]["noise_bits"])
    out = {}
    for name, entry in result["sites"].items():
        if kind is not None and entry["kind"] != kind:
            continue
        if method in entry["measured"]:
            v = entry["measured"][method]
        else:
            v = entry["scores"].get(method, {}).get(nb)
        if v is not None and math.isfinite(v):
            out[name] = v
    return out


def rank_statistics(result: Mapping[str, Any]) -> dict[str, Any]:
    """Spearman rho between methods (per kind and overall) and top-5 overlaps against the isolated measurement."""
    rho: dict[str, float | None] = {}
    overlap: dict[str, int] = {}
    tops: dict[str, list[str]] = {}
    pairs = list(PAIRS)
    if any("profiler_isolated_kl" in e["measured"] for e in result["sites"].values()):
        pairs += [("noise_kl", "profiler_isolated_kl"), ("hessian", "profiler_isolated_kl"), ("isolated_kl", "profiler_isolated_kl")]
    for kind in ("act", "weight", None):
        label = kind or "all"
        for a, b in pairs:
            va, vb = measured_at(result, a, kind), measured_at(result, b, kind)
            common = [n for n in va if n in vb]
            r = spearman([va[n] for n in common], [vb[n] for n in common])
            if r is not None:
                rho[f"{a}_vs_{b}/{label}"] = r
        for method in ("noise_kl", "hessian", "isolated_kl"):
            values = measured_at(result, method, kind)
            if values:
                tops[f"{method}/{label}"] = top_k(values, 5)
        for a in ("noise_kl", "hessian"):
            if f"{a}/{label}" in tops and f"isolated_kl/{label}" in tops:
                overlap[f"{a}_vs_isolated_kl/{label}"] = len(set(tops[f"{a}/{label}"]) & set(tops[f"isolated_kl/{label}"]))
    return {"spearman": rho, "top5_overlap": overlap, "top5": tops}


def summary_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """Flat metrics for MLflow / summary.json."""
    out: dict[str, float] = {}
    for key, v in result["ranking"]["spearman"].items():
        out[f"spearman/{key}"] = v
    for key, v in result["ranking"]["top5_overlap"].items():
        out[f"top5_overlap/{key}"] = v
    meta = result["meta"]
    out["sensitivity_sites"] = len(result["sites"])
    if meta["hutchinson"]["iters"]:
        out["hutchinson_iters"] = sum(meta["hutchinson"]["iters"]) / len(meta["hutchinson"]["iters"])
    for k, v in meta["seconds"].items():
        out[f"sensitivity_{k}_s"] = v
    return out


# -- files ---------------------------------------------------------------------------------------


def csv_rows(result: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    widths = sorted({int(b) for e in result["sites"].values() for s in e["scores"].values() for b in s})
    methods = sorted({m for e in result["sites"].values() for m in e["scores"]})
    measured = sorted({m for e in result["sites"].values() for m in e["measured"]})
    header = ["site", "role", "block", "kind", "quantizer", "hessian_trace", "hessian_trace_stderr", *measured, *[f"{m}@{b}" for m in methods for b in widths]]
    rows = []
    for name, e in result["sites"].items():
        row = [name, e["role"], e["block"], e["kind"], e["quantizer"], e["hessian_trace"], e.get("hessian_trace_stderr"), *[e["measured"].get(m) for m in measured]]
        row += [e["scores"].get(m, {}).get(str(b)) for m in methods for b in widths]
        rows.append(row)
    return header, rows


def write_report(folder: Path, result: Mapping[str, Any]) -> list[Path]:
    folder = Path(folder)
    paths = [write_json(folder / "sensitivity.json", result)]
    header, rows = csv_rows(result)
    with atomic_path(folder / "sensitivity.csv") as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    paths.append(folder / "sensitivity.csv")
    for stem, png in plots(result).items():
        with atomic_path(folder / "plots" / f"{stem}.png") as tmp:
            tmp.write_bytes(png)
        paths.append(folder / "plots" / f"{stem}.png")
    return paths


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def log_floor(*groups: Iterable[float]) -> float:
    """Where a log axis draws scores <= 0 (marked apart): a tenth of the smallest positive value.

    Loss and Hessian scores are estimates; near zero they can come out negative (see the stderr).
    """
    positive = [v for group in groups for v in group if v > 0]
    return 0.1 * min(positive) if positive else 1e-12


def plots(result: Mapping[str, Any]) -> dict[str, bytes]:
    """`scores_by_site.png` (every method at noise_bits, forward order, log scale) and
    `noise_vs_isolated.png` / `hessian_vs_isolated.png` (scatter, log-log, with Spearman rho).
    Scores <= 0 are drawn at `log_floor` with a downward triangle, counted in the legend."""
    from matplotlib.figure import Figure

    out: dict[str, bytes] = {}
    names = list(result["sites"])
    nb = result["meta"]["noise_bits"]
    fig = Figure(figsize=(14, 5))
    ax = fig.add_subplot()
    styles = (("isolated_kl", "k-", "k"), ("noise_kl", "C0.-", "C0"), ("noise_loss", "C1.--", "C1"), ("hessian", "C2.:", "C2"))
    floor = log_floor(*(measured_at(result, method).values() for method, _, _ in styles))
    for method, style, color in styles:
        values = measured_at(result, method)
        if not values:
            continue
        xs = [i for i, n in enumerate(names) if n in values]
        ax.plot(xs, [max(values[names[i]], floor) for i in xs], style, label=method, linewidth=1, markersize=3)
        low = [i for i in xs if values[names[i]] <= 0]
        if low:
            ax.plot(low, [floor] * len(low), "v", color=color, markersize=4, label=f"{method} <= 0 ({len(low)}), at the floor")
    ax.set_yscale("log")
    ax.set_xlabel("site (forward order)")
    ax.set_ylabel(f"score at {nb} bits (nats)")
    ax.set_title(f"Per-site sensitivity at {nb} bits")
    ticks = [i for i, n in enumerate(names) if n.endswith(".norm1") or not n.startswith("blocks.")]
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=60, fontsize=6, ha="right")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out["scores_by_site"] = _png(fig)
    iso = measured_at(result, "isolated_kl")
    for method, stem in (("noise_kl", "noise_vs_isolated"), ("hessian", "hessian_vs_isolated")):
        values = measured_at(result, method)
        common = [n for n in values if n in iso]
        if len(common) < 3:
            continue
        fig = Figure(figsize=(6, 5))
        ax = fig.add_subplot()
        x_floor, y_floor = log_floor(iso[n] for n in common), log_floor(values[n] for n in common)
        for kind, color in (("act", "C0"), ("weight", "C3")):
            pts = [n for n in common if result["sites"][n]["kind"] == kind]
            up = [n for n in pts if values[n] > 0]
            ax.scatter([max(iso[n], x_floor) for n in up], [values[n] for n in up], s=10, c=color, label=kind)
            low = [n for n in pts if values[n] <= 0]
            if low:
                ax.scatter([max(iso[n], x_floor) for n in low], [y_floor] * len(low), s=14, c=color, marker="v", label=f"{kind}, {method} <= 0 ({len(low)}), at the floor")
        rho = result["ranking"]["spearman"].get(f"{method}_vs_isolated_kl/all")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"isolated INT{nb} quantization: logit KL (nats)")
        ax.set_ylabel(f"{method} (nats)")
        ax.set_title(f"{method} vs measured isolated drop (Spearman rho = {rho:.3f})" if rho is not None else method, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out[stem] = _png(fig)
    return out
