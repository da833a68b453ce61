"""Mixed-precision search: cost model, ties, repair, priors, storage/resume/workers, the stage end to end."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline import PROJECT_ROOT
from pipeline.errors import PipelineError
from pipeline.quant.calibration import bind, calibrate
from pipeline.quant.recipe import resolve_recipe
from pipeline.quant.sites import attach_sites
from pipeline.search.objective import Evaluator
from pipeline.search.priors import Priors, greedy_fill, raise_probabilities, repair
from pipeline.search.space import Group, SearchSpace, build_space, calibrated_act_sites, check_act_widths
from tests import fake_search
from tests.conftest import compose
from tests.test_sensitivity import labelled, tiny_outlier_model

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    model = tiny_outlier_model()
    graph = attach_sites(model)
    specs = resolve_recipe(compose(["quant=recommended"]).quant, graph)
    state = calibrate(graph, specs, labelled(2, 8, seed=5), CPU, [8, 16])
    return model, graph, specs, state


def space_of(tiny, act=(8, 16), weight=(8, 16), ties=(), **kw):
    model, graph, specs, state = tiny
    return build_space(graph, specs, list(act), list(weight), list(ties), torch.zeros(1, 3, 32, 32), **kw)


# -- cost model and space ----------------------------------------------------------------------


def test_a_softmax_width_whose_log2_grid_cannot_reach_even_attention_is_no_candidate(tiny):
    # recommended's log2 softmax (frac_bits 3) at 4 bits flushes every p < 0.27: such a trial is noise, not a choice
    with pytest.raises(PipelineError, match=r"search.act_bits=\[4, 8\]: site blocks.0.attn.softmax: log2 at 4 bits with frac_bits=3"):
        space_of(tiny, act=(4, 8))


def test_cost_is_normalised_to_all_int8(tiny):
    space = space_of(tiny)
    assert space.cost(space.lowest()) == pytest.approx(1.0)
    assert space.cost(space.highest()) == pytest.approx(2.0)
    w4 = space_of(tiny, weight=(4, 8))
    weight_share = sum(w4.site_cost(n, 8) for n, k in w4.kinds.items() if k == "weight")
    assert 0.5 < weight_share < 1.0  # the tiny model: few tokens, weights dominate
    assert w4.min_cost() == pytest.approx(1.0 - weight_share / 2)  # 4-bit weights cost half
    assert w4.cost({g.name: 1 if "weight" in g.name else 0 for g in w4.groups}) == pytest.approx(1.0)
    heavy = space_of(tiny, weight_cost_weight=3.0)
    assert heavy.cost(heavy.lowest()) == pytest.approx(1.0)
    assert sum(heavy.site_cost(n, 8) for n, k in heavy.kinds.items() if k == "weight") > weight_share


def test_activation_elements_are_per_image(tiny):
    space = space_of(tiny)
    assert space.elements["blocks.0.attn.sv"] == 17 * 192  # 16 patches + class token, 192 channels
    assert space.elements["blocks.0.attn.scores"] == 3 * 17 * 17
    assert space.elements["blocks.0.mlp.fc1.weight"] == 768 * 192


def test_ties_group_sites(tiny):
    plain = space_of(tiny)
    qkv = space_of(tiny, ties=["qkv"])
    assert len(plain.groups) - len(qkv.groups) == 2 * 2  # two blocks: q, k, v -> one group each
    assert qkv.by_name["blocks.1.attn.{q,k,v}"].members == ["blocks.1.attn.q", "blocks.1.attn.k", "blocks.1.attn.v"]
    wi = space_of(tiny, act=(8, 16), weight=(4, 8), ties=["qkv", "weight_with_input"])
    group = next(g for g in wi.groups if "blocks.0.attn.qkv.weight" in g.members)
    assert set(group.members) == {"blocks.0.norm1", "blocks.0.attn.qkv.weight"}
    assert group.widths == {"blocks.0.norm1": [8, 16], "blocks.0.attn.qkv.weight": [4, 8]}
    assert any(set(g.members) == {"head.in", "head.weight"} for g in wi.groups)
    with pytest.raises(PipelineError, match="as many candidate widths"):
        space_of(tiny, act=(8, 16), weight=(4, 8, 16), ties=["weight_with_input"])
    with pytest.raises(PipelineError, match="unknown tie 'kqv'"):
        space_of(tiny, ties=["kqv"])


def test_qkv_tie_holds_q_and_k_before_their_norms():
    from pipeline.search.space import tie_key
    from tests.test_sites import build

    graph = attach_sites(build("vit_every_norm"))  # qk_norm: q_norm.in / k_norm.in are qkv's outputs too
    members = [n for n in graph.names() if n.startswith("blocks.0.attn.") and graph[n].role == "qkv"]
    assert len(members) == 5 and {tie_key(graph, n, "qkv") for n in members} == {"blocks.0.attn.qkv"}


def test_uncalibrated_width_is_a_clear_error(tiny):
    _, _, specs, state = tiny
    widths = {n: state.index["sites"][n]["bits"] for n in calibrated_act_sites(specs)}
    assert widths and "blocks.0.attn.qkv.weight" not in widths and all(w == [8, 16] for w in widths.values())
    check_act_widths(widths, [8, 16])
    with pytest.raises(PipelineError, match="calibrated for bits \\[8, 16\\], not \\[12\\]"):
        check_act_widths(widths, [8, 12])


# -- repair, greedy, priors --------------------------------------------------------------------


def test_repair_never_exceeds_the_budget_and_keeps_feasible_assignments():
    space = fake_search.fake_space()
    priors = Priors(space, fake_search.fake_sensitivity(space), "noise_kl")
    rng = random.Random(0)
    for budget in (1.0, 1.05, 1.3, 1.7, 2.0):
        for _ in range(200):
            levels = {g.name: rng.randrange(2) for g in space.groups}
            for p in (priors, None):
                fixed, lowered = repair(space, levels, budget, p, rng)
                assert space.cost(fixed) <= budget + 1e-12
                assert all(fixed[n] <= levels[n] for n in levels)
                if space.cost(levels) <= budget:
                    assert fixed == levels and lowered == 0
    with pytest.raises(PipelineError, match="search.budget=0.9 is below the minimum possible cost"):
        repair(space, space.highest(), 0.9, priors)


def test_repair_lowers_the_least_useful_groups_first():
    space = fake_search.fake_space()
    priors = Priors(space, fake_search.fake_sensitivity(space), "noise_kl")
    fixed, _ = repair(space, space.highest(), 1.3, priors)
    kept = [n for n, lvl in fixed.items() if lvl]
    dropped = [n for n, lvl in fixed.items() if not lvl]
    assert kept and dropped and space.cost(fixed) <= 1.3
    assert min(priors.priority(n, 0) for n in kept) >= max(priors.priority(n, 0) for n in dropped) - 1e-12


def test_greedy_fill_is_maximal_and_in_budget():
    space = fake_search.fake_space()
    priors = Priors(space, fake_search.fake_sensitivity(space), "noise_kl")
    levels = greedy_fill(space, priors, 1.3)
    cost = space.cost(levels)
    assert cost <= 1.3
    assert all(cost + space.raise_cost(n, 0) > 1.3 for n, lvl in levels.items() if lvl == 0)
    assert levels["s0"] == 1  # the most sensitive group per cost goes first


def test_greedy_spends_every_evaluation_it_can_and_never_more():
    # Replays greedy_plan as run_greedy does, measuring each planned assignment once. The step before
    # the last keeps an evaluation for the final fill only when a fill can follow: with trials=10 and
    # width 2 the last step's second candidate used to be cut for a fill that turned out to be that step's.
    from pipeline.search.study import greedy_plan

    space = fake_search.fake_space()
    priors = Priors(space, fake_search.fake_sensitivity(space), "noise_kl")

    def evaluations(trials: int, width: int) -> int:
        results: dict[str, float] = {}
        while True:
            plan, done = greedy_plan(space, priors, fake_search.BUDGET, trials, width, results, "kl")
            if done or not plan:
                return len(results)
            for _, levels in plan:
                results[space.key(levels)] = fake_search.fake_metrics(space.widths(levels))["kl"]

    assert evaluations(10, 2) == 10
    complete = evaluations(100, 2)  # the whole greedy path to a full budget
    for trials in range(1, 16):
        for width in (1, 2, 3):
            assert evaluations(trials, width) <= trials
        assert evaluations(trials, 2) == min(trials, complete)


def test_greedy_resumed_with_more_trials_stays_within_them():
    # A study resumed with more trials holds the shorter run's final fill, off the longer path: it
    # counts. Random small spaces (3,000 of them overshot in 82 cases before).
    import random as rnd

    from pipeline.search.space import Group, SearchSpace
    from pipeline.search.study import greedy_plan

    checked = 0
    for case in range(300):
        rng = rnd.Random(case)
        names = [f"s{i}" for i in range(rng.randint(2, 6))]
        elements = {n: rng.choice([50, 100, 200]) for n in names}
        space = SearchSpace([Group(n, [n], {n: [4, 8, 16]}) for n in names], {n: "act" for n in names}, elements, float(sum(elements.values())))
        scores = {n: {"kind": "act", "scores": {"noise_kl": {str(w): rng.random() for w in (4, 8, 16)}}} for n in names}
        priors, budget = Priors(space, {"meta": {}, "sites": scores}, "noise_kl"), rng.uniform(1.0, 2.2)
        first, width = rng.randint(1, 8), rng.randint(1, 4)
        then = first + rng.randint(1, 6)
        results: dict[str, float] = {}
        for trials in (first, then):
            for _ in range(100):
                plan, done = greedy_plan(space, priors, budget, trials, width, results, "kl")
                if done or not plan:
                    break
                results.update({space.key(levels): rng.random() for _, levels in plan})
            assert len(results) <= trials, (case, trials)
        checked += 1
    assert checked == 300


def test_local_moves_stay_in_budget_and_change_the_assignment():
    from pipeline.search.priors import local_move

    space = fake_search.fake_space()
    priors = Priors(space, fake_search.fake_sensitivity(space), "noise_kl")
    start = greedy_fill(space, priors, 1.3)
    rng = random.Random(3)
    moved = [local_move(space, priors, start, 1.3, rng) for _ in range(50)]
    assert all(space.cost(m) <= 1.3 + 1e-12 for m in moved)
    assert sum(m != start for m in moved) > 25


def test_local_moves_are_swaps_that_skip_measured_assignments_until_none_is_left():
    from pipeline.search.priors import local_move

    space = fake_search.fake_space()
    priors = Priors(space, fake_search.fake_sensitivity(space), "noise_kl")
    start = greedy_fill(space, priors, 1.3)
    rng, seen, moves = random.Random(0), {space.key(start)}, []
    while (moved := local_move(space, priors, start, 1.3, rng, exclude=seen)) is not None and len(moves) < 500:
        assert space.key(moved) not in seen and space.cost(moved) <= 1.3 + 1e-12
        assert 1 <= sum(start[n] > moved[n] for n in start) <= 2  # one or two raises undone, the rest of the incumbent kept
        seen.add(space.key(moved))
        moves.append(moved)
    assert moved is None and len(moves) >= 2  # the neighbourhood is finite: once measured, nothing new is proposed


def test_raise_probabilities_meet_the_budget_in_expectation():
    space = fake_search.fake_space()
    priors = Priors(space, fake_search.fake_sensitivity(space), "noise_kl")
    probs = raise_probabilities(space, priors, 1.3, temperature=0.5)
    expected = sum(p * space.raise_cost(n, 0) for n, p in probs.items())
    assert expected == pytest.approx(1.3 - space.min_cost(), rel=1e-6)
    assert probs["s0"] > probs["s11"]


def test_raise_probabilities_count_the_mean_raised_level_with_three_widths():
    from pipeline.search.space import Group, SearchSpace

    names = [f"s{i}" for i in range(10)]
    space = SearchSpace([Group(n, [n], {n: [8, 12, 16]}) for n in names], {n: "act" for n in names}, {n: 100 for n in names}, 1000.0)
    sens = {"meta": {"model": "fake"}, "sites": {n: {"kind": "act", "scores": {"noise_kl": {"8": 1 / (1 + i), "12": 1 / (1 + i) / 256, "16": 1 / (1 + i) / 65536}}} for i, n in enumerate(names)}}
    probs = raise_probabilities(space, Priors(space, sens, "noise_kl"), 1.2, temperature=0.5)
    # a raised group takes level 1 (12 bits: +0.05) or 2 (16 bits: +0.1) with equal odds: +0.075 expected
    expected = sum(p * (space.raise_cost(n, 0) + space.raise_cost(n, 0) + space.raise_cost(n, 1)) / 2 for n, p in probs.items())
    assert expected == pytest.approx(1.2 - space.min_cost(), rel=1e-6) and space.min_cost() == pytest.approx(1.0)


def test_local_moves_survive_a_near_zero_temperature_with_many_groups():
    from pipeline.search.priors import local_move

    space = fake_search.fake_space(200)
    priors = Priors(space, fake_search.fake_sensitivity(space), "noise_kl")
    start = space.highest()
    moved = local_move(space, priors, start, space.max_cost(), random.Random(0), temperature=1e-9)  # rank^(1/T) overflows a float
    assert moved is not None and sum(moved[n] < start[n] for n in start) in (1, 2)


def test_priors_reject_scores_without_the_width():
    space = fake_search.fake_space()
    sens = fake_search.fake_sensitivity(space)
    del sens["sites"]["s3"]["scores"]["noise_kl"]["16"]
    with pytest.raises(PipelineError, match="cover widths \\[8\\], not 8 and 16"):
        Priors(space, sens, "noise_kl")
    del sens["sites"]["s3"]["scores"]["noise_kl"]  # names what this site has, not what any site has
    with pytest.raises(PipelineError, match=r"no 'noise_kl' for s3 \(it has: hessian; noise scores need the site calibrated at sensitivity.noise_bits\)"):
        Priors(space, sens, "noise_kl")


# -- the assembled model ----------------------------------------------------------------------


def test_assembled_assignment_equals_bind_and_caches_weights(tiny):
    model, _, specs, state = tiny
    space = space_of(tiny, ties=["qkv"])
    x = labelled(1, 8, seed=4)[0][0]
    with torch.no_grad():
        ref = model(x)
    ev = Evaluator(attach_sites(model), specs, state, [x], ref, torch.zeros(8, dtype=torch.long), CPU)
    rng = random.Random(1)
    for _ in range(3):
        widths = space.widths({g.name: rng.randrange(2) for g in space.groups})
        got = ev.logits(widths)
        check = attach_sites(model)
        bind(check, specs, state, widths)
        with torch.no_grad():
            torch.testing.assert_close(got, check.model(x), rtol=0, atol=0)
    low = ev.evaluate(space.widths(space.lowest()))
    assert set(low) >= {"kl", "agreement", "top1", "loss", "eval_s"}


# -- studies: storage, resume, workers, baselines -------------------------------------------------


def test_each_method_stays_in_budget_and_prior_beats_random(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    runs = {m: fake_search.run(url, f"s-{m}", m, 8) for m in ("prior", "random", "greedy")}
    for m, run in runs.items():
        assert len(run.records) <= 8 and all(r.cost <= fake_search.BUDGET + 1e-12 for r in run.records), m
    assert len(runs["prior"].records) == 8 and len(runs["random"].records) == 8
    assert {r.source for r in runs["prior"].records} >= {"greedy-noise_kl-ratio", "prior-draw", "local"}
    assert runs["prior"].best("kl").value < runs["random"].best("kl").value
    assert len(runs["greedy"].records) == 8  # as many evaluations as the others
    last, space = runs["greedy"].records[-1], fake_search.fake_space()  # a fill, or a step that fills the budget
    assert last.source == "greedy-final" or all(last.cost + space.raise_cost(n, lvl) > fake_search.BUDGET for n, lvl in last.levels.items() if lvl + 1 < space.by_name[n].levels)


def test_resume_keeps_completed_trials_and_continues_to_a_larger_count(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    first = fake_search.run(url, "resume", "prior", 5)
    assert len(first.records) == 5 and first.evaluated_here == 5
    again = fake_search.run(url, "resume", "prior", 5)  # the same command: nothing to do
    assert len(again.records) == 5 and again.evaluated_here == 0
    more = fake_search.run(url, "resume", "prior", 7)
    assert len(more.records) == 7 and len({r.number for r in more.records} - {r.number for r in first.records}) == 2
    assert {r.number for r in first.records} <= {r.number for r in more.records}
    fewer = fake_search.run(url, "resume", "prior", 5)  # a study filled further reports its first 5, as the others would
    assert [r.number for r in fewer.records] == sorted(r.number for r in first.records) and fewer.evaluated_here == 0


def _worker(tmp_path: Path, url: str, study: str, trials: int, delay: float, log: Path, method: str = "random") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tests.fake_search", url, study, method, str(trials), str(delay), str(log)], cwd=PROJECT_ROOT, env=env, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("method, interrupt_at", [("greedy", 3), ("prior", 1)])  # a greedy step; the first prior seed
def test_a_step_or_seed_stopped_by_an_interrupt_is_run_again_on_resume(tmp_path, method, interrupt_at):
    """Ctrl-C or SIGTERM inside a trial fails it; resuming must enqueue that step or seed again (Optuna's
    skip_if_exists matched the failed trial: the greedy loop then spun for ever, and the seed was lost)."""
    import optuna

    url = f"sqlite:///{tmp_path}/o.db"
    with pytest.raises(KeyboardInterrupt):
        fake_search.run(url, "stopped", method, 8, interrupt_at=interrupt_at)
    trials = optuna.load_study(study_name="stopped", storage=url).get_trials(deepcopy=False)
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(failed) == 1 and failed[0].system_attrs.get("fixed_params")  # an enqueued step or seed
    resume = _worker(tmp_path, url, "stopped", 8, 0.0, tmp_path / "log.jsonl", method)  # a subprocess: the old code hung here
    try:
        _, err = resume.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        resume.kill()
        resume.communicate()
        raise
    assert resume.returncode == 0, err
    trials = optuna.load_study(study_name="stopped", storage=url).get_trials(deepcopy=False)
    complete = [t.system_attrs.get("fixed_params") for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert failed[0].system_attrs["fixed_params"] in complete


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_sqlite_storage_opens_where_sqlalchemy_puts_the_file(tmp_path, monkeypatch):
    import sqlalchemy

    from pipeline.search.study import open_storage
    from pipeline.tracking import sqlite_path

    monkeypatch.chdir(tmp_path)
    url = "sqlite:///~/nested/o.db"  # SQLAlchemy does not expand ~: the file is ./~/nested/o.db
    engine = sqlalchemy.create_engine(url)
    assert sqlite_path(url) == Path(engine.dialect.create_connect_args(engine.url)[0][0])
    assert sqlite_path("sqlite:///:memory:") is None and sqlite_path("postgresql://h/db") is None
    open_storage(url)
    assert (tmp_path / "~" / "nested" / "o.db").is_file()


def test_two_workers_on_one_sqlite_storage_share_the_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    log = tmp_path / "log.jsonl"
    procs = [_worker(tmp_path, url, "shared", 10, 0.3, log) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    entries = _log(log)
    numbers = [e["trial"] for e in entries]
    assert len(numbers) == 10 and len(set(numbers)) == 10  # N trials in total, none run twice
    assert len({e["pid"] for e in entries}) == 2  # both workers did some
    import optuna

    study = optuna.load_study(study_name="shared", storage=url)
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == 10


def test_sigkill_midway_then_rerun_keeps_completed_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/o.db"
    log = tmp_path / "log.jsonl"
    import optuna

    def committed() -> set[int]:
        """Trials the storage holds as COMPLETE: what survives a SIGKILL (the log may run ahead)."""
        try:
            trials = optuna.load_study(study_name="killed", storage=url).get_trials(deepcopy=False)
        except KeyError:  # the study does not exist yet
            return set()
        return {t.number for t in trials if t.state == optuna.trial.TrialState.COMPLETE}

    proc = _worker(tmp_path, url, "killed", 6, 0.6, log)
    deadline = time.time() + 90
    while len(committed()) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = committed()
    assert 2 <= len(done_before) < 6
    rerun = fake_search.run(url, "killed", "random", 6)  # the same command again
    assert len(rerun.records) == 6
    assert done_before <= {r.number for r in rerun.records}  # kept, not redone
    assert rerun.evaluated_here == 6 - len(done_before)


def test_a_trial_asked_but_never_run_goes_stale(tmp_path):
    """A worker killed between ask() and its objective must not leave a RUNNING trial that never goes stale."""
    import optuna

    from pipeline.search.study import make_sampler, open_storage

    storage = open_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_s=1)  # grace period 4 s
    space = fake_search.fake_space()
    study = optuna.create_study(study_name="asked", storage=storage, sampler=make_sampler(space, fake_search.BUDGET, "random", None, None, 0, 0))
    trial = study.ask()  # what a worker does before its heartbeat thread starts; then it dies
    time.sleep(6)  # > grace period, with the storage clock's 1 s resolution
    optuna.storages.fail_stale_trials(study)
    assert study.get_trials(deepcopy=False)[trial.number].state == optuna.trial.TrialState.FAIL


def test_a_retried_trial_evaluates_the_levels_it_records(tmp_path):
    """The heartbeat retry re-creates a dead trial as WAITING with its params (and no fixed params):
    the retry must evaluate those levels, so that Optuna's record matches the measured metrics."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    from pipeline.search.study import TrialObjective, make_sampler, open_storage, open_study

    space = fake_search.fake_space()
    sampler = make_sampler(space, fake_search.BUDGET, "random", None, None, 0, 0)
    study, _ = open_study(open_storage(f"sqlite:///{tmp_path}/s.db"), "retry", "minimize", sampler, "fp")
    dead = {g.name: int(i in (1, 2)) for i, g in enumerate(space.groups)}  # what the dead worker had drawn
    retry = optuna.create_trial(state=optuna.trial.TrialState.WAITING, params=dead, distributions={n: CategoricalDistribution([0, 1]) for n in dead}, system_attrs={"failed_trial": 0, "retry_history": [0]})
    study.add_trial(retry)  # as RetryHeartbeatStaleTrialCallback does
    evaluated = []
    objective = TrialObjective(space, lambda widths: evaluated.append(dict(widths)) or fake_search.fake_metrics(widths), fake_search.BUDGET, "kl", "random", None, 5, sampler)
    study.optimize(objective, n_trials=1)
    trial = study.trials[-1]
    assert trial.params == dead and trial.user_attrs["result"]["levels"] == dead
    assert evaluated == [space.widths(dead)]


def test_a_trial_killed_before_its_first_heartbeat_goes_stale(tmp_path):
    """A worker killed between Optuna creating its trial and the first heartbeat leaves a RUNNING
    trial with no heartbeat: it must go stale after the grace period (and be retried), or every
    worker waits on it for ever. A fresh one, still within the grace period, must not."""
    from datetime import datetime, timedelta

    import optuna

    from pipeline.search.study import open_storage

    storage = open_storage(f"sqlite:///{tmp_path}/s.db", heartbeat_s=1)  # grace period 4 s
    study = optuna.create_study(study_name="orphan", storage=storage)
    study_id = study._study_id

    def running(started: datetime) -> int:
        template = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING)
        template.datetime_start = started
        return storage.create_new_trial(study_id, template_trial=template)

    orphan = running(datetime.now() - timedelta(seconds=30))
    fresh = running(datetime.now())
    optuna.storages.fail_stale_trials(study)
    states = {t._trial_id: t.state for t in study.get_trials(deepcopy=False)}
    assert states[orphan] == optuna.trial.TrialState.FAIL
    assert states[fresh] == optuna.trial.TrialState.RUNNING
    assert list(states.values()).count(optuna.trial.TrialState.WAITING) == 1  # the orphan's retry


# -- the stage ----------------------------------------------------------------------------------


def search_overrides(tiny_overrides, tmp_path, *extra):
    return [
        *tiny_overrides, "quant=recommended", "threads=1", "data.calib_size=16", "data.search_size=16", "data.eval_size=16", "data.batch_size=16",
        "sensitivity.batch_size=4", "sensitivity.batches=1", "sensitivity.noise_batches=1", "sensitivity.hutchinson_iters=2", "sensitivity.hutchinson_min_iters=1", "sensitivity.isolated=false",
        f"search.storage=sqlite:///{tmp_path}/optuna.db", "search.trials=4", "search.n_startup=3", "search.seeds=2", *extra,
    ]


def test_stage_end_to_end_with_sensitivity_computed_first(tmp_path, tiny_overrides, mlflow_uri):
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from pipeline.config import QuantConfig
    from pipeline.runner import run_pipeline

    cfg = compose(search_overrides(tiny_overrides, tmp_path, "stages=[calibrate,search]", "search.budget=1.15", "tracking.run_name=search-e2e"))
    summary = run_pipeline(cfg, tmp_path / "run")
    folder = tmp_path / "run/search"
    assert (folder / "sensitivity/sensitivity.json").is_file()  # computed first
    results = json.loads((folder / "results.json").read_text())
    assert results["methods"]["prior"]["trials"] == 4 and results["best"]["cost"] <= 1.15
    assert summary["search_results"]["best"]["test"]["images"] == 16 and "search_test_agreement" in summary
    assert (folder / "plots/pareto.png").stat().st_size > 1000
    # The exported recipe reproduces the best assignment, through `quant=<name>` and as a plain file.
    best = json.loads((folder / "best_assignment.json").read_text())
    graph = attach_sites(tiny_outlier_model())
    composed = compose([f"hydra.searchpath=[file://{folder}]", f"quant={results['recipe']}"]).quant
    plain = OmegaConf.merge(OmegaConf.structured(QuantConfig), OmegaConf.load(folder / "recipe.yaml"))
    for quant in (composed, plain):
        specs = resolve_recipe(quant, graph)
        assert {n: specs[n].bits for n in best["widths"]} == best["widths"]
    # One nested MLflow run per trial, with the assignment as an artifact.
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("vit-ptq")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_name == "search-e2e")
    stage = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and r.info.run_name == "search")
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == stage.info.run_id]
    assert len(trials) == 4 and all("kl" in r.data.metrics and "cost" in r.data.metrics for r in trials)
    assert [a.path for a in client.list_artifacts(trials[0].info.run_id)] == ["assignment.json"]
    assert stage.data.tags["study.prior"] == results["methods"]["prior"]["study"]  # what a later run resumes
    assert stage.data.metrics["search/prior/evaluated_here"] == stage.data.metrics["search/prior/trials"] == 4


@pytest.mark.parametrize(
    "extra, message",
    [
        (["search.objective=accuracy"], "search.objective: unknown objective 'accuracy'"),
        (["search.method=bayes"], "search.method: unknown method 'bayes'"),
        (["search.prior_temperature=0"], "search.prior_temperature must be > 0, got 0"),
        (["search.storage=notaurl"], "search.storage=notaurl: not a usable database URL"),
        (["search.storage=nodb://host/x"], "search.storage=nodb://host/x: not a usable database URL"),
        (["search.storage=sqlite:///{tmp}/file.db/sub/o.db"], r"cannot make the folder .*file\.db/sub \(.*file\.db is not a writable folder\)"),
        (["search.storage=sqlite:///{tmp}/mlflow.db", "tracking.uri=sqlite:///{tmp}/mlflow.db"], "is the MLflow tracking store's database"),
        (["search.budget=inf"], "search.budget must be a finite number > 0, got inf"),
        (["search.seeds=-1"], "search.seeds must be >= 0, got -1"),
    ],
)
def test_bad_search_config_fails_before_any_run(tmp_path, tiny_overrides, extra, message):
    from pipeline.runner import run_pipeline

    (tmp_path / "file.db").write_text("")  # a file where the storage wants a folder
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    with pytest.raises(PipelineError, match=message):
        run_pipeline(compose(search_overrides(tiny_overrides, tmp_path, "stages=[calibrate,search]", *extra)), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_budget_below_minimum_and_foreign_sensitivity_fail_before_any_trial(tmp_path, tiny_overrides, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from pipeline.runner import run_pipeline

    def mlflow_runs() -> int:
        client = MlflowClient(mlflow_uri)
        return len(client.search_runs([e.experiment_id for e in client.search_experiments()]))

    run_pipeline(compose(search_overrides(tiny_overrides, tmp_path, "stages=[calibrate]")), tmp_path / "calib")
    opened = mlflow_runs()
    base = search_overrides(tiny_overrides, tmp_path, "stages=[search]", f"from_run={tmp_path / 'calib'}", "search.method=random")
    with pytest.raises(PipelineError, match="search.budget=0.9 is below the minimum possible cost 1.0000"):
        run_pipeline(compose([*base, "search.budget=0.9"]), tmp_path / "low")
    with pytest.raises(PipelineError, match="search.budget=0.5 is below the minimum possible cost 0\\."):
        run_pipeline(compose([*base, "search.budget=0.5", "search.weight_bits=[4,8]"]), tmp_path / "low4")
    with pytest.raises(PipelineError, match="search.budget=0.9 is below the minimum possible cost 1.0000"):  # calibrating in the same run
        run_pipeline(compose(search_overrides(tiny_overrides, tmp_path, "stages=[calibrate,search]", "search.budget=0.9")), tmp_path / "low_chain")
    assert not (tmp_path / "optuna.db").exists()  # no study, no trial
    assert mlflow_runs() == opened  # and no MLflow run: the budget is checked before any run opens
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"meta": {"model": "0123abcd", "model_name": "vit_other"}, "sites": {}}))
    with pytest.raises(PipelineError, match="belongs to another model \\(vit_other"):
        run_pipeline(compose([*base, "search.method=prior", f"search.sensitivity={foreign}"]), tmp_path / "foreign")
    assert not (tmp_path / "foreign").exists()  # found before any run opened
    for name, text, problem in (("empty.json", "{}", "is not an artifact of this pipeline"), ("cut.json", '{"meta": ', "not valid JSON")):
        (tmp_path / name).write_text(text)
        with pytest.raises(PipelineError, match=f"{name}.*{problem}"):
            run_pipeline(compose([*base, "search.method=prior", f"search.sensitivity={tmp_path / name}"]), tmp_path / f"run-{name}")
        assert not (tmp_path / f"run-{name}").exists()  # found before any run opened
    with pytest.raises(PipelineError, match="search.sensitivity=.*missing.json: file not found"):
        run_pipeline(compose([*base, "search.method=prior", f"search.sensitivity={tmp_path / 'missing.json'}"]), tmp_path / "missing")
    assert not (tmp_path / "missing").exists()
    meta = json.loads((tmp_path / "calib/calibrate/index.json").read_text())["meta"]  # this model's scores, without the prior's
    (tmp_path / "noprior.json").write_text(json.dumps({"meta": {"model": meta["model"]}, "sites": {"blocks.0.attn.sv": {"scores": {"noise_kl": {"8": 1.0}}}}}))
    with pytest.raises(PipelineError, match=r"search.prior=isolated_kl: the sensitivity scores in .*noprior.json have no 'isolated_kl' \(they have: noise_kl\)"):
        run_pipeline(compose([*base, "search.method=prior", "search.prior=isolated_kl", f"search.sensitivity={tmp_path / 'noprior.json'}"]), tmp_path / "noprior")
    with pytest.raises(PipelineError, match="search.prior=isolated_kl needs the isolated measurement"):
        run_pipeline(compose([*base, "search.method=greedy", "search.prior=isolated_kl", "sensitivity.isolated=false"]), tmp_path / "noisolated")
    assert mlflow_runs() == opened
    # The search subset is cut from the back of the calibration's own permutation: another seed cannot say
    # which images the calibration used, and a calibration over the whole split leaves none.
    with pytest.raises(PipelineError, match="drawn with data.seed=0, this run has 1"):
        run_pipeline(compose([*base, "data.seed=1"]), tmp_path / "seed")
    run_pipeline(compose(search_overrides(tiny_overrides, tmp_path, "stages=[calibrate]", "data.calib_size=0")), tmp_path / "all")
    with pytest.raises(PipelineError, match="the calibration uses all 64 images of split 'train'"):
        run_pipeline(compose([*base, f"from_run={tmp_path / 'all'}"]), tmp_path / "none_left")
    with pytest.raises(PipelineError, match="the calibration uses all 64 images"):  # calibrating in the same run
        run_pipeline(compose(search_overrides(tiny_overrides, tmp_path, "stages=[calibrate,search]", "data.calib_size=0")), tmp_path / "none_left")
    # widths the calibration does not cover: found before any run, from_run or in the same chain
    with pytest.raises(PipelineError, match=r"was calibrated for bits \[8, 16\], not \[12\]: add them to quant.candidate_bits"):
        run_pipeline(compose([*base, "search.act_bits=[8,12]"]), tmp_path / "widths")
    with pytest.raises(PipelineError, match=r"was calibrated for bits \[8, 16\], not \[12\]"):
        run_pipeline(compose(search_overrides(tiny_overrides, tmp_path, "stages=[calibrate,search]", "search.act_bits=[8,12]")), tmp_path / "widths")
    # a noise prior scored in this run needs sensitivity.noise_bits calibrated (sensitivity would skip those sites)
    with pytest.raises(PipelineError, match=r"search.prior=noise_kl scores sites at sensitivity.noise_bits=6, but site .* was calibrated for bits \[8, 16\]"):
        run_pipeline(compose([*base, "search.method=prior", "sensitivity.noise_bits=6"]), tmp_path / "noise")
    with pytest.raises(PipelineError, match=r"sensitivity.noise_bits=6, but site"):
        run_pipeline(compose(search_overrides(tiny_overrides, tmp_path, "stages=[calibrate,sensitivity,search]", "search.method=greedy", "sensitivity.noise_bits=6")), tmp_path / "noise")
    assert not any((tmp_path / name).exists() for name in ("seed", "none_left", "widths", "noise"))


def test_exported_recipe_reproduces_the_assignment_when_the_base_names_the_site_before_a_glob(tmp_path):
    """An exact `sites` entry of the base followed by a glob that also sets its width: the export must
    keep the entry's other fields and win over the glob."""
    from omegaconf import OmegaConf

    from pipeline.config import QuantConfig
    from pipeline.search.report import export_recipe

    graph = attach_sites(tiny_outlier_model())
    base = {"name": "base", "enabled": True, "weight": {"gptq": True}, "sites": {"head.weight": {"gptq": False}, "head.*": {"bits": 16}}}
    specs = resolve_recipe(base, graph)
    assert (specs["head.weight"].bits, specs["head.weight"].gptq) == (16, False)
    path = export_recipe(tmp_path / "r.yaml", base, {n: sp.bits for n, sp in specs.items()}, {"head.weight": 8}, "exported")
    again = resolve_recipe(OmegaConf.merge(OmegaConf.structured(QuantConfig), OmegaConf.load(path)), graph)
    assert (again["head.weight"].bits, again["head.weight"].gptq) == (8, False)
    assert {n: sp for n, sp in again.items() if n != "head.weight"} == {n: sp for n, sp in specs.items() if n != "head.weight"}


def test_a_rerun_resumes_its_study_and_another_seed_gets_its_own(tmp_path, tiny_overrides):
    from pipeline.runner import run_pipeline

    run_pipeline(compose(search_overrides(tiny_overrides, tmp_path, "stages=[calibrate]")), tmp_path / "calib")
    base = search_overrides(tiny_overrides, tmp_path, "stages=[search]", f"from_run={tmp_path / 'calib'}", "search.method=random", "search.trials=2", "search.test=false")

    def random_run(name: str, *extra: str) -> dict:
        return run_pipeline(compose([*base, *extra]), tmp_path / name)["search_results"]["methods"]["random"]

    first, again, other = random_run("first"), random_run("again"), random_run("other", "search.seed=1")
    assert first["study"] == again["study"] and again["evaluated_here"] == 0  # the same study: nothing left to do
    assert other["study"] != first["study"] and other["evaluated_here"] == 2  # a sweep over seeds shares no trials


def test_prior_and_greedy_studies_are_keyed_on_the_sensitivity_scores_random_ones_not():
    """Other scores make other priors: a study run with them must not resume one made with the first."""
    import copy
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from pipeline.quant.calibration import CalibState
    from pipeline.stages.search import fingerprint, scores_digest

    space = fake_search.fake_space()
    scores = fake_search.fake_sensitivity(space)
    doubled, jittered = copy.deepcopy(scores), copy.deepcopy(scores)
    doubled["sites"]["s3"]["scores"]["noise_kl"]["8"] *= 2
    jittered["sites"]["s3"]["scores"]["noise_kl"]["8"] *= 1 + 1e-12  # a recomputation's last bits
    assert scores_digest(scores) != scores_digest(doubled) and scores_digest(scores) == scores_digest(jittered)
    cfg = OmegaConf.create({"search": {"seed": 0, "prior": "noise_kl", "seeds": 2, "n_startup": 3, "prior_temperature": 0.5, "greedy_width": 2, "objective": "kl", "budget": 1.3}})
    fp32 = SimpleNamespace(fingerprint="fake")

    def key(sensitivity, method, state=CalibState({"s3/8/scale": torch.tensor([0.5])}, {"meta": {}})):
        setup = SimpleNamespace(specs={}, state=state, space=space, search_key="k", sensitivity=sensitivity)
        return fingerprint(cfg, fp32, setup, method)

    for method in ("prior", "greedy"):
        assert key(scores, method) != key(doubled, method)
    assert key(scores, "random") == key(doubled, "random") and "scores" not in key(scores, "random")
    # a calibration of the same images whose scales differ (another data.batch_size moves EMA ranges)
    rescaled = CalibState({"s3/8/scale": torch.tensor([0.25])}, {"meta": {}})
    assert key(scores, "random") != key(scores, "random", rescaled)


def test_a_worker_whose_parent_is_gone_interrupts_itself():
    """A search worker orphaned by a SIGKILL of the stage's process stops (its trial fails and is rerun
    on resume) instead of running the study to its end under a stage run no one closes."""
    from pipeline.search.worker import stop_when_orphaned

    import threading

    stopped = threading.Event()  # the worker's stop is _thread.interrupt_main; a signal in pytest's own process is not reliable
    stop_when_orphaned(parent=os.getppid() + 1_000_000, poll_s=0.01, stop=stopped.set)  # not our parent: as if it had died
    assert stopped.wait(10)


def test_optuna_does_not_log_an_interrupted_trial_as_a_failure_with_its_traceback():
    import logging

    from pipeline.search.study import _quiet_optuna

    _quiet_optuna()
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("optuna.study._optimize")
    log.addHandler(handler)
    try:
        for error in (KeyboardInterrupt("SIGTERM"), ValueError("a real failure")):
            try:
                raise error
            except BaseException:
                log.warning("Trial 3 failed: %r", error, exc_info=sys.exc_info())
    finally:
        log.removeHandler(handler)
    assert seen == ["Trial 3 failed: ValueError('a real failure')"]


def test_activation_elements_are_per_image_whatever_the_batch_given():
    model = tiny_outlier_model()
    graph = attach_sites(model)
    specs = resolve_recipe(compose(["quant=naive"]).quant, graph)
    one = build_space(graph, specs, [8, 16], [8, 16], [], torch.zeros(1, 3, 32, 32))
    four = build_space(graph, specs, [8, 16], [8, 16], [], torch.zeros(4, 3, 32, 32))  # the stage passes a whole batch
    assert four.elements == one.elements and four.norm == one.norm


def _line_space(n=6):
    names = [f"s{i}" for i in range(n)]
    return SearchSpace([Group(s, [s], {s: [8, 16]}) for s in names], {s: "act" for s in names}, {s: 100 for s in names}, 100.0 * n)


def test_raise_probabilities_follow_the_documented_formula():
    space = _line_space()
    gains = [1.0, 0.25, 0.04, 0.01, 0.0, 0.0]
    sens = {"meta": {}, "sites": {f"s{i}": {"scores": {"noise_kl": {"8": g, "16": 0.0}}} for i, g in enumerate(gains)}}
    priors = Priors(space, sens, "noise_kl")
    probs = raise_probabilities(space, priors, 1.0 + 0.5 * (1 / 6), temperature=0.5)
    # P = min(0.95, lambda * (priority / max)^T): uncapped groups keep the ratio sqrt(gain_i / gain_j)
    assert probs["s2"] / probs["s3"] == pytest.approx(math.sqrt(0.04 / 0.01), rel=1e-6)
    assert probs["s4"] == 0.0
    big = raise_probabilities(space, priors, 1.0 + 0.9 * 4 / 6, temperature=0.5)  # slack for nearly every gainful group
    assert max(big.values()) == pytest.approx(0.95)


def test_local_move_lowers_the_raise_with_the_least_gain_most_often_and_refills_in_priority_order():
    from pipeline.search.priors import local_move

    space = _line_space()
    sens = {"meta": {}, "sites": {f"s{i}": {"scores": {"noise_kl": {"8": 1.0 / (1 + i), "16": 0.0}}} for i in range(6)}}
    priors = Priors(space, sens, "noise_kl")
    start = {"s0": 1, "s1": 1, "s2": 1, "s3": 1, "s4": 0, "s5": 0}
    budget = space.cost(start)
    rng, lowered, single = random.Random(0), {n: 0 for n in start}, 0
    for _ in range(400):
        moved = local_move(space, priors, start, budget, rng)
        for n in start:
            lowered[n] += moved[n] < start[n]
        if sum(moved[n] < start[n] for n in start) == 1:  # one raise undone: the freed step goes to s4, the best group left
            single += 1
            assert moved["s4"] == 1 and moved["s5"] == 0
    assert single > 100
    assert lowered["s3"] > lowered["s2"] > lowered["s1"] > lowered["s0"]  # rank-weighted toward the lowest priority


def test_greedy_keeps_the_best_measured_candidate_of_each_step():
    from pipeline.search.study import greedy_plan

    space = _line_space(4)
    sens = {"meta": {}, "sites": {f"s{i}": {"scores": {"noise_kl": {"8": 1.0 / (1 + i), "16": 0.0}}} for i in range(4)}}
    priors = Priors(space, sens, "noise_kl")
    budget, low = 1.5, space.lowest()  # room for two raises
    plan, done = greedy_plan(space, priors, budget, 4, 2, {}, "kl")
    assert not done and [lv for _, lv in plan] == [{**low, "s0": 1}, {**low, "s1": 1}]
    # measured: raising s1 is better (lower KL) than raising s0, against the priors' order: s1 is kept
    results = {space.key({**low, "s0": 1}): 0.5, space.key({**low, "s1": 1}): 0.1}
    plan, done = greedy_plan(space, priors, budget, 4, 2, results, "kl")
    assert [lv for _, lv in plan] == [{**low, "s0": 1, "s1": 1}, {**low, "s1": 1, "s2": 1}]


def test_search_metrics_are_kl_of_fp32_to_quantized_agreement_and_top1():
    from pipeline.search.objective import metrics_of

    ref = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    q = torch.tensor([[0.0, 2.0, 0.0], [0.0, 1.5, 0.0]])
    labels = torch.tensor([0, 0])
    m = metrics_of(ref, q, labels)
    p, r = torch.softmax(ref.double(), 1), torch.softmax(q.double(), 1)
    assert m["kl"] == pytest.approx(float((p * (p.log() - r.log())).sum(1).mean()), rel=1e-9)  # KL(FP32 || quantized)
    assert m["agreement"] == 0.5 and m["top1"] == 0.0


def test_pareto_front_keeps_only_undominated_points():
    from pipeline.search.report import pareto_front

    pts = [(1.0, 0.5), (1.1, 0.5), (1.2, 0.3), (1.2, 0.4), (1.05, 0.6)]
    assert sorted(pareto_front(pts, minimize=True)) == [0, 2]  # (1.1, 0.5) is dominated by (1.0, 0.5)
    assert sorted(pareto_front([(c, -v) for c, v in pts], minimize=False)) == [0, 2]


def test_the_best_trial_on_a_tie_is_the_cheaper_one():
    from pipeline.search.study import MethodRun, TrialRecord
    from pipeline.stages.search import _best_of

    recs = [TrialRecord("prior", 0, 0.1, 1.10, {}, {}, "x"), TrialRecord("prior", 1, 0.1, 1.05, {}, {}, "x")]
    assert MethodRun("prior", "s", recs).best("kl").number == 1
    assert _best_of(recs, "kl").number == 1


def test_prior_draws_raise_with_the_prior_probability_and_repair_in_sensitivity_order():
    import optuna

    from pipeline.search.priors import repair
    from pipeline.search.sampler import BudgetSampler

    space = _line_space()
    sens = {"meta": {}, "sites": {f"s{i}": {"scores": {"noise_kl": {"8": 1.0 / (1 + i), "16": 0.0}}} for i in range(6)}}
    priors = Priors(space, sens, "noise_kl")
    never = BudgetSampler(space, 2.0, "prior", priors, {f"s{i}": (0.0 if i % 2 else 1.0) for i in range(6)}, 0, 10)
    rng = random.Random(0)
    assert all(never._draw(f"s{i}", rng) == (0 if i % 2 else 1) for i in range(6) for _ in range(20))
    # every group raised, budget for two: the sampler's repair keeps the two most sensitive (s0, s1)
    sampler = BudgetSampler(space, 1.0 + 2 / 6, "prior", priors, {f"s{i}": 1.0 for i in range(6)}, 0, 10)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    for _ in range(3):
        trial = study.ask()
        levels = {g.name: trial.suggest_categorical(g.name, [0, 1]) for g in space.groups}
        assert levels == repair(space, space.highest(), 1.0 + 2 / 6, priors)[0] == {"s0": 1, "s1": 1, "s2": 0, "s3": 0, "s4": 0, "s5": 0}
        study.tell(trial, 0.0)
        break


# -- mutation-found gaps, round 2 (search) --------------------------------------------------------
# Needs nothing beyond this file's imports (fake_search, Priors, greedy_fill, repair, Group,
# SearchSpace, PipelineError, compose, attach_sites, tiny_outlier_model, labelled, torch, pytest).


def test_a_budget_at_exactly_the_minimum_cost_is_accepted(tiny):
    """Only a budget *below* the cheapest assignment is an error: 1.0 (all-INT8) with widths {8, 16},
    or the min cost of a 4-bit-weight space, must run (repaired to all-lowest)."""
    space = space_of(tiny)
    space.check_budget(1.0)
    space.check_budget(space.min_cost())
    w4 = space_of(tiny, weight=(4, 8))
    w4.check_budget(w4.min_cost())
    levels, _ = repair(w4, w4.highest(), w4.min_cost())
    assert levels == w4.lowest()
    with pytest.raises(PipelineError, match="below the minimum possible cost"):
        space.check_budget(0.999)


def test_greedy_fill_takes_a_step_that_lands_exactly_on_the_budget():
    space = _line_space()  # 6 sites x 100 elements, norm 600: each 8 -> 16 raise costs exactly 1/6
    sens = {"meta": {}, "sites": {f"s{i}": {"scores": {"noise_kl": {"8": 1.0 / (1 + i), "16": 0.0}}} for i in range(6)}}
    priors = Priors(space, sens, "noise_kl")
    for k in (1, 2, 3):
        budget = space.cost({f"s{i}": int(i < k) for i in range(6)})  # room for exactly k raises
        assert greedy_fill(space, priors, budget) == {f"s{i}": int(i < k) for i in range(6)}
        assert greedy_fill(space, priors, 1.0 + k / 6) == {f"s{i}": int(i < k) for i in range(6)}


def test_guided_proposals_start_once_n_startup_trials_are_complete(tmp_path):
    """fake_search runs prior with seeds=2, n_startup=3: trials 0-1 are two distinct greedy seeds (the
    hessian ratio fill repeats noise_kl's, so the second is noise_kl by gain), trial 2 the one prior draw
    (seeds count among the n_startup complete trials), and from trial 3 on local moves / TPE."""
    run = fake_search.run(f"sqlite:///{tmp_path}/o.db", "startup", "prior", 6)
    sources = [r.source for r in sorted(run.records, key=lambda r: r.number)]
    assert sources[:3] == ["greedy-noise_kl-ratio", "greedy-noise_kl-gain", "prior-draw"]
    assert all(s in ("local", "tpe") for s in sources[3:])


def test_an_exact_repeat_reuses_the_stored_result_and_another_assignment_does_not(tmp_path):
    from pipeline.search.study import TrialObjective, make_sampler, open_storage, open_study

    space = fake_search.fake_space()
    sampler = make_sampler(space, fake_search.BUDGET, "random", None, None, 0, 0)
    study, _ = open_study(open_storage(f"sqlite:///{tmp_path}/s.db"), "dup", "minimize", sampler, "fp")
    a = {g.name: int(i == 1) for i, g in enumerate(space.groups)}
    b = {g.name: int(i == 2) for i, g in enumerate(space.groups)}
    calls, seen = [], []
    objective = TrialObjective(space, lambda w: calls.append(dict(w)) or fake_search.fake_metrics(w), fake_search.BUDGET, "kl", "random", None, 10, sampler, on_trial=lambda r, s, n: seen.append(r))
    for levels in (a, b, a):
        study.enqueue_trial(levels)
        study.optimize(objective, n_trials=1)
    assert calls == [space.widths(a), space.widths(b)] and objective.evaluated == 2  # the repeat is not re-evaluated
    assert [r.duplicate_of for r in seen] == [None, None, 0] and seen[2].metrics == seen[0].metrics
    assert seen[1].value == fake_search.fake_metrics(space.widths(b))["kl"] != seen[0].value


def test_failed_and_pruned_trials_do_not_count_toward_search_trials(tmp_path):
    import optuna

    url = f"sqlite:///{tmp_path}/o.db"
    with pytest.raises(KeyboardInterrupt):
        fake_search.run(url, "failed", "random", 4, interrupt_at=2)  # trial 0 complete, trial 1 failed
    optuna.load_study(study_name="failed", storage=url).add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED))
    again = fake_search.run(url, "failed", "random", 4)
    states = [t.state for t in optuna.load_study(study_name="failed", storage=url).get_trials(deepcopy=False)]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 4
    assert len(again.records) == 4 and again.evaluated_here == 3


def test_a_study_name_reused_with_another_setup_is_an_error(tmp_path):
    from pipeline.search.study import make_sampler, open_storage, open_study

    storage = open_storage(f"sqlite:///{tmp_path}/s.db")
    sampler = make_sampler(fake_search.fake_space(), fake_search.BUDGET, "random", None, None, 0, 0)
    assert open_study(storage, "named", "minimize", sampler, "setup-a")[1]
    assert not open_study(storage, "named", "minimize", sampler, "setup-a")[1]  # the same set-up resumes
    with pytest.raises(PipelineError, match="study 'named' in the storage was made for another search"):
        open_study(storage, "named", "minimize", sampler, "setup-b")


def test_a_study_is_keyed_on_budget_objective_subset_seed_and_space():
    """search.study_name reuses one name: only the fingerprint keeps another budget, objective, search
    subset, seed or space from resuming the study (README: Storage)."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from pipeline.quant.calibration import CalibState
    from pipeline.stages.search import fingerprint

    base = {"seed": 0, "prior": "noise_kl", "seeds": 2, "n_startup": 3, "prior_temperature": 0.5, "greedy_width": 2, "objective": "kl", "budget": 1.3}
    state = CalibState({"s3/8/scale": torch.tensor([0.5])}, {"meta": {}})

    def key(method="random", search_key="k", space=None, **search):
        cfg = OmegaConf.create({"search": {**base, **search}})
        setup = SimpleNamespace(specs={}, state=state, space=space or fake_search.fake_space(), search_key=search_key, sensitivity=None)
        return fingerprint(cfg, SimpleNamespace(fingerprint="fake"), setup, method)

    same = key()
    assert key() == same
    for other in (key(budget=1.2), key(objective="agreement"), key(search_key="other-subset"), key(seed=1), key(space=fake_search.fake_space(11))):
        assert other != same


def test_the_exported_recipe_adds_one_sites_entry_per_changed_site_only(tmp_path):
    """README: recipe.yaml = the base recipe plus one `sites` entry per changed site (an entry for an
    unchanged site would pin its width against a later quant.act.bits / roles override)."""
    from omegaconf import OmegaConf

    from pipeline.search.report import export_recipe

    graph = attach_sites(tiny_outlier_model())
    base = {"name": "base", "enabled": True, "sites": {"head.*": {"bits": 16}}}
    base_bits = {n: sp.bits for n, sp in resolve_recipe(base, graph).items()}
    assert base_bits["head.weight"] == 16 and base_bits["blocks.0.attn.sv"] == 8
    widths = {**base_bits, "blocks.0.attn.sv": 16}  # every site, one changed
    path = export_recipe(tmp_path / "r.yaml", base, base_bits, widths, "exported")
    assert OmegaConf.to_container(OmegaConf.load(path))["sites"] == {"head.*": {"bits": 16}, "blocks.0.attn.sv": {"bits": 16}}


def test_the_search_subset_counts_the_images_the_calibration_used(tmp_path, tiny_overrides):
    """A from_run calibrated on 48 of the 64 synthetic train images, searched with data.calib_size=8 and
    search_size=0 (all that is left): the subset is the 16 images behind the 48, not 56."""
    from pipeline.data import make_subset
    from pipeline.models import load_model
    from pipeline.runner import run_pipeline
    from pipeline.stages.search import prepare

    run_pipeline(compose(search_overrides(tiny_overrides, tmp_path, "stages=[calibrate]", "data.calib_size=48")), tmp_path / "calib")
    cfg = compose(search_overrides(tiny_overrides, tmp_path, "stages=[search]", f"from_run={tmp_path / 'calib'}", "data.calib_size=8", "data.search_size=0"))
    fp32 = load_model(cfg.model)
    setup = prepare(cfg, fp32, CPU, tmp_path / "calib" / "calibrate", None)
    assert setup.evaluator.fp_logits.shape[0] == 64 - 48
    calib48 = make_subset(compose(search_overrides(tiny_overrides, tmp_path, "data.calib_size=48")).data, fp32, "calib")
    first = torch.cat([x for x, _ in calib48.loader])
    searched = torch.cat(setup.evaluator.batches)
    assert not any(torch.equal(s, c) for s in searched for c in first)  # no calibration image is searched


def test_block_and_role_ties_give_one_group_per_block_and_per_role_and_combine_transitively(tiny):
    """README search.ties: `block` = every site of a block, `role` = every site of a role; several rules
    join whatever any of them joins (q, k of block 1 reach block 0 through their role, norm1 through the block)."""
    _, graph, _, _ = tiny
    names = list(space_of(tiny).kinds)
    by_block = space_of(tiny, ties=["block"])
    expected = {frozenset(n for n in names if graph[n].block == b) for b in (0, 1)} | {frozenset([n]) for n in names if graph[n].block is None}
    assert {frozenset(g.members) for g in by_block.groups} == expected
    by_role = space_of(tiny, ties=["role"])
    assert {frozenset(g.members) for g in by_role.groups} == {frozenset(n for n in names if graph[n].role == r) for r in {graph[n].role for n in names}}
    both = space_of(tiny, ties=["role", "block"])
    group = next(g for g in both.groups if "blocks.0.attn.q" in g.members)
    assert {"blocks.1.attn.k", "blocks.1.norm1", "blocks.0.norm1", "head.weight"} <= set(group.members)


def test_search_seeds_enqueues_that_many_greedy_seeds(tmp_path):
    from pipeline.search.study import open_storage, run_method

    space = fake_search.fake_space()
    storage = open_storage(f"sqlite:///{tmp_path}/o.db", 1)
    for seeds in (0, 1, 2):
        run = run_method("prior", storage, f"seeds{seeds}", "fp", space, fake_search.fake_metrics, fake_search.BUDGET, "kl", 4, fake_search.fake_sensitivity(space), "noise_kl", seeds, 3, 0.5, 2, 0)
        sources = [r.source for r in sorted(run.records, key=lambda r: r.number)]
        assert sum(s.startswith("greedy-") for s in sources) == seeds and all(s.startswith("greedy-") for s in sources[:seeds]), (seeds, sources)


def test_greedy_fill_reaches_a_budget_that_float_sums_in_another_order_land_on():
    """The fill adds step costs in priority order (s1, s2, then s0); the budget, the cost of raising s0-s2,
    sums them in group order: the last step lands on it within float residue and must still be taken."""
    names = [f"s{i}" for i in range(6)]
    elements = dict(zip(names, [100, 7, 30, 300, 100, 100]))
    space = SearchSpace([Group(n, [n], {n: [8, 16]}) for n in names], {n: "act" for n in names}, elements, float(sum(elements.values())))
    sens = {"meta": {}, "sites": {n: {"scores": {"noise_kl": {"8": 1.0 / (1 + i), "16": 0.0}}} for i, n in enumerate(names)}}
    target = {"s0": 1, "s1": 1, "s2": 1, "s3": 0, "s4": 0, "s5": 0}
    assert greedy_fill(space, Priors(space, sens, "noise_kl"), space.cost(target)) == target


def test_the_assignment_key_tells_every_level_apart():
    """space.key identifies an assignment for duplicate reuse: with three widths, level 1 and level 2 of
    a group are different assignments and must not share a stored result."""
    import itertools

    names = ["a", "b", "c"]
    space = SearchSpace([Group(n, [n], {n: [4, 8, 16]}) for n in names], {n: "act" for n in names}, {n: 100 for n in names}, 300.0)
    keys = {space.key(dict(zip(names, lv))) for lv in itertools.product(range(3), repeat=3)}
    assert len(keys) == 27


def test_a_proposal_that_repeats_a_measured_assignment_is_drawn_again():
    """README: a repeated proposal is drawn again (up to 8 times). Three groups give 8 assignments: six
    uniform draws without redraws repeat one with probability 92%; with them every trial is new here."""
    import optuna

    from pipeline.search.sampler import BudgetSampler

    space = _line_space(3)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=BudgetSampler(space, 2.0, "random", None, None, 0, 0))
    seen = []
    for _ in range(6):
        trial = study.ask()
        seen.append(tuple(trial.suggest_categorical(g.name, [0, 1]) for g in space.groups))
        study.tell(trial, float(len(seen)))
    assert len(set(seen)) == 6, seen
