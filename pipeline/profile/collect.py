"""Run the FP32 and the quantized site graphs side by side and compare every site.

Both graphs see the same images; a tap records each site's output for the
current batch, so memory holds one batch of site tensors at a time.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from pipeline.quant.sites import Site, SiteGraph


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
    signal: dict[str, torch.Tensor] = {}
    noise: dict[str, torch.Tensor] = {}
    for ref, test, _, _ in paired_outputs(fp, quant, batches, device):
        for name, y in test.items():
            if quant[name].mode != "quant":
                continue
            r = ref[name].double()
            signal[name] = signal.get(name, 0) + r.square().sum()
            noise[name] = noise.get(name, 0) + (r - y.double()).square().sum()
    return {name: _db(signal[name], noise[name]) for name in signal}


def _db(signal: torch.Tensor, noise: torch.Tensor) -> float:
    if float(noise) == 0.0:
        return float("inf")
    if float(signal) == 0.0:
        return float("-inf")
    return float(10 * torch.log10(signal / noise))


class _OwnErrorTap:
    """A site tap that sums each site's input energy and the energy of its own quantization error (y - x)."""

    def __init__(self) -> None:
        self.signal: dict[str, torch.Tensor] = {}
        self.noise: dict[str, torch.Tensor] = {}

    def __call__(self, site: Site, x: torch.Tensor, y: torch.Tensor) -> None:
        if site.mode != "quant":
            return
        x64 = x.double()
        self.signal[site.name] = self.signal.get(site.name, 0) + x64.square().sum()
        self.noise[site.name] = self.noise.get(site.name, 0) + (x64 - y.double()).square().sum()


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
    return {name: _db(tap.signal[name], tap.noise[name]) for name in tap.signal}
