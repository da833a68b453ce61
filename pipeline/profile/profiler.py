"""Profiling passes over a quantized SiteGraph, and the `evaluate` entry point `profile_run`.

Modes (each row of a table says which):

- `cumulative`: the whole model quantized; every site's output is compared with the
  FP32 model's same site (the two graphs run block by block in lockstep, `collect.lockstep`,
  and the FP32 site tensors of one block are held until the quantized block has used them).
  Codes and saturation come from the tensor that entered the quantized site, with that
  site's qparams.
- `isolated` (opt-in, one pass per site): only this site quantized, everything else
  FP32; measured at the site (its input is then the FP32 tensor) and at the model
  output (logit SQNR, argmax agreement, logit KL vs the FP32 logits).
- weights: the stored (folded) weight vs its dequantized codes, no data pass (role
  `weight`, listed with the cumulative rows; see `weight_pass`).

The model logits get the same metrics (top-1/top-5 agreement, logit KL) as `output`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Iterable, Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from pipeline.profile.codes import CodePlan, code_counts, code_index, code_plan, code_source, column_values, count_axis, is_log2
from pipeline.profile.collect import BatchRecorder, SuffixRunner, first_images, lockstep
from pipeline.profile.dump import Capture
from pipeline.profile.stats import ROW_SAMPLES_PER_IMAGE, WEIGHT_HIST_SAMPLES, HistGrid, SiteStats, Workspace
from pipeline.quant.sites import Site, SiteGraph, stored_weight

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """One profiling pass: rows (one per site, site description + metrics), logits metrics, histograms, captures.

    A cumulative pass also keeps the logits of each batch: `fp_logits` (FP32 model, for an isolated
    pass) and `logits` (quantized model, for evaluate's own metrics), (batch, classes) each.
    """

    mode: str
    rows: list[dict[str, Any]]
    output: dict[str, Any] = field(default_factory=dict)
    histograms: dict[str, dict[str, Any]] = field(default_factory=dict)
    captures: dict[str, Capture] = field(default_factory=dict)
    seconds: float = 0.0
    images: int = 0
    fp_logits: list[Tensor] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)


# -- sites ------------------------------------------------------------------------------


def token_dim(site: Site) -> int:
    """Dimension along which a site's vectors run for the cosine: channels of the image input, else the last."""
    return 1 if site.role == "linear_in" else -1


def site_info(site: Site, graph: SiteGraph) -> dict[str, Any]:
    """Name, role, block, quantizer, bits, range and the qparams in use (min/max over channels)."""
    info: dict[str, Any] = {
        "site": site.name,
        "role": site.role,
        "block": site.block,
        "quantizer": site.spec.quantizer,
        "bits": site.bits,
        "granularity": site.granularity,
        "qmin": site.qmin,
        "qmax": site.qmax,
        "scale_min": None,
        "scale_max": None,
        "zero_point_min": None,
        "zero_point_max": None,
        "folded_into": graph.folds.get(site.name) if site.per_channel else None,
    }
    if site.scale is not None:
        scale, zp = site.scale.detach().reshape(-1).cpu(), site.zero_point.detach().reshape(-1).cpu()
        info.update(scale_min=float(scale.min()), scale_max=float(scale.max()), zero_point_min=int(zp.min()), zero_point_max=int(zp.max()))
    return info


def hist_grid(site: Site) -> HistGrid | None:
    """The level grid of a site's value histograms (`stats.HistGrid`); None for a site without one."""
    if site.spec is None:
        return None
    if is_log2(site):
        return HistGrid(log2_frac_bits=site.spec.frac_bits, log2_levels=site.qmax - site.qmin + 1)
    if site.scale is None:
        return None
    steps = site.scale.detach().double().reshape(-1)
    zero_points = site.zero_point.detach().double().reshape(-1)
    lo, hi = ((site.qmin - zero_points) * steps).min(), ((site.qmax - zero_points) * steps).max()
    return HistGrid(step=float(steps.median()), aligned=steps.numel() == 1, lo=float(lo), hi=float(hi))


def activation_sites(graph: SiteGraph) -> list[str]:
    """Quantized activation sites, in forward order."""
    return [n for n, s in graph.sites.items() if s.mode == "quant" and s.role != "weight"]


def weight_sites(graph: SiteGraph) -> list[str]:
    return [n for n, s in graph.sites.items() if s.mode == "quant" and s.role == "weight"]


def observe_codes(stats: SiteStats, site: Site, source: Tensor, plan: SitePlan | None = None, rounded: Tensor | None = None) -> SitePlan:
    """Count one batch of a site's codes from its code source (see `codes.code_source`).

    `rounded`, when given, is the quantizer's own rounding of `source` (Site.fake_quant's
    `on_rounded`); it is clamped in place. Returns the site's plan, to pass back on the next batch.
    """
    plan = plan or site_plan(site, source)
    out = stats.workspace.like(source, torch.int32) if stats.workspace is not None else None
    stats.add_code_index(code_index(plan.codes, source, rounded, out), plan.codes.rows, plan.codes.width, plan.values)
    return plan


def observe_site(stats: SiteStats, site: Site, ref: Tensor, x: Tensor, y: Tensor, plan: SitePlan | None = None, counted: bool = False) -> SitePlan:
    """Add one batch of a quantized site: ref = FP32 tensor, x = tensor entering the site, y = its output.

    `counted`: this batch's codes were already added (by `observe_codes` from the quantizer's rounding).
    Returns the site's plan (constants for its codes and histograms), to pass back on the next batch.
    """
    if not counted:
        plan = observe_codes(stats, site, code_source(site, x, y), plan)
    stats.add_pair(ref, y)
    if site.role == "intSoft":
        stats.add_rows(ref, y, limit=ROW_SAMPLES_PER_IMAGE * ref.shape[0])  # rows per image: the same share at any batch size
    return plan


@dataclass(frozen=True)
class SitePlan:
    """Per-site constants of a pass: the code plan and, when usable, the value of each code column."""

    codes: CodePlan
    values: Tensor | None


def site_plan(site: Site, source: Tensor) -> SitePlan:
    """The plan of `site` for code sources shaped like `source` (per-channel counts when small enough)."""
    plan = code_plan(site, source, count_axis(site, source))
    values = column_values(site, source.device)
    if values.shape[0] not in (1, plan.rows):
        values = None  # per-channel values but whole-tensor counts (too many channels x levels)
    return SitePlan(plan, values)


# -- batches ----------------------------------------------------------------------------


def profile_batches(loader: Iterable, images: int, batch_size: int) -> list[Tensor]:
    """The first `images` images of `loader`, in batches of at most `batch_size` (CPU tensors)."""
    out: list[Tensor] = []
    for batch in first_images(loader, images):
        out.extend(batch.split(max(1, batch_size)))
    return out


# -- taps -------------------------------------------------------------------------------


class _CaptureStore:
    """Keeps the first `samples` samples of chosen sites (CPU copies)."""

    def __init__(self, names: Iterable[str], samples: int):
        self.names, self.samples = set(names), max(1, samples)
        self.captures: dict[str, Capture] = {}

    def offer(self, name: str, fp32: Tensor | None, x: Tensor, y: Tensor) -> None:
        if name not in self.names:
            return
        have = self.captures.get(name)
        if have is not None and have.x.shape[0] >= self.samples:
            return
        cut = lambda t: None if t is None else t[: self.samples].detach().cpu().clone()  # noqa: E731
        new = Capture(cut(fp32), cut(x), cut(y))
        self.captures[name] = new if have is None else have.extend(new, self.samples)


class _StatsTap:
    """Site tap that feeds one SiteStats per site: codes from the quantizer's own rounding, then the output pair.

    `on_rounded` (called by Site.fake_quant before the output is made) counts the codes, so no
    second rounding pass runs; sites without it (int_softmax) are counted from their output.
    The reference tensor is the site's input (everything upstream FP32: isolated mode).
    """

    def __init__(self, stats: dict[str, SiteStats]):
        self.stats = stats
        self.plans: dict[str, SitePlan] = {}
        self._counted: str | None = None  # the site whose codes on_rounded has just counted

    def on_rounded(self, site: Site, x: Tensor, rounded: Tensor) -> None:
        stats = self.stats.get(site.name)
        if stats is not None:
            self.plans[site.name] = observe_codes(stats, site, x, self.plans.get(site.name), rounded)
            self._counted = site.name

    def __call__(self, site: Site, x: Tensor, y: Tensor) -> None:
        stats = self.stats.get(site.name)
        if stats is None:
            return
        counted, self._counted = self._counted == site.name, None
        ref = self.reference(site, x)
        self.plans[site.name] = observe_site(stats, site, ref, x, y, self.plans.get(site.name), counted)
        self.seen(site, ref, x, y)

    def reference(self, site: Site, x: Tensor) -> Tensor:
        return x

    def seen(self, site: Site, ref: Tensor, x: Tensor, y: Tensor) -> None:
        """Called after a site's statistics were added."""


class _CumulativeTap(_StatsTap):
    """Quantized-graph tap: compares each quantized site with the FP32 tensor recorded for the same piece of the forward."""

    def __init__(self, stats: dict[str, SiteStats], store: _CaptureStore, recorder: BatchRecorder):
        super().__init__(stats)
        self.store = store
        self.recorder = recorder  # the FP32 graph's tap
        self.refs: dict[str, Tensor] = {}

    def hand_over(self) -> None:
        """Take the FP32 site tensors recorded so far (one piece of the FP32 forward, `collect.lockstep`)."""
        self.refs = self.recorder.take()

    def reference(self, site: Site, x: Tensor) -> Tensor:
        return self.refs.pop(site.name)  # frees the FP32 tensor as soon as it is used

    def seen(self, site: Site, ref: Tensor, x: Tensor, y: Tensor) -> None:
        self.store.offer(site.name, ref, x, y)


# -- passes -----------------------------------------------------------------------------


@torch.inference_mode()
def weight_pass(graph: SiteGraph, capture: Iterable[str] = ()) -> PassResult:
    """Every quantized weight vs its dequantized codes (no data): rows with role `weight`.

    The site's tensor is the weight the NPU stores (`sites.stored_weight`): W·diag(s) when the
    producing activation has per-channel scales s folded into W's input channels (and a following
    LayerScale folded into its rows), else W. It is compared with the dequantized codes,
    Q(W·diag(s)) = effective weight · diag(s), as an
    activation site's input is compared with its output. (Unfolded, the error of a column
    with a small s is magnified by 1/s, where the input is small by as much: weight space
    would flag what the layer's output never sees.) Vectors for the cosine are output
    channels (rows). Codes are counted from the folded weight's rounding, or, for GPTQ
    weights, read back from the dequantized codes (`codes.codes_from_output`).
    """
    t0 = time.perf_counter()
    store = _CaptureStore(capture, 1)
    rows, hists = [], {}
    for name in weight_sites(graph):
        site = graph[name]
        module = graph.module(name.rsplit(".", 1)[0])
        weight, effective = module.weight.detach(), module.effective_weight().detach()
        path = name.rsplit(".", 1)[0]
        source, dequantized = stored_weight(graph, path, weight), stored_weight(graph, path, effective)
        stats = SiteStats(grid=hist_grid(site))
        codes = code_source(site, source, dequantized)  # GPTQ weights: the stored codes, not the nearest ones
        stats.add_codes(code_counts(site, codes, count_axis(site, codes)))
        stats.add_pair(source.flatten(1), dequantized.flatten(1), limit=WEIGHT_HIST_SAMPLES)  # vectors: output channels
        rows.append({**site_info(site, graph), "mode": "cumulative", **stats.result(site.bits)})
        hists[name] = stats.histograms()
        if name in store.names:
            store.captures[name] = Capture(weight.cpu().clone(), source.cpu().clone(), dequantized.cpu().clone())
    return PassResult("weights", rows, histograms=hists, captures=store.captures, seconds=time.perf_counter() - t0)


@torch.inference_mode()
def cumulative_pass(fp_graph: SiteGraph, graph: SiteGraph, batches: list[Tensor], device: torch.device, capture: Iterable[str] = (), samples: int = 4) -> PassResult:
    """Everything quantized; each site's output vs the FP32 model's same site, over `batches`.

    `fp_graph` is a site graph of the FP32 model (put in `fp` mode here). Returns one row per
    quantized activation site, the logits metrics in `output`, value histograms per site and the
    first `samples` samples of the `capture` sites, and the FP32 and quantized logits of each batch.
    """
    t0 = time.perf_counter()
    names = activation_sites(graph)
    workspace = Workspace()
    stats = {n: SiteStats(token_dim(graph[n]), workspace=workspace, grid=hist_grid(graph[n])) for n in names}
    logits_stats = SiteStats(bins=None)  # few values (images x classes): sqrt-sized bins
    recorder, store = BatchRecorder(), _CaptureStore(capture, samples)
    tap = _CumulativeTap(stats, store, recorder)
    fp_graph.set_mode("fp")
    fp_graph.set_tap(recorder, [n for n in names if n in fp_graph.sites])
    graph.set_tap(tap, names)
    fp_logits: list[Tensor] = []
    q_logits: list[Tensor] = []
    try:
        for images in tqdm(batches, desc="profile (cumulative)", unit="batch", leave=False):
            ref_logits, logits = lockstep(fp_graph, graph, images.to(device), between=tap.hand_over)
            logits_stats.add_pair(ref_logits, logits)
            logits_stats.add_rows(ref_logits, logits, kl=True)
            fp_logits.append(ref_logits)
            q_logits.append(logits)
            tap.refs = {}
    finally:
        fp_graph.set_tap(None)
        graph.set_tap(None)
    rows = [{**site_info(graph[n], graph), "mode": "cumulative", **stats[n].result(graph[n].bits)} for n in names if stats[n].elements]
    hists = {n: stats[n].histograms() for n in names if stats[n].elements}
    images = sum(int(b.shape[0]) for b in batches)
    return PassResult("cumulative", rows, logits_stats.result(), hists, store.captures, time.perf_counter() - t0, images, fp_logits, q_logits)


@torch.inference_mode()
def isolated_pass(graph: SiteGraph, batches: list[Tensor], fp_logits: list[Tensor], device: torch.device, weight_rows: Mapping[str, Mapping[str, Any]] | None = None, names: Iterable[str] | None = None) -> PassResult:
    """Each uniform / log2 site quantized alone (everything else FP32), one pass over `batches` per site.

    At the site the input is the FP32 tensor, so the site metrics are its own error; at the output
    the logits are compared with `fp_logits` (the FP32 logits of the same batches, same explicit
    path): `logit_sqnr_db`, `logit_cos_mean`, `logit_agreement` (argmax), `logit_top5`, `logit_kl`.
    Weight sites reuse their (data-free) metrics from `weight_rows`. int_softmax sites are skipped:
    they need their scores site quantized too. `names` restricts the pass to some sites.

    Everything upstream of the site is FP32, so each block's input is cached once (all sites FP32,
    `collect.SuffixRunner`) and a site of block i re-runs only blocks i..L-1 and the head: about
    half the model on average.
    """
    t0 = time.perf_counter()
    modes = {n: s.mode for n, s in graph.sites.items()}
    candidates = isolated_candidates(graph)
    if names is not None:
        keep = set(names)
        candidates = [n for n in candidates if n in keep]
    rows = []
    try:
        graph.set_mode("fp")
        runner = SuffixRunner(graph, batches, device)
        runner.cache()
        for name in tqdm(candidates, desc="profile (isolated)", unit="site", leave=False):
            graph.set_mode("fp")
            site = graph[name]
            site.mode = "quant"
            rows.append(_isolated_site(graph, site, runner, fp_logits, (weight_rows or {}).get(name)))
    finally:
        graph.set_tap(None)
        for n, mode in modes.items():
            graph.sites[n].mode = mode
    images = sum(int(b.shape[0]) for b in batches)
    return PassResult("isolated", rows, seconds=time.perf_counter() - t0, images=images)


def isolated_candidates(graph: SiteGraph) -> list[str]:
    """Quantized uniform and log2 sites (weights included), in forward order."""
    return [n for n, s in graph.sites.items() if s.mode == "quant" and s.spec.quantizer in ("uniform", "log2")]


def _isolated_site(graph: SiteGraph, site: Site, runner: SuffixRunner, fp_logits: list[Tensor], weight_row: Mapping[str, Any] | None) -> dict[str, Any]:
    """One isolated row: `site` is the only quantized site; `runner` holds the FP32 block inputs."""
    at_site = SiteStats(token_dim(site), grid=hist_grid(site))
    if site.role != "weight":
        site.tap = _StatsTap({site.name: at_site})  # upstream is FP32: the input is the reference
    at_output = SiteStats(bins=None)
    start = runner.start(site.name)
    for index, ref_logits in enumerate(fp_logits):
        logits = runner.run(index, start)
        at_output.add_pair(ref_logits, logits)
        at_output.add_rows(ref_logits, logits, kl=True)
    site.tap = None
    metrics = at_site.result(site.bits) if at_site.elements else {k: v for k, v in (weight_row or {}).items() if k not in _INFO_KEYS}
    out = at_output.result()
    return {
        **site_info(site, graph),
        "mode": "isolated",
        **metrics,
        "logit_sqnr_db": out["sqnr_db"],
        "logit_cos_mean": out["cos_mean"],
        "logit_agreement": out["top1_agreement"],
        "logit_top5": out["top5_hit_rate"],
        "logit_kl": out["logit_kl"],
    }


_INFO_KEYS = {"site", "role", "block", "quantizer", "bits", "granularity", "qmin", "qmax", "scale_min", "scale_max", "zero_point_min", "zero_point_max", "folded_into", "mode", "flags"}


# -- the evaluate entry point -----------------------------------------------------------


def check_sizes(cfg: Mapping[str, Any]) -> None:
    """`profile.images` and `profile.batch_size` must be >= 1."""
    from pipeline.errors import PipelineError

    for key in ("images", "batch_size"):
        if int(cfg[key]) < 1:
            raise PipelineError(f"profile.{key} must be >= 1, got {cfg[key]}")


def check_request(cfg: Mapping[str, Any], graph: SiteGraph, quantized: Collection[str] | None = None) -> tuple[list[str], str | None]:
    """Validate the `profile` config against a site graph: (dump sites, trace site).

    `quantized`: the sites the recipe quantizes, for a check before the model is quantized (before
    any run opens); by default the graph's sites in `quant` mode.
    """
    from pipeline.profile.dump import check_trace, resolve_dump

    check_sizes(cfg)
    return resolve_dump(list(cfg.get("dump") or []), graph, quantized), check_trace(cfg.get("trace"), graph, quantized)


@dataclass
class ProfileOutcome:
    """What a profile hands back to `evaluate`: summary metrics, the cumulative rows and the quantized logits.

    `logits` (images, classes) float32 on the CPU are the quantized model's logits of the profiled
    images, in loading order: the profile's quantized forward is the evaluation's forward for them.
    """

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    logits: Tensor


def profile_run(ctx, graph: SiteGraph, subset) -> ProfileOutcome:
    """Profile the quantized `graph` on the first `profile.images` images of `subset` (evaluate's entry point).

    Writes everything into `ctx.out_dir / "profile"` (tables, HTML, plots, dumps, trace) and logs the
    per-block series to `ctx.tracker`.
    """
    from pipeline.quant.sites import attach_sites

    title = f"{ctx.fp32.name}, quant={ctx.cfg.quant.name}"
    fp_graph = attach_sites(ctx.fp32.model)
    source = {"model": ctx.fp32.fingerprint, "recipe": ctx.cfg.quant.name}
    return run_profile(ctx.cfg.profile, graph, fp_graph, subset.loader, ctx.device, ctx.out_dir / "profile", ctx.tracker, title, source)


def run_profile(cfg: Mapping[str, Any], graph: SiteGraph, fp_graph: SiteGraph, loader: Iterable, device: torch.device, folder: Path, tracker=None, title: str = "", source: Mapping[str, Any] | None = None) -> ProfileOutcome:
    """The whole profile (see `profile_run`) without a stage context.

    `cfg` is a `profile` config node (or a dict with its keys); `fp_graph` a site graph of the FP32 model;
    `source` (model fingerprint, recipe) is recorded in the JSON tables.
    """
    from pipeline.profile.dump import trace_site, write_dump
    from pipeline.profile.flags import Thresholds, flag_rows
    from pipeline.profile.report import write_report
    from pipeline.profile.series import ISOLATED_SERIES, SERIES, graph_sites, log_rows, summary_metrics

    t_start = time.perf_counter()
    dump_names, trace_name = check_request(cfg, graph)
    wanted = set(dump_names) | ({trace_name} if trace_name else set())
    thresholds = Thresholds.from_config(cfg)
    batches = profile_batches(loader, int(cfg["images"]), int(cfg["batch_size"]))
    weights = weight_pass(graph, wanted)
    cumulative = cumulative_pass(fp_graph.to(device), graph, batches, device, wanted, int(cfg["dump_samples"]))
    rows = flag_rows(weights.rows + cumulative.rows, thresholds)
    metrics: dict[str, Any] = {"profile_images": cumulative.images, "profile_cumulative_s": round(weights.seconds + cumulative.seconds, 3)}
    log.info("profile: %d sites over %d images in %.1f s (cumulative)", len(rows), cumulative.images, weights.seconds + cumulative.seconds)
    isolated = None
    if cfg.get("isolated"):
        isolated = isolated_pass(graph, batches, cumulative.fp_logits, device, {r["site"]: r for r in weights.rows})
        flag_rows(isolated.rows, thresholds)
        metrics["profile_isolated_s"] = round(isolated.seconds, 3)
        log.info("profile: isolated mode, %d passes in %.1f s", len(isolated.rows), isolated.seconds)
    captures = {**weights.captures, **cumulative.captures}
    trace_text = None
    if trace_name:
        trace_text = trace_site(graph[trace_name], captures[trace_name], int(cfg["trace_elements"]))
        print(trace_text, end="", flush=True)
    dumps = [write_dump(folder / "dump", graph[n], captures[n]) for n in dump_names]
    hists = {**weights.histograms, **cumulative.histograms}
    t_report = time.perf_counter()
    write_report(folder, rows, cumulative.output, hists, thresholds, isolated.rows if isolated else None, trace_text, dumps, images=cumulative.images, worst_k=int(cfg["worst_k"]), title=title, source=source)
    metrics["profile_report_s"] = round(time.perf_counter() - t_report, 3)
    if tracker is not None:
        log_rows(tracker, rows, SERIES, graph_sites(graph))
        if isolated is not None:
            log_rows(tracker, isolated.rows, ISOLATED_SERIES, graph_sites(graph))
    metrics.update(summary_metrics(rows))
    out = cumulative.output
    metrics.update({"profile/logit_sqnr": out["sqnr_db"], "profile/logit_cos": out["cos_mean"], "profile/logit_agreement": out["top1_agreement"], "profile/logit_kl": out["logit_kl"]})
    metrics["profile_s"] = round(time.perf_counter() - t_start, 3)
    return ProfileOutcome(metrics, rows, torch.cat(cumulative.logits).float().cpu())
