"""The stage chain: validate inputs, open the parent MLflow run, run stages in order.

Stages talk only through the artifacts they write. Each stage writes into a
hidden temp folder `<run_dir>/.<stage>.tmp/`, renamed to `<run_dir>/<stage>/`
when the stage succeeds, so a failed stage leaves nothing half-written; its
MLflow run is marked FAILED. A stage looks for earlier artifacts first in this
run's folder, then in `from_run` (a run folder or an MLflow run id).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import PROJECT_ROOT
from pipeline.artifacts import json_number, write_json, write_text
from pipeline.config import Stage, unknown_keys
from pipeline.errors import PipelineError
from pipeline.models import LoadedModel, load_model
from pipeline.tracking import Tracker, flatten, resolve_run_dir

if TYPE_CHECKING:
    from pipeline.quant.recipe import SiteSpec

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


@dataclass
class StageContext:
    """What a stage may use: the config, folders, tracker, device and the FP32 model."""

    cfg: DictConfig
    run_dir: Path
    source_dir: Path | None
    tracker: Tracker
    device: torch.device
    fp32: LoadedModel
    summary: dict[str, Any] = field(default_factory=dict)
    out_dir: Path | None = None  # the running stage's (temp) output folder

    def find(self, stage: str, name: str, required: bool = True) -> Path | None:
        """An earlier stage's artifact: this run first, then `from_run`."""
        for base in (self.run_dir, self.source_dir):
            if base is not None and (base / stage / name).exists():
                return base / stage / name
        if required:
            where = f"{self.run_dir}" + (f" or {self.source_dir}" if self.source_dir else "")
            raise PipelineError(f"no {stage}/{name} in {where}: run stage '{stage}' first or pass from_run=<run dir or MLflow run id>")
        return None

    def made_earlier(self, stage: str, consumer: str) -> bool:
        """True when `stage` runs in this chain before `consumer`, so `consumer` reads this run's artifacts, not from_run's."""
        order = [Stage(s).value for s in self.cfg.stages]
        return stage in order and consumer in order and order.index(stage) < order.index(consumer)

    def write_summary(self) -> Path:
        """summary.json, strict JSON: a non-finite figure (an exact site's SQNR) as a string ('inf'), as
        MLflow, which takes finite numbers only, does not have it."""
        return write_json(self.run_dir / SUMMARY, {k: json_number(v) for k, v in self.summary.items()})


def stage_function(stage: Stage) -> Callable[[StageContext], dict[str, Any]]:
    """Stages live in `pipeline.stages.<name>` and expose `run(ctx) -> metrics`."""
    return importlib.import_module(f"pipeline.stages.{stage.value}").run


DEVICE_NAMES = re.compile(r"auto|cpu|cuda(:\d+)?")


def select_device(name: str) -> torch.device:
    """The torch device for `device=` (`auto`: the first GPU when CUDA is available, else the CPU;
    `cpu`; `cuda`; `cuda:N`), with FP32 kept exact on it (`exact_fp32`)."""
    if not DEVICE_NAMES.fullmatch(name):
        raise PipelineError(f"device={name}: choose auto, cpu, cuda or cuda:N")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PipelineError(f"device={name} but no CUDA device is available (use device=auto or device=cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PipelineError(f"device={name} but {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    exact_fp32(device)
    return device


def exact_fp32(device: torch.device) -> None:
    """No TF32 on GPUs: cuDNN convolutions default to it (10 mantissa bits, a relative error of about
    5e-4, some 30 INT16 steps), which would make the FP32 reference and every 16-bit figure of the
    patch embedding measure TF32's rounding. Matmuls are kept at full FP32 too."""
    if device.type == "cuda":
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        torch.backends.cuda.matmul.fp32_precision = "ieee"


def set_threads(threads: int) -> None:
    """0 = one intra-op thread per CPU this process may use."""
    if threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(threads)


def run_pipeline(cfg: DictConfig, run_dir: Path, job_label: str = "") -> dict[str, Any]:
    """Run the configured stages; returns the summary written to `run_dir/summary.json`.

    `job_label` (a multirun job's overrides) is appended to the default run name.
    """
    started = time.time()
    unknown = unknown_keys(cfg)
    if unknown:
        raise PipelineError(f"unknown config key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not in the schema (pipeline/config.py), so nothing would read {'them' if len(unknown) > 1 else 'it'}; check the spelling (a leading + adds any key)")
    if cfg.threads < 0:
        raise PipelineError(f"threads must be >= 0 (0 = one per CPU this process may use), got {cfg.threads}")
    set_threads(cfg.threads)
    device = select_device(str(cfg.device))
    stages = [Stage(s) for s in cfg.stages]
    if not stages:
        raise PipelineError("stages is empty: choose from " + ", ".join(s.value for s in Stage))
    fns = {s: stage_function(s) for s in stages}

    # Validate everything a user can get wrong before any run is opened.
    fp32 = load_model(cfg.model)
    tracker = Tracker(cfg.tracking)
    tracker.connect()
    source_dir = resolve_run_dir(cfg.from_run, cfg.tracking, run_dir / ".from_run") if cfg.from_run else None
    _check_data(cfg, stages, fp32)
    specs = _check_site_names(cfg, stages, fp32)
    modules = [importlib.import_module(f"pipeline.stages.{stage.value}") for stage in stages]
    for module in modules:  # stage-specific config checks (e.g. search.objective), before any run is opened
        if hasattr(module, "check_config"):
            module.check_config(cfg)
    ctx = StageContext(cfg, run_dir, source_dir, tracker, device, fp32)
    for module in modules:  # artifacts a stage reads from from_run: there, fitting this model and recipe
        if hasattr(module, "check_inputs"):
            module.check_inputs(ctx, specs)

    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config = run_dir / "config.yaml"
    earlier_config = config.read_text() if config.is_file() else None  # a reused folder's: put back if this run makes nothing
    write_text(config, OmegaConf.to_yaml(resolved))
    run_name = cfg.tracking.run_name or f"{fp32.name}-{cfg.quant.name}-{'+'.join(s.value for s in stages)}" + (f" [{job_label}]" if job_label else "")
    tags = {"model": fp32.name, "timm_name": fp32.timm_name, "data": _data_tag(cfg), "quant": cfg.quant.name, "run_dir": str(run_dir), "stages": ",".join(s.value for s in stages)}
    failed, finished = True, []
    try:
        try:
            tracker.start(run_name, flatten(resolved), tags)
            tracker.log_artifact(config)
            for stage in stages:
                _run_stage(ctx, stage, fns[stage])
                finished.append(stage)
            ctx.summary["wall_s"] = round(time.time() - started, 2)
            tracker.log_metrics({k: v for k, v in ctx.summary.items() if _is_number(v)})  # on the parent: runs compare side by side
            ctx.write_summary()
            tracker.log_artifact(run_dir / SUMMARY)
            failed = False
        finally:
            tracker.end(failed=failed)
            if failed and not finished and earlier_config is not None:
                write_text(config, earlier_config)
            if source_dir == run_dir / ".from_run":  # from_run's artifacts, downloaded for this run only
                shutil.rmtree(source_dir, ignore_errors=True)
    except BaseException as error:  # also one raised while ending the runs (an unreachable server, a second Ctrl-C)
        error.finished_stages = tuple(s.value for s in finished)  # type: ignore[attr-defined]  # for cleanup_failed_run
        raise
    return ctx.summary


def _run_stage(ctx: StageContext, stage: Stage, fn: Callable[[StageContext], dict[str, Any]]) -> None:
    final = ctx.run_dir / stage.value
    tmp = ctx.run_dir / f".{stage.value}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ctx.out_dir = tmp
    t0 = time.time()
    try:
        with ctx.tracker.stage(stage.value):
            metrics = fn(ctx) or {}
            metrics[f"{stage.value}_s"] = round(time.time() - t0, 3)
            ctx.tracker.log_metrics({k: v for k, v in metrics.items() if _is_number(v)})
            ctx.tracker.log_artifact(tmp, stage.value)  # before the rename: a failed upload leaves no finished folder
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ctx.out_dir = None
    ctx.summary.update(metrics)
    log.info("stage %s done in %.1f s", stage.value, time.time() - t0)


def _check_data(cfg: DictConfig, stages: list[Stage], fp32: LoadedModel) -> None:
    """Fail early on a missing or empty data root, splits that do not fit the model, or a bad loader setting
    (the stages build loaders later)."""
    from pipeline.data import check_calibration_split, check_splits

    if int(cfg.data.batch_size) < 1:
        raise PipelineError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")
    if int(cfg.data.num_workers) < 0:
        raise PipelineError(f"data.num_workers must be >= 0, got {cfg.data.num_workers}")
    for key in ("calib_size", "eval_size", "search_size"):
        if int(cfg.data[key]) < 0:
            raise PipelineError(f"data.{key} must be >= 0 (0 = all), got {cfg.data[key]}")
    if cfg.data.kind not in ("imagefolder", "synthetic"):
        raise PipelineError(f"unknown data.kind '{cfg.data.kind}' (imagefolder or synthetic)")
    if cfg.data.kind == "synthetic" and int(cfg.data.synthetic_size) < 1:
        raise PipelineError(f"data.synthetic_size must be >= 1, got {cfg.data.synthetic_size}")
    needs_calib = any(s in (Stage.calibrate, Stage.sensitivity, Stage.search) for s in stages)
    needs_eval = Stage.evaluate in stages or (Stage.search in stages and cfg.search.test)
    if needs_calib:
        check_calibration_split(cfg.data)
    check_splits(cfg.data, fp32, ([cfg.data.calib_split] if needs_calib else []) + ([cfg.data.eval_split] if needs_eval else []))


def _check_site_names(cfg: DictConfig, stages: list[Stage], fp32: LoadedModel) -> dict[str, SiteSpec] | None:
    """Check what names sites against one site graph of the model; returns the resolved recipe (None for quant=none).

    The recipe is resolved (a bad width, observer, rounding, role or glob fails here), and with
    `evaluate` and a profile, the `profile.dump` globs and the `profile.trace` site are checked.
    """
    from pipeline.quant.recipe import check_disabled_recipe, resolve_recipe
    from pipeline.quant.sites import attach_sites

    if not cfg.quant.enabled:
        check_disabled_recipe(cfg.quant)  # no site graph needed: no deep copy of the model for an FP32 run
        return None
    graph = attach_sites(fp32.model)
    specs = resolve_recipe(cfg.quant, graph, verbose=True)
    if Stage.evaluate in stages and cfg.profile.enabled and (cfg.profile.dump or cfg.profile.trace):
        from pipeline.profile.profiler import check_request

        check_request(cfg.profile, graph, quantized=[name for name, spec in specs.items() if spec.enabled])
    return specs


def _data_tag(cfg: DictConfig) -> str:
    return "synthetic" if cfg.data.kind == "synthetic" else str(cfg.data.root)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def finished_stages(error: BaseException) -> tuple[str, ...]:
    """The stages `run_pipeline` finished before `error` ended it (none when it failed before the first)."""
    return getattr(error, "finished_stages", ())


def cleanup_failed_run(run_dir: Path, kept: frozenset[str] = frozenset(), finished_here: tuple[str, ...] = ()) -> None:
    """After a failed invocation: remove what it left half-made, and everything it made when it
    finished no stage.

    `kept`: what the folder held before this invocation (`hydra.run.dir` pointing at an existing
    folder, see `existing_entries`); none of it is touched. `finished_here`: the stages this
    invocation finished (`finished_stages`), which may have replaced a kept stage folder. Half-made: the temp stage
    folders and the downloaded `from_run`. When a stage finished, it stays, with config.yaml, `.hydra/`
    and the log. When none did, the run's own files go too, and a folder made by this invocation goes
    whole, then its parent too when that is an empty day folder of the default layout
    (`mlruns/outputs/<YYYY-MM-DD>/...`).
    """
    if not run_dir.is_dir():
        return
    made_here = [p for p in run_dir.iterdir() if p.name not in kept]
    finished = bool(finished_here) or any(p.is_dir() and p.name in {s.value for s in Stage} for p in made_here)
    for path in made_here:
        if not finished or path.name == ".from_run" or (path.name.startswith(".") and path.name.endswith(".tmp")):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    if kept or finished:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    day = run_dir.parent
    if day.parent == PROJECT_ROOT / "mlruns" / "outputs" and re.fullmatch(r"\d{4}-\d{2}-\d{2}", day.name):
        with contextlib.suppress(OSError):  # not empty (other runs): kept
            day.rmdir()


def existing_entries(run_dir: Path, job_log: str, hydra_subdir: str | None = ".hydra") -> frozenset[str]:
    """What `run_dir` holds before a run starts (what a failure must leave alone).

    Not Hydra's output subdir (`hydra.output_subdir`, `.hydra/` by default; None: Hydra writes none),
    which Hydra has just written for this run; and the job's log only when it already holds an earlier
    run's lines (Hydra appends to it; this run has logged nothing yet).
    """
    if not run_dir.is_dir():
        return frozenset()
    names = {p.name for p in run_dir.iterdir() if p.name != hydra_subdir}
    if job_log in names and (run_dir / job_log).stat().st_size == 0:
        names.discard(job_log)
    return frozenset(names)
