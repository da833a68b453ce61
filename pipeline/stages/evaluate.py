"""Evaluate: top-1/top-5/loss of the FP32 model, or of the quantized model against FP32.

FP32 logits are cached per (model weights, data subset). With `quant.enabled`,
the quantized model is rebuilt from the quantize stage's artifacts; the stage
reports its top-1, the drop from FP32, argmax agreement and logit KL vs FP32,
and profiles every site (pipeline.profile.profiler, `profile.*`) over the first
`profile.images` images: `profile/` (tables, HTML, plots), `site_sqnr.json`,
MLflow series `sqnr/<role>`, `cos/<role>`, `sat/<role>`... with step = block.
The profile's quantized forward is the evaluation's forward for those images: their
logits come from it and only the other images run through `predict`, so profiling
adds its statistics and the FP32 site graph's forward, not a second quantized pass.
With `profile.enabled=false` only the per-site SQNR is measured, over the first
`evaluate.sqnr_images` images.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from pipeline.artifacts import write_json
from pipeline.data import DataSubset, make_subset
from pipeline.errors import PipelineError
from pipeline.inference import classification_metrics, fp32_logits, predict
from pipeline.profile.collect import first_images, site_sqnr
from pipeline.profile.metrics import argmax_agreement, logit_kl
from pipeline.quant.sites import attach_sites
from pipeline.runner import StageContext

log = logging.getLogger(__name__)


def check_config(cfg) -> None:
    """Before any run opens: bad `profile.*` sizes (the runner checks the dump globs and trace site against the model).

    A dump or trace that cannot run (`quant=none` or `profile.enabled=false`) is a warning, not an error,
    so that a sweep over recipes may include `none`.
    """
    if cfg.evaluate.sqnr_images < 0:
        raise PipelineError(f"evaluate.sqnr_images must be >= 0 (0 = no per-site SQNR), got {cfg.evaluate.sqnr_images}")
    if not (cfg.quant.enabled and cfg.profile.enabled):
        if cfg.profile.dump or cfg.profile.trace:
            why = "quant=none has no quantized sites" if not cfg.quant.enabled else "profile.enabled=false"
            log.warning("profile.dump / profile.trace are ignored: %s", why)
        return
    from pipeline.profile.profiler import check_sizes

    check_sizes(cfg.profile)


def check_inputs(ctx: StageContext, specs) -> None:
    """Before any run opens: a quantized model from from_run holds this model and recipe."""
    if ctx.cfg.quant.enabled and not ctx.made_earlier("quantize", "evaluate"):
        from pipeline.stages.quantize import find_quantized

        find_quantized(ctx, specs)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    subset = make_subset(cfg.data, ctx.fp32, "eval")
    ref_logits, labels, hit = fp32_logits(ctx.fp32.model, ctx.fp32.fingerprint, subset, ctx.device, cfg.cache_dir)
    ctx.tracker.set_tags({"fp32_cache_hit": str(hit), "eval_subset": subset.key})
    if not cfg.quant.enabled:
        return classification_metrics(ref_logits, labels)

    from pipeline.stages.quantize import load_quantized

    graph, _ = load_quantized(ctx)
    profile = None
    if cfg.profile.enabled:
        from pipeline.profile.profiler import profile_run

        profile = profile_run(ctx, graph, subset)  # checks profile.dump / profile.trace before any pass
        logits = _with_rest(profile.logits, graph, subset, ctx.device)
    else:
        logits, _ = predict(graph.model, subset, ctx.device, desc="quantized")
    metrics = classification_metrics(logits, labels)
    fp = classification_metrics(ref_logits, labels)
    metrics.update(
        top1_fp32=fp["top1"],
        top1_drop=fp["top1"] - metrics["top1"],  # a share (0..1); top1_drop_pt is the same in points
        top1_drop_pt=round(100 * (fp["top1"] - metrics["top1"]), 4),
        agreement=argmax_agreement(ref_logits, logits),
        logit_kl=logit_kl(ref_logits, logits),
    )
    if profile is not None:
        from pipeline.profile.series import site_table

        write_json(ctx.out_dir / "site_sqnr.json", site_table(profile.rows))
        metrics.update(profile.metrics)
    elif cfg.evaluate.sqnr_images > 0:
        metrics.update(_site_sqnr_only(ctx, graph, subset))
    return metrics


def _with_rest(head: torch.Tensor, graph, subset: DataSubset, device: torch.device) -> torch.Tensor:
    """Quantized logits of the whole subset: `head` (its first images, from the profile) then `predict` on the rest."""
    if head.shape[0] >= len(subset):
        return head
    rest, _ = predict(graph.model, subset.without_first(head.shape[0]), device, desc="quantized")
    return torch.cat([head, rest])


def _site_sqnr_only(ctx: StageContext, graph, subset) -> dict[str, Any]:
    """Cumulative SQNR (dB) of each activation site over `evaluate.sqnr_images` images, without the profiler."""
    from pipeline.profile.series import graph_sites, log_by_block, site_table

    fp_graph = attach_sites(ctx.fp32.model).to(ctx.device)
    sqnr = site_sqnr(fp_graph, graph, first_images(subset.loader, ctx.cfg.evaluate.sqnr_images), ctx.device)
    write_json(ctx.out_dir / "site_sqnr.json", site_table([{"site": n, "role": graph[n].role, "block": graph[n].block, "sqnr_db": v} for n, v in sqnr.items()]))
    log_by_block(ctx.tracker, {"sqnr": sqnr}, graph_sites(graph))
    by_role: dict[str, list[float]] = {}
    for name, v in sqnr.items():
        by_role.setdefault(graph[name].role, []).append(v)
    out = {f"sqnr_min/{role}": min(vs) for role, vs in by_role.items()}
    if sqnr:  # a weight-only recipe quantizes no activation
        out["sqnr_min"] = min(sqnr.values())
    return out
