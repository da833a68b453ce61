"""Search: per-site (or per tied group) widths under a cost budget, with Optuna (`search.*`).

Reads `calibrate/` (every candidate width is calibrated: a trial only assembles qparams and
runs one forward pass over the search subset, drawn from the calibration split and disjoint
from the calibration images, against cached FP32 logits) and `sensitivity/sensitivity.json`
(this run, `from_run` or `search.sensitivity`; computed here when absent). Runs the
configured method(s) on an Optuna RDB study (resumable; several workers may share it; see
pipeline.search.study), logs one nested MLflow run per trial (metrics + `assignment.json`),
re-evaluates the best assignment (and all-lowest / all-highest references) once on the
evaluation split, and writes into `search/`: `results.json`, `trials.csv`, `space.json`,
`best_assignment.json`, `recipe.yaml` (also `quant/<name>.yaml`, usable as `quant=<name>`
with `hydra.searchpath=[file://<run>/search]`) and `plots/pareto.png`.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from pipeline.artifacts import read_json, write_json
from pipeline.errors import PipelineError
from pipeline.quant.calibration import CalibState, check_calibrated, check_model
from pipeline.quant.recipe import SiteSpec, check_widths, resolve_recipe
from pipeline.quant.sites import SiteGraph, attach_sites
from pipeline.search.objective import OBJECTIVES, Evaluator, metrics_of
from pipeline.search.space import TIES, SearchSpace, build_space, calibrated_act_sites, check_act_widths, space_hash
from pipeline.search.study import METHODS, MethodRun, TrialRecord, check_storage_url, default_storage, open_storage, run_method
from pipeline.tracking import default_tracking_uri

log = logging.getLogger(__name__)

PRIORS = ("noise_kl", "noise_loss", "hessian", "isolated_kl")


def check_config(cfg: DictConfig) -> None:
    """Reject bad `search.*` values before any run is opened (the budget is checked against the space before any trial)."""
    s = cfg.search
    if s.objective not in OBJECTIVES:
        raise PipelineError(f"search.objective: unknown objective '{s.objective}' (choose one of {', '.join(OBJECTIVES)})")
    if s.method not in (*METHODS, "all"):
        raise PipelineError(f"search.method: unknown method '{s.method}' (choose one of {', '.join(METHODS)}, all)")
    if s.prior not in PRIORS:
        raise PipelineError(f"search.prior: unknown sensitivity score '{s.prior}' (choose one of {', '.join(PRIORS)})")
    for tie in s.ties:
        if tie not in TIES:
            raise PipelineError(f"search.ties: unknown tie '{tie}' (choose from {', '.join(TIES)})")
    for key in ("trials", "workers", "greedy_width", "heartbeat_s"):
        if int(s[key]) < 1:
            raise PipelineError(f"search.{key} must be >= 1, got {s[key]}")
    for key in ("seeds", "n_startup"):
        if int(s[key]) < 0:
            raise PipelineError(f"search.{key} must be >= 0, got {s[key]}")
    for key in ("act_bits", "weight_bits"):
        check_widths(f"search.{key}", s[key], required=True)
    if not (math.isfinite(s.budget) and s.budget > 0):
        raise PipelineError(f"search.budget must be a finite number > 0, got {s.budget}")
    if not s.prior_temperature > 0:
        raise PipelineError(f"search.prior_temperature must be > 0, got {s.prior_temperature}")
    if s.weight_cost_weight < 0 or s.act_cost_weight < 0:
        raise PipelineError("search.weight_cost_weight and search.act_cost_weight must be >= 0")
    if not cfg.quant.enabled:
        raise PipelineError("search needs a quantization recipe as its base (quant=recommended, naive, ...), not quant=none")
    if s.storage:
        check_storage_url(s.storage, cfg.tracking.uri or default_tracking_uri())
    if s.method != "random":  # the priors' sensitivity scores may be computed inside the search
        from pipeline.stages.sensitivity import check_config as check_sensitivity

        check_sensitivity(cfg)


@dataclass
class SearchSetup:
    """Everything a worker needs to run trials: the model graph, space, evaluator and sensitivity."""

    graph: SiteGraph
    specs: dict[str, SiteSpec]
    state: CalibState
    space: SearchSpace
    evaluator: Evaluator
    sensitivity: dict | None
    search_key: str


def prepare(cfg: DictConfig, fp32, device: torch.device, calib_dir: Path, sensitivity: dict | None) -> SearchSetup:
    from pipeline.data import make_subset
    from pipeline.inference import fp32_logits
    from pipeline.stages.calibrate import calibration_front

    state = CalibState.load(calib_dir)
    graph = attach_sites(fp32.model)
    specs = resolve_recipe(cfg.quant, graph)
    check_calibrated(specs, state.index)
    subset = make_subset(cfg.data, fp32, "search", calib_images=calibration_front(state.index, cfg.data))
    ref, labels, _ = fp32_logits(fp32.model, fp32.fingerprint, subset, device, cfg.cache_dir)
    batches = [x for x, _ in subset.loader]  # decoded once
    space = space_of(cfg, graph, specs, batches[0])
    evaluator = Evaluator(graph, specs, state, batches, ref, labels, device)
    return SearchSetup(graph, specs, state, space, evaluator, sensitivity, subset.key)


def fingerprint(cfg: DictConfig, fp32, setup: SearchSetup, method: str) -> dict[str, Any]:
    """What a study's trials depend on: a run whose fingerprint matches resumes the study (more trials
    may be asked for); any other gets its own study. Sweeps over any of these keys never share trials."""
    s = cfg.search
    sampler = {"seed": int(s.seed)}
    if method == "prior":
        sampler.update(prior=s.prior, seeds=int(s.seeds), n_startup=int(s.n_startup), temperature=float(s.prior_temperature))
    elif method == "greedy":
        sampler.update(prior=s.prior, greedy_width=int(s.greedy_width))
    return {
        "model": fp32.fingerprint,
        "recipe": space_hash({n: asdict(spec) for n, spec in setup.specs.items()}),
        "calibration": setup.state.digest(),  # its images and everything else that moves a scale (batch size, observers)
        "space": space_hash(setup.space.fingerprint()),
        "objective": s.objective,
        "budget": float(s.budget),
        "search_subset": setup.search_key,
        "method": method,
        "sampler": sampler,
        **({"scores": scores_digest(setup.sensitivity)} if method != "random" else {}),
    }


def scores_digest(sensitivity: Mapping[str, Any] | None) -> str | None:
    """A hash of the per-site sensitivity scores that seeds, biases and repairs the prior and greedy
    searches, to 6 significant digits (a recomputation that differs in the last bits still resumes)."""
    if sensitivity is None:
        return None

    def rounded(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): rounded(v) for k, v in value.items()}
        return float(f"{value:.6g}") if isinstance(value, float) else value

    return space_hash({name: rounded(entry.get("scores", {})) for name, entry in sensitivity["sites"].items()})


def study_name(cfg: DictConfig, fp32, payload: Mapping[str, Any], method: str, methods: list[str]) -> str:
    s = cfg.search
    if s.study_name:
        return s.study_name if len(methods) == 1 else f"{s.study_name}-{method}"
    return f"{fp32.name}-{cfg.quant.name}-b{float(s.budget):g}-{method}-{space_hash(payload)}"


def methods_of(cfg: DictConfig) -> list[str]:
    return list(METHODS) if cfg.search.method == "all" else [cfg.search.method]


def run_methods(cfg: DictConfig, fp32, setup: SearchSetup, storage_url: str, tracker=None) -> dict[str, MethodRun]:
    """Run every configured method's study in this process (the main one or a worker)."""
    s = cfg.search
    storage = open_storage(storage_url, int(s.heartbeat_s))
    on_trial = trial_logger(tracker, s.objective) if tracker is not None else None
    runs = {}
    methods = methods_of(cfg)
    for method in methods:
        payload = fingerprint(cfg, fp32, setup, method)
        name = study_name(cfg, fp32, payload, method, methods)
        runs[method] = run_method(
            method, storage, name, space_hash(payload), setup.space, setup.evaluator.evaluate, float(s.budget), s.objective, int(s.trials),
            setup.sensitivity, s.prior, int(s.seeds), int(s.n_startup), float(s.prior_temperature), int(s.greedy_width), int(s.seed), on_trial,
        )
    return runs


def trial_logger(tracker, objective: str):
    """One nested MLflow run per evaluated trial: metrics, tags, and the assignment as `assignment.json`."""

    def log_trial(record: TrialRecord, space: SearchSpace, study: str) -> None:
        widths = space.widths(record.levels)
        raised = space.raised(record.levels)
        metrics = {objective: record.value, **{k: v for k, v in record.metrics.items()}, "cost": record.cost, "raised_groups": len(raised), "raised_sites": sum(1 for g in raised for _ in space.by_name[g].members), "trial_s": record.trial_s}
        tags = {"method": record.method, "study": study, "trial": str(record.number), "source": record.source}
        if record.duplicate_of is not None:
            tags["duplicate_of"] = str(record.duplicate_of)
        assignment = {"study": study, "trial": record.number, "method": record.method, "cost": record.cost, "objective": objective, "value": record.value, "raised": raised, "levels": record.levels, "widths": widths}
        tracker.child_run(f"{record.method}-trial-{record.number:03d}", metrics, tags, {"assignment.json": assignment}, step=record.number)

    return log_trial


def load_sensitivity(ctx, out_dir: Path) -> tuple[dict | None, Path | None]:
    """The sensitivity scores: search.sensitivity, this run / from_run, or computed now (into search/sensitivity/)."""
    cfg = ctx.cfg
    path = _sensitivity_file(ctx)
    if path is None:
        if cfg.search.method == "random":
            return None, None
        from pipeline.stages.sensitivity import compute

        log.info("search: no sensitivity scores found; computing them first")
        compute(ctx, out_dir / "sensitivity")
        path = out_dir / "sensitivity" / "sensitivity.json"
    data = _read_sensitivity(ctx, path)
    if data["meta"].get("recipe") != cfg.quant.name:
        log.warning("sensitivity scores in %s were computed with recipe %s, the search uses %s", path, data["meta"].get("recipe"), cfg.quant.name)
    return data, path


def _sensitivity_file(ctx) -> Path | None:
    """search.sensitivity (which must exist), else sensitivity.json of this run or from_run, else None."""
    explicit = ctx.cfg.search.get("sensitivity")
    if explicit:
        if not Path(explicit).is_file():
            raise PipelineError(f"search.sensitivity={explicit}: file not found")
        return Path(explicit)
    return ctx.find("sensitivity", "sensitivity.json", required=False)


def _given_sensitivity(ctx) -> Path | None:
    """The scores file the search reads instead of computing: search.sensitivity, or from_run's when this
    chain runs no sensitivity stage; None when the scores are computed in this run."""
    if ctx.cfg.search.get("sensitivity") or not ctx.made_earlier("sensitivity", "search"):
        return _sensitivity_file(ctx)
    return None


def _read_sensitivity(ctx, path: Path) -> dict[str, Any]:
    """The scores in `path`, checked to belong to the run's model."""
    data = read_json(path)
    check_model(data, ctx.fp32.fingerprint, f"the sensitivity scores in {path}", ctx.fp32.name, "rerun the sensitivity stage")
    if not isinstance(data.get("sites"), Mapping):
        raise PipelineError(f"{path} has no per-site scores ('sites'): it is not a sensitivity.json")
    return data


def spawn_workers(ctx, calib_dir: Path, sensitivity_path: Path | None, storage_url: str, count: int) -> list[multiprocessing.Process]:
    from pipeline.search.worker import worker_main

    if count <= 0:
        return []
    payload = {
        "cfg": OmegaConf.to_container(ctx.cfg, resolve=True, enum_to_str=True),
        "calib_dir": str(calib_dir),
        "sensitivity": str(sensitivity_path) if sensitivity_path else None,
        "storage": storage_url,
        "run_id": ctx.tracker.active_id if ctx.tracker.enabled else None,
        "device": str(ctx.device),
        "threads": torch.get_num_threads(),
        "parent": os.getpid(),
    }
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=worker_main, args=(payload, i + 1), daemon=False) for i in range(count)]
    for p in procs:
        p.start()
    return procs


def test_metrics(ctx, setup: SearchSetup, assignments: Mapping[str, Mapping[str, int]]) -> dict[str, dict[str, float]]:
    """top-1, argmax agreement and logit KL vs FP32 of each assignment on the evaluation split."""
    from pipeline.data import make_subset
    from pipeline.inference import fp32_logits, predict

    subset = make_subset(ctx.cfg.data, ctx.fp32, "eval")
    ref, labels, _ = fp32_logits(ctx.fp32.model, ctx.fp32.fingerprint, subset, ctx.device, ctx.cfg.cache_dir)
    out = {}
    for name, widths in assignments.items():
        setup.evaluator.assembler.apply(widths)
        logits, _ = predict(setup.graph.model, subset, ctx.device, desc=f"test {name}")
        out[name] = {**metrics_of(ref, logits, labels), "images": int(labels.numel())}
    return out


def _check_calibration_fits(ctx, specs: Mapping[str, SiteSpec] | None) -> None:
    """The calibration (this chain's, or from_run's) covers every search.act_bits width of every searched
    activation site, and leaves images of its split outside it for the search subset."""
    from pipeline.data import clamp_size, search_room, split_size
    from pipeline.quant.calibration import calibration_widths
    from pipeline.stages.calibrate import calibration_front, find_calibration

    data, searched = ctx.cfg.data, calibrated_act_sites(specs or {})
    available = split_size(data, data.calib_split)
    if ctx.made_earlier("calibrate", "search"):
        used = clamp_size(int(data.calib_size), available, "data.calib_size", warn=False)
        widths = {n: calibration_widths(specs[n], list(ctx.cfg.quant.candidate_bits)) for n in searched}
    else:
        index = find_calibration(ctx)[1]
        used = calibration_front(index, data)
        widths = {n: index["sites"].get(n, {}).get("bits", []) for n in searched}
    check_act_widths(widths, list(ctx.cfg.search.act_bits))
    _check_noise_width(ctx, widths)
    search_room(available, used, data.calib_split)


def _check_noise_width(ctx, widths: Mapping[str, Sequence[int]]) -> None:
    """A noise prior scored in this run needs every searched activation site calibrated at
    sensitivity.noise_bits: sensitivity skips (with a warning) the sites it is not, and the prior then fails."""
    s, noise_bits = ctx.cfg.search, int(ctx.cfg.sensitivity.noise_bits)
    if s.method == "random" or not s.prior.startswith("noise_"):
        return
    if _given_sensitivity(ctx) is not None:
        return  # scores read from a file, checked when they are read
    for name, have in widths.items():
        if noise_bits not in have:
            raise PipelineError(
                f"search.prior={s.prior} scores sites at sensitivity.noise_bits={noise_bits}, but site {name} was calibrated "
                f"for bits {list(have)}: add {noise_bits} to quant.candidate_bits, or set sensitivity.noise_bits to one of them"
            )


def space_of(cfg: DictConfig, graph: SiteGraph, specs: Mapping[str, SiteSpec], image: torch.Tensor) -> SearchSpace:
    """The search space of `search.*` over the graph's sites; `image` (1 x C x H x W) only counts elements."""
    s = cfg.search
    return build_space(graph, specs, list(s.act_bits), list(s.weight_bits), list(s.ties), image, float(s.weight_cost_weight), float(s.act_cost_weight))


def _check_budget(ctx, specs: Mapping[str, SiteSpec]) -> None:
    """search.budget reaches the space's cheapest assignment: the space needs only the model (a zero image)."""
    image = torch.zeros(1, *ctx.fp32.data_config["input_size"])
    space_of(ctx.cfg, attach_sites(ctx.fp32.model), specs, image).check_budget(float(ctx.cfg.search.budget))


def check_inputs(ctx, specs) -> None:
    """Before any run opens: a calibration from from_run fits the model and recipe, the budget reaches
    the cheapest assignment, and sensitivity scores given or found in from_run exist and belong to the model."""
    from pipeline.stages.calibrate import check_calibration_input

    check_calibration_input(ctx, specs, "search")
    _check_calibration_fits(ctx, specs)
    _check_budget(ctx, specs)
    path = _given_sensitivity(ctx)
    s = ctx.cfg.search
    if path is not None:
        data = _read_sensitivity(ctx, path)
        have = sorted({m for entry in data["sites"].values() for m in (entry.get("scores") or {})})
        if s.method != "random" and s.prior not in have:
            raise PipelineError(f"search.prior={s.prior}: the sensitivity scores in {path} have no '{s.prior}' (they have: {', '.join(have) or 'none'})")
    elif s.method != "random" and s.prior.startswith("isolated_") and not ctx.cfg.sensitivity.isolated:
        raise PipelineError(f"search.prior={s.prior} needs the isolated measurement: set sensitivity.isolated=true, or choose another prior")


def run(ctx) -> dict[str, Any]:
    from pipeline.search.report import pareto_png, write_trials_csv
    from pipeline.stages.calibrate import find_calibration

    cfg = ctx.cfg
    s = cfg.search
    check_config(cfg)
    calib_dir, _ = find_calibration(ctx)
    sensitivity, sens_path = load_sensitivity(ctx, ctx.out_dir)
    setup = prepare(cfg, ctx.fp32, ctx.device, calib_dir, sensitivity)
    space = setup.space
    storage_url = s.storage or default_storage()
    write_json(ctx.out_dir / "space.json", {**space.describe(), "budget": float(s.budget), "groups": [{"name": g.name, "members": g.members, "widths": g.widths, "cost": g.level_cost} for g in space.groups]})
    runs, search_s = _run_studies(ctx, setup, calib_dir, sens_path, storage_url)

    objective = s.objective
    records = [r for run in runs.values() for r in run.records]
    bests = {m: run.best(objective) for m, run in runs.items() if run.best(objective) is not None}
    overall = bests.get(methods_of(cfg)[0]) if len(runs) == 1 else _best_of(bests.values(), objective)
    references = {"all_low": space.lowest(), "all_high": space.highest()}
    ref_search = {name: setup.evaluator.evaluate(space.widths(levels)) for name, levels in references.items()}
    tests: dict[str, dict[str, float]] = {}
    if s.test and bests:
        assignments = {f"best_{m}": space.widths(r.levels) for m, r in bests.items()}
        assignments.update({name: space.widths(levels) for name, levels in references.items()})
        tests = test_metrics(ctx, setup, assignments)

    write_trials_csv(ctx.out_dir / "trials.csv", records)
    png = pareto_png(records, objective, float(s.budget), {f"{n} ({space.cost(l):.2f})": (space.cost(l), ref_search[n][objective]) for n, l in references.items()}, overall)
    (ctx.out_dir / "plots").mkdir(exist_ok=True)
    (ctx.out_dir / "plots" / "pareto.png").write_bytes(png)
    results: dict[str, Any] = {
        "objective": objective,
        "budget": float(s.budget),
        "storage": storage_url,
        "space": space.describe(),
        "methods": {m: _method_entry(run, bests.get(m), space, tests.get(f"best_{m}")) for m, run in runs.items()},
        "references": {n: {"cost": space.cost(l), "search": ref_search[n], "test": tests.get(n)} for n, l in references.items()},
        "search_s": search_s,
    }
    metrics: dict[str, Any] = {"search_trials": len(records), "search_groups": len(space.groups), "search_min_cost": space.min_cost()}
    if overall is not None:
        test = tests.get(f"best_{overall.method}")
        results["best"] = {"method": overall.method, "trial": overall.number, "value": overall.value, "cost": overall.cost, "raised": space.raised(overall.levels), "roles_raised": _roles_raised(setup.graph, space, overall.levels), "test": test}
        results["recipe"] = _export_best(ctx, setup, overall)
        metrics.update({f"search_best_{objective}": overall.value, "search_best_cost": overall.cost, "search_best_raised_groups": len(space.raised(overall.levels))})
        if test is not None:
            metrics.update({"search_test_top1": test["top1"], "search_test_agreement": test["agreement"], "search_test_kl": test["kl"]})
    metrics.update(_per_method_metrics(results))
    ctx.tracker.set_tags({f"study.{m}": run.study_name for m, run in runs.items()})  # a resumed study: the same name as the earlier run's
    write_json(ctx.out_dir / "results.json", results)
    ctx.summary["search_results"] = results
    return metrics


def _run_studies(ctx, setup: SearchSetup, calib_dir: Path, sens_path: Path | None, storage_url: str) -> tuple[dict[str, MethodRun], float]:
    """Every method's study, with `search.workers - 1` helper processes on the same storage; (runs, seconds)."""
    t0 = time.perf_counter()
    workers = spawn_workers(ctx, calib_dir, sens_path, storage_url, int(ctx.cfg.search.workers) - 1)
    try:
        runs = run_methods(ctx.cfg, ctx.fp32, setup, storage_url, ctx.tracker)
    except BaseException:  # Ctrl-C / SIGTERM or an error here: stop the helpers (their trials go stale and are retried on a rerun)
        for p in workers:
            p.terminate()
        raise
    finally:
        for p in workers:
            p.join()
    bad = [p.exitcode for p in workers if p.exitcode != 0]
    if bad:
        raise PipelineError(f"{len(bad)} search worker process(es) failed (exit codes {bad})")
    return runs, time.perf_counter() - t0


def _method_entry(run: MethodRun, best: TrialRecord | None, space: SearchSpace, test: dict[str, float] | None) -> dict[str, Any]:
    """One method's block of results.json: its study, trial counts, timings (s) and best trial."""
    return {
        "study": run.study_name,
        "trials": len(run.records),
        "evaluations": run.evaluations,
        "evaluated_here": run.evaluated_here,
        "seconds": run.seconds,
        "best": None if best is None else {"trial": best.number, "value": best.value, "cost": best.cost, "source": best.source, "search": best.metrics, "raised": space.raised(best.levels), "test": test},
        "mean_trial_s": sum(r.trial_s for r in run.records) / max(1, len(run.records)),
        "mean_eval_s": sum(r.metrics.get("eval_s", 0.0) for r in run.records if r.duplicate_of is None) / max(1, run.evaluations),
    }


def _export_best(ctx, setup: SearchSetup, best: TrialRecord) -> str:
    """Write best_assignment.json and the best assignment as a recipe (recipe.yaml, quant/<name>.yaml); returns its name."""
    from pipeline.search.report import export_recipe

    cfg = ctx.cfg
    widths = setup.space.widths(best.levels)
    write_json(ctx.out_dir / "best_assignment.json", {"method": best.method, "trial": best.number, "cost": best.cost, "levels": best.levels, "widths": widths})
    name = f"search_{cfg.quant.name}_{best.method}_{space_hash({'w': widths})}"
    base_bits = {n: spec.bits for n, spec in setup.specs.items()}
    comment = f"{ctx.fp32.name}, base {cfg.quant.name}, budget {float(cfg.search.budget):g}, {cfg.search.objective}={best.value:.6g}, cost {best.cost:.4f}"
    export_recipe(ctx.out_dir / "recipe.yaml", cfg.quant, base_bits, widths, name, comment)
    export_recipe(ctx.out_dir / "quant" / f"{name}.yaml", cfg.quant, base_bits, widths, name, comment)
    return name


def _per_method_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """MLflow metrics `search/<method or reference>/<name>` from results.json's methods and references."""
    objective = results["objective"]
    metrics: dict[str, float] = {}
    for m, entry in results["methods"].items():
        best = entry["best"]
        metrics[f"search/{m}/trials"] = entry["trials"]
        metrics[f"search/{m}/evaluations"] = entry["evaluations"]
        metrics[f"search/{m}/evaluated_here"] = entry["evaluated_here"]  # fewer than trials: a resumed study
        metrics[f"search/{m}/mean_trial_s"] = entry["mean_trial_s"]
        if best is not None:
            metrics[f"search/{m}/best"] = best["value"]
            metrics[f"search/{m}/best_cost"] = best["cost"]
            metrics.update(_test_metrics(f"search/{m}", best["test"]))
    for n, entry in results["references"].items():
        metrics[f"search/{n}/{objective}"] = entry["search"][objective]
        metrics.update(_test_metrics(f"search/{n}", entry["test"]))
    return metrics


def _test_metrics(prefix: str, test: Mapping[str, float] | None) -> dict[str, float]:
    return {f"{prefix}/test_{k}": v for k, v in (test or {}).items() if k in ("top1", "agreement", "kl")}


def _best_of(records, objective: str) -> TrialRecord | None:
    from pipeline.search.objective import better

    best = None
    for r in records:
        if best is None or better(objective, r.value, best.value) or (r.value == best.value and r.cost < best.cost):
            best = r
    return best


def _roles_raised(graph: SiteGraph, space: SearchSpace, levels: Mapping[str, int]) -> dict[str, int]:
    """Sites raised above their lowest width, counted per role."""
    out: dict[str, int] = {}
    for g in space.raised(levels):
        for m in space.by_name[g].members:
            out[graph[m].role] = out.get(graph[m].role, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
