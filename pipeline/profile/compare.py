"""Side-by-side picture of two or more profiles (e.g. `quant=naive` vs `quant=recommended`).

Reads each run's `evaluate/profile/cumulative.json` and draws, for the chosen roles
(columns), one panel per metric (rows) with one line per run against the block index:
the picture in the README, and a quick look outside the MLflow UI. Usage:

    python -m pipeline.profile.compare naive=<run>/evaluate/profile/cumulative.json \\
        recommended=<run2>/evaluate/profile/cumulative.json --out compare.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.artifacts import atomic_path
from pipeline.profile.report import _png, block_series

METRICS = {
    "sqnr_db": "SQNR (dB)",
    "sat_pct": "clipped (%)",
    "channel_level_pct": "levels used, median channel (%)",
}
LINESTYLES = ("-", "--", ":", "-.")


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The site rows of one profile table (`cumulative.json` or `isolated.json`)."""
    try:
        table = json.loads(Path(path).read_text())
        rows = list(table["sites"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"error: {path}: not a profile table ({exc.__class__.__name__}: {exc})") from None
    for index, row in enumerate(rows):
        problem = _row_problem(row)
        if problem:
            raise SystemExit(f"error: {path}: site row {index} {problem}")
    return rows


def _row_problem(row: Any) -> str | None:
    """What keeps a table row from being drawn (None if nothing): `site` and `role` strings, and for a
    site inside a block an integer `block` and a name `blocks.<i>.<leaf>`."""
    if not isinstance(row, dict) or not isinstance(row.get("site"), str) or not isinstance(row.get("role"), str):
        return "needs a 'site' and a 'role' string"
    block = row.get("block")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or row["site"].count(".") < 2):
        return f"({row['site']}): 'block' {block!r} needs an integer and a site named blocks.<i>.<leaf>"
    return None


def compare_png(profiles: Mapping[str, Sequence[Mapping[str, Any]]], roles: Sequence[str] = ("norm_out", "sv_attn", "mlp_act"), metrics: Sequence[str] = tuple(METRICS), title: str = "") -> bytes:
    """PNG of `compare_figure`."""
    return _png(compare_figure(profiles, roles, metrics, title))


def compare_figure(profiles: Mapping[str, Sequence[Mapping[str, Any]]], roles: Sequence[str], metrics: Sequence[str], title: str = "") -> Figure:
    """Rows = metrics, columns = roles, one line per profile (label; one colour each) against the block index."""
    fig = Figure(figsize=(4.4 * len(roles), 2.4 * len(metrics)))
    if title:
        fig.suptitle(title, fontsize=11)
    for r, metric in enumerate(metrics):
        for c, role in enumerate(roles):
            ax = fig.add_subplot(len(metrics), len(roles), r * len(roles) + c + 1)
            for colour, (label, rows) in enumerate(profiles.items()):  # one colour per profile in every panel
                leaves = block_series(rows, metric).get(role, {})
                for style, leaf in enumerate(sorted(leaves)):  # roles such as residual or qkv have several sites a block
                    blocks, values = leaves[leaf]
                    ax.plot(blocks, values, color=f"C{colour}", linestyle=LINESTYLES[style % len(LINESTYLES)], marker="o", markersize=3, linewidth=1.2,
                            label=label if len(leaves) == 1 else f"{label} {leaf}")
            if r == 0:
                ax.set_title(role, fontsize=10)
            if c == 0:
                ax.set_ylabel(METRICS.get(metric, metric), fontsize=8)
            if r == len(metrics) - 1:
                ax.set_xlabel("block", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if r == 0:  # each role's own leaves (res1 / res2, q / k / v) need their own legend
                ax.legend(fontsize=7)
    fig.subplots_adjust(left=0.1, right=0.98, bottom=0.35 / (2.4 * len(metrics)) + 0.03, top=1 - 0.6 / (2.4 * len(metrics)), wspace=0.25, hspace=0.35)
    return fig


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="+", help="label=path/to/cumulative.json")
    parser.add_argument("--roles", default="norm_out,sv_attn,mlp_act")
    parser.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated, from {', '.join(METRICS)}")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    profiles = {}
    for item in args.profiles:
        label, sep, path = item.partition("=")
        if not sep or not label:
            raise SystemExit(f"error: '{item}' is not label=path")
        profiles[label] = load_rows(Path(path))
    roles, metrics = args.roles.split(","), args.metrics.split(",")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise SystemExit(f"error: unknown metric(s) {', '.join(unknown)} (choose from {', '.join(METRICS)})")
    for label, rows in profiles.items():
        missing = [role for role in roles if not any(row.get("role") == role for row in rows)]
        if missing:
            raise SystemExit(f"error: profile '{label}' has no sites of role(s) {', '.join(missing)}")
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)):
        raise SystemExit(f"error: --out {args.out} is a folder; give the PNG file's path (e.g. {out / 'compare.png'})")
    png = compare_png(profiles, roles, metrics, args.title)
    with atomic_path(out) as tmp:  # creates out's folder
        tmp.write_bytes(png)
    print(out)


if __name__ == "__main__":
    sys.exit(main())
