"""The search's Optuna sampler: one joint draw of every group's level, repaired to the budget.

Optuna records what the sampler returns, so the parameters of every trial are the evaluated,
in-budget assignment. Methods (`study` module docstring): `random` draws each level uniformly;
`prior` draws with P(raise g) from the sensitivity priors until `n_startup` trials are complete,
then alternates a sensitivity-biased swap around the best trial so far (`priors.local_move`)
with multivariate TPE. A proposal that repeats a measured or running assignment is drawn again,
up to `MAX_REDRAWS` times. Imported only when a study opens (it imports Optuna).
"""

from __future__ import annotations

import random
import zlib
from typing import Any, Mapping

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.samplers import BaseSampler, TPESampler
from optuna.trial import TrialState

from pipeline.search.priors import Priors, local_move, repair
from pipeline.search.space import SearchSpace
from pipeline.search.study import trial_seed

MAX_REDRAWS = 8


class BudgetSampler(BaseSampler):
    """Joint (relative) sampling of every group's level, repaired to the budget before Optuna records it.

    `trial_source` (how each trial's proposal was made: prior-draw, local, tpe, random) and
    `trial_lowered` (how many groups the repair lowered) are read, and popped, by the trial objective.
    """

    def __init__(self, space: SearchSpace, budget: float, method: str, priors: Priors | None, probs: Mapping[str, float] | None, seed: int, n_startup: int, temperature: float = 0.5):
        self.space = space
        self.budget = budget
        self.method = method
        self.priors = priors
        self.probs = probs
        self.seed = seed
        self.n_startup = n_startup
        self.temperature = temperature
        self.dists = {g.name: CategoricalDistribution(list(range(g.levels))) for g in space.groups if g.levels > 1}
        self.trial_source: dict[int, str] = {}
        self.trial_lowered: dict[int, int] = {}

    def before_trial(self, study, trial) -> None:
        # Optuna starts a trial's heartbeat thread only after ask() has sampled: a worker killed
        # in between would leave a RUNNING trial without heartbeat, which never goes stale and
        # blocks every other worker. The first heartbeat is therefore recorded here.
        from optuna.storages._heartbeat import is_heartbeat_enabled

        if is_heartbeat_enabled(study._storage):
            study._storage.record_heartbeat(trial._trial_id)

    def infer_relative_search_space(self, study, trial):
        return dict(self.dists)

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        rng = random.Random(trial_seed(self.seed, trial.number))
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING))
        proposals = (t.params or t.system_attrs.get("fixed_params") for t in trials if t.number != trial.number)
        taken = {self.space.key(p) for p in proposals if p}  # a trial still being sampled has no levels yet
        guided = self.method == "prior" and sum(1 for t in trials if t.state == TrialState.COMPLETE) >= self.n_startup
        incumbent = _incumbent(study) if guided else None
        for attempt in range(MAX_REDRAWS):
            params: dict[str, Any] = {}
            source = "prior-draw" if self.method == "prior" else self.method
            if guided:
                if incumbent is not None and (trial.number + attempt) % 2 == 0:
                    params = local_move(self.space, self.priors, incumbent, self.budget, rng, self.temperature, exclude=taken) or {}
                    source = "local"
                if not params:
                    tpe = TPESampler(seed=trial_seed(self.seed, trial.number) + attempt, n_startup_trials=0, multivariate=True, constant_liar=True)
                    params = tpe.sample_relative(study, trial, search_space)
                    source = "tpe"
            if not params:
                params = {n: self._draw(n, rng) for n in search_space}
            levels, lowered = repair(self.space, params, self.budget, self.priors if self.method != "random" else None, rng)
            if self.space.key(levels) not in taken:
                break
        self.trial_source[trial.number] = source
        self.trial_lowered[trial.number] = lowered
        return {n: levels[n] for n in search_space}

    def sample_independent(self, study, trial, param_name, param_distribution):
        if param_name in self.space.by_name:
            return self._draw(param_name, random.Random(trial_seed(self.seed, trial.number) + zlib.crc32(param_name.encode())))
        return optuna.samplers.RandomSampler().sample_independent(study, trial, param_name, param_distribution)

    def _draw(self, name: str, rng: random.Random) -> int:
        """One group's level: uniform, or under `prior` raised with the group's prior probability."""
        g = self.space.by_name[name]
        if self.method == "prior" and self.probs is not None:
            return rng.randrange(1, g.levels) if rng.random() < self.probs.get(name, 0.0) else 0
        return rng.randrange(g.levels)


def _incumbent(study) -> dict[str, int] | None:
    """The best complete trial's levels, or None before the first."""
    try:
        best = study.best_trial
    except ValueError:
        return None
    return {k: int(v) for k, v in best.params.items()}
