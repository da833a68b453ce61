"""Publishing a profile: MLflow series by block, summary metrics, and the per-site SQNR table.

Per-site metrics are logged as MLflow series `<prefix>/<role>` with step = block
index (the MLflow UI then draws "metric by block" for each role), or
`<prefix>/<role>/<leaf>` when the role has several kinds of site in the blocks
(`sqnr/qkv/attn_q`, `sqnr/norm_out/norm1`, `sqnr/weight/mlp_fc1_weight`).
Sites outside blocks (patch embedding, final norm, head) are in the tables only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping


def series_keys(sites: Mapping[str, tuple[str, int | None]], prefix: str) -> dict[str, str]:
    """MLflow key per site: `<prefix>/<role>`, or `<prefix>/<role>/<leaf>` when the role's sites have several
    leaves (the name after `blocks.i.`) over all blocks, so that one series never mixes two kinds of site,
    even when a recipe leaves some of them in FP32.

    `sites` maps site name -> (role, block); sites outside blocks get no key.
    """
    leaves = {name: name.split(".", 2)[2] for name, (_, block) in sites.items() if block is not None}
    per_role: dict[str, set[str]] = {}
    for name, leaf in leaves.items():
        per_role.setdefault(sites[name][0], set()).add(leaf)
    keys = {}
    for name, leaf in leaves.items():
        role = sites[name][0]
        keys[name] = f"{prefix}/{role}/{leaf.replace('.', '_')}" if len(per_role[role]) > 1 else f"{prefix}/{role}"
    return keys


def graph_sites(graph) -> dict[str, tuple[str, int | None]]:
    """{site: (role, block)} of every site of a SiteGraph, quantized or not: what `series_keys` names by."""
    return {name: (site.role, site.block) for name, site in graph.sites.items()}


def log_by_block(tracker, values: Mapping[str, Mapping[str, float | None]], sites: Mapping[str, tuple[str, int | None]]) -> None:
    """Log `values[prefix][site]` as MLflow series `<prefix>/<role>[/<leaf>]` with step = block index.

    `sites` is every site of the model (`graph_sites`), not only the measured ones: the key of a
    site then does not depend on which other sites a recipe quantizes. One MLflow call per block
    (all prefixes and sites of that block together).
    """
    by_step: dict[int, dict[str, float]] = {}
    for prefix, per_site in values.items():
        keys = series_keys(sites, prefix)
        for name, value in per_site.items():
            if name in keys and value is not None:
                by_step.setdefault(sites[name][1], {})[keys[name]] = float(value)
    for step in sorted(by_step):
        tracker.log_metrics(by_step[step], step=step)


# MLflow series per site: metric prefix -> row key.
SERIES = {
    "sqnr": "sqnr_db",
    "cos": "cos_mean",
    "cos_min": "cos_min",
    "mse": "mse",
    "kl": "hist_kl",
    "sat": "sat_pct",
    "sat_low": "sat_low_pct",
    "sat_high": "sat_high_pct",
    "levels": "level_pct",
    "channel_levels": "channel_level_pct",
    "eff_bits": "effective_bits",
}
ISOLATED_SERIES = {"iso_sqnr": "sqnr_db", "iso_logit_sqnr": "logit_sqnr_db", "iso_agreement": "logit_agreement", "iso_logit_kl": "logit_kl"}


def log_rows(tracker, rows: list[Mapping[str, Any]], series: Mapping[str, str], sites: Mapping[str, tuple[str, int | None]]) -> None:
    """Per-site series of `rows` (see SERIES) by block; `sites` = `graph_sites` of the model."""
    log_by_block(tracker, {prefix: {r["site"]: r.get(key) for r in rows} for prefix, key in series.items()}, sites)


def summary_metrics(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    """Worst SQNR and mean SQNR over the activation sites (dB; weights have their own role keys), min and
    mean SQNR per role (the means over finite values), flag counts."""
    from pipeline.profile.flags import flag_counts

    out: dict[str, float] = {}
    by_role: dict[str, list[float]] = {}
    for r in rows:
        by_role.setdefault(r["role"], []).append(r["sqnr_db"])
    acts = [r["sqnr_db"] for r in rows if r["role"] != "weight"]
    finite = [v for v in acts if math.isfinite(v)]
    if acts:  # activation sites, as evaluate reports it without the profile (weights: sqnr_min/weight)
        out["sqnr_min"] = min(acts)
        out["profile/worst_sqnr"] = out["sqnr_min"]
    for role, values in by_role.items():
        out[f"sqnr_min/{role}"] = min(values)
        ok = [v for v in values if math.isfinite(v)]
        if ok:
            out[f"profile/sqnr_mean/{role}"] = sum(ok) / len(ok)
    if finite:
        out["profile/sqnr_mean"] = sum(finite) / len(finite)
    counts = flag_counts(list(rows))
    out["profile/flagged"] = counts.pop("flagged")
    out.update({f"profile/flagged/{k}": v for k, v in counts.items()})
    return out


def site_table(rows: list[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """{site: {role, block, sqnr_db}} (the evaluate stage's `site_sqnr.json`; an infinite SQNR as "inf")."""
    from pipeline.artifacts import json_number

    return {r["site"]: {"role": r["role"], "block": r["block"], "sqnr_db": json_number(r["sqnr_db"])} for r in rows}

