"""Search outputs: trials table, Pareto plot (cost vs objective), the best assignment as a recipe."""

from __future__ import annotations

import fnmatch

import csv
import io
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import OmegaConf

from pipeline.artifacts import atomic_path, write_text
from pipeline.search.objective import OBJECTIVES
from pipeline.search.study import TrialRecord

TRIAL_COLUMNS = ("method", "number", "value", "cost", "kl", "agreement", "top1", "loss", "raised_groups", "source", "duplicate_of", "trial_s", "eval_s")


def write_trials_csv(path: Path, records: Sequence[TrialRecord]) -> Path:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(TRIAL_COLUMNS)
        for r in records:
            raised = sum(1 for v in r.levels.values() if v > 0)
            row = [r.method, r.number, r.value, r.cost, r.metrics.get("kl"), r.metrics.get("agreement"), r.metrics.get("top1"), r.metrics.get("loss"), raised, r.source, r.duplicate_of, r.trial_s, r.metrics.get("eval_s")]
            w.writerow(["" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row])
    return Path(path)


def pareto_front(points: Sequence[tuple[float, float]], minimize: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and objective."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1] if minimize else -points[i][1]))
    front, best = [], math.inf
    for i in order:
        v = points[i][1] if minimize else -points[i][1]
        if v < best:
            front.append(i)
            best = v
    return front


def pareto_png(records: Sequence[TrialRecord], objective: str, budget: float, references: Mapping[str, tuple[float, float]] | None = None, best: TrialRecord | None = None) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    minimize = OBJECTIVES[objective] == "minimize"
    fig = Figure(figsize=(7, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, method in enumerate(sorted({r.method for r in records})):
        pts = [r for r in records if r.method == method]
        ax.scatter([r.cost for r in pts], [r.value for r in pts], s=14, alpha=0.7, color=f"C{i}", label=f"{method} ({len(pts)})")
    if records:
        pts = [(r.cost, r.value) for r in records]
        front = pareto_front(pts, minimize)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "k--", linewidth=1, label="Pareto front")
    for j, (name, (cost, value)) in enumerate((references or {}).items()):
        ax.scatter([cost], [value], marker="s", s=40, color=f"C{5 + j}", label=name)
    if best is not None:
        ax.scatter([best.cost], [best.value], marker="*", s=160, color="gold", edgecolor="k", zorder=5, label=f"best ({best.method} #{best.number})")
    ax.axvline(budget, color="r", linewidth=1, linestyle=":", label=f"budget {budget:g}")
    if minimize and all(r.value > 0 for r in records):
        ax.set_yscale("log")
    ax.set_xlabel("cost (all-INT8 = 1.0)")
    ax.set_ylabel(f"search objective: {objective}")
    ax.set_title("Mixed-precision search: cost vs objective")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _without_unset(node: Any) -> Any:
    """A config tree without unset (None) values and the mappings they leave empty (e.g. untouched roles)."""
    if not isinstance(node, Mapping):
        return node
    kept = {k: _without_unset(v) for k, v in node.items() if v is not None}
    return {k: v for k, v in kept.items() if v != {} or k == "sites"}


def export_recipe(path: Path, base_quant: Mapping[str, Any], base_bits: Mapping[str, int], widths: Mapping[str, int], name: str, comment: str = "") -> Path:
    """A self-contained recipe: the base recipe plus one `sites` entry per site whose width differs from the base's."""
    recipe = OmegaConf.to_container(OmegaConf.create(dict(base_quant)), resolve=True) if not isinstance(base_quant, dict) else dict(base_quant)
    recipe = dict(recipe)
    recipe["name"] = name
    sites = dict(recipe.get("sites") or {})
    for site, bits in widths.items():
        if base_bits.get(site) == bits:
            continue
        if site in sites:  # re-added last, so no later glob of the base overrides its width; it keeps what
            # every entry matching it set, in file order (entries apply field by field, last wins)
            merged = {k: v for pattern, entry in sites.items() if fnmatch.fnmatchcase(site, pattern) for k, v in (entry or {}).items()}
            del sites[site]
            sites[site] = {**merged, "bits": int(bits)}
        else:
            sites[site] = {"bits": int(bits)}
    recipe["sites"] = sites
    text = OmegaConf.to_yaml(OmegaConf.create(_without_unset(recipe)))
    header = "# Mixed-precision recipe exported by the search stage" + (f": {comment}" if comment else "") + "\n"
    header += "# Use: copy into conf/quant/ and run quant=<file stem>, or add hydra.searchpath=[file://<this run>/search]\n"
    return write_text(path, header + text)
