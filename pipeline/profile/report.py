"""Profile reports: ranked tables (CSV, JSON), PNG plots by block, and a self-contained HTML page.

Files written into the profile folder:

- `cumulative.csv`, `cumulative.json`: one row per site (weights included), worst SQNR first;
  `isolated.csv`, `isolated.json` when the isolated mode ran;
- `plots/sqnr_by_block.png`, `cos_by_block.png`, `saturation_by_block.png`,
  `utilization_by_block.png`, `channel_utilization_by_block.png` (one panel per role, one line per site of the block),
  `plots/iso_by_block.png` (isolated mode), `plots/hist_<rank>_<site>.png` for the
  `worst_k` lowest-SQNR sites (FP32 vs quantized value histograms);
- `profile.html`: everything above on one page, the plots inline (base64 PNG).

Plots use matplotlib's object API on an Agg canvas (no pyplot state, no display).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from pipeline.artifacts import atomic_path, json_number, write_json, write_text
from pipeline.profile.flags import FLAGS, Thresholds, flag_counts, flags_by_role
from pipeline.quant.sites import ROLES

COLUMNS = (
    "rank", "site", "role", "block", "mode", "quantizer", "bits", "granularity",
    "sqnr_db", "cos_mean", "cos_min", "mse", "hist_kl",
    "sat_low_pct", "sat_high_pct", "sat_pct", "levels_used", "levels_total", "level_pct", "effective_bits", "channel_level_pct",
    "top1_agreement", "top5_hit_rate",
    "scale_min", "scale_max", "zero_point_min", "zero_point_max", "qmin", "qmax", "folded_into", "flags",
)
ISOLATED_COLUMNS = COLUMNS[:-1] + ("logit_sqnr_db", "logit_cos_mean", "logit_agreement", "logit_top5", "logit_kl", "flags")
OUTPUT_KEYS = ("sqnr_db", "cos_mean", "cos_min", "mse", "hist_kl", "top1_agreement", "top5_hit_rate", "logit_kl")

# metric key, file stem, title, y label, flag threshold attribute (or None)
BLOCK_PLOTS = (
    ("sqnr_db", "sqnr_by_block", "SQNR by block", "SQNR (dB)", "sqnr_min_db"),
    ("cos_mean", "cos_by_block", "Mean token cosine by block", "cosine", "cos_min"),
    ("sat_pct", "saturation_by_block", "Saturation by block (clipped low + high)", "clipped (%)", "saturation_max_pct"),
    ("level_pct", "utilization_by_block", "Bit utilization by block: levels used / 2^bits, whole tensor", "levels used (%)", None),
    ("channel_level_pct", "channel_utilization_by_block", "Bit utilization by block: levels used / levels reachable (min(2^bits, values)), median channel", "levels used (%)", "wasted_levels_pct"),
)


# -- tables -----------------------------------------------------------------------------


def ranked(rows: Sequence[Mapping[str, Any]], key: str = "sqnr_db") -> list[dict[str, Any]]:
    """Rows sorted worst first (lowest `key`; missing / NaN last), with a 1-based `rank`."""

    def order(row: Mapping[str, Any]) -> tuple[int, float]:
        v = row.get(key)
        return (1, 0.0) if v is None or (isinstance(v, float) and math.isnan(v)) else (0, float(v))

    return [{**row, "rank": i + 1} for i, row in enumerate(sorted(rows, key=order))]


def _cell(value: Any) -> str:
    """CSV / HTML text of one value: floats to 6 significant digits, lists joined by ';', None empty."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ";".join(str(v) for v in value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """One row per site with the given columns (atomic write)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(row.get(c)) for c in columns])
    return Path(path)


def table_json(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], meta: Mapping[str, Any]) -> dict[str, Any]:
    return {**meta, "columns": list(columns), "sites": [{c: json_number(row.get(c)) for c in columns} for row in rows]}


# -- plots ------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def _finite(v: Any) -> float:
    return float(v) if v is not None and math.isfinite(float(v)) else math.nan


def block_series(rows: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{role: {leaf: (blocks, values)}} for the sites inside blocks, in ROLES order; leaf = the name after `blocks.i.`."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for row in sorted((r for r in rows if r.get("block") is not None), key=lambda r: r["block"]):
        leaf = row["site"].split(".", 2)[2]
        blocks, values = out.setdefault(row["role"], {}).setdefault(leaf, ([], []))
        blocks.append(int(row["block"]))
        values.append(_finite(row.get(key)))
    return {role: out[role] for role in ROLES if role in out}


def plot_by_block(rows: Sequence[Mapping[str, Any]], key: str, title: str, ylabel: str, threshold: float | None = None, threshold_roles: Collection[str] | None = None) -> bytes | None:
    """PNG of `block_figure`; None when no row lies inside a block."""
    fig = block_figure(rows, key, title, ylabel, threshold, threshold_roles)
    return None if fig is None else _png(fig)


def block_figure(rows: Sequence[Mapping[str, Any]], key: str, title: str, ylabel: str, threshold: float | None = None, threshold_roles: Collection[str] | None = None) -> Figure | None:
    """One panel per role, one line per site of a block, metric `key` against the block index.

    A dashed red line marks the flag threshold, on the panels of `threshold_roles` (default: all).
    Few ticks and shared axis labels keep the rendering cheap (text layout dominates matplotlib's cost).
    """
    series = block_series(rows, key)
    if not series:
        return None
    ncols = min(4, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 2.6 * nrows))
    fig.suptitle(title)
    fig.supxlabel("block", fontsize=9)
    fig.supylabel(ylabel, fontsize=9)
    for i, (role, leaves) in enumerate(series.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for leaf, (blocks, values) in sorted(leaves.items()):
            ax.plot(blocks, values, marker="o", markersize=3, linewidth=1.2, label=leaf)
        if threshold is not None and (threshold_roles is None or role in threshold_roles):
            ax.axhline(threshold, color="red", linestyle="--", linewidth=0.8)
        ax.set_title(role, fontsize=10)
        every = [b for blocks, _ in leaves.values() for b in blocks]
        ax.set_xlim(min(every) - 0.5, max(every) + 0.5)
        if len(set(every)) == 1:
            ax.set_xticks(every[:1])
        else:
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(leaves) > 1:  # beside the panel, not on its points
            ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.2)
    # fixed margins: tight_layout would cost an extra draw of every panel
    fig.subplots_adjust(left=0.25 / ncols, right=0.98, bottom=0.45 / (2.6 * nrows), top=1 - 0.7 / (2.6 * nrows), wspace=0.25, hspace=0.5)
    return fig


def _judged_roles(rows: Sequence[Mapping[str, Any]], attr: str | None) -> set[str] | None:
    """The roles a threshold judges (None: all): `wasted` only judges uniform sites (a log2 grid is fixed)."""
    return {row["role"] for row in rows if row.get("quantizer") == "uniform"} if attr == "wasted_levels_pct" else None


def plot_isolated(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """PNG: isolated mode, logit SQNR (dB) with only that site quantized, by block and role."""
    return plot_by_block(rows, "logit_sqnr_db", "Isolated: logit SQNR with only this site quantized", "logit SQNR (dB)")


def plot_histogram(row: Mapping[str, Any], hist: Mapping[str, Any]) -> bytes:
    """PNG: FP32 vs quantized value histograms of one site (share of values per bin, log scale)."""
    lo, hi = hist["range"]
    ref, test = hist["ref"].double(), hist["test"].double()
    ref, test = ref / ref.sum().clamp_min(1), test / test.sum().clamp_min(1)  # the FP32 histogram is sampled
    floor = 0.5 * float(min(ref[ref > 0].min(), test[test > 0].min())) if (ref > 0).any() and (test > 0).any() else 1e-9
    bins = ref.numel()
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    fig = Figure(figsize=(6.0, 3.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.stairs(ref.clamp_min(floor).tolist(), edges, label="FP32", color="tab:blue", linewidth=1.2)
    ax.stairs(test.clamp_min(floor).tolist(), edges, label="quantized", color="tab:orange", linewidth=1.0)
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.yaxis.set_minor_locator(NullLocator())  # a log axis's minor ticks are most of the drawing time
    flags = ", ".join(row.get("flags") or []) or "no flag"
    ax.set_title(f"{row['site']}  SQNR {_cell(row.get('sqnr_db'))} dB  ({flags})", fontsize=9)
    ax.set_xlabel(hist.get("axis", "value"), fontsize=8)
    ax.set_ylabel("share of values", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.15, top=0.9)
    return _png(fig)


# -- HTML -------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; position: sticky; top: 0; }
td.l { text-align: left; } td.bad { background: #f8c9c4; } tr.flagged td.l { font-weight: bold; }
img { max-width: 100%; border: 1px solid #ddd; margin: 4px 0; }
pre { background: #f7f7f7; padding: 0.8em; font-size: 12px; overflow-x: auto; }
.kv td { text-align: left; }
"""
_TEXT_COLUMNS = {"site", "role", "mode", "quantizer", "granularity", "folded_into", "flags"}


def _bad_cells(row: Mapping[str, Any]) -> set[str]:
    """Columns to highlight: the metric behind each flag of the row."""
    flags = set(row.get("flags") or ())
    cells = set()
    if "cosine" in flags:
        cells.add("cos_mean")
    if "clipping" in flags:
        cells.add("sat_pct")
    if "wasted" in flags:
        cells.add("channel_level_pct" if row.get("channel_level_pct") is not None else "level_pct")
    if "low_sqnr" in flags:
        cells.add("sqnr_db")
    return cells


def html_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        bad = _bad_cells(row)
        cells = []
        for c in columns:
            cls = " ".join(k for k, on in (("l", c in _TEXT_COLUMNS), ("bad", c in bad)) if on)
            cells.append(f"<td class=\"{cls}\">{html.escape(_cell(row.get(c)))}</td>" if cls else f"<td>{html.escape(_cell(row.get(c)))}</td>")
        tr = '<tr class="flagged">' if row.get("flags") else "<tr>"
        body.append(f"{tr}{''.join(cells)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _kv_table(items: Mapping[str, Any]) -> str:
    return "<table class=\"kv\">" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(_cell(v))}</td></tr>" for k, v in items.items()) + "</table>"


def _img(png: bytes, alt: str) -> str:
    return f"<img alt=\"{html.escape(alt)}\" src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"


def render_html(title: str, meta: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], output: Mapping[str, Any], plots: Mapping[str, bytes], hist_pngs: Mapping[str, bytes], thresholds: Thresholds, isolated: Sequence[Mapping[str, Any]] | None, trace_text: str | None, dumps: Sequence[Path]) -> str:
    """The self-contained page: summary, flags, logits, plots, worst histograms, tables, trace."""
    counts = flag_counts(list(rows))
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>Per-site profile: {html.escape(title)}</h1>")
    parts.append(_kv_table({**meta, "sites": len(rows), "flagged sites": counts["flagged"], **{f"flag {f}": counts[f] for f in FLAGS}}))
    by_role = flags_by_role(list(rows))
    if by_role:
        head = "".join(f"<th>{f}</th>" for f in FLAGS)
        body = "".join(f"<tr><td class=\"l\">{html.escape(role)}</td>" + "".join(f"<td>{c[f]}</td>" for f in FLAGS) + "</tr>" for role, c in sorted(by_role.items(), key=lambda kv: ROLES.index(kv[0]) if kv[0] in ROLES else len(ROLES)))
        parts.append(f"<h2>Flagged sites by role</h2><table><thead><tr><th>role</th>{head}</tr></thead><tbody>{body}</tbody></table>")
    parts.append("<h2>Flag thresholds</h2>" + _kv_table({
        "cosine: mean token cosine <": thresholds.cos_min,
        "clipping: % clipped >": thresholds.saturation_max_pct,
        "wasted: % clipped <= ... and % levels used (median channel) <": f"{thresholds.saturation_zero_pct} / {thresholds.wasted_levels_pct} (uniform sites)",
        "low_sqnr: SQNR (dB) <": thresholds.sqnr_min_db,
    }))
    parts.append("<h2>Model output (logits, FP32 vs quantized)</h2>" + _kv_table({k: output.get(k) for k in OUTPUT_KEYS if k in output}))
    parts.append("<h2>By block</h2>" + "".join(_img(png, name) for name, png in plots.items()))
    if hist_pngs:
        parts.append("<h2>Worst sites: FP32 vs quantized histograms</h2>" + "".join(_img(png, name) for name, png in hist_pngs.items()))
    parts.append("<h2>Cumulative mode: everything quantized, each site vs the FP32 model's same site (worst SQNR first)</h2>")
    parts.append(html_table(rows, COLUMNS))
    if isolated is not None:
        parts.append("<h2>Isolated mode: only this site quantized (worst logit SQNR first)</h2>" + html_table(isolated, ISOLATED_COLUMNS))
    if trace_text:
        parts.append(f"<h2>Trace</h2><pre>{html.escape(trace_text)}</pre>")
    if dumps:
        parts.append("<h2>Tensor dumps</h2><ul>" + "".join(f"<li>dump/{html.escape(p.name)}</li>" for p in dumps) + "</ul>")
    parts.append("</body></html>\n")
    return "".join(parts)


# -- everything -------------------------------------------------------------------------


def write_report(folder: Path, rows: Sequence[Mapping[str, Any]], output: Mapping[str, Any], histograms: Mapping[str, Mapping[str, Any] | None], thresholds: Thresholds, isolated: Sequence[Mapping[str, Any]] | None = None, trace_text: str | None = None, dumps: Sequence[Path] = (), images: int = 0, worst_k: int = 6, title: str = "", source: Mapping[str, Any] | None = None) -> list[Path]:
    """Write tables, plots, HTML (and trace.txt) into `folder`; returns the paths written.

    `source` (e.g. the model's fingerprint and the recipe) goes into the JSON tables, for readers in later runs.
    """
    folder = Path(folder)
    table = ranked(rows)
    meta = {"images": images, "thresholds": thresholds.__dict__, **(source or {})}
    paths = [write_csv(folder / "cumulative.csv", table, COLUMNS)]
    summary = {"flags": flag_counts(list(table)), "flags_by_role": flags_by_role(list(table)), "output": {k: json_number(v) for k, v in output.items()}}
    paths.append(write_json(folder / "cumulative.json", {"mode": "cumulative", **meta, **summary, **table_json(table, COLUMNS, {})}))
    iso_table = None
    if isolated is not None:
        iso_table = ranked(isolated, "logit_sqnr_db")
        paths.append(write_csv(folder / "isolated.csv", iso_table, ISOLATED_COLUMNS))
        paths.append(write_json(folder / "isolated.json", {"mode": "isolated", **meta, **table_json(iso_table, ISOLATED_COLUMNS, {})}))
    plots: dict[str, bytes] = {}
    for key, stem, plot_title, ylabel, attr in BLOCK_PLOTS:
        png = plot_by_block(table, key, plot_title, ylabel, getattr(thresholds, attr) if attr else None, _judged_roles(table, attr))
        if png is not None:
            plots[stem] = png
    if iso_table:
        png = plot_isolated(iso_table)
        if png is not None:
            plots["iso_by_block"] = png
    hist_pngs = {}
    for row in table[: max(0, worst_k)]:
        hist = histograms.get(row["site"])
        if hist is not None:
            hist_pngs[f"hist_{row['rank']:02d}_{row['site']}"] = plot_histogram(row, hist)
    for name, png in {**plots, **hist_pngs}.items():
        path = folder / "plots" / f"{name}.png"
        with atomic_path(path) as tmp:
            tmp.write_bytes(png)
        paths.append(path)
    if trace_text:
        paths.append(write_text(folder / "trace.txt", trace_text))
    page = render_html(title or "quantized model", {"images": images}, table, output, plots, hist_pngs, thresholds, iso_table, trace_text, dumps)
    paths.append(write_text(folder / "profile.html", page))
    return paths
