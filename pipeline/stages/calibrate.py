"""Calibrate: observe `data.calib_size` training images at every site.

Writes `calibrate/state.safetensors` + `calibrate/index.json`: every site's
qparams at every candidate width and its observer statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from pipeline.artifacts import read_json
from pipeline.data import check_calibrated_elsewhere, data_source, make_subset, split_size
from pipeline.errors import PipelineError
from pipeline.quant.calibration import INDEX_FILE, STATE_FILE, calibrate, check_calibrated, check_model
from pipeline.quant.recipe import SiteSpec, resolve_recipe
from pipeline.quant.sites import attach_sites
from pipeline.runner import StageContext

log = logging.getLogger(__name__)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg
    graph = attach_sites(ctx.fp32.model)
    specs = resolve_recipe(cfg.quant, graph)
    subset = make_subset(cfg.data, ctx.fp32, "calib")
    state = calibrate(graph, specs, subset.loader, ctx.device, list(cfg.quant.candidate_bits))
    state.index["meta"].update(
        model=ctx.fp32.fingerprint,
        model_name=ctx.fp32.name,
        recipe=cfg.quant.name,
        images=len(subset),
        subset=subset.key,
        source=data_source(cfg.data),
        split=subset.split,
        split_images=subset.split_images,  # the seeded permutation's length: search cuts from its back
        seed=int(cfg.data.seed),
    )
    state.save(ctx.out_dir)
    calibrated = sum(1 for e in state.index["sites"].values() if e["bits"])
    return {"calib_images": len(subset), "calib_sites": calibrated}


def find_calibration(ctx: StageContext) -> tuple[Path, dict[str, Any]]:
    """This run's or from_run's calibrate folder and its JSON index, checked to belong to the run's model
    and not to have calibrated on the images this run evaluates."""
    calib_dir = ctx.find("calibrate", INDEX_FILE).parent
    index = read_json(calib_dir / INDEX_FILE)
    check_model(index, ctx.fp32.fingerprint, f"calibration state in {calib_dir}")
    check_calibrated_elsewhere(index["meta"], ctx.cfg.data, f"the calibration in {calib_dir}")
    return calib_dir, index


def check_calibration_input(ctx: StageContext, specs: Mapping[str, SiteSpec] | None, consumer: str) -> None:
    """Before any run opens: a calibration that stage `consumer` reads from an earlier run fits the model and recipe."""
    if ctx.cfg.quant.enabled and not ctx.made_earlier("calibrate", consumer):
        calib_dir, index = find_calibration(ctx)
        check_calibrated(specs, index)
        if not (calib_dir / STATE_FILE).is_file():
            raise PipelineError(f"the calibration in {calib_dir} has its index but no {STATE_FILE}: rerun calibrate")


def calibration_front(index: Mapping[str, Any], data) -> int:
    """How many images at the front of the calibration split's seeded permutation a calibration used.

    The search subset is cut from the back of that permutation, disjoint from them; a calibration drawn
    from another permutation (another data.seed or data.calib_split) is an error.
    """
    meta = index.get("meta", {})
    for key, option, value in (("split", "calib_split", str(data.calib_split)), ("seed", "seed", int(data.seed))):
        if key not in meta:
            log.warning("the calibration state does not record its data.%s (made before it was recorded): assuming %s; recalibrate if it was drawn otherwise", option, value)
        elif meta[key] != value:
            raise PipelineError(f"the calibration state was drawn with data.{option}={meta[key]!r}, this run has {value!r}: the search subset is cut from the same permutation (set data.{option}={meta[key]} or recalibrate)")
    if "split_images" in meta:
        now = split_size(data, str(data.calib_split))
        if int(meta["split_images"]) != now:
            raise PipelineError(
                f"the calibration was drawn when split '{data.calib_split}' held {meta['split_images']} images; it now holds "
                f"{now}, a different permutation, so the search subset could reach the calibration images: recalibrate"
            )
    return int(meta["images"])
