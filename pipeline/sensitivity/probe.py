"""Perturbing one site of a SiteGraph, and re-running only the part of the model after it.

- `replace_forward(site, fn)`: the activation site returns `fn(x)` instead of x (an instance
  attribute shadows `Site.forward`; removed on exit). Used for noise injection and for the
  zero perturbations whose Hessian the Hutchinson estimator measures.
- `replace_weight(graph, name, w)`: the Linear/Conv of a weight site uses `w` (through its
  `qweight`, the path the quantized model takes) until exit.
- `SuffixRunner`: caches the input of every transformer block on fixed batches once, so a
  perturbation at a site of block i only re-runs blocks i..L-1, the final norm and the head.
  Sites before block 0 (patch embedding) run the whole model.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor

from pipeline.quant.sites import Site, SiteGraph

_BLOCK = re.compile(r"blocks\.(\d+)\.")


@contextmanager
def replace_forward(site: Site, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    site.forward = fn  # shadows the class method for this instance only
    try:
        yield
    finally:
        del site.forward


@contextmanager
def replace_weight(graph: SiteGraph, name: str, weight: Tensor) -> Iterator[None]:
    module = graph.module(name.rsplit(".", 1)[0])
    site = module.weight_site
    old_mode, old_q = site.mode, module.qweight
    module.qweight, site.mode = weight, "quant"
    try:
        yield
    finally:
        module.qweight, site.mode = old_q, old_mode


def weight_of(graph: SiteGraph, name: str) -> Tensor:
    return graph.module(name.rsplit(".", 1)[0]).weight


class SuffixRunner:
    """Logits of `graph.model` on fixed `batches`, starting at the block a site belongs to.

    The cached block inputs are those of the graph's state when `cache()` ran (all sites in
    `fp` mode for sensitivity): perturbing a site at block i leaves the inputs of blocks
    0..i unchanged, so re-running from block i gives the same logits as a full forward.
    Models without the timm VisionTransformer layout (`blocks`, `norm`, `forward_head`)
    always run the full forward.
    """

    def __init__(self, graph: SiteGraph, batches: list[Tensor], device: torch.device):
        self.graph = graph
        self.model = graph.model
        self.batches = [b.to(device) for b in batches]
        self.device = device
        self.depth = len(getattr(self.model, "blocks", []))
        self.ok = self.depth > 0 and hasattr(self.model, "norm") and hasattr(self.model, "forward_head")
        self.inputs: list[list[Tensor]] = []

    @torch.inference_mode()
    def cache(self) -> list[Tensor]:
        """Run every batch once, recording each block's input and the final norm's input; returns the logits."""
        self.inputs = []
        logits = []
        for x in self.batches:
            seen: list[Tensor] = []
            hooks = []
            if self.ok:
                record = lambda m, args, seen=seen: seen.append(args[0])  # noqa: E731
                hooks = [m.register_forward_pre_hook(record, prepend=True) for m in (*self.model.blocks, self.model.norm)]
            try:
                logits.append(self.model(x))
            finally:
                for h in hooks:
                    h.remove()
            if self.ok and len(seen) != self.depth + 1:
                self.ok = False  # an unusual forward (e.g. norm called twice): fall back to full passes
            self.inputs.append(seen)
        return logits

    def start(self, site_name: str) -> int | None:
        """Block index to start from (None = the whole model; depth = only the final norm and head)."""
        if not self.ok:
            return None
        m = _BLOCK.match(site_name)
        if m:
            return int(m.group(1))
        if site_name.startswith(("patch_embed", "cls_token", "pos_embed", "norm_pre")):
            return None
        return self.depth

    def run(self, index: int, start: int | None) -> Tensor:
        """Logits of batch `index`, recomputed from block `start` (None: from the image)."""
        if start is None or not self.ok or not self.inputs:
            return self.model(self.batches[index])
        x = self.inputs[index][start]
        for blk in self.model.blocks[start:]:
            x = blk(x)
        return self.model.forward_head(self.model.norm(x))
