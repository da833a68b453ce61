"""Quantize: bind the recipe's widths from the calibration state (no data pass).

Writes `quantize/state.safetensors` + `quantize/index.json` (the bound width of
every site, in the calibration-state format, plus every weight's integer codes as the
NPU stores them, `<weight site>/<bits>/codes`, and each layer's integer bias on its accumulator's
step, `<weight site>/<bits>/bias_codes` (int32) and `bias_step`, and the patch tokens' position embedding on
the patch conv's accumulator, `patch_embed.proj.weight/<bits>/pos_codes` (int32, (N_patches, C)) and
`pos_step`) and `quantize/sites.json` (per-site
spec, width, qmin/qmax, fold target). `load_quantized()` rebuilds the quantized
model from these files for the later stages: weights from their stored codes, with no
new range search or GPTQ pass, so what later stages run is what was saved.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.artifacts import read_json, write_json
from pipeline.data import check_calibrated_elsewhere
from pipeline.errors import PipelineError
from pipeline.quant.calibration import BIAS_CODES_KEY, CODES_KEY, INDEX_FILE, POS_CODES_KEY, CalibState, bind, check_calibrated, check_model, describe_bound, stored_weight_codes
from pipeline.quant.recipe import SiteSpec, resolve_recipe
from pipeline.quant.sites import SiteGraph, attach_sites, position_codes
from pipeline.runner import StageContext
from pipeline.stages.calibrate import check_calibration_input, find_calibration


def check_inputs(ctx: StageContext, specs: Mapping[str, SiteSpec]) -> None:
    """Before any run opens: a calibration from from_run fits the model and recipe."""
    check_calibration_input(ctx, specs, "quantize")


def run(ctx: StageContext) -> dict[str, Any]:
    calib_dir, _ = find_calibration(ctx)
    state = CalibState.load(calib_dir)
    graph = attach_sites(ctx.fp32.model)
    specs = resolve_recipe(ctx.cfg.quant, graph)
    check_calibrated(specs, state.index)
    bound = bind(graph, specs, state)
    selected = CalibState(dict(bound), {"meta": {**state.index["meta"], "recipe": ctx.cfg.quant.name}, "sites": {}})
    for name, site in graph.sites.items():
        if site.mode == "quant" and specs[name].quantizer == "uniform":
            selected.tensors[f"{name}/{site.bits}/scale"] = selected.tensors.pop(f"{name}/scale")
            selected.tensors[f"{name}/{site.bits}/zero_point"] = selected.tensors.pop(f"{name}/zero_point")
        selected.index["sites"][name] = {"role": site.role, "bits": [site.bits] if site.mode == "quant" else []}
        if site.mode == "quant" and site.role == "weight":
            selected.tensors[f"{name}/{site.bits}/{CODES_KEY}"] = stored_weight_codes(graph, name).cpu()
            bias = graph.module(name.rsplit(".", 1)[0]).bias_codes()
            if bias is not None:
                selected.tensors[f"{name}/{site.bits}/{BIAS_CODES_KEY}"] = bias[0].to(torch.int32).cpu()
                selected.tensors[f"{name}/{site.bits}/bias_step"] = bias[1].float().cpu()
    position = position_codes(graph.model)
    if position is not None:  # the patch conv's second integer bias, one per position and channel
        bits = graph["patch_embed.proj.weight"].bits
        selected.tensors[f"patch_embed.proj.weight/{bits}/{POS_CODES_KEY}"] = position[0][0].to(torch.int32).cpu()
        selected.tensors[f"patch_embed.proj.weight/{bits}/pos_step"] = position[1].float().cpu()
    selected.save(ctx.out_dir)
    sites = describe_bound(graph, specs)
    write_json(ctx.out_dir / "sites.json", sites)
    live = [s for s in sites.values() if s["mode"] == "quant"]
    return {
        "quant_sites": len(live),
        "quant_act_sites_channelwise": sum(1 for s in live if s["role"] != "weight" and s["spec"]["granularity"] in ("per_channel", "ptf")),
        "quant_sites_folded": sum(1 for s in live if s["folded_into"]),  # per-channel activation scales folded into a weight
        "mean_bits": sum(s["bits"] for s in live) / max(1, len(live)),
    }


def find_quantized(ctx: StageContext, wanted: Mapping[str, SiteSpec]) -> tuple[Path, dict[str, SiteSpec], dict[str, int]]:
    """This run's or from_run's quantize folder, its specs and bound widths, checked to hold the run's model and recipe
    (calibrated on other images than this run evaluates).

    Reads the JSON files only, so the runner can call it before any run opens.
    """
    qdir = ctx.find("quantize", "sites.json").parent
    index = read_json(qdir / INDEX_FILE)
    check_model(index, ctx.fp32.fingerprint, f"quantized state in {qdir}")
    check_calibrated_elsewhere(index["meta"], ctx.cfg.data, f"the quantized state in {qdir}")  # its meta is its calibration's
    sites = read_json(qdir / "sites.json")
    specs = {name: SiteSpec(**entry["spec"]) for name, entry in sites.items()}
    check_same_recipe(specs, wanted, f"{qdir} (quant={index['meta'].get('recipe')})", ctx.cfg.quant.name)
    return qdir, specs, {name: entry["bits"] for name, entry in sites.items() if entry["bits"]}


def load_quantized(ctx: StageContext) -> tuple[SiteGraph, dict[str, SiteSpec]]:
    """The quantized model from this run's (or from_run's) quantize artifacts."""
    graph = attach_sites(ctx.fp32.model)
    qdir, specs, bits = find_quantized(ctx, resolve_recipe(ctx.cfg.quant, graph))
    state = CalibState.load(qdir)
    missing = [n for n, b in bits.items() if graph[n].role == "weight" and state.weight_codes(n, b) is None]
    if missing:  # the codes are what evaluate must run: rounding the weights again could pick others (GPTQ)
        raise PipelineError(f"quantized state in {qdir} stores no codes for weight site {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "") + ": rerun quantize")
    bind(graph, specs, state, bits)
    return graph.to(ctx.device), specs


def check_same_recipe(quantized: Mapping[str, SiteSpec], wanted: Mapping[str, SiteSpec], where: str, name: str) -> None:
    """The run's recipe must be the one `quantize` bound, or the run would be labelled with a recipe it does not evaluate."""
    for site, spec in wanted.items():
        have = quantized.get(site)
        if have != spec:
            diff = {k: (v, getattr(spec, k)) for k, v in asdict(have).items() if v != getattr(spec, k)} if have else "not in the quantized model"
            raise PipelineError(f"{where} was quantized with another recipe than quant={name} asks for (site {site}: {diff}): pass the same quant overrides or rerun quantize")


__all__ = ["run", "check_inputs", "find_quantized", "load_quantized", "check_same_recipe"]
