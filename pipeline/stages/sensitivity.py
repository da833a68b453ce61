"""Sensitivity: which sites deserve more bits? Scores per site and width from the calibration state.

Reads `calibrate/` (qparams at every candidate width), rebuilds the recipe on a fresh site
graph and measures, on fixed batches from the calibration split (`sensitivity.*`):
Hutchinson Hessian traces (weights and activations, one joint HVP per sample) with the
HAWQ-V2 score, noise injection (loss and logit KL increase), and each site quantized alone
(the isolated drop the others are ranked against). Writes `sensitivity/sensitivity.json`,
`sensitivity.csv` and `plots/*.png`; logs Spearman rho / top-5 overlaps and per-block
series `sens_<method>/<role>` to MLflow. If the evaluate stage ran the profiler's isolated
mode (this run or `from_run`), its logit KL is ranked against too.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from omegaconf import DictConfig

from pipeline.artifacts import ArtifactError, read_json
from pipeline.errors import PipelineError
from pipeline.quant.calibration import CalibState, check_calibrated
from pipeline.quant.recipe import check_widths, resolve_recipe
from pipeline.profile.series import graph_sites, log_by_block
from pipeline.quant.sites import SiteGraph, attach_sites
from pipeline.runner import StageContext

log = logging.getLogger(__name__)

NOISES = ("uniform", "gaussian")


def check_config(cfg: DictConfig) -> None:
    """Reject bad `sensitivity.*` values before any work."""
    s = cfg.sensitivity
    if s.noise not in NOISES:
        raise PipelineError(f"sensitivity.noise: unknown noise '{s.noise}' (choose one of {', '.join(NOISES)})")
    for key in ("batches", "batch_size", "noise_batches"):
        if int(s[key]) < 1:
            raise PipelineError(f"sensitivity.{key} must be >= 1, got {s[key]}")
    check_widths("sensitivity.noise_bits", [s.noise_bits])
    check_widths("sensitivity.widths", s.widths)
    for key in ("weight_bits", "act_bits"):  # scored here too (wanted_widths)
        check_widths(f"search.{key}", cfg.search[key])
    if s.hutchinson_iters < 0 or s.hutchinson_tol < 0:
        raise PipelineError("sensitivity.hutchinson_iters and sensitivity.hutchinson_tol must be >= 0")
    if not cfg.quant.enabled:
        raise PipelineError("sensitivity needs a quantization recipe (quant=recommended, naive, ...), not quant=none")


def labelled_batches(loader: Iterable, images: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `images` (image, label) pairs of `loader`, re-batched to `batch_size` (CPU tensors)."""
    xs, ys, n = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        n += int(x.shape[0])
        if n >= images:
            break
    if not xs:
        raise PipelineError("the calibration split gave no images for sensitivity")
    x, y = torch.cat(xs)[:images], torch.cat(ys)[:images]
    return list(zip(x.split(batch_size), y.split(batch_size)))


def check_inputs(ctx: StageContext, specs) -> None:
    """Before any run opens: a calibration from from_run fits the model and recipe."""
    from pipeline.stages.calibrate import check_calibration_input

    check_calibration_input(ctx, specs, "sensitivity")


def wanted_widths(cfg: DictConfig) -> tuple[list[int], list[int]]:
    """(weight widths, activation widths) to score: sensitivity.widths, the search's candidates and the recipe's
    (weights, quantized from the tensor itself, at noise_bits too: the noise scores' reference width)."""
    weights = sorted({*cfg.sensitivity.widths, *cfg.search.weight_bits, *cfg.quant.candidate_bits, cfg.sensitivity.noise_bits})
    acts = sorted({*cfg.search.act_bits, *cfg.quant.candidate_bits})
    return weights, acts


def profiler_isolated(ctx: StageContext) -> dict[str, float] | None:
    """Logit KL per site from the profiler's isolated mode (evaluate/profile/isolated.json), if it ran."""
    path = ctx.find("evaluate", "profile/isolated.json", required=False)
    if path is None:
        return None
    try:
        table = read_json(path)
        rows = table.get("sites", [])
        found = {r["site"]: r.get("logit_kl") for r in rows if isinstance(r.get("logit_kl"), (int, float))}
    except (OSError, ArtifactError, ValueError, AttributeError, KeyError, TypeError):  # unreadable, or a hand-edited row without "site"
        log.warning("could not read %s; ranking without it", path)
        return None
    if table.get("model") != ctx.fp32.fingerprint or table.get("recipe") != ctx.cfg.quant.name:
        log.warning("%s was measured on another model or recipe (or does not record them); ranking without it", path)
        return None
    return found


def compute(ctx: StageContext, out_dir: Path, graph: SiteGraph | None = None) -> dict[str, Any]:
    """Compute the scores into `out_dir` (sensitivity.json, .csv, plots); returns the result dict.

    `graph`: a fresh `attach_sites` of the FP32 model to score on (made here when None).
    """
    from pipeline.data import make_subset
    from pipeline.sensitivity.compute import SensitivitySettings
    from pipeline.sensitivity.run import compute_sensitivity, write_report
    from pipeline.stages.calibrate import find_calibration

    cfg = ctx.cfg
    check_config(cfg)
    state = CalibState.load(find_calibration(ctx)[0])
    graph = attach_sites(ctx.fp32.model) if graph is None else graph
    specs = resolve_recipe(cfg.quant, graph)
    check_calibrated(specs, state.index)
    s = cfg.sensitivity
    subset = make_subset(cfg.data, ctx.fp32, "calib")
    need = max(s.batches, s.noise_batches) * s.batch_size
    batches = labelled_batches(subset.loader, need, s.batch_size)
    got = sum(int(b[0].shape[0]) for b in batches)
    if got < need:  # the calibration split is smaller than the batches asked for
        log.warning("sensitivity asks for %d images (sensitivity.batch_size x max(batches, noise_batches)) but the calibration subset holds %d: it uses %d (raise data.calib_size)", need, got, got)
    weight_widths, act_widths = wanted_widths(cfg)
    meta = {"model": ctx.fp32.fingerprint, "model_name": ctx.fp32.name, "recipe": cfg.quant.name, "calib_subset": subset.key}
    result = compute_sensitivity(
        graph,
        specs,
        state,
        batches[: s.batches],
        batches[: s.noise_batches],
        SensitivitySettings.from_config(s),
        weight_widths,
        act_widths,
        ctx.device,
        meta=meta,
        profiler_isolated=profiler_isolated(ctx),
    )
    write_report(out_dir, result)
    return result


def run(ctx: StageContext) -> dict[str, Any]:
    from pipeline.sensitivity.run import summary_metrics

    graph = attach_sites(ctx.fp32.model)
    result = compute(ctx, ctx.out_dir, graph)
    log_series(ctx.tracker, result, graph_sites(graph))
    metrics = summary_metrics(result)
    ranking = result["ranking"]
    rho = ranking["spearman"].get("noise_kl_vs_isolated_kl/act")
    if rho is not None:  # only with the isolated measurement (sensitivity.isolated)
        log.info("sensitivity: Spearman rho(noise KL, isolated KL) over activation sites = %.3f, top-5 overlap %s/5", rho, ranking["top5_overlap"].get("noise_kl_vs_isolated_kl/act"))
    return metrics


def log_series(tracker, result: Mapping[str, Any], sites: Mapping[str, tuple[str, int | None]]) -> None:
    """MLflow series `sens_<method>/<role>[/<leaf>]` of every measured method at noise_bits, step = block index.

    `sites` is `graph_sites` of the model, so the keys are the profiler's: one series never mixes two
    kinds of site, whichever sites the recipe left in FP32. Sites outside the blocks (patch embedding,
    final norm, head) have no step: they are in the files only.
    """
    from pipeline.sensitivity.run import measured_at

    methods = sorted({m for entry in result["sites"].values() for m in entry["measured"]})
    log_by_block(tracker, {f"sens_{method}": measured_at(result, method) for method in methods}, sites)
