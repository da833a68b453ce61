"""Flag rules: why a site fails, from its metrics and configurable thresholds (`profile.*`).

| flag        | rule                                                                  | meaning                          |
|-------------|-----------------------------------------------------------------------|----------------------------------|
| `cosine`    | cos_mean < cos_min (0.99)                                             | token vectors lose their direction: the logic starts to collapse |
| `clipping`  | sat_pct > saturation_max_pct (5 %)                                    | the range clips too hard         |
| `wasted`    | uniform site, sat_pct <= saturation_zero_pct (0.01 %) and typical_level_pct < wasted_levels_pct (10 %) | the range is too wide: resolution wasted |
| `low_sqnr`  | sqnr_db < sqnr_min_db (10 dB)                                         | the error's energy is at least a tenth of the signal's (amplitude ratio ≥ 0.32) |

`typical_level_pct` is the % of the levels used by the median channel
(`channel_level_pct`: out of the levels it could reach, min(2^bits, values counted in
the channel), so that a channel with few values, e.g. head.in with one per image, is not
called wasteful for lack of samples), or by the whole tensor (`level_pct`, out of 2^bits)
when no per-channel counts exist. The median channel is what exposes a per-tensor range stretched by
a few outlier channels: the tensor as a whole still touches most levels (the
outlier channels spread over them) while a typical channel uses a handful.
`wasted` applies to uniform sites only: a log2 grid (intSoft) is fixed, not
chosen by calibration, and uses few of its levels by design.
A rule whose metric is missing (None) does not fire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

FLAGS = ("cosine", "clipping", "wasted", "low_sqnr")


@dataclass(frozen=True)
class Thresholds:
    """Flag thresholds; units: cosine unitless, saturation and levels in %, SQNR in dB."""

    cos_min: float = 0.99
    saturation_max_pct: float = 5.0
    saturation_zero_pct: float = 0.01
    wasted_levels_pct: float = 10.0
    sqnr_min_db: float = 10.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "Thresholds":
        """Read the thresholds from a `profile` config node (other keys are ignored)."""
        return cls(**{name: float(cfg[name]) for name in cls.__dataclass_fields__ if name in cfg})


def site_flags(row: Mapping[str, Any], th: Thresholds) -> list[str]:
    """The flags (subset of FLAGS, in FLAGS order) that one site's metrics raise.

    `row` holds the keys of SiteStats.result() plus `quantizer` (uniform | log2 | int_softmax).
    """
    flags = []
    if _lt(row.get("cos_mean"), th.cos_min):
        flags.append("cosine")
    sat = row.get("sat_pct")
    if _gt(sat, th.saturation_max_pct):
        flags.append("clipping")
    if row.get("quantizer") == "uniform" and sat is not None and sat <= th.saturation_zero_pct and _lt(typical_level_pct(row), th.wasted_levels_pct):
        flags.append("wasted")
    if _lt(row.get("sqnr_db"), th.sqnr_min_db):
        flags.append("low_sqnr")
    return flags


def typical_level_pct(row: Mapping[str, Any]) -> float | None:
    """% of the levels a typical channel uses: `channel_level_pct` (median channel), else `level_pct`."""
    channel = row.get("channel_level_pct")
    return channel if channel is not None else row.get("level_pct")


def flag_rows(rows: list[dict[str, Any]], th: Thresholds) -> list[dict[str, Any]]:
    """Set `row['flags']` (a list) on every row; returns the rows."""
    for row in rows:
        row["flags"] = site_flags(row, th)
    return rows


def flag_counts(rows: list[Mapping[str, Any]]) -> dict[str, int]:
    """{'flagged': sites with any flag, '<flag>': sites with that flag} over the rows."""
    out = {"flagged": sum(1 for r in rows if r.get("flags"))}
    out.update({flag: sum(1 for r in rows if flag in (r.get("flags") or ())) for flag in FLAGS})
    return out


def _lt(value: Any, threshold: float) -> bool:
    return value is not None and value < threshold


def _gt(value: Any, threshold: float) -> bool:
    return value is not None and value > threshold


def flags_by_role(rows: list[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """{role: {flag: number of sites of that role with the flag}} for the roles that have any flag."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        for flag in r.get("flags") or ():
            counts = out.setdefault(r["role"], dict.fromkeys(FLAGS, 0))
            counts[flag] += 1
    return out
