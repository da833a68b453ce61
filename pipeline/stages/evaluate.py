"""Evaluate: top-1/top-5/loss of the FP32 model, or of the quantized model against FP32.

FP32 logits are cached per (model weights, data subset). With `quant.enabled`,
the quantized model is rebuilt from the quantize stage's artifacts; the stage
reports its top-1, the drop from FP32, argmax agreement and logit KL vs FP32,
and the cumulative SQNR of each site's output over the first
`evaluate.sqnr_images` images (`site_sqnr.json`, MLflow `sqnr/<role>` by block).
"""

from __future__ import annotations

from typing import Any

from pipeline.artifacts import write_json
from pipeline.data import make_subset
from pipeline.inference import classification_metrics, fp32_logits, predict
from pipeline.profile.collect import first_images, site_sqnr
from pipeline.profile.metrics import argmax_agreement, logit_kl
from pipeline.quant.sites import attach_sites
from pipeline.runner import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    subset = make_subset(cfg.data, ctx.fp32, "eval")
    ref_logits, labels, hit = fp32_logits(ctx.fp32.model, ctx.fp32.fingerprint, subset, ctx.device, cfg.cache_dir)
    ctx.tracker.set_tags({"fp32_cache_hit": str(hit), "eval_subset": subset.key})
    if not cfg.quant.enabled:
        return classification_metrics(ref_logits, labels)

    from pipeline.stages.quantize import load_quantized

    graph, _ = load_quantized(ctx)
    logits, _ = predict(graph.model, subset, ctx.device, desc="quantized")
    metrics = classification_metrics(logits, labels)
    fp = classification_metrics(ref_logits, labels)
    metrics.update(
        top1_fp32=fp["top1"],
        top1_drop=fp["top1"] - metrics["top1"],
        top1_drop_pt=round(100 * (fp["top1"] - metrics["top1"]), 4),
        agreement=argmax_agreement(ref_logits, logits),
        logit_kl=logit_kl(ref_logits, logits),
    )
    if cfg.evaluate.sqnr_images > 0:
        fp_graph = attach_sites(ctx.fp32.model).to(ctx.device)
        sqnr = site_sqnr(fp_graph, graph, first_images(subset.loader, cfg.evaluate.sqnr_images), ctx.device)
        write_json(ctx.out_dir / "site_sqnr.json", {name: {"role": graph[name].role, "block": graph[name].block, "sqnr_db": v} for name, v in sqnr.items()})
        log_by_block(ctx, "sqnr", {name: v for name, v in sqnr.items()}, graph)
        by_role: dict[str, list[float]] = {}
        for name, v in sqnr.items():
            by_role.setdefault(graph[name].role, []).append(v)
        metrics.update({f"sqnr_min/{role}": min(vs) for role, vs in by_role.items()})
        metrics["sqnr_min"] = min(sqnr.values())
    return metrics


def log_by_block(ctx: StageContext, prefix: str, values: dict[str, float], graph) -> None:
    """MLflow series `<prefix>/<role>[/<leaf>]` with step = block index (sites outside blocks skipped)."""
    per_block_roles: dict[tuple[str, int], int] = {}
    for name in values:
        site = graph[name]
        if site.block is not None:
            per_block_roles[(site.role, site.block)] = per_block_roles.get((site.role, site.block), 0) + 1
    for name, v in values.items():
        site = graph[name]
        if site.block is None:
            continue
        shared = per_block_roles[(site.role, site.block)] > 1
        leaf = name.split(".", 2)[2].replace(".", "_")
        key = f"{prefix}/{site.role}/{leaf}" if shared else f"{prefix}/{site.role}"
        ctx.tracker.log_metrics({key: v}, step=site.block)
