"""The Optuna study: RDB storage, resumable multi-worker trial loop, samplers, greedy baseline.

Storage: any Optuna RDB URL (default SQLite `mlruns/optuna.db`) with trial heartbeats. A
worker that dies (SIGKILL) stops beating; after 4 heartbeats any worker marks its trial
FAIL and re-enqueues the same parameters (RetryHeartbeatStaleTrialCallback), so a rerun of
the same command keeps every completed trial and finishes the interrupted one. A worker killed
between Optuna creating its trial and the first heartbeat leaves a RUNNING trial with no
heartbeat at all, which Optuna never calls stale; `_storage_class` fails those too once they
are older than the grace period, so they cannot block the study for ever.

Counting: a study is done when it holds `trials` COMPLETE trials. Before each trial a worker
checks COMPLETE + RUNNING; inside the trial, one that finds `trials` others complete or
started before it is pruned as surplus (state PRUNED, no evaluation), so several workers on
one storage finish exactly `trials` evaluations between them.

Methods (the budget holds for every trial through `priors.repair`):
- `prior`: `search.seeds` greedy fills at the budget (one per sensitivity method / ordering)
  are enqueued first; until `n_startup` trials are complete, new trials are drawn with
  P(raise g) from `priors.raise_probabilities` (sensitive, cheap groups more often); then
  proposals alternate between a sensitivity-biased swap around the best trial so far
  (`priors.local_move`) and multivariate TPE (Optuna's TPESampler, seeded per trial number).
  Every draw is repaired in sensitivity order (least gain per cost lowered first) inside the
  sampler, so the parameters Optuna records are the evaluated, in-budget assignment.
- `random`: each group's level uniform, repaired in random order.
- `greedy`: measured forward selection in sensitivity order: from all-lowest, each step
  measures raising each of the next `greedy_width` groups (priority order) that fit, keeps the
  best; with one evaluation left, the remaining budget is filled in priority order and that
  final assignment is measured. Steps are enqueued trials, so it resumes and shares like the others.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from pipeline import PROJECT_ROOT
from pipeline.errors import PipelineError
from pipeline.search.goal import better, direction_of
from pipeline.search.priors import Priors, greedy_fill, raise_probabilities, repair
from pipeline.search.space import Levels, SearchSpace
from pipeline.tracking import sqlite_path

log = logging.getLogger(__name__)

METHODS = ("prior", "random", "greedy")


def default_storage() -> str:
    return f"sqlite:///{PROJECT_ROOT / 'mlruns' / 'optuna.db'}"


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optimize_log = logging.getLogger("optuna.study._optimize")
    if not any(isinstance(f, _DropInterrupts) for f in optimize_log.filters):
        optimize_log.addFilter(_DropInterrupts())
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*Heartbeat of storage.*")


class _DropInterrupts(logging.Filter):
    """Optuna logs a trial stopped by Ctrl-C or SIGTERM as a failure, with the whole traceback; the
    pipeline's one `error: interrupted` line says it already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.exc_info[0] is not None and issubclass(record.exc_info[0], KeyboardInterrupt))


def check_storage_url(url: str, tracking_url: str | None = None) -> None:
    """One clear error unless SQLAlchemy can parse `url` and has its driver, a SQLite file's folder can
    be made, and the file is not the MLflow store's (`tracking_url`). Nothing is connected or created."""
    import sqlalchemy

    try:
        sqlalchemy.create_engine(url).dispose()
    except Exception as e:  # unparsable URL, unknown dialect, missing driver module
        raise PipelineError(f"search.storage={url}: not a usable database URL: {str(e).splitlines()[0][:200]}") from None
    path = sqlite_path(url)
    if path is None:
        return
    if tracking_url and sqlite_path(tracking_url) == path:
        raise PipelineError(f"search.storage={url} is the MLflow tracking store's database: give Optuna a file of its own")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise PipelineError(f"search.storage={url}: cannot make the folder {path.parent} ({ancestor} is not a writable folder)")


def open_storage(url: str, heartbeat_s: int = 5):
    """An RDBStorage with heartbeats; one clear error if the URL cannot be opened."""
    _quiet_optuna()
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:///"):
        path = sqlite_path(url)
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PipelineError(f"search.storage={url}: cannot make its folder ({e.strerror})") from None
        engine_kwargs = {"connect_args": {"timeout": 120}}
    for attempt in range(6):  # two workers creating one new database race on its schema: the loser retries
        try:
            storage = _storage_class()(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=max(1, int(heartbeat_s)),
                grace_period=4 * max(1, int(heartbeat_s)),
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
            )
            break
        except Exception as e:  # sqlalchemy errors, bad URLs, missing drivers
            racing = any(m in str(e) for m in ("IntegrityError", "already exists", "database is locked"))
            if attempt == 5 or not racing:
                raise PipelineError(f"search.storage={url}: cannot open the Optuna storage: {str(e).splitlines()[0][:200]}") from None
            time.sleep(0.3 + random.random())
    if url.startswith("sqlite"):
        _sqlite_wal(storage)
    return storage


@functools.cache
def _storage_class():
    """RDBStorage whose stale check also covers RUNNING trials that never recorded a heartbeat.

    Optuna creates a trial (RUNNING) and records its first heartbeat in two transactions
    (`BudgetSampler.before_trial` records it as early as Optuna allows). A worker killed between
    the two leaves a trial that Optuna's own check skips, and every worker would wait on it for
    ever. Such a trial is stale once it started more than `grace_period` seconds ago.
    """
    from datetime import datetime, timedelta

    from optuna.storages import RDBStorage
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    class HeartbeatStorage(RDBStorage):
        def _get_stale_trial_ids(self, study_id: int) -> list[int]:
            stale = super()._get_stale_trial_ids(study_id)
            cutoff = datetime.now() - timedelta(seconds=self.grace_period)  # datetime_start is local time
            old = [t._trial_id for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)) if t.datetime_start is not None and t.datetime_start < cutoff]
            if not old:
                return stale
            beat = models.TrialHeartbeatModel
            with _create_scoped_session(self.scoped_session) as session:  # the stale ones above have a heartbeat: excluded here
                beating = {tid for (tid,) in session.query(beat.trial_id).filter(beat.trial_id.in_(old))}
            return stale + [tid for tid in old if tid not in beating]

    return HeartbeatStorage


def _sqlite_wal(storage) -> None:
    """WAL journal + synchronous=NORMAL: commits without an fsync each, readers never block the writer (multi-process safe on a local disk)."""
    from sqlalchemy import event

    def on_connect(dbapi_connection, _record) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # pooled connections made before the listener reconnect with it


def open_study(storage, name: str, direction: str, sampler, fingerprint: str):
    """Create the study, or load it if it exists with the same fingerprint. Returns (study, created)."""
    import optuna

    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=direction, sampler=sampler)
        study.set_user_attr("fingerprint", fingerprint)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
    for _ in range(20):  # the creator sets the fingerprint right after creating
        found = study.user_attrs.get("fingerprint")
        if found is not None:
            break
        time.sleep(0.5)
    if found is not None and found != fingerprint:
        raise PipelineError(f"study '{name}' in the storage was made for another search (model, recipe, space, objective or budget differ): choose another search.study_name")
    if study.direction.name.lower() != direction:
        raise PipelineError(f"study '{name}' {study.direction.name.lower()}s, but search.objective needs {direction}")
    return study, False


# -- sampler -------------------------------------------------------------------------------


def trial_seed(seed: int, number: int) -> int:
    """The random seed of trial `number` in a study seeded `seed` (reproducible whichever worker runs it)."""
    return (seed * 1_000_003 + number * 7919 + 12345) % (2**31 - 1)


def make_sampler(space: SearchSpace, budget: float, method: str, priors: Priors | None, probs: Mapping[str, float] | None, seed: int, n_startup: int, temperature: float = 0.5):
    """The study's sampler: joint draws of every group's level, repaired to the budget (`sampler.BudgetSampler`)."""
    from pipeline.search.sampler import BudgetSampler

    return BudgetSampler(space, budget, method, priors, probs, seed, n_startup, temperature)


# -- trial loop -----------------------------------------------------------------------------


@dataclass
class TrialRecord:
    method: str
    number: int
    value: float
    cost: float
    metrics: dict[str, float]
    levels: Levels
    source: str
    duplicate_of: int | None = None
    trial_s: float = 0.0


@dataclass
class MethodRun:
    """What one method's study produced (all of its complete trials, whoever ran them)."""

    method: str
    study_name: str
    records: list[TrialRecord] = field(default_factory=list)
    evaluated_here: int = 0
    seconds: float = 0.0

    def best(self, objective: str) -> TrialRecord | None:
        best = None
        for r in self.records:
            if best is None or better(objective, r.value, best.value) or (r.value == best.value and r.cost < best.cost):
                best = r
        return best

    @property
    def evaluations(self) -> int:
        return sum(1 for r in self.records if r.duplicate_of is None)


class TrialObjective:
    """The function Optuna calls: levels -> repaired assignment -> metrics (or a cached duplicate)."""

    def __init__(self, space: SearchSpace, evaluate: Callable[[dict[str, int]], dict[str, float]], budget: float, objective: str, method: str, priors: Priors | None, n_trials: int, sampler, on_trial: Callable[..., None] | None = None, study_name: str = "", queued_only: bool = False, seed: int = 0):
        self.space, self.evaluate, self.budget, self.objective = space, evaluate, budget, objective
        self.method, self.priors, self.n_trials, self.sampler = method, priors, n_trials, sampler
        self.on_trial, self.study_name, self.queued_only, self.seed = on_trial, study_name, queued_only, seed
        self.evaluated = 0

    def __call__(self, trial) -> float:
        import optuna
        from optuna.trial import TrialState

        t0 = time.perf_counter()
        study = trial.study
        source = trial.user_attrs.get("source")
        if self.queued_only and source is None:
            raise optuna.TrialPruned("greedy: no queued step for this trial")
        if _surplus(study, trial.number, self.n_trials):
            raise optuna.TrialPruned("surplus: the study already has its trials")
        # Enqueued levels (seeds, greedy steps), and the levels of a trial re-created by the heartbeat retry,
        # which carries the dead trial's params (not as fixed params): both are evaluated as given.
        fixed = {**trial.params, **(getattr(trial, "_fixed_params", {}) or {})}
        proposed = {} if len(fixed) >= len(self.space.groups) else trial.relative_params  # the sampler's joint draw, already repaired
        raw = {g.name: int(fixed.get(g.name, proposed.get(g.name, 0))) for g in self.space.groups if g.levels > 1}
        levels, lowered = repair(self.space, raw, self.budget, self.priors if self.method != "random" else None, random.Random(trial_seed(self.seed, trial.number)))
        write_params(trial, {n: v for n, v in levels.items() if n in raw}, self.space)
        lowered += self.sampler.trial_lowered.pop(trial.number, 0)
        source = source or self.sampler.trial_source.pop(trial.number, self.method)
        cost = self.space.cost(levels)
        assert cost <= self.budget + 1e-9, (cost, self.budget)
        key = self.space.key(levels)
        duplicate = next((t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if (t.user_attrs.get("result") or {}).get("key") == key), None)
        if duplicate is not None:
            metrics = dict(duplicate.user_attrs["result"]["metrics"])
        else:
            metrics = self.evaluate(self.space.widths(levels))
            self.evaluated += 1
        record = TrialRecord(self.method, trial.number, metrics[self.objective], cost, metrics, levels, source, duplicate.number if duplicate else None, 0.0)
        if self.on_trial is not None:
            record.trial_s = time.perf_counter() - t0
            self.on_trial(record, self.space, self.study_name)
        record.trial_s = time.perf_counter() - t0
        trial.set_user_attr("result", {"key": key, "levels": levels, "cost": cost, "metrics": metrics, "source": source, "lowered": lowered, "duplicate_of": record.duplicate_of, "trial_s": record.trial_s})
        return metrics[self.objective]


def write_params(trial, levels: Mapping[str, int], space: SearchSpace) -> None:
    """Record every group's level as the trial's parameters in ONE storage transaction.

    `trial.suggest_categorical` commits once per parameter (a few ms each on SQLite, i.e. about
    a second per trial for ~160 groups); this writes the same rows (Optuna's own RDB models)
    in one commit and updates the trial's cached view, so later suggests are no-ops. Storages
    other than RDB, or an Optuna without these internals, fall back to suggest_categorical.
    """
    from optuna.distributions import CategoricalDistribution, distribution_to_json

    todo = {n: int(v) for n, v in levels.items() if n not in trial.params}
    dists = {n: CategoricalDistribution(list(range(space.by_name[n].levels))) for n in todo}
    try:
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import RDBStorage, _create_scoped_session

        backend = getattr(trial.storage, "_backend", trial.storage)
        if not isinstance(backend, RDBStorage):
            raise TypeError
        with _create_scoped_session(backend.scoped_session, True) as session:
            row = models.TrialModel.find_or_raise_by_id(trial._trial_id, session)
            backend.check_trial_is_updatable(trial._trial_id, row.state)
            for name, value in todo.items():
                session.add(models.TrialParamModel(trial_id=trial._trial_id, param_name=name, param_value=dists[name].to_internal_repr(value), distribution_json=distribution_to_json(dists[name])))
        cached = trial._cached_frozen_trial
        cached.params.update(todo)
        cached.distributions.update(dists)
    except (ImportError, AttributeError, TypeError):
        for name, value in todo.items():
            trial._fixed_params[name] = value
            trial.suggest_categorical(name, dists[name].choices)


def _surplus(study, number: int, n_trials: int | None) -> bool:
    if n_trials is None:
        return False
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
    ahead = sum(1 for t in trials if t.state == TrialState.COMPLETE or (t.state == TrialState.RUNNING and t.number < number))
    return ahead >= n_trials


def _counts(study) -> tuple[int, int, int]:
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    return tuple(sum(1 for t in trials if t.state == s) for s in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))  # type: ignore[return-value]


def run_trials(study, objective: TrialObjective, n_trials: int, poll_s: float = 1.0) -> None:
    """Run trials in this process until the study holds `n_trials` complete ones (shared with other workers)."""
    while True:
        complete, running, waiting = _counts(study)
        if complete >= n_trials:
            return
        if complete + running >= n_trials:
            time.sleep(poll_s)  # others are finishing the last trials (or a dead worker's trial goes stale)
            continue
        study.optimize(objective, n_trials=1, catch=(), gc_after_trial=False)


def run_queue(study, objective: TrialObjective, poll_s: float = 1.0) -> None:
    """Run enqueued trials until none is waiting or running."""
    while True:
        complete, running, waiting = _counts(study)
        if waiting:
            study.optimize(objective, n_trials=1, catch=(), gc_after_trial=False)
        elif running:
            time.sleep(poll_s)
        else:
            return


def enqueue(study, levels: Levels, source: str) -> None:
    """Enqueue `levels` unless a trial that did not fail already holds them (waiting, running or done).

    A failed trial (a step or seed stopped by Ctrl-C or SIGTERM) is enqueued again; Optuna's own
    `skip_if_exists` would skip it, and a greedy search would then wait for ever on a step no one runs.
    """
    from optuna.trial import TrialState

    params = {k: int(v) for k, v in levels.items()}
    for t in study.get_trials(deepcopy=False):
        if t.state != TrialState.FAIL and t.system_attrs.get("fixed_params", t.params) == params:
            return
    study.enqueue_trial(params, user_attrs={"source": source})


def seed_study(study, seeds: list[tuple[str, Levels]]) -> None:
    """Enqueue the greedy seeds: all of them in a new study; later, any whose trial failed (an interrupt)."""
    for source, levels in seeds:
        enqueue(study, levels, source)
    study.set_user_attr("seeded", True)


def greedy_plan(space: SearchSpace, priors: Priors, budget: float, n: int, width: int, results: Mapping[str, float], objective: str) -> tuple[list[tuple[str, Levels]], bool]:
    """Next greedy assignments to measure given the measured `results` (key -> value); (plan, done).

    Replays the steps `results` hold. A plan never takes the study past `n` evaluations, counting
    every measured one: a study resumed with more trials may hold an earlier run's final fill, off
    the path the longer run takes.
    """
    base = space.lowest()
    order = priors.order()
    used, step = 0, 0
    left = n - len(results)  # evaluations this study may still make
    while True:
        cost = space.cost(base)
        cands = []
        for name in sorted(order, key=lambda g: -priors.priority(g, base[g])):
            g = space.by_name[name]
            lvl = base[name]
            if lvl + 1 < g.levels and cost + space.raise_cost(name, lvl) <= budget + 1e-12:
                cands.append({**base, name: lvl + 1})
                if len(cands) >= width:
                    break
        room = n - used
        k = min(len(cands), room - 1)  # one evaluation is kept for the final fill...
        if 0 < room <= len(cands) and all(space.key(greedy_fill(space, priors, budget, c)) == space.key(c) for c in cands[:room]):
            k = room  # ...unless each candidate it would cut already fills the budget: no fill follows them
        if k <= 0:
            final = greedy_fill(space, priors, budget, base)
            done = space.key(final) in results or left <= 0
            return ([] if done else [("greedy-final", final)]), done
        cands = cands[:k]
        missing = [(f"greedy-step{step}", c) for c in cands if space.key(c) not in results]
        if missing:
            return (missing[:left], False) if left > 0 else ([], True)
        best = cands[0]
        for c in cands[1:]:
            if better(objective, results[space.key(c)], results[space.key(best)]):
                best = c
        base, used, step = best, used + k, step + 1


def run_greedy(study, objective: TrialObjective, space: SearchSpace, priors: Priors, budget: float, n: int, width: int, objective_name: str, poll_s: float = 1.0) -> None:
    from optuna.trial import TrialState

    while True:
        results = {t.user_attrs["result"]["key"]: t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if "result" in t.user_attrs}
        plan, done = greedy_plan(space, priors, budget, n, max(1, width), results, objective_name)
        if done or not plan:
            if not plan:
                run_queue(study, objective, poll_s)
            if done:
                return
            continue
        for source, levels in plan:
            enqueue(study, levels, source)
        run_queue(study, objective, poll_s)


def records_of(study, method: str, trials: int | None = None) -> list[TrialRecord]:
    """The study's complete trials as records; with `trials`, only the first `trials` of them (by trial
    number), so that a study an earlier, longer run filled is compared on as many trials as the others."""
    from optuna.trial import TrialState

    out = []
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)
    for t in complete:
        if trials is not None and len(out) >= trials:
            log.info("search %s: the study holds %d complete trials; the first %d (search.trials) are reported", method, len(complete), trials)
            break
        r = t.user_attrs.get("result")
        if not r:
            continue
        out.append(TrialRecord(method, t.number, float(t.value), float(r["cost"]), dict(r["metrics"]), {k: int(v) for k, v in r["levels"].items()}, r.get("source", method), r.get("duplicate_of"), float(r.get("trial_s", 0.0))))
    return out


def run_method(
    method: str,
    storage,
    study_name: str,
    fingerprint: str,
    space: SearchSpace,
    evaluate: Callable[[dict[str, int]], dict[str, float]],
    budget: float,
    objective: str,
    trials: int,
    sensitivity: Mapping | None,
    prior_method: str,
    seeds: int,
    n_startup: int,
    temperature: float,
    greedy_width: int,
    seed: int,
    on_trial: Callable[..., None] | None = None,
) -> MethodRun:
    """Open (or resume) the method's study and run it to `trials` complete trials."""
    from pipeline.search.priors import greedy_seeds

    t0 = time.perf_counter()
    priors = Priors(space, sensitivity, prior_method) if sensitivity is not None and method != "random" else None
    if method in ("prior", "greedy") and priors is None:
        raise PipelineError(f"search.method={method} needs sensitivity scores")
    probs = raise_probabilities(space, priors, budget, temperature) if method == "prior" else None
    sampler = make_sampler(space, budget, method, priors, probs, seed, n_startup, temperature)
    study, created = open_study(storage, study_name, direction_of(objective), sampler, fingerprint)
    obj = TrialObjective(space, evaluate, budget, objective, method, priors, trials if method != "greedy" else None, sampler, on_trial, study_name, queued_only=method == "greedy", seed=seed)
    if method == "prior":
        others = [m for m in ("noise_kl", "hessian", "noise_loss", "isolated_kl") if m != prior_method]
        seed_study(study, greedy_seeds(space, sensitivity, [prior_method, *others], budget, seeds) if seeds > 0 else [])
    if method == "greedy":
        run_greedy(study, obj, space, priors, budget, trials, greedy_width, objective)
    else:
        run_trials(study, obj, trials)
    run = MethodRun(method, study_name, records_of(study, method, trials), obj.evaluated, time.perf_counter() - t0)
    log.info("search %s: %d complete trials (%d evaluated here) in %.1f s", method, len(run.records), obj.evaluated, run.seconds)
    return run
