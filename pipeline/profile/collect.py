"""Run the FP32 and the quantized site graphs side by side and compare every site.

Both graphs see the same images, in lockstep: the FP32 model runs one piece (the stem,
one transformer block, or the final norm and head; `forward_segments`), then the quantized
model runs the same piece, and so on. A tap records each FP32 site's output of the current
piece, so memory holds one block's FP32 site tensors at a time (not a whole model's), and
they are still in cache when the quantized block compares with them.

`SuffixRunner` re-runs only the part of a model after one site (the profiler's isolated
mode, sensitivity's perturbations): it caches the input of every transformer block once,
so a change at a site of block i re-runs blocks i..L-1, the final norm and the head.
Sites before block 0 (patch embedding) run the whole model.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from pipeline.profile.metrics import sqnr_from_energy
from pipeline.quant.sites import Site, SiteGraph

STEM_PREFIXES = ("patch_embed", "cls_token", "pos_embed", "norm_pre")
"""Sites outside blocks whose names start so run before block 0 (everything else outside blocks runs after)."""

Segment = Callable[[torch.Tensor], torch.Tensor]


class BatchRecorder:
    """A site tap that keeps the latest output of each site (detached) until `take()`."""

    def __init__(self) -> None:
        self.outputs: dict[str, torch.Tensor] = {}

    def __call__(self, site: Site, x: torch.Tensor, y: torch.Tensor) -> None:
        self.outputs[site.name] = y.detach()

    def take(self) -> dict[str, torch.Tensor]:
        """The outputs recorded since the last call (and forget them)."""
        out, self.outputs = self.outputs, {}
        return out


def first_images(loader: Iterable, n: int) -> Iterator[torch.Tensor]:
    """Yield image batches until `n` images have been yielded (the last batch is cut; no batch is read past it)."""
    seen = 0
    if n <= 0:
        return
    for images, _ in loader:
        take = min(n - seen, images.shape[0])
        seen += take
        yield images[:take]
        if seen >= n:
            return


def forward_segments(model: nn.Module) -> list[Segment]:
    """`model`'s forward as consecutive pieces whose composition is exactly `model(x)`.

    A timm VisionTransformer (or DeiT, distilled or not) that keeps timm's own `forward` and
    `forward_features`: the stem (patch embedding, position embedding, patch dropout, pre-norm),
    each block, then the final norm and the head (pooling included). Any other model: one piece,
    the whole forward.
    """
    from timm.models.vision_transformer import VisionTransformer

    cls = type(model)
    timm_layout = isinstance(model, VisionTransformer) and cls.forward is VisionTransformer.forward and cls.forward_features is VisionTransformer.forward_features
    if not timm_layout or model.grad_checkpointing:
        return [model]

    def stem(x: torch.Tensor) -> torch.Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    def head(x: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.norm(x))

    return [stem, *model.blocks, head]


@torch.inference_mode()
def lockstep(fp: SiteGraph, quant: SiteGraph, images: torch.Tensor, between: Callable[[], None] | None = None, after: Callable[[], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(FP32 logits, quantized logits) of one batch, the two graphs run piece by piece in turn.

    After each FP32 piece, `between()` runs (a tap hands that piece's FP32 site tensors over),
    then the quantized piece, then `after()`. `fp` runs in its current modes (`fp` for a reference).
    """
    x_fp = x_q = images
    for piece_fp, piece_q in zip(forward_segments(fp.model), forward_segments(quant.model), strict=True):
        x_fp = piece_fp(x_fp)
        if between is not None:
            between()
        x_q = piece_q(x_q)
        if after is not None:
            after()
    return x_fp, x_q


def site_sqnr(fp: SiteGraph, quant: SiteGraph, batches: Iterable[torch.Tensor], device: torch.device) -> dict[str, float]:
    """Cumulative SQNR (dB) of every quantized site's output vs the FP32 model's same site."""
    energy = _ErrorEnergy()
    rec_fp, rec_q = BatchRecorder(), BatchRecorder()

    def compare() -> None:
        ref = rec_fp.take()
        for name, y in rec_q.take().items():
            if quant[name].mode == "quant":
                energy.add(name, ref[name], y)

    fp.set_mode("fp")
    fp.set_tap(rec_fp)
    quant.set_tap(rec_q)
    try:
        for images in batches:
            lockstep(fp, quant, images.to(device), after=compare)
    finally:
        fp.set_tap(None)
        quant.set_tap(None)
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
    return sqnr_from_energy(float(signal), float(noise))


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
