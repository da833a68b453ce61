"""Command-line acceptance of the search stage on the reference ViT (small subsets, so it runs in minutes).

1. Resume: start `python -m pipeline ... stages=[search]`, SIGKILL it once some trials are complete,
   rerun the same command: the completed trials are kept (not redone) and the study reaches the count.
2. Two worker processes (the same command started twice) on one SQLite storage: N trials in total,
   each evaluated once.
3. A budget below the minimum, an unknown objective, and a sensitivity file of another model each
   end with one `error: ...` line and exit code 2.

Writes bench/results/search_acceptance.json. Usage: .venv/bin/python bench/acceptance_search.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(args: list[str], wait: bool = True, timeout: int = 1800):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "pipeline", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def study_state(url: str, name: str) -> dict:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        return {"COMPLETE": [], "RUNNING": [], "FAIL": [], "PRUNED": [], "WAITING": []}
    out: dict[str, list[int]] = {"COMPLETE": [], "RUNNING": [], "FAIL": [], "PRUNED": [], "WAITING": []}
    for t in study.get_trials(deepcopy=False):
        out.setdefault(t.state.name, []).append(t.number)
    return out


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="acceptance_search_"))
    url = f"sqlite:///{tmp}/optuna.db"
    common = [
        "quant=recommended", "threads=1", "device=cpu", "data.num_workers=0", "data.calib_size=64", "data.search_size=64", "data.eval_size=100",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"cache_dir={tmp}/cache",
        "sensitivity.batch_size=16", "sensitivity.batches=1", "sensitivity.noise_batches=1", "sensitivity.hutchinson_iters=4", "sensitivity.isolated=false",
        f"search.storage={url}", "search.heartbeat_s=2",
    ]
    report: dict = {"tmp": str(tmp)}
    base = tmp / "base"
    p = cli([*common, "stages=[calibrate,sensitivity]", f"hydra.run.dir={base}"])
    assert p.returncode == 0, p.stderr[-2000:]

    # 1. SIGKILL mid-way, then the same command again.
    n = 10
    cmd = [*common, "stages=[search]", f"from_run={base}", f"search.trials={n}", "search.study_name=acc-resume", "search.test=false"]
    proc = cli([*cmd, f"hydra.run.dir={tmp}/resume1"], wait=False)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None and len(study_state(url, "acc-resume")["COMPLETE"]) < 4:
        time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = study_state(url, "acc-resume")
    t0 = time.time()
    p = cli([*cmd, f"hydra.run.dir={tmp}/resume2"])
    after = study_state(url, "acc-resume")
    results = json.loads((tmp / "resume2/search/results.json").read_text()) if p.returncode == 0 else {}
    evaluated = results.get("methods", {}).get("prior", {}).get("evaluated_here")
    report["resume"] = {
        "trials": n,
        "complete_before_kill": before["COMPLETE"],
        "running_at_kill": before["RUNNING"],
        "rerun_exit": p.returncode,
        "rerun_s": round(time.time() - t0, 1),
        "complete_after": after["COMPLETE"],
        "failed_after": after["FAIL"],
        "evaluated_by_rerun": evaluated,
        "kept": set(before["COMPLETE"]) <= set(after["COMPLETE"]),
        "new_trials_by_rerun": len(set(after["COMPLETE"]) - set(before["COMPLETE"])),
        "ok": p.returncode == 0 and len(after["COMPLETE"]) == n and set(before["COMPLETE"]) <= set(after["COMPLETE"]) and len(set(after["COMPLETE"]) - set(before["COMPLETE"])) == n - len(before["COMPLETE"]),
    }
    print(json.dumps(report["resume"]), flush=True)

    # 2. Two workers on one storage.
    cmd = [*common, "stages=[search]", f"from_run={base}", f"search.trials={n}", "search.study_name=acc-workers", "search.test=false"]
    procs = [cli([*cmd, f"hydra.run.dir={tmp}/worker{i}"], wait=False) for i in range(2)]
    codes = [pr.wait(timeout=1800) for pr in procs]
    state = study_state(url, "acc-workers")
    evaluated = []
    for i in range(2):
        f = tmp / f"worker{i}/search/results.json"
        evaluated.append(json.loads(f.read_text())["methods"]["prior"]["evaluated_here"] if f.is_file() else None)
    report["workers"] = {
        "trials": n,
        "exit_codes": codes,
        "complete": len(state["COMPLETE"]),
        "pruned_surplus": len(state["PRUNED"]),
        "evaluated_per_worker": evaluated,
        "ok": codes == [0, 0] and len(state["COMPLETE"]) == n and None not in evaluated and sum(evaluated) <= n,
    }
    print(json.dumps(report["workers"]), flush=True)

    # 3. One clear line each.
    foreign = tmp / "foreign_sensitivity.json"
    foreign.write_text(json.dumps({"meta": {"model": "0" * 16, "model_name": "deit_small_patch16_224"}, "sites": {}}))
    errors = {}
    for label, extra in {
        "budget_below_minimum": ["search.budget=0.9"],
        "budget_below_minimum_w4": ["search.budget=0.5", "search.weight_bits=[4,8]"],
        "unknown_objective": ["search.objective=accuracy"],
        "foreign_sensitivity": [f"search.sensitivity={foreign}"],
    }.items():
        p = cli([*common, "stages=[search]", f"from_run={base}", *extra, f"hydra.run.dir={tmp}/err_{label}"])
        lines = [line for line in p.stderr.strip().splitlines() if line.strip()]
        errors[label] = {"exit": p.returncode, "last_line": lines[-1] if lines else "", "ok": p.returncode == 2 and bool(lines) and lines[-1].startswith("error: ")}
    report["errors"] = errors
    print(json.dumps(errors, indent=1), flush=True)
    report["ok"] = report["resume"]["ok"] and report["workers"]["ok"] and all(e["ok"] for e in errors.values())
    out = ROOT / "bench/results/search_acceptance.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("ok" if report["ok"] else "NOT ok", out)


if __name__ == "__main__":
    main()
