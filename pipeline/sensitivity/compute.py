"""Per-site sensitivity scores of a calibrated SiteGraph.

Every score estimates how much the task loss (cross-entropy with the labels, nats) or the
logit KL vs FP32 (nats) grows when ONE site is quantized at a width `b`, everything else FP32.

- `hessian`: second-order, from Hutchinson traces (double backward through the FP32 model
  with the task loss on calibration batches; one joint Rademacher HVP per sample estimates
  every site's block trace at once):
    weights: Omega(b) = sum_i diag(H_W)_i * (Q_b(W) - W)_i^2 (Q_b(W): the effective weight the
             quantized model uses, per-channel folding included; diag from E[v * Hv]). HAWQ-V2's
             Tr(H_W)/n * ||Q_b(W) - W||^2 is this with a flat diagonal; a folded weight is far from
             flat: a column whose input channel has a large scale s_c has error ~ step / s_c and
             curvature ~ s_c^2, so the average trace overrates it (fc2 after per-channel GELU ranges:
             ~10x on the reference ViT);
    activations: the same quantity with the expected noise energy spread per channel,
             Omega(b) = sum_c diag(H)_c * step_c(b)^2 / 12  (diag summed per channel, from
             E[v * Hv]; = Tr(H)/n * E||Q_b(a) - a||^2 for a per-tensor scale); log2 (softmax)
             sites: sum_i diag(H)_i * e_b(x_i)^2, e_b(x)^2 = x^2 (ln 2)^2 / 12 * 4^-frac_bits
             (relative rounding in the log domain) where the grid keeps x, x^2 where width b
             flushes it to zero (x < 2^-((2^b - 1/2) * 2^-frac_bits)): more bits add range.
  The expected loss increase is about Omega / 2.
- `noise_kl`, `noise_loss`: noise injection. Noise with the variance of the site's rounding
  noise at `noise_bits` (uniform U(-step/2, step/2), or Gaussian with variance step^2/12, with
  the per-channel calibrated step) is added to one site at a time on fixed batches; the
  increase of the task loss and the logit KL vs FP32 are measured. Weights get the same with
  the effective weight's per-element step. log2 sites get multiplicative noise 2^u,
  u ~ U(-1/2, 1/2). Other widths are extrapolated by the ratio of mean squared steps (the
  rounding-noise variance; for weights the ratio of ||Q_b(W) - W||^2; for log2 sites the ratio
  of sum e_b(x)^2 over the noise batches, as above), exact to first order.
- `isolated_kl`, `isolated_loss`, `isolated_agreement`: the site really quantized alone (the
  profiler's isolated mode) on the same batches, at every width it can take (clipping included:
  a range that clips at 8 bits clips at 16 too). At `noise_bits` it is the reference the other
  methods are ranked against.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.profile.collect import SuffixRunner
from pipeline.profile.metrics import argmax_agreement, logit_kl
from pipeline.quant.calibration import CalibState, bind, bind_activation, quantize_weight
from pipeline.quant.recipe import SiteSpec
from pipeline.quant.sites import Site, SiteGraph, divide_by_storage_factor, storage_factor
from pipeline.sensitivity.hutchinson import hutchinson_trace
from pipeline.sensitivity.probe import replace_forward, replace_weight, weight_of

log = logging.getLogger(__name__)

LOG2_NOISE = math.log(2) ** 2 / 12  # E[(u ln 2)^2], u ~ U(-1/2, 1/2): relative noise energy of log2 rounding (frac_bits 0)


def log2_flush_point(bits: int, frac_bits: int) -> float:
    """The probability below which the log2 quantizer at `bits` outputs 0: its rounded code
    round(-log2 p * 2^frac_bits) passes 2^bits - 1, i.e. p < 2^-((2^bits - 1/2) / 2^frac_bits)."""
    return 2.0 ** -((2**bits - 0.5) * 2.0**-frac_bits)


def log2_error_sq(x: Tensor, bits: int, frac_bits: int) -> Tensor:
    """Expected squared error (x's shape) of the log2 quantizer at `bits` on probabilities x: the rounding
    noise x^2 * LOG2_NOISE * 4^-frac_bits where the grid keeps x, x^2 where it flushes x to zero."""
    x2 = x.square()
    return torch.where(x < log2_flush_point(bits, frac_bits), x2, x2 * (LOG2_NOISE * 4.0**-frac_bits))
METHODS = ("noise_kl", "noise_loss", "hessian", "isolated_kl", "isolated_loss")


@dataclass
class SensitivitySettings:
    hutchinson_iters: int = 50
    hutchinson_tol: float = 0.01
    hutchinson_min_iters: int = 8
    activation_hessian: bool = True
    noise_bits: int = 8
    noise: str = "uniform"
    noise_clip: bool = False
    weights: bool = True
    isolated: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "SensitivitySettings":
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


def scoreable(graph: SiteGraph, specs: Mapping[str, SiteSpec]) -> list[str]:
    """Sites with a width to choose: enabled uniform or log2 sites (int_softmax depends on its scores site)."""
    return [n for n in graph.names() if specs[n].enabled and specs[n].quantizer in ("uniform", "log2")]


def act_widths(state: CalibState, name: str, spec: SiteSpec, wanted: Sequence[int]) -> list[int]:
    """Widths an activation site can take: calibrated ones (uniform) or any wanted one (log2: no qparams)."""
    if spec.quantizer == "log2":
        return sorted(set(wanted))
    return list(state.index["sites"].get(name, {}).get("bits", []))


class SensitivityProbe:
    """Holds the FP32 SiteGraph (all sites `fp`), the recipe's weights per width, and fixed batches."""

    def __init__(self, graph: SiteGraph, specs: Mapping[str, SiteSpec], state: CalibState, weight_widths: Sequence[int], act_wanted: Sequence[int], device: torch.device):
        self.graph, self.specs, self.state, self.device = graph, dict(specs), state, device
        self.names = scoreable(graph, specs)
        self.weights = [n for n in self.names if graph[n].role == "weight"]
        self.acts = [n for n in self.names if graph[n].role != "weight"]
        # Effective weights Q_b(W) at every width, folded with the producers' recipe-width scales.
        graph.to(device)
        bind(graph, specs, state)
        self.qweights: dict[str, dict[int, Tensor]] = {}
        self.wgrids: dict[str, dict[int, tuple[Tensor, Tensor]]] = {}  # (scale, zero point) of the stored weight per width
        self.folds: dict[str, Tensor | None] = {}
        for name in self.weights:
            module = graph.module(name.rsplit(".", 1)[0])
            fold = graph.fold_scale(name.rsplit(".", 1)[0])
            self.folds[name] = None if fold is None else fold.detach().clone()
            self.qweights[name], self.wgrids[name] = {}, {}
            for b in sorted(set(weight_widths) | {specs[name].bits}):
                scale, zero_point = quantize_weight(graph, name, specs[name], b, state)
                self.qweights[name][b] = module.qweight.detach().clone()
                self.wgrids[name][b] = (scale.detach().clone(), zero_point.detach().clone())
        self.act_bits = {n: act_widths(state, n, specs[n], act_wanted) for n in self.acts}
        self.log2_energy: dict[str, dict[int, float]] = {}  # log2 sites: sum of e_b(x)^2 per width over the noise batches
        graph.set_mode("fp")
        for name in self.weights:
            graph.module(name.rsplit(".", 1)[0]).qweight = None

    # -- per-site noise models -------------------------------------------------------------
    def weight_error_energy(self, name: str, b: int) -> float:
        w = weight_of(self.graph, name).detach()
        return float((self.qweights[name][b] - w).double().square().sum())

    def act_step_sq(self, name: str, b: int) -> Tensor:
        """step^2 per channel (or one element) of a uniform activation site at width b."""
        scale, _ = self.state.qparams(name, b)
        return scale.double().square()

    def noise_factor(self, name: str, b: int, nb: int) -> float:
        """Rounding-noise energy at width b relative to width nb (for extrapolating noise scores)."""
        site = self.graph[name]
        if site.role == "weight":
            base = self.weight_error_energy(name, nb)
            return self.weight_error_energy(name, b) / base if base > 0 else 0.0
        if self.specs[name].quantizer == "log2":
            energy = self.log2_energy.get(name, {})
            return energy[b] / energy[nb] if energy.get(nb) and b in energy else 1.0
        return float(self.act_step_sq(name, b).mean() / self.act_step_sq(name, nb).mean().clamp_min(1e-300))


def _broadcast(t: Tensor, x: Tensor, axis: int) -> Tensor:
    if t.numel() == 1:
        return t.reshape(()).to(x.device, x.dtype)
    shape = [1] * x.dim()
    shape[axis] = -1
    return t.reshape(shape).to(x.device, x.dtype)


def _unit_noise(shape: torch.Size, kind: str, gen: torch.Generator) -> Tensor:
    if kind == "uniform":
        return torch.rand(shape, generator=gen) - 0.5
    if kind == "gaussian":
        return torch.randn(shape, generator=gen) * (1 / 12) ** 0.5
    raise ValueError(f"unknown noise '{kind}' (uniform or gaussian)")


def act_noise_fn(probe: SensitivityProbe, name: str, b: int, settings: SensitivitySettings, gen: torch.Generator):
    """x -> x + rounding-like noise of site `name` at width b (the site's FP32 input is x)."""
    site: Site = probe.graph[name]
    spec = probe.specs[name]
    if spec.quantizer == "log2":
        step = 2.0**-spec.frac_bits  # the log2 grid's step (frac_bits fractional exponent bits)

        energy = probe.log2_energy.setdefault(name, {})

        def log2_noise(x: Tensor) -> Tensor:
            for width in probe.act_bits[name]:  # for extrapolating the score from width b to the others
                energy[width] = energy.get(width, 0.0) + float(log2_error_sq(x.double(), width, spec.frac_bits).sum())
            u = _unit_noise(x.shape, settings.noise, gen).to(x.device, x.dtype)
            y = x * torch.exp2(u * step)
            if settings.noise_clip:
                y = y.masked_fill(x < log2_flush_point(b, spec.frac_bits), 0.0).clamp_max(1.0)
            return y
        return log2_noise
    scale, zp = probe.state.qparams(name, b)
    from pipeline.quant.quantizers import qrange

    qmin, qmax = qrange(b, spec.signed)

    def uniform_noise(x: Tensor) -> Tensor:
        step = _broadcast(scale.float(), x, site.axis)
        y = x + _unit_noise(x.shape, settings.noise, gen).to(x.device, x.dtype) * step
        if settings.noise_clip:
            z = _broadcast(zp.float(), x, site.axis)
            y = torch.maximum(torch.minimum(y, (qmax - z) * step), (qmin - z) * step)
        return y
    return uniform_noise


def weight_noise(probe: SensitivityProbe, name: str, b: int, settings: SensitivitySettings, gen: torch.Generator) -> Tensor:
    """W + noise with the effective weight's per-element step at width b: step_c (per output channel), / s_j when folded.

    With `noise_clip` the result is clamped to the grid's range [(qmin - zp) * step, (qmax - zp) * step] of the
    stored weight, mapped back into W's space like the step (a range search that clips, clips here too).
    """
    from pipeline.quant.quantizers import qrange

    w = weight_of(probe.graph, name).detach()
    per_row = lambda t: t.float().to(w.device).reshape(-1, *([1] * (w.dim() - 1))) if t.numel() > 1 else t.float().to(w.device).reshape(())  # noqa: E731
    scale, zero_point = (per_row(t) for t in probe.wgrids[name][b])
    factor = storage_factor(w, probe.folds[name], probe.graph.output_scale(name.rsplit(".", 1)[0]))
    step = divide_by_storage_factor(scale, factor)  # steps of the stored weight diag(gamma)·W·diag(s), in W's space
    noisy = w + _unit_noise(w.shape, settings.noise, gen).to(w.device) * step
    if settings.noise_clip:
        qmin, qmax = qrange(b, probe.specs[name].signed)
        low, high = (divide_by_storage_factor((q - zero_point) * scale, factor) for q in (qmin, qmax))
        noisy = torch.maximum(torch.minimum(noisy, torch.maximum(low, high)), torch.minimum(low, high))  # a negative LayerScale row swaps the ends
    return noisy


# -- passes ------------------------------------------------------------------------------------


def _site_gen(seed: int, index: int) -> torch.Generator:
    """The noise generator of the index-th site: any integer seed (reduced into the generator's 64-bit range)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % 2**63)


@torch.inference_mode()
def output_change(runner: SuffixRunner, start: int | None, fp_logits: list[Tensor], labels: list[Tensor], fp_loss: float) -> dict[str, float]:
    logits = torch.cat([runner.run(i, start).float().cpu() for i in range(len(runner.batches))])
    ref = torch.cat(fp_logits)
    y = torch.cat(labels)
    return {
        "kl": logit_kl(ref, logits),
        "loss": F.cross_entropy(logits.double(), y).item() - fp_loss,
        "agreement": argmax_agreement(ref, logits),
    }


def noise_injection(probe: SensitivityProbe, runner: SuffixRunner, fp_logits: list[Tensor], labels: list[Tensor], settings: SensitivitySettings, names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """{site: {kl, loss, agreement}} with noise of width `noise_bits` at one site at a time."""
    fp_loss = F.cross_entropy(torch.cat(fp_logits).double(), torch.cat(labels)).item()
    out: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    nb = settings.noise_bits
    for index, name in enumerate(tqdm(names if names is not None else probe.names, desc="noise injection", unit="site", leave=False)):
        site = probe.graph[name]
        gen = _site_gen(settings.seed, index)
        start = runner.start(name)
        if site.role == "weight":
            if not settings.weights:
                continue
            with replace_weight(probe.graph, name, weight_noise(probe, name, nb, settings, gen)):
                out[name] = output_change(runner, start, fp_logits, labels, fp_loss)
        else:
            if nb not in probe.act_bits[name]:
                skipped.append(name)
                continue
            with replace_forward(site, act_noise_fn(probe, name, nb, settings, gen)):
                out[name] = output_change(runner, start, fp_logits, labels, fp_loss)
    if skipped:
        log.warning("noise scores: %d activation sites were not calibrated at sensitivity.noise_bits=%d (e.g. %s): add it to quant.candidate_bits to score them", len(skipped), nb, skipped[0])
    return out


def isolated_quantization(probe: SensitivityProbe, runner: SuffixRunner, fp_logits: list[Tensor], labels: list[Tensor], bits: int, names: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """{site: {kl, loss, agreement}} with one site really quantized at `bits` (everything else FP32)."""
    fp_loss = F.cross_entropy(torch.cat(fp_logits).double(), torch.cat(labels)).item()
    out: dict[str, dict[str, float]] = {}
    for name in tqdm(names if names is not None else probe.names, desc="isolated quantization", unit="site", leave=False):
        site = probe.graph[name]
        spec = probe.specs[name]
        start = runner.start(name)
        if site.role == "weight":
            if bits not in probe.qweights[name]:
                continue
            with replace_weight(probe.graph, name, probe.qweights[name][bits]):
                out[name] = output_change(runner, start, fp_logits, labels, fp_loss)
            continue
        if bits not in probe.act_bits[name]:
            continue
        bind_activation(site, spec, bits, probe.state)
        try:
            out[name] = output_change(runner, start, fp_logits, labels, fp_loss)
        finally:
            site.mode = "fp"
    return out


def hessian_traces(probe: SensitivityProbe, batches: list[Tensor], labels: list[Tensor], settings: SensitivitySettings) -> dict[str, Any]:
    """Hutchinson over every weight site's parameter and (optionally) every activation site, averaged over the
    images of `batches` (each batch weighs by its size: a short last batch counts for its images only).

    Returns {"weights": {site: {"trace", "stderr", "diag" (sum diag * (Q_b(W) - W)^2 per width of `probe.qweights`)}},
    "acts": {site: {"trace", "stderr", "diag" (per channel, (1,), or for log2 sites sum diag * e_b(x)^2 per width of
    `probe.act_bits`)}}, where "stderr" is the standard error of "trace" (from the spread of the Hutchinson
    samples; the stopping rule watches only the total trace, so a small site's estimate can stay noisy),
    "iters": [...], "converged": [...], "seconds": s}.
    """
    graph, device = probe.graph, probe.device
    t0 = time.perf_counter()
    model = graph.model
    saved = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    wparams = [weight_of(graph, n) for n in probe.weights]
    for p in wparams:
        p.requires_grad_(True)
    # weights: sum diag(H) * (Q_b(W) - W)^2 per width, elementwise (a fold makes the error and H uneven across columns)
    wreducers = [error_weighted_sum(torch.stack([(probe.qweights[n][b] - p.detach()).square() for b in sorted(probe.qweights[n])])) for n, p in zip(probe.weights, wparams)]
    acc_w: dict[str, dict[str, Tensor | float]] = {}
    acc_a: dict[str, dict[str, Tensor | float]] = {}
    iters, converged = [], []
    gen = torch.Generator().manual_seed((settings.seed + 7) % 2**63)
    images_in_all = sum(int(b.shape[0]) for b in batches)
    try:
        for images, y in zip(batches, labels):
            images, y = images.to(device), y.to(device)
            acts, deltas, reducers = _activation_perturbations(probe, images, settings.activation_hessian)
            if not wparams and not deltas:  # no weight sites and no activation Hessian: nothing to differentiate
                break
            with contextlib.ExitStack() as stack:  # each activation site outputs x + δ, δ = 0 with a gradient
                for n, d in zip(acts, deltas):
                    stack.enter_context(replace_forward(graph[n], lambda x, d=d: x + d))
                result = hutchinson_trace(
                    lambda: F.cross_entropy(model(images), y),
                    [*wparams, *deltas],
                    iters=settings.hutchinson_iters,
                    tol=settings.hutchinson_tol,
                    generator=gen,
                    min_iters=settings.hutchinson_min_iters,
                    diag_reduce=wreducers + reducers,
                )
            iters.append(result.iters)
            converged.append(result.converged)
            w = len(wparams)
            share = int(images.shape[0]) / images_in_all  # each batch's loss is a mean over its images: pool by image
            for acc, names, part in ((acc_w, probe.weights, slice(0, w)), (acc_a, acts, slice(w, None))):
                for n, t, se, d in zip(names, result.traces[part], result.stderr[part], result.diag[part]):
                    entry = acc.setdefault(n, {"trace": 0.0, "var": 0.0, "diag": torch.zeros_like(d, dtype=torch.float64, device="cpu")})
                    entry["trace"] += t * share
                    entry["var"] += (se * share) ** 2  # batches are independent draws
                    entry["diag"] = entry["diag"] + d.double().cpu() * share
            del deltas, reducers, result
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        graph.set_tap(None)
    for entry in (*acc_w.values(), *acc_a.values()):
        entry["stderr"] = entry.pop("var") ** 0.5
    return {"weights": acc_w, "acts": acc_a, "iters": iters, "converged": converged, "seconds": time.perf_counter() - t0}


def _activation_perturbations(probe: SensitivityProbe, images: Tensor, enabled: bool) -> tuple[list[str], list[Tensor], list[Callable[[Tensor], Tensor]]]:
    """(sites, δ, reducers) for the activation Hessian on one batch (empty when not `enabled`).

    δ is a zero tensor (requires grad) of the site's output shape on `images`; the reducer turns
    Hutchinson's diagonal estimate of that δ into the site's figure: a sum per channel for
    channelwise sites, one sum for per-tensor sites, and for log2 sites Σ diag·e_b(x)² per width
    (`log2_error_sq`: their error scales with the value, and a narrow grid flushes small ones to zero).
    """
    graph = probe.graph
    acts = probe.acts if enabled else []
    log2 = {n for n in acts if probe.specs[n].quantizer == "log2"}
    seen: dict[str, Tensor | torch.Size] = {}  # shapes, and for log2 sites the values
    graph.set_tap(lambda s, x, out: seen.__setitem__(s.name, x.detach() if s.name in log2 else x.shape), acts)
    try:
        with torch.no_grad():
            graph.model(images)
    finally:
        graph.set_tap(None, acts)
    acts = [n for n in acts if n in seen]
    deltas = [torch.zeros(seen[n].shape if n in log2 else seen[n], device=images.device, requires_grad=True) for n in acts]
    reducers: list[Callable[[Tensor], Tensor]] = []
    for n in acts:
        if n in log2:  # one figure per width: sum diag * e_b(x)^2
            reducers.append(error_weighted_sum(torch.stack([log2_error_sq(seen[n], b, probe.specs[n].frac_bits) for b in probe.act_bits[n]])))
        elif probe.specs[n].channelwise:
            reducers.append(lambda p, axis=graph[n].axis: p.movedim(axis, -1).reshape(-1, p.shape[axis]).sum(0))
        else:
            reducers.append(lambda p: p.sum().reshape(1))
    return acts, deltas, reducers


def error_weighted_sum(errors_sq: Tensor) -> Callable[[Tensor], Tensor]:
    """Hutchinson reducer: diag estimate (shape S) -> sum diag * errors_sq per width ((widths, *S) -> (widths,))."""
    return lambda diag: (errors_sq * diag).flatten(1).sum(1)


def hessian_scores(probe: SensitivityProbe, traces: Mapping[str, Any]) -> dict[str, dict[int, float]]:
    """Omega(b) per site and width (see the module docstring)."""
    out: dict[str, dict[int, float]] = {}
    for name, entry in traces["weights"].items():  # diag holds sum diag(H) * (Q_b(W) - W)^2, one entry per width
        out[name] = {b: float(entry["diag"][i]) for i, b in enumerate(sorted(probe.qweights[name]))}
    for name, entry in traces["acts"].items():
        diag = entry["diag"]
        if probe.specs[name].quantizer == "log2":  # diag holds sum diag(H) * e_b(x)^2, one entry per width
            out[name] = {b: float(diag[i]) for i, b in enumerate(probe.act_bits[name])}
            continue
        scores = {}
        for b in probe.act_bits[name]:
            step_sq = probe.act_step_sq(name, b)
            scores[b] = float((diag * step_sq).sum() / 12) if diag.numel() == step_sq.numel() else float(diag.sum() * step_sq.mean() / 12)
        out[name] = scores
    return out


# -- ranking statistics --------------------------------------------------------------------------


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation of paired values (None with fewer than 3 pairs or a constant side)."""
    if len(a) < 3:
        return None
    from scipy.stats import spearmanr

    rho = spearmanr(a, b).statistic
    return None if rho is None or not math.isfinite(float(rho)) else float(rho)


def top_k(values: Mapping[str, float], k: int) -> list[str]:
    return [n for n, _ in sorted(values.items(), key=lambda kv: -kv[1])[:k]]
