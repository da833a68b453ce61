"""Mixed-precision search on the reference ViT: three regimes, prior-guided vs random vs greedy.

Regimes (each method gets the same number of evaluations, `--trials`):
  a: vit_tiny_cifar10, base `recommended`, INT8/INT16 weights and activations, budget 1.10
  b: vit_tiny_cifar10_outliers, base `naive`, INT8/INT16, budget 1.10
  c: vit_tiny_cifar10, base `recommended`, weights {4, 8}, activations {8, 16}, budget 0.80
     (reuses regime a's calibration and sensitivity through from_run)

Each regime is one pipeline run (`stages=[calibrate,sensitivity,search] search.method=all`), so
everything it measures is also in MLflow and in its run folder. The search objective (logit KL
vs FP32) is measured on `--search-size` train images (disjoint from calibration); the best
assignment of each method and the all-lowest / all-highest references are re-evaluated on the
first `--eval-size` test images. Speed: median wall time per `random` trial (everything the study
loop does for it: sampling, repair, storage, MLflow, the forward pass) vs one quantized forward pass
over the search subset, interleaved in the same process (see `speed`); each regime's
`trial_cost_ratio` is a rough whole-study figure for the prior method. Writes bench/results/search.json. Usage:
    .venv/bin/python bench/bench_search.py [--regimes a,b,c] [--trials 30] [--threads 1] [--speed-trials 6]
    .venv/bin/python bench/bench_search.py --regimes= --speed-trials 6   # only the speed ratio (needs regime a's run)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402
from pipeline.artifacts import write_text  # noqa: E402
from pipeline.config import register_configs, register_resolvers  # noqa: E402

REGIMES = {
    "a": {"model": "vit_tiny_cifar10", "quant": "recommended", "budget": 1.10, "weight_bits": [8, 16], "act_bits": [8, 16]},
    "b": {"model": "vit_tiny_cifar10_outliers", "quant": "naive", "budget": 1.10, "weight_bits": [8, 16], "act_bits": [8, 16]},
    "c": {"model": "vit_tiny_cifar10", "quant": "recommended", "budget": 0.80, "weight_bits": [4, 8], "act_bits": [8, 16], "from": "a"},
}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def forward_seconds(run_dir: Path, cfg, repeats: int = 2) -> float:
    """Best-of wall time of one quantized forward pass (the base recipe) over the search subset, batches decoded."""
    from pipeline.data import make_subset
    from pipeline.models import load_model
    from pipeline.quant.calibration import CalibState, bind
    from pipeline.quant.recipe import resolve_recipe
    from pipeline.quant.sites import attach_sites

    fp32 = load_model(cfg.model)
    graph = attach_sites(fp32.model)
    specs = resolve_recipe(cfg.quant, graph)
    bind(graph, specs, CalibState.load(run_dir / "calibrate"))
    batches = [x for x, _ in make_subset(cfg.data, fp32, "search").loader]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for x in batches:
                graph.model(x)
            best = min(best, time.perf_counter() - t0)
    return best


def speed(run_dir: Path, cfg, trials: int = 6, tmp: Path | None = None) -> dict:
    """Trial cost vs one quantized forward pass over the search subset, interleaved in one process.

    A trial here is everything the study loop does for one more trial of a resumed random study
    (open the storage and study, sample, repair, write params, assemble qparams, forward pass,
    store the result, log the nested MLflow run with its assignment artifact); it alternates with
    a plain forward pass of the base recipe (qparams bound once) over the same decoded images.
    """
    import tempfile

    from pipeline.config import TrackingConfig
    from pipeline.models import load_model
    from pipeline.quant.calibration import CalibState, bind
    from pipeline.quant.recipe import resolve_recipe
    from pipeline.quant.sites import attach_sites
    from pipeline.search.study import open_storage, run_method
    from pipeline.stages.search import prepare, trial_logger
    from pipeline.tracking import Tracker

    fp32 = load_model(cfg.model)
    setup = prepare(cfg, fp32, torch.device("cpu"), run_dir / "calibrate", None)
    plain = attach_sites(fp32.model)
    specs = resolve_recipe(cfg.quant, plain)
    bind(plain, specs, CalibState.load(run_dir / "calibrate"))
    batches = setup.evaluator.batches
    tmp = Path(tmp or tempfile.mkdtemp(prefix="bench_search_speed_"))
    tracker = Tracker(TrackingConfig(uri=f"sqlite:///{tmp}/mlflow.db", experiment="speed"))
    tracker.connect()
    tracker.start("speed", {}, {})
    storage = open_storage(f"sqlite:///{tmp}/optuna.db", int(cfg.search.heartbeat_s))
    forward, trial = [], []
    s = cfg.search
    for k in range(1, trials + 1):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                plain.model(x)
        forward.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_method("random", storage, "speed", "speed", setup.space, setup.evaluator.evaluate, float(s.budget), s.objective, k, None, s.prior, 0, 0, 0.5, 1, 0, trial_logger(tracker, s.objective))
        trial.append(time.perf_counter() - t0)
    tracker.end()
    f, t = sorted(forward)[len(forward) // 2], sorted(trial)[len(trial) // 2]
    return {"images": sum(int(b.shape[0]) for b in batches), "groups": len(setup.space.groups), "forward_s": forward, "trial_s": trial, "median_forward_s": f, "median_trial_s": t, "ratio": t / f, "target": 1.3, "pass": t / f <= 1.3}


def regime_row(name: str, spec: dict, run_dir: Path, summary: dict, wall: float, fwd: float) -> dict:
    results = summary["search_results"]
    methods = {}
    for m, entry in results["methods"].items():
        best = entry["best"] or {}
        test = best.get("test") or {}
        methods[m] = {
            "best_kl_search": best.get("value"),
            "best_cost": best.get("cost"),
            "best_source": best.get("source"),
            "trials": entry["trials"],
            "evaluations": entry["evaluations"],
            "test_top1": test.get("top1"),
            "test_agreement": test.get("agreement"),
            "test_kl": test.get("kl"),
            "raised_groups": len(best.get("raised") or []),
            "evaluated_here": entry["evaluated_here"],
            "wall_s": entry["seconds"],
            "wall_per_trial_s": entry["seconds"] / entry["evaluated_here"] if entry["evaluated_here"] else None,  # None: resumed, nothing left to run
            "mean_trial_s": entry["mean_trial_s"],
            "mean_eval_s": entry["mean_eval_s"],
        }
    refs = {n: {"cost": r["cost"], "kl_search": r["search"]["kl"], **{f"test_{k}": (r["test"] or {}).get(k) for k in ("top1", "agreement", "kl")}} for n, r in results["references"].items()}
    prior = methods.get("prior", {})
    others = [methods[m]["best_kl_search"] for m in ("random", "greedy") if m in methods and methods[m]["best_kl_search"] is not None]
    row = {
        "regime": name,
        **spec,
        "run_dir": str(run_dir),
        "space": results["space"],
        "methods": methods,
        "references": refs,
        "best": results.get("best"),
        "prior_beats_random_and_greedy": bool(prior.get("best_kl_search") is not None and others and all(prior["best_kl_search"] < o for o in others)),
        "wall_s": wall,
        "quantized_forward_s": fwd,
        "trial_cost_ratio": prior["wall_per_trial_s"] / fwd if fwd and prior.get("wall_per_trial_s") else None,  # rough: the search ran earlier than this forward pass; see "speed"
    }
    if "sensitivity_sites" in summary or any(k.startswith("spearman/") for k in summary):
        row["sensitivity"] = {k: v for k, v in summary.items() if k.startswith(("spearman/", "top5_overlap/", "hutchinson_iters", "sensitivity_"))}
    return row


def markdown(report: dict) -> str:
    """The README table: per regime and method, the search objective and the test metrics."""
    lines = [
        "| regime | method | KL search (x1e-3) | cost | test top-1 | test agreement | test KL (x1e-3) | groups raised |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sorted(report.get("regimes", {}).items()):
        label = f"{name}: {r['model']}, `{r['quant']}`, W{r['weight_bits']} A{r['act_bits']}, budget {r['budget']}"
        for m in ("prior", "random", "greedy"):
            e = r["methods"].get(m)
            if not e:
                continue
            best = "**" if m == "prior" and r.get("prior_beats_random_and_greedy") else ""
            lines.append(f"| {label} | {m} | {best}{e['best_kl_search'] * 1e3:.3f}{best} | {e['best_cost']:.3f} | {e['test_top1']:.3f} | {e['test_agreement']:.3f} | {e['test_kl'] * 1e3:.3f} | {e['raised_groups']} |")
            label = ""
        for ref, ref_name in (("all_low", "all lowest"), ("all_high", "all highest")):
            e = r["references"][ref]
            lines.append(f"| | {ref_name} | {e['kl_search'] * 1e3:.3f} | {e['cost']:.3f} | {e['test_top1']:.3f} | {e['test_agreement']:.3f} | {e['test_kl'] * 1e3:.3f} | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regimes", default="a,b,c")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--search-size", type=int, default=256)
    parser.add_argument("--eval-size", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--out", default=str(ROOT / "bench/results/search.json"))
    parser.add_argument("--speed-trials", type=int, default=6, help="interleaved trial / forward pairs for the speed ratio (0: skip)")
    parser.add_argument("--table", action="store_true", help="print the README table of --out and exit")
    parser.add_argument("--reuse-tag", default=None, help="reuse the calibrate/ and sensitivity/ folders of an earlier bench tag (search only)")
    args = parser.parse_args()
    if args.table:
        print(markdown(json.loads(Path(args.out).read_text())))
        return

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    register_resolvers()
    register_configs()
    from pipeline.runner import run_pipeline

    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    report = {
        "trials_per_method": args.trials,
        "search_size": args.search_size,
        "eval_size": args.eval_size,
        "threads": args.threads,
        "machine": machine(),
        "tag": args.tag,
        "reuse_tag": args.reuse_tag,
        "regimes": dict(previous.get("regimes", {})) if previous.get("trials_per_method") == args.trials and previous.get("tag") == args.tag else {},
    }
    if "speed" in previous:
        report["speed"] = previous["speed"]
    run_dirs: dict[str, Path] = {k: Path(v.get("calib_dir", v["run_dir"])) for k, v in report["regimes"].items()}  # folders holding calibrate/
    for name in [r for r in args.regimes.split(",") if r]:
        spec = REGIMES[name]
        run_dir = ROOT / "mlruns" / "outputs" / "bench_search" / f"{args.tag}-{name}"
        calib_dir = run_dir
        stages = "[calibrate,sensitivity,search]"
        extra = []
        if "from" in spec and spec["from"] in run_dirs:
            stages, extra = "[search]", [f"from_run={run_dirs[spec['from']]}"]
            calib_dir = run_dirs[spec["from"]]
        elif args.reuse_tag and (reuse := run_dir.with_name(f"{args.reuse_tag}-{name}")).joinpath("sensitivity").is_dir():
            # Calibration and sensitivity of an earlier bench run (same model, recipe, data): only the search runs.
            stages, extra = "[search]", [f"from_run={reuse}"]
            calib_dir = reuse
        elif (run_dir / "calibrate").is_dir() and (run_dir / "sensitivity").is_dir() and not (run_dir / "search").is_dir():
            # An interrupted earlier attempt with this tag: reuse its stages; the studies resume from the storage.
            stages, extra = "[search]", [f"from_run={run_dir}"]
            run_dir = run_dir.with_name(run_dir.name + "-resumed")
        overrides = [
            f"model={spec['model']}", f"quant={spec['quant']}", f"stages={stages}", *extra,
            f"data.search_size={args.search_size}", f"data.eval_size={args.eval_size}", "data.num_workers=0", f"threads={args.threads}", "device=cpu",
            "search.method=all", f"search.trials={args.trials}", f"search.budget={spec['budget']}",
            f"search.weight_bits=[{','.join(map(str, spec['weight_bits']))}]", f"search.act_bits=[{','.join(map(str, spec['act_bits']))}]",
            f"search.study_name=bench-{args.tag}-{name}", "tracking.run_name=bench-search-" + name,
        ]
        print(f"== regime {name}: {' '.join(overrides)}", flush=True)
        cfg = compose(overrides)
        t0 = time.perf_counter()
        summary = run_pipeline(cfg, run_dir)
        wall = time.perf_counter() - t0
        torch.set_num_threads(args.threads)
        fwd = forward_seconds(calib_dir, cfg)
        row = {**regime_row(name, spec, run_dir, summary, wall, fwd), "calib_dir": str(calib_dir)}
        sens = calib_dir / "sensitivity" / "sensitivity.json"
        if sens.is_file():
            data = json.loads(sens.read_text())
            row["sensitivity"] = {"file": str(sens), **data["ranking"], "hutchinson": data["meta"]["hutchinson"], "seconds": data["meta"]["seconds"], "noise_images": data["meta"]["noise_images"], "hessian_images": data["meta"]["hessian_images"]}
        report["regimes"][name] = row
        run_dirs[name] = calib_dir
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text(out, json.dumps(report, indent=2) + "\n")  # atomic
        print(json.dumps(report["regimes"][name], indent=2), flush=True)
    if args.speed_trials > 0 and "a" in run_dirs:
        spec = REGIMES["a"]
        cfg = compose([f"model={spec['model']}", f"quant={spec['quant']}", f"data.search_size={args.search_size}", "data.num_workers=0", f"threads={args.threads}", "device=cpu", f"search.budget={spec['budget']}"])
        torch.set_num_threads(args.threads)
        report["speed"] = speed(run_dirs["a"], cfg, args.speed_trials)
        write_text(out, json.dumps(report, indent=2) + "\n")  # atomic
        print(json.dumps(report["speed"], indent=2), flush=True)


if __name__ == "__main__":
    main()
