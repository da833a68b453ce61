"""Calibration state: observe once, keep qparams for every candidate width, bind any assignment.

`calibrate()` runs the calibration images through the FP32 model with observers
at every site (observers only watch: outputs are the FP32 outputs), then asks
each observer for qparams at every candidate bit width (range searches run per
width). The resulting `CalibState` is enough to build the quantized model for
any assignment of candidate widths without another data pass (`bind()`), which
is what quantize, sensitivity and search do.

Files: `state.safetensors` (`<site>/<bits>/scale`, `<site>/<bits>/zero_point`,
`<site>/stats/<name>`, and `<weight site>/hessian` for weights with `gptq: true`)
and `index.json` (per site: role, spec, widths).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from tqdm.auto import tqdm

from pipeline.artifacts import read_json, read_tensors, write_json, write_tensors
from pipeline.errors import PipelineError
from pipeline.quant.gptq import HESSIAN_KEY, HessianHooks, gptq_fake_quantize
from pipeline.quant.observers import build_observer
from pipeline.quant.quantizers import dequantize, fake_quantize, power_of_two_factor_scales, qrange, quantize
from pipeline.quant.recipe import SiteSpec
from pipeline.quant.sites import QuantConv2d, QuantLinear, SiteGraph, divide_by_storage_factor, fold_view, storage_factor, stored_weight

STATE_FILE = "state.safetensors"
INDEX_FILE = "index.json"
CODES_KEY = "codes"
BIAS_CODES_KEY = "bias_codes"
POS_CODES_KEY = "pos_codes"


@dataclass
class CalibState:
    """Qparams per (site, bits) plus observer statistics, and an index describing them."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    index: dict[str, Any] = field(default_factory=dict)  # {"meta": {...}, "sites": {name: {...}}}

    def qparams(self, site: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
        entry = self.index["sites"].get(site)
        if entry is None:
            raise PipelineError(f"site {site} is not in the calibration state (recalibrate with this recipe)")
        if bits not in entry["bits"]:
            raise PipelineError(missing_width(site, entry["bits"], bits))
        try:
            scale, zero_point = self.tensors[f"{site}/{bits}/scale"], self.tensors[f"{site}/{bits}/zero_point"]
        except KeyError as err:
            raise PipelineError(f"the state's index lists width {bits} for site {site} but {STATE_FILE} has no tensor {err.args[0]}: the state is damaged, rerun the stage that wrote it") from None
        if scale.numel() != zero_point.numel() or not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise PipelineError(f"site {site}: the state's {bits}-bit scale is not finite and positive or does not match its zero point ({STATE_FILE} is damaged): rerun the stage that wrote it")
        return scale, zero_point

    def weight_codes(self, site: str, bits: int) -> torch.Tensor | None:
        """The integer codes of weight `site` at `bits` as the quantize stage stored them (see
        `stored_weight_codes`), or None in a calibration state (whose weights are still to be rounded)."""
        return self.tensors.get(f"{site}/{bits}/{CODES_KEY}")

    def hessian(self, site: str) -> torch.Tensor:
        """Σ x xᵀ of the inputs of the layer that owns weight `site` (in, in), for GPTQ."""
        h = self.tensors.get(f"{site}/{HESSIAN_KEY}")
        if h is None:
            raise PipelineError(f"weight site {site} asks gptq but the calibration state has no input Hessian for it: recalibrate with this recipe")
        return h

    def digest(self) -> str:
        """A hash of every tensor (qparams, observer statistics, Hessians) and of the index: two states
        share it only when a stage would read the same numbers from them (16 hex digits)."""
        h = hashlib.sha1(json.dumps(self.index, sort_keys=True, default=str).encode())
        for key in sorted(self.tensors):
            tensor = self.tensors[key].detach().cpu()
            h.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            h.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]

    def save(self, folder: Path) -> None:
        write_tensors(folder / STATE_FILE, self.tensors)
        write_json(folder / INDEX_FILE, self.index)

    @classmethod
    def load(cls, folder: Path) -> "CalibState":
        return cls(read_tensors(folder / STATE_FILE), read_json(folder / INDEX_FILE))


def check_model(index: Any, fingerprint: str, where: str, model_name: str | None = None, remedy: str | None = None) -> None:
    """An artifact's JSON (a state's index, sensitivity scores) must come from the model being run.

    The model is the artifact's `meta.model` (a fingerprint); JSON without one is not an artifact of
    this pipeline. `model_name` (the run's model) and `remedy` are added to the message.
    """
    meta = index.get("meta") if isinstance(index, Mapping) else None
    if not isinstance(meta, Mapping) or "model" not in meta:
        raise PipelineError(f"{where} is not an artifact of this pipeline (its JSON has no meta.model)")
    if meta["model"] != fingerprint:
        run_model = f", not {model_name}" if model_name else ""
        raise PipelineError(f"{where} belongs to another model ({meta.get('model_name')}{run_model})" + (f": {remedy}" if remedy else ""))


def check_calibrated(specs: Mapping[str, SiteSpec], index: Mapping[str, Any]) -> None:
    """The recipe must match what was calibrated (observer, granularity, signedness..., and its width among the
    calibrated ones); `index` is the state's JSON index."""
    sites = index.get("sites") if isinstance(index, Mapping) else None
    if not isinstance(sites, Mapping):
        raise PipelineError("the calibration index has no 'sites' table: it is not a calibration state of this pipeline (rerun calibrate)")
    for name, spec in specs.items():
        if not spec.needs_observer:
            continue
        entry = sites.get(name)
        if entry is not None and not (isinstance(entry, Mapping) and isinstance(entry.get("bits"), list) and isinstance(entry.get("spec"), Mapping)):
            raise PipelineError(f"site {name}: the calibration index's entry is malformed (it needs a 'bits' list and a 'spec' table): rerun calibrate")
        if entry is None or not entry["bits"]:
            raise PipelineError(f"site {name} was not calibrated: run calibrate with this recipe")
        if entry["spec"] != spec.calibration_key():
            diff = {k: (entry["spec"].get(k), v) for k, v in spec.calibration_key().items() if entry["spec"].get(k) != v}
            raise PipelineError(f"site {name}: recipe differs from the calibrated one {diff}: rerun calibrate")
        if spec.bits not in entry["bits"]:
            raise PipelineError(missing_width(name, entry["bits"], spec.bits))


def missing_width(site: str, calibrated: list[int], bits: int) -> str:
    """The one-line error for a width a site was not calibrated at."""
    return f"site {site} was calibrated for bits {calibrated}, not {bits}: add {bits} to quant.candidate_bits and recalibrate"


def calibration_widths(spec: SiteSpec, candidate_bits: list[int]) -> list[int]:
    return sorted({spec.bits, *candidate_bits})


@torch.no_grad()
def calibrate(graph: SiteGraph, specs: Mapping[str, SiteSpec], loader, device: torch.device, candidate_bits: list[int], weight_bits: list[int] | None = None) -> CalibState:
    """Observe activations over `loader` (and weights once) -> CalibState for every candidate width."""
    graph.set_mode("fp")
    for name, spec in specs.items():
        site = graph[name]
        if not spec.needs_observer:
            site.observer = None
        elif site.role == "weight":
            site.observer = weight_observer(spec, _weight_of(graph, name))
        else:
            site.observer = build_observer(spec.observer, granularity=spec.observer_granularity, axis=site.axis, **spec.observer_kwargs())
        site.mode = "observe" if spec.needs_observer and site.role != "weight" else "fp"
    graph.to(device)
    for name in specs:  # weights: observed once, from the tensor itself (first: a NaN weight is named as such)
        site = graph[name]
        if site.role == "weight" and site.observer is not None:
            site._observe(_weight_of(graph, name))
    hooks = HessianHooks(graph.model, [n.rsplit(".", 1)[0] for n, s in specs.items() if s.enabled and s.gptq and graph[n].role == "weight"])
    batches = 0
    try:
        for images, _ in tqdm(loader, desc="calibrate", unit="batch", leave=False):
            graph.model(images.to(device))
            batches += 1
    finally:
        hooks.remove()
    if batches == 0:
        raise PipelineError("calibration saw zero batches (check data.calib_size and the calibration split)")

    state = CalibState(index={"sites": {}})
    for name, spec in specs.items():
        site = graph[name]
        entry = {"role": site.role, "spec": spec.calibration_key(), "bits": []}
        if site.observer is not None:
            widths = calibration_widths(spec, weight_bits if site.role == "weight" and weight_bits else candidate_bits)
            if not getattr(site.observer, "batches_seen", 1):
                raise PipelineError(f"site {name} saw no data in calibration: the model's forward never reaches it")
            for bits in widths:
                scale, zp = site.observer.calculate_qparams(bits, spec.signed, spec.symmetric, spec.rounding)
                if spec.granularity == "ptf":  # widens channel ranges only: zp keeps 0.0 exact, nothing clips
                    scale, _, _ = power_of_two_factor_scales(scale, spec.ptf_shift, spec.ptf_frac_bits)
                state.tensors[f"{name}/{bits}/scale"] = scale.detach().float().cpu().reshape(-1)
                state.tensors[f"{name}/{bits}/zero_point"] = zp.detach().to(torch.int32).cpu().reshape(-1)
            for key, value in site.observer.stats().items():
                state.tensors[f"{name}/stats/{key}"] = value.detach().float().cpu().reshape(-1)
            entry["bits"] = widths
            entry["batches"] = int(getattr(site.observer, "batches_seen", batches))
        if name in hooks.hessians:
            state.tensors[f"{name}/{HESSIAN_KEY}"] = hooks.hessians[name].detach().float().cpu()
            entry[HESSIAN_KEY] = True
        state.index["sites"][name] = entry
        site.observer = None
    graph.set_mode("off")
    state.index["meta"] = {"batches": batches}
    return state


def _weight_of(graph: SiteGraph, site_name: str) -> torch.Tensor:
    return graph.module(site_name.rsplit(".", 1)[0]).weight


def weight_observer(spec: SiteSpec, weight: torch.Tensor):
    """The observer of a weight site (per channel: one row per output channel, axis 0).

    A weight is observed once and is small, so the `omse` range search takes each row whole (the
    whole tensor per tensor) unless the recipe sets `samples`; activations keep a sample.
    """
    kwargs = spec.observer_kwargs()
    if spec.observer == "omse" and spec.samples is None:
        kwargs["max_samples"] = max(1, weight[0].numel() if spec.channelwise else weight.numel())
    return build_observer(spec.observer, granularity=spec.observer_granularity, axis=0, **kwargs)


def bind_activation(site, spec: SiteSpec, bits: int, state: CalibState) -> None:
    """Put one activation site in quant mode at `bits`: a uniform grid from `state`, a log2 one (fixed scale) as is."""
    if spec.quantizer == "uniform":
        site.bind(spec, bits, *state.qparams(site.name, bits))
    else:
        site.bind(spec, bits, None, None)
    site.mode = "quant"


@torch.no_grad()
def bind(graph: SiteGraph, specs: Mapping[str, SiteSpec], state: CalibState, bits: Mapping[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Put `graph` in quant mode for `specs` with qparams from `state`.

    `bits` overrides the width of individual sites (a mixed-precision assignment).
    Weights are quantized here (no data pass): a weight whose producer activation
    has per-channel scales s is quantized as Q(W·diag(s))·diag(1/s), the NPU's folded
    weight. Returns the bound qparams (`<site>/scale`, `<site>/zero_point`).
    """
    bits = dict(bits or {})
    bound: dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        site = graph[name]
        if not spec.enabled:
            site.mode = "fp"
            continue
        width = bits.get(name, spec.bits)
        if site.role == "weight":
            continue
        bind_activation(site, spec, width, state)
        if spec.quantizer == "uniform":
            bound[f"{name}/scale"], bound[f"{name}/zero_point"] = site.scale, site.zero_point
    for name, spec in specs.items():
        if graph[name].role == "weight" and spec.enabled:
            scale, zp = quantize_weight(graph, name, spec, bits.get(name, spec.bits), state)
            bound[f"{name}/scale"], bound[f"{name}/zero_point"] = scale, zp
    return bound


def quantize_weight(graph: SiteGraph, name: str, spec: SiteSpec, width: int, state: CalibState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize one weight, as stored (`sites.stored_weight`: the producer's per-channel scales and a
    following LayerScale folded in), into its module's `qweight` (back in W's own space).

    With `spec.gptq` the codes are chosen by GPTQ from the layer's input Hessian in `state`
    (pipeline.quant.gptq); the grid (scale, zero point) is the observer's either way. A quantize
    stage's state holds the codes and grid it chose (`CalibState.weight_codes`): they are bound as
    they are, with no new search, so a later stage runs exactly the weights that were saved.
    """
    path = name.rsplit(".", 1)[0]
    module: QuantLinear | QuantConv2d = graph.module(path)
    site = module.weight_site
    weight = module.weight.detach()
    fold = graph.fold_scale(path)
    factor = storage_factor(weight, fold, graph.output_scale(path))  # the stored weight is W * factor
    codes = state.weight_codes(name, width) if state is not None else None
    if codes is not None and codes.shape != weight.shape:
        raise PipelineError(f"weight site {name}: stored codes {tuple(codes.shape)} do not fit the weight {tuple(weight.shape)} ({STATE_FILE} is damaged): rerun quantize")
    if codes is not None:
        scale, zp = state.qparams(name, width)
        stored = dequantize(codes.to(weight.device), scale.to(weight.device), zp.to(weight.device), 0 if scale.numel() > 1 else None)
        qweight = divide_by_storage_factor(stored.to(weight.dtype), factor)
    else:
        # Searches rebind many assignments: reuse a weight already quantized for this (spec, width, fold scale).
        # (A LayerScale gamma is a fixed parameter of the module: it needs no place in the key.)
        key = (spec, width, None if fold is None else fold.detach().cpu().numpy().tobytes())
        cache = module.__dict__.setdefault("_qweight_cache", {})
        if key not in cache:
            cache[key] = _round_weight(weight, factor, fold, name, spec, width, state)
        qweight, scale, zp = cache[key]
    site.bind(spec, width, scale, zp)
    site.mode = "quant"
    module.qweight = qweight
    return scale, zp


def _round_weight(weight: torch.Tensor, factor: torch.Tensor | None, fold: torch.Tensor | None, name: str, spec: SiteSpec, width: int, state: CalibState | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight in W's space, scale, zero point): the stored weight W * factor searched and rounded (GPTQ or nearest)."""
    folded = weight if factor is None else weight * factor
    observer = weight_observer(spec, folded)
    observer(folded)
    scale, zp = observer.calculate_qparams(width, spec.signed, spec.symmetric, spec.rounding)
    qmin, qmax = qrange(width, spec.signed)
    if spec.gptq:
        if state is None:
            raise PipelineError(f"weight site {name} asks gptq: quantizing it needs the calibration state")
        hessian = state.hessian(name).to(folded)
        if fold is not None:  # the folded weight's inputs are x / s (per column of folded.flatten(1))
            inverse = (1.0 / fold_view(fold.to(folded), folded)).expand(1, *folded.shape[1:]).reshape(-1)
            hessian = hessian * inverse.view(-1, 1) * inverse.view(1, -1)
        flat = gptq_fake_quantize(folded.flatten(1), hessian, scale, zp, qmin, qmax, spec.rounding)
        qweight = flat.view_as(folded).to(folded.dtype)
    else:
        qweight = fake_quantize(folded, scale.to(folded), zp.to(folded), qmin, qmax, 0 if scale.numel() > 1 else None, spec.rounding)
    return divide_by_storage_factor(qweight, factor), scale, zp  # back in W's own space


def stored_weight_codes(graph: SiteGraph, name: str) -> torch.Tensor:
    """The integer codes the NPU stores for the bound weight site `name`: W's shape, int8 / int16 / int32.

    They are the codes of the stored weight (`sites.stored_weight`: producer scales and LayerScale
    folded in) on the site's grid, GPTQ's choice included: the dequantized stored weight lies on
    the grid, so rounding it gives its codes back.
    """
    path = name.rsplit(".", 1)[0]
    module: QuantLinear | QuantConv2d = graph.module(path)
    site = module.weight_site
    stored = stored_weight(graph, path, module.effective_weight().detach())
    return quantize(stored, site.scale, site.zero_point, site.bits, site.spec.signed, 0 if site.scale.numel() > 1 else None, site.spec.rounding)


def describe_bound(graph: SiteGraph, specs: Mapping[str, SiteSpec]) -> dict[str, Any]:
    """Per-site summary of what is bound (for quantize/sites.json)."""
    out = {}
    for name, site in graph.sites.items():
        spec = specs[name]
        out[name] = {
            "role": site.role,
            "block": site.block,
            "mode": site.mode,
            "bits": site.bits if site.mode == "quant" else None,
            "qmin": site.qmin,
            "qmax": site.qmax,
            "folded_into": graph.folds.get(name) if site.per_channel else None,
            "spec": asdict(spec),
        }
    return out
