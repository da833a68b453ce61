"""Run the FP32 and the quantized site graphs side by side and compare every site.

Both graphs see the same images; a tap records each site's output for the
current batch, so memory holds one batch of site tensors at a time.

`SuffixRunner` re-runs only the part of a model after one site (the profiler's isolated
mode, sensitivity's perturbations): it caches the input of every transformer block once,
so a change at a site of block i re-runs blocks i..L-1, the final norm and the head.
Sites before block 0 (patch embedding) run the whole model.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from pipeline.quant.sites import Site, SiteGraph

STEM_PREFIXES = ("patch_embed", "cls_token", "pos_embed", "norm_pre")
"""Sites outside blocks whose names start so run before block 0 (everything else outside blocks runs after)."""


class BatchRecorder:
    """A site tap that keeps the latest output of each site (detached)."""

    def __init__(self) -> None:
        self.outputs: dict[str, torch.Tensor] = {}

    def __call__(self, site: Site, x: torch.Tensor, y: torch.Tensor) -> None:
        self.outputs[site.name] = y.detach()


def first_images(loader: Iterable, n: int) -> Iterator[torch.Tensor]:
    """Yield image batches until `n` images have been yielded (the last batch is cut)."""
    seen = 0
    for images, _ in loader:
        if seen >= n:
            return
        take = min(n - seen, images.shape[0])
        seen += take
        yield images[:take]


@torch.inference_mode()
def paired_outputs(fp: SiteGraph, quant: SiteGraph, batches: Iterable[torch.Tensor], device: torch.device) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, torch.Tensor]]:
    """Per batch: (fp site outputs, quantized site outputs, fp logits, quantized logits).

    `fp` runs in `fp` mode (explicit attention path, no quantization); `quant` keeps its modes.
    """
    fp.set_mode("fp")
    rec_fp, rec_q = BatchRecorder(), BatchRecorder()
    fp.set_tap(rec_fp)
    quant.set_tap(rec_q)
    try:
        for images in batches:
            images = images.to(device)
            logits_fp = fp.model(images)
            logits_q = quant.model(images)
            yield rec_fp.outputs, rec_q.outputs, logits_fp, logits_q
            rec_fp.outputs, rec_q.outputs = {}, {}
    finally:
        fp.set_tap(None)
        quant.set_tap(None)


def site_sqnr(fp: SiteGraph, quant: SiteGraph, batches: Iterable[torch.Tensor], device: torch.device) -> dict[str, float]:
    """Cumulative SQNR (dB) of every quantized site's output vs the FP32 model's same site."""
    energy = _ErrorEnergy()
    for ref, test, _, _ in paired_outputs(fp, quant, batches, device):
        for name, y in test.items():
            if quant[name].mode == "quant":
                energy.add(name, ref[name], y)
    return energy.sqnr_db()


class _ErrorEnergy:
    """Per-site sums of the reference's energy and of the error's energy (float64), then SQNR (dB)."""

    def __init__(self) -> None:
        self.signal: dict[str, torch.Tensor] = {}
        self.noise: dict[str, torch.Tensor] = {}

    def add(self, name: str, ref: torch.Tensor, test: torch.Tensor) -> None:
        r = ref.double()
        self.signal[name] = self.signal.get(name, 0) + r.square().sum()
        self.noise[name] = self.noise.get(name, 0) + (r - test.double()).square().sum()

    def sqnr_db(self) -> dict[str, float]:
        return {name: _db(self.signal[name], self.noise[name]) for name in self.signal}


def _db(signal: torch.Tensor, noise: torch.Tensor) -> float:
    if float(noise) == 0.0:
        return float("inf")
    if float(signal) == 0.0:
        return float("-inf")
    return float(10 * torch.log10(signal / noise))


class _OwnErrorTap(_ErrorEnergy):
    """A site tap that sums each quantized site's input energy and the energy of its own error (y - x)."""

    def __call__(self, site: Site, x: torch.Tensor, y: torch.Tensor) -> None:
        if site.mode == "quant":
            self.add(site.name, x, y)


@torch.inference_mode()
def quantizer_sqnr(quant: SiteGraph, batches: Iterable[torch.Tensor], device: torch.device) -> dict[str, float]:
    """SQNR (dB) of every quantized site's own quantizer: its output vs its input, in the quantized model.

    Unlike `site_sqnr` (vs the FP32 model), upstream error does not count: this is the figure of
    the site's range and granularity choice on the data it really sees.
    """
    tap = _OwnErrorTap()
    quant.set_tap(tap)
    try:
        for images in batches:
            quant.model(images.to(device))
    finally:
        quant.set_tap(None)
    return tap.sqnr_db()


class SuffixRunner:
    """Logits of `graph.model` on fixed `batches`, starting at the block a site belongs to.

    The cached block inputs are those of the graph's state when `cache()` ran (all sites in
    `fp` mode, for sensitivity and the profiler's isolated mode): perturbing a site at block i leaves the inputs of blocks
    0..i unchanged, so re-running from block i gives the same logits as a full forward.
    Models without the timm VisionTransformer layout (`blocks`, `norm`, `forward_head`)
    always run the full forward.
    """

    def __init__(self, graph: SiteGraph, batches: list[torch.Tensor], device: torch.device):
        self.graph = graph
        self.model = graph.model
        self.batches = [b.to(device) for b in batches]
        self.device = device
        self.depth = len(getattr(self.model, "blocks", []))
        self.ok = self.depth > 0 and hasattr(self.model, "norm") and hasattr(self.model, "forward_head")
        self.inputs: list[list[torch.Tensor]] = []

    @torch.inference_mode()
    def cache(self) -> list[torch.Tensor]:
        """Run every batch once, recording each block's input and the final norm's input; returns the logits."""
        self.inputs = []
        logits = []
        for x in self.batches:
            seen: list[torch.Tensor] = []
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
        block = self.graph[site_name].block
        if block is not None:
            return block
        if site_name.startswith(STEM_PREFIXES):
            return None
        return self.depth

    def run(self, index: int, start: int | None) -> torch.Tensor:
        """Logits of batch `index`, recomputed from block `start` (None: from the image)."""
        if start is None or not self.ok or not self.inputs:
            return self.model(self.batches[index])
        x = self.inputs[index][start]
        for blk in self.model.blocks[start:]:
            x = blk(x)
        return self.model.forward_head(self.model.norm(x))
