"""Sensitivity priors: the gain of raising a group, greedy fills at the budget, repair, sampling bias.

gain(g, l) = sum over g's members of score(member, width at level l) - score(member, width at l + 1),
with `score` one sensitivity method (predicted / measured increase of the loss or logit KL, nats).
Priority = gain / extra cost ("nats saved per unit of budget").

- `greedy_fill(levels)`: raise one level at a time the step with the highest priority that still
  fits the budget (a greedy knapsack), until nothing fits.
- `repair(levels)`: while the assignment costs more than the budget, lower by one level the raised
  group whose current step has the lowest priority (random order for the random baseline). Every
  assignment a trial evaluates has gone through it, so no trial ever exceeds the budget.
- `raise_probabilities()`: P(raise g) = min(0.95, lambda * (priority_g / max priority)^temperature),
  lambda set (bisection) so that the expected extra cost equals the budget's slack: the
  sensitivity-biased draws of the prior-guided study before TPE takes over.
- `local_move(levels)`: a sensitivity-biased swap around an assignment (the incumbent): lower
  1-2 raised groups (rank-weighted toward the lowest priority), then refill the budget in
  priority order, never re-raising the ones just lowered.
"""

from __future__ import annotations

import math
import random
from typing import Container, Mapping, Sequence

from pipeline.errors import PipelineError
from pipeline.search.space import Levels, SearchSpace

EPS = 1e-30


class Priors:
    """Per-(group, level) gains from one sensitivity method."""

    def __init__(self, space: SearchSpace, sensitivity: Mapping, method: str):
        self.space, self.method = space, method
        sites = sensitivity["sites"]
        self.gain: dict[str, list[float]] = {}
        for g in space.groups:
            gains = []
            for lvl in range(g.levels - 1):
                total = 0.0
                for m in g.members:
                    if m not in sites:
                        raise PipelineError(f"the sensitivity scores have no site {m}: they were computed for another model or recipe (rerun sensitivity)")
                    scores = sites[m]["scores"].get(method)
                    if scores is None:
                        hint = "; noise scores need the site calibrated at sensitivity.noise_bits" if method.startswith("noise_") else ""
                        raise PipelineError(f"search.prior={method}: the sensitivity scores have no '{method}' for {m} (it has: {', '.join(sorted(sites[m]['scores'])) or 'none'}{hint})")
                    lo, hi = str(g.width(m, lvl)), str(g.width(m, lvl + 1))
                    if lo not in scores or hi not in scores:
                        raise PipelineError(f"sensitivity scores for {m} cover widths {sorted(int(k) for k in scores)}, not {g.width(m, lvl)} and {g.width(m, lvl + 1)}: rerun sensitivity with these widths")
                    total += scores[lo] - scores[hi]
                gains.append(total)
            self.gain[g.name] = gains

    def priority(self, group: str, level: int) -> float:
        """Gain per unit cost of raising `group` from `level` (0 if no gain; -inf at the top level)."""
        gains = self.gain[group]
        if level >= len(gains):
            return -math.inf
        return max(gains[level], 0.0) / max(self.space.raise_cost(group, level), EPS)

    def order(self) -> list[str]:
        """Groups by the priority of their first step, highest first (ties: forward order)."""
        return sorted((g.name for g in self.space.groups), key=lambda n: -self.priority(n, 0))


def greedy_fill(space: SearchSpace, priors: Priors, budget: float, levels: Levels | None = None, by: str = "ratio") -> Levels:
    """Raise steps in priority order (by='ratio': gain/cost; by='gain': gain alone) while they fit."""
    levels = dict(levels or space.lowest())
    cost = space.cost(levels)
    while True:
        best, best_value = None, 0.0
        for g in space.groups:
            lvl = levels[g.name]
            if lvl + 1 >= g.levels:
                continue
            extra = space.raise_cost(g.name, lvl)
            if cost + extra > budget + 1e-12:
                continue
            value = priors.priority(g.name, lvl) if by == "ratio" else max(priors.gain[g.name][lvl], 0.0)
            if best is None or value > best_value:
                best, best_value = g.name, value
        if best is None:
            return levels
        cost += space.raise_cost(best, levels[best])
        levels[best] += 1


def repair(space: SearchSpace, levels: Mapping[str, int], budget: float, priors: Priors | None = None, rng: random.Random | None = None) -> tuple[Levels, int]:
    """Lower raised groups (lowest priority first, or at random without priors) until the cost fits. Returns (levels, steps lowered)."""
    space.check_budget(budget)
    rng = rng or random.Random(0)
    levels = {g.name: int(levels.get(g.name, 0)) for g in space.groups}
    cost = space.cost(levels)
    lowered = 0
    while cost > budget + 1e-12:
        raised = [n for n, lvl in levels.items() if lvl > 0]
        if not raised:  # all lowest: within float residue of the budget (check_budget passed)
            break
        if priors is not None:
            victim = min(raised, key=lambda n: priors.priority(n, levels[n] - 1))
        else:
            victim = rng.choice(raised)
        cost -= space.raise_cost(victim, levels[victim] - 1)
        levels[victim] -= 1
        lowered += 1
    return levels, lowered


def mean_raise_cost(space: SearchSpace, group: str) -> float:
    """Extra cost of a raised draw of `group`: a level drawn uniformly from 1..L-1 (the sampler's `_draw`), over level 0."""
    g = space.by_name[group]
    return sum(g.level_cost[lvl] - g.level_cost[0] for lvl in range(1, g.levels)) / (g.levels - 1)


def raise_probabilities(space: SearchSpace, priors: Priors, budget: float, temperature: float = 0.5, cap: float = 0.95) -> dict[str, float]:
    """P(raise group g): proportional to (priority / max)^temperature, expected extra cost = budget slack.

    A raised group takes a level drawn uniformly from 1..L-1, so its expected extra cost is `mean_raise_cost`
    (the one step's cost when L = 2)."""
    slack = budget - space.min_cost()
    prio = {g.name: priors.priority(g.name, 0) for g in space.groups if g.levels > 1}
    top = max(prio.values(), default=0.0)
    if top <= 0 or slack <= 0:
        return {n: 0.0 for n in prio}
    rel = {n: (p / top) ** temperature if p > 0 else 0.0 for n, p in prio.items()}
    cost = {n: mean_raise_cost(space, n) for n in prio}

    def expected(lam: float) -> float:
        return sum(min(cap, lam * r) * cost[n] for n, r in rel.items())

    lo, hi = 0.0, 1.0
    while expected(hi) < slack and hi < 1e12:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if expected(mid) < slack else (lo, mid)
    return {n: min(cap, hi * r) for n, r in rel.items()}


def greedy_seeds(space: SearchSpace, sensitivity: Mapping, methods: Sequence[str], budget: float, count: int) -> list[tuple[str, Levels]]:
    """Up to `count` distinct greedy fills at the budget: for each method (first = the main prior), by gain/cost, then by gain."""
    seeds: list[tuple[str, Levels]] = []
    seen: set[str] = set()
    for by in ("ratio", "gain"):
        for method in methods:
            try:
                priors = Priors(space, sensitivity, method)
            except PipelineError:
                continue
            levels = greedy_fill(space, priors, budget, by=by)
            key = space.key(levels)
            if key not in seen:
                seen.add(key)
                seeds.append((f"greedy-{method}-{by}", levels))
            if len(seeds) >= count:
                return seeds
    return seeds


def local_move(space: SearchSpace, priors: Priors, levels: Mapping[str, int], budget: float, rng: random.Random, temperature: float = 0.5, exclude: Container[str] = ()) -> Levels | None:
    """A swap around `levels` (the incumbent), biased by the priors; stays within the budget.

    Lowers one raised group (one time in four, a second one too), drawn rank-weighted toward the
    lowest priority (the raise the sensitivity scores trust least; weight = rank^(1 / temperature)),
    then refills the freed budget greedily in priority order, never re-raising the groups just
    lowered: one step in the neighbourhood of swaps, so a measured improvement keeps the rest of
    the incumbent. Victims are tried in that weighted random order until the swap's key
    (`space.key`) is not in `exclude` (the assignments measured already); None when none is left.
    """
    levels = {g.name: int(levels.get(g.name, 0)) for g in space.groups}
    raised = sorted((n for n, lvl in levels.items() if lvl > 0), key=lambda n: priors.priority(n, levels[n] - 1))
    # weights rank^(1/T) relative to the largest (in log space: no overflow at small T or many groups)
    log_weight = [math.log(len(raised) - i) / max(temperature, 1e-3) for i in range(len(raised))]
    top = max(log_weight, default=0.0)
    weight = {n: math.exp(lw - top) for n, lw in zip(raised, log_weight)}
    # weighted draw without replacement: order by u^(1/w), compared as log(u)/w
    order = sorted(raised, key=lambda n: math.log(rng.random() or 1e-300) / weight[n] if weight[n] > 0 else -math.inf, reverse=True)
    for first in order:
        victims = [first]
        if rng.random() < 0.25 and len(order) > 1:
            others = [n for n in order if n != first]
            odds = [weight[n] for n in others]
            victims.append(rng.choices(others, weights=odds if sum(odds) > 0 else None)[0])
        moved = _swap(space, priors, levels, victims, budget)
        if space.key(moved) not in exclude:
            return moved
    return None


def _swap(space: SearchSpace, priors: Priors, levels: Mapping[str, int], victims: Sequence[str], budget: float) -> Levels:
    """Lower each victim one level, then raise the highest-priority steps that fit (victims excluded)."""
    levels = dict(levels)
    for v in victims:
        levels[v] -= 1
    cost = space.cost(levels)
    while True:
        fits = [g.name for g in space.groups if g.name not in victims and levels[g.name] + 1 < g.levels and cost + space.raise_cost(g.name, levels[g.name]) <= budget + 1e-12]
        if not fits:
            return levels
        pick = max(fits, key=lambda n: priors.priority(n, levels[n]))
        cost += space.raise_cost(pick, levels[pick])
        levels[pick] += 1
