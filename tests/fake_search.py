"""A model-free search problem for the study tests (storage, resume, workers), also runnable as a worker:

    python -m tests.fake_search STORAGE STUDY METHOD TRIALS DELAY_S LOG_PATH
"""

from __future__ import annotations

import json
import os
import sys
import time

from pipeline.search.space import Group, SearchSpace

N = 12
BUDGET = 1.3


def fake_space(n: int = N) -> SearchSpace:
    names = [f"s{i}" for i in range(n)]
    groups = [Group(s, [s], {s: [8, 16]}) for s in names]
    kinds = {s: ("weight" if i % 3 == 0 else "act") for i, s in enumerate(names)}
    elements = {s: 100 * (1 + i % 4) for i, s in enumerate(names)}
    return SearchSpace(groups, kinds, elements, float(sum(elements.values())))


def sensitivity_of(i: int) -> float:
    return 1.0 / (1 + i) ** 1.5


def fake_sensitivity(space: SearchSpace) -> dict:
    sites = {}
    for i, g in enumerate(space.groups):
        s = sensitivity_of(i)
        sites[g.name] = {"kind": space.kinds[g.name], "scores": {"noise_kl": {"8": s, "16": s / 65536}, "hessian": {"8": s * (1 + 0.1 * (i % 3)), "16": 0.0}}}
    return {"meta": {"model": "fake"}, "sites": sites}


def fake_metrics(widths: dict, delay: float = 0.0) -> dict:
    if delay:
        time.sleep(delay)
    kl = sum(sensitivity_of(int(s[1:])) * (1.0 if w == 8 else 1 / 65536) for s, w in widths.items())
    return {"kl": kl, "agreement": 1 - kl / 10, "top1": 0.5, "loss": 1.0, "eval_s": delay}


def run(storage_url: str, study: str, method: str, trials: int, delay: float = 0.0, log_path: str | None = None, heartbeat_s: int = 1, interrupt_at: int | None = None):
    """`interrupt_at`: the evaluation (1, 2, ...) that raises KeyboardInterrupt, as Ctrl-C or SIGTERM would."""
    from pipeline.search.study import open_storage, run_method

    space = fake_space()
    calls = []

    def evaluate(widths: dict) -> dict:
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt("SIGTERM")
        return fake_metrics(widths, delay)

    def on_trial(record, space, study_name):
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps({"pid": os.getpid(), "trial": record.number, "duplicate_of": record.duplicate_of, "cost": record.cost}) + "\n")

    storage = open_storage(storage_url, heartbeat_s)
    return run_method(method, storage, study, "fake", space, evaluate, BUDGET, "kl", trials, fake_sensitivity(space), "noise_kl", 2, 3, 0.5, 2, 0, on_trial)


if __name__ == "__main__":
    url, name, method, n, delay, log = sys.argv[1:7]
    run(url, name, method, int(n), float(delay), log)
