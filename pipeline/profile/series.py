"""Publishing a profile: MLflow series by block, summary metrics, and the per-site SQNR table.

Per-site metrics are logged as MLflow series `<prefix>/<role>` with step = block
index (the MLflow UI then draws "metric by block" for each role), or
`<prefix>/<role>/<leaf>` when a block has several sites of that role
(`sqnr/qkv/attn_q`, `sqnr/norm_out/norm1`, `sqnr/weight/mlp_fc1_weight`).
Sites outside blocks (patch embedding, final norm, head) are in the tables only.
"""

from __future__ import annotations

import math
from typing import Any, Mapping


def series_keys(sites: Mapping[str, tuple[str, int | None]], prefix: str) -> dict[str, str]:
    """MLflow key per site: `<prefix>/<role>`, or `<prefix>/<role>/<leaf>` when a block has several sites of that role.

    `sites` maps site name -> (role, block); sites outside blocks get no key.
    """
    per_block: dict[tuple[str, int], int] = {}
    for role, block in sites.values():
        if block is not None:
            per_block[(role, block)] = per_block.get((role, block), 0) + 1
    keys = {}
    for name, (role, block) in sites.items():
        if block is None:
            continue
        leaf = name.split(".", 2)[2].replace(".", "_")
        keys[name] = f"{prefix}/{role}/{leaf}" if per_block[(role, block)] > 1 else f"{prefix}/{role}"
    return keys


def log_by_block(tracker, values: Mapping[str, Mapping[str, float | None]], sites: Mapping[str, tuple[str, int | None]]) -> None:
    """Log `values[prefix][site]` as MLflow series `<prefix>/<role>[/<leaf>]` with step = block index.

    One MLflow call per block (all prefixes and sites of that block together).
    """
    by_step: dict[int, dict[str, float]] = {}
    for prefix, per_site in values.items():
        keys = series_keys({n: sites[n] for n in per_site}, prefix)
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
    "eff_bits": "effective_bits",
}
ISOLATED_SERIES = {"iso_sqnr": "sqnr_db", "iso_logit_sqnr": "logit_sqnr_db", "iso_agreement": "logit_agreement", "iso_logit_kl": "logit_kl"}


def log_rows(tracker, rows: list[Mapping[str, Any]], series: Mapping[str, str]) -> None:
    """Per-site series of `rows` (see SERIES) by block."""
    sites = {r["site"]: (r["role"], r["block"]) for r in rows}
    log_by_block(tracker, {prefix: {r["site"]: r.get(key) for r in rows} for prefix, key in series.items()}, sites)


def summary_metrics(rows: list[Mapping[str, Any]]) -> dict[str, float]:
    """Worst SQNR, mean and min SQNR per role (dB, finite values), flag counts."""
    from pipeline.profile.flags import flag_counts

    out: dict[str, float] = {}
    by_role: dict[str, list[float]] = {}
    for r in rows:
        by_role.setdefault(r["role"], []).append(r["sqnr_db"])
    finite = [v for r in rows if math.isfinite(v := r["sqnr_db"])]
    if rows:
        out["sqnr_min"] = min(r["sqnr_db"] for r in rows)
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
    """{site: {role, block, sqnr_db}} (the evaluate stage's `site_sqnr.json`)."""
    return {r["site"]: {"role": r["role"], "block": r["block"], "sqnr_db": r["sqnr_db"]} for r in rows}

