"""Evaluate a width assignment: assemble qparams from the calibration state, one forward pass.

`Assembler.apply(widths)` binds every site of a SiteGraph for an assignment without any data
pass: activation sites take their scale / zero point for that width straight from the
calibration state; a weight is quantized once per (width, width of the producer whose
per-channel scales it absorbs) and cached, so later trials only swap tensors.
`Evaluator` holds the search batches (decoded once) and the FP32 logits of the same images,
and returns the search metrics of one assignment.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import torch

from pipeline.errors import PipelineError
from pipeline.inference import classification_metrics
from pipeline.profile.metrics import argmax_agreement, logit_kl
from pipeline.quant.calibration import CalibState, bind_activation, quantize_weight
from pipeline.quant.recipe import SiteSpec
from pipeline.quant.sites import SiteGraph

from pipeline.search.goal import OBJECTIVES, better  # noqa: F401 (re-exported)


class Assembler:
    def __init__(self, graph: SiteGraph, specs: Mapping[str, SiteSpec], state: CalibState):
        self.graph, self.specs, self.state = graph, dict(specs), state
        self.acts = [n for n in graph.names() if graph[n].role != "weight"]
        self.weights = [n for n in graph.names() if graph[n].role == "weight"]
        self._weights: dict[tuple[str, int, int | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _width(self, name: str, widths: Mapping[str, int]) -> int | None:
        """The site's width in `widths` (default: its recipe width); None, with the site set to fp, when disabled."""
        spec = self.specs[name]
        if not spec.enabled:
            self.graph[name].mode = "fp"
            return None
        return int(widths.get(name, spec.bits))

    def apply(self, widths: Mapping[str, int]) -> None:
        graph, specs = self.graph, self.specs
        for name in self.acts:
            site, spec = graph[name], specs[name]
            bits = self._width(name, widths)
            if bits is None:
                continue
            if site.mode != "quant" or site.bits != bits:
                bind_activation(site, spec, bits, self.state)
        for name in self.weights:
            site, spec = graph[name], specs[name]
            bits = self._width(name, widths)
            if bits is None:
                continue
            path = name.rsplit(".", 1)[0]
            folded = graph.fold_scale(path) is not None
            key = (name, bits, graph[graph.consumers[path]].bits if folded else None)
            module = graph.module(path)
            if key not in self._weights:
                scale, zp = quantize_weight(graph, name, spec, bits, self.state)
                self._weights[key] = (module.qweight, scale, zp)
            qweight, scale, zp = self._weights[key]
            module.qweight = qweight
            site.bind(spec, bits, scale, zp)
            site.mode = "quant"


class Evaluator:
    """Search metrics of an assignment on fixed batches, against cached FP32 logits."""

    def __init__(self, graph: SiteGraph, specs: Mapping[str, SiteSpec], state: CalibState, batches: Sequence[torch.Tensor], fp_logits: torch.Tensor, labels: torch.Tensor, device: torch.device):
        self.assembler = Assembler(graph.to(device), specs, state)
        self.graph = graph
        self.batches = [b.to(device) for b in batches]
        self.fp_logits = fp_logits.float().cpu()
        self.labels = labels.cpu()
        self.device = device
        if sum(int(b.shape[0]) for b in self.batches) != self.fp_logits.shape[0]:
            raise PipelineError("search batches and FP32 logits differ in size")

    @torch.inference_mode()
    def logits(self, widths: Mapping[str, int]) -> torch.Tensor:
        self.assembler.apply(widths)
        self.graph.model.eval()
        return torch.cat([self.graph.model(x).float().cpu() for x in self.batches])

    def evaluate(self, widths: Mapping[str, int]) -> dict[str, float]:
        t0 = time.perf_counter()
        logits = self.logits(widths)
        return {**metrics_of(self.fp_logits, logits, self.labels), "eval_s": time.perf_counter() - t0}


def metrics_of(ref: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """A trial's figures: kl = KL(FP32 || quantized) (nats), agreement and top1 (shares in 0..1), loss (nats)."""
    measured = classification_metrics(logits, labels)
    return {"kl": logit_kl(ref, logits), "agreement": argmax_agreement(ref, logits), "top1": measured["top1"], "loss": measured["loss"]}
