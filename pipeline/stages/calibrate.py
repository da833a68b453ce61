"""Calibrate: observe `data.calib_size` training images at every site.

Writes `calibrate/state.safetensors` + `calibrate/index.json`: every site's
qparams at every candidate width and its observer statistics.
"""

from __future__ import annotations

from typing import Any

from pipeline.data import make_subset
from pipeline.quant.calibration import calibrate
from pipeline.quant.recipe import resolve_recipe
from pipeline.quant.sites import attach_sites
from pipeline.runner import StageContext


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    graph = attach_sites(ctx.fp32.model)
    specs = resolve_recipe(cfg.quant, graph)
    subset = make_subset(cfg.data, ctx.fp32, "calib")
    state = calibrate(graph, specs, subset.loader, ctx.device, list(cfg.quant.candidate_bits))
    state.index["meta"].update(
        model=ctx.fp32.fingerprint, model_name=ctx.fp32.name, recipe=cfg.quant.name, images=len(subset), subset=subset.key, split=subset.split
    )
    state.save(ctx.out_dir)
    calibrated = sum(1 for e in state.index["sites"].values() if e["bits"])
    return {"calib_images": len(subset), "calib_sites": calibrated}
