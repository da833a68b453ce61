"""The search space (one width level per site or tied group) and the cost model.

Cost model (the default is bytes moved by the NPU): every quantized site s costs

    w_kind * elements(s) * bits(s) / 8

with elements = the weight's size for weights and the tensor's elements per image for
activations, w_kind = `search.weight_cost_weight` or `search.act_cost_weight`. The total
is divided by the same sum with every site at 8 bits, so all-INT8 costs 1.0, all-INT16
2.0 and 4-bit weights half of their INT8 share. Sites the recipe leaves in FP32 are not
in the space and cost nothing (they are the same in every assignment).

Groups: each site is its own group unless `search.ties` merges sites that must share a
width level: `qkv` (q, k, v of one attention), `weight_with_input` (a Linear/Conv weight
with the activation site feeding it), `block` (every site of a block), `role` (every site
of a role). A group's choices are level indices 0..L-1; level i gives each member the
i-th smallest width of its kind's candidate list, so all members need lists of equal
length (e.g. weights {4, 8} with activations {8, 16}).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from pipeline.errors import PipelineError

if TYPE_CHECKING:  # torch and the quantization modules load only where a model is involved
    import torch

    from pipeline.quant.recipe import SiteSpec
    from pipeline.quant.sites import SiteGraph

TIES = ("qkv", "weight_with_input", "block", "role")

Levels = dict[str, int]  # group name -> level index


@dataclass
class Group:
    name: str
    members: list[str]
    widths: dict[str, list[int]]  # member -> ascending candidate widths (same length for all members)
    level_cost: list[float] = field(default_factory=list)  # cost at each level (normalised)

    @property
    def levels(self) -> int:
        return len(next(iter(self.widths.values())))

    def width(self, member: str, level: int) -> int:
        return self.widths[member][level]


@dataclass
class SearchSpace:
    groups: list[Group]
    kinds: dict[str, str]  # site -> weight | act
    elements: dict[str, int]  # site -> elements (weights: total; activations: per image)
    norm: float  # cost of all-INT8 before normalisation
    weight_cost_weight: float = 1.0
    act_cost_weight: float = 1.0

    def __post_init__(self) -> None:
        self.by_name = {g.name: g for g in self.groups}
        for g in self.groups:
            g.level_cost = [sum(self.site_cost(m, g.width(m, lvl)) for m in g.members) for lvl in range(g.levels)]

    # -- cost ---------------------------------------------------------------------------
    def site_cost(self, site: str, bits: int) -> float:
        w = self.weight_cost_weight if self.kinds[site] == "weight" else self.act_cost_weight
        return w * self.elements[site] * bits / 8 / self.norm

    def cost(self, levels: Mapping[str, int]) -> float:
        return sum(g.level_cost[levels.get(g.name, 0)] for g in self.groups)

    def min_cost(self) -> float:
        return sum(g.level_cost[0] for g in self.groups)

    def max_cost(self) -> float:
        return sum(g.level_cost[-1] for g in self.groups)

    def check_budget(self, budget: float) -> None:
        """One clear error when `budget` is below the cheapest assignment (every site at its lowest width)."""
        if budget < self.min_cost() - 1e-12:
            raise PipelineError(f"search.budget={budget:g} is below the minimum possible cost {self.min_cost():.4f} (every site at its lowest width)")

    def raise_cost(self, group: str, level: int) -> float:
        """Extra cost of moving `group` from `level` to `level + 1`."""
        g = self.by_name[group]
        return g.level_cost[level + 1] - g.level_cost[level]

    # -- assignments --------------------------------------------------------------------------
    def lowest(self) -> Levels:
        return {g.name: 0 for g in self.groups}

    def highest(self) -> Levels:
        return {g.name: g.levels - 1 for g in self.groups}

    def widths(self, levels: Mapping[str, int]) -> dict[str, int]:
        return {m: g.width(m, levels.get(g.name, 0)) for g in self.groups for m in g.members}

    def raised(self, levels: Mapping[str, int]) -> list[str]:
        return [g.name for g in self.groups if levels.get(g.name, 0) > 0]

    def key(self, levels: Mapping[str, int]) -> str:
        """Identity of an assignment (for de-duplication across trials and workers)."""
        text = ",".join(str(levels.get(g.name, 0)) for g in self.groups)
        return hashlib.sha1(text.encode()).hexdigest()[:16]

    def fingerprint(self) -> dict:
        """What a study's results depend on in the space (stored with the study; compared on resume)."""
        return {
            "groups": [[g.name, g.members, [g.widths[m] for m in g.members]] for g in self.groups],
            "weight_cost_weight": self.weight_cost_weight,
            "act_cost_weight": self.act_cost_weight,
        }

    def describe(self) -> dict:
        return {"groups": len(self.groups), "sites": len(self.kinds), "min_cost": self.min_cost(), "max_cost": self.max_cost()}


def activation_elements(graph: SiteGraph, sites: Iterable[str], image: torch.Tensor) -> dict[str, int]:
    """Elements per image of each activation site, from one forward of one image (sites in `fp` mode)."""
    import torch

    wanted = set(sites)
    modes = {n: s.mode for n, s in graph.sites.items()}
    counts: dict[str, int] = {}
    graph.set_mode("fp")
    graph.set_tap(lambda s, x, y: counts.__setitem__(s.name, x.numel()) if s.name in wanted else None)
    try:
        with torch.no_grad():
            graph.model(image[:1].to(next(graph.model.parameters()).device))
    finally:
        graph.set_tap(None)
        for n, m in modes.items():
            graph.sites[n].mode = m
    return counts


def tie_key(graph: SiteGraph, site: str, tie: str) -> str | None:
    """The group a site joins under one tie rule (None: the rule does not apply to this site)."""
    s = graph[site]
    if tie == "qkv":
        if s.role == "qkv":  # <attn>.q / .k / .v, and with qk_norm <attn>.q_norm.in / .k_norm.in
            attention = site.rsplit(".", 2)[0] if site.endswith("_norm.in") else site.rsplit(".", 1)[0]
            return attention + ".qkv"
        return None
    if tie == "block":
        return f"blocks.{s.block}" if s.block is not None else None
    if tie == "role":
        return f"role:{s.role}"
    if tie == "weight_with_input":
        if s.role == "weight":
            path = site.rsplit(".", 1)[0]
            producer = graph.consumers.get(path)
            if producer is None and f"{path}.in" in graph.sites:
                producer = f"{path}.in"
            return f"{path}+in" if producer else None
        consumer = graph.folds.get(site)
        if consumer is not None:
            return f"{consumer}+in"
        if site.endswith(".in") and f"{site[:-3]}.weight" in graph.sites:
            return f"{site[:-3]}+in"
        return None
    raise PipelineError(f"search.ties: unknown tie '{tie}' (choose from {', '.join(TIES)})")


def calibrated_act_sites(specs: Mapping[str, SiteSpec]) -> list[str]:
    """The searched activation sites whose qparams come from calibration (enabled, uniform, not weights)."""
    return [n for n, spec in specs.items() if spec.enabled and spec.quantizer == "uniform" and not n.endswith(".weight")]


def check_act_widths(calibrated: Mapping[str, Sequence[int]], act_bits: Sequence[int]) -> None:
    """Every searched uniform activation site ({name: widths it is calibrated at}) has every search.act_bits width."""
    for name, have in calibrated.items():
        missing = [b for b in act_bits if b not in have]
        if missing:
            raise PipelineError(f"site {name} was calibrated for bits {list(have)}, not {missing}: add them to quant.candidate_bits and recalibrate")


def build_space(
    graph: SiteGraph,
    specs: Mapping[str, SiteSpec],
    act_bits: Sequence[int],
    weight_bits: Sequence[int],
    ties: Sequence[str],
    image: torch.Tensor,
    weight_cost_weight: float = 1.0,
    act_cost_weight: float = 1.0,
) -> SearchSpace:
    """Groups over every enabled uniform / log2 site (int_softmax sites keep the recipe width and are not searched).

    Needs no calibration: `image` (1 x C x H x W, any values) only counts each activation's elements.
    """
    for tie in ties:
        if tie not in TIES:
            raise PipelineError(f"search.ties: unknown tie '{tie}' (choose from {', '.join(TIES)})")
    from pipeline.quant.recipe import check_log2_reach, check_widths

    act_bits = check_widths("search.act_bits", act_bits, required=True)
    weight_bits = check_widths("search.weight_bits", weight_bits, required=True)
    names = [n for n in graph.names() if specs[n].enabled and specs[n].quantizer in ("uniform", "log2")]
    for n in names:  # a log2 softmax at a width whose grid cannot reach even attention is no candidate
        for bits in act_bits if specs[n].quantizer == "log2" else ():
            check_log2_reach(replace(specs[n], bits=bits), n, graph, where=f"search.act_bits={list(act_bits)}: ")
    kinds = {n: "weight" if graph[n].role == "weight" else "act" for n in names}
    elements = activation_elements(graph, [n for n in names if kinds[n] == "act"], image)
    for n in names:
        if kinds[n] == "weight":
            elements[n] = graph.module(n.rsplit(".", 1)[0]).weight.numel()
        elif n not in elements:
            raise PipelineError(f"site {n} saw no tensor in a forward pass")
    groups = []
    for root, ms in tied_members(graph, names, ties).items():
        widths = {m: (weight_bits if kinds[m] == "weight" else act_bits) for m in ms}
        if len({len(w) for w in widths.values()}) > 1:
            raise PipelineError(f"tied group of {root} mixes weights {weight_bits} and activations {act_bits}: tied sites need as many candidate widths")
        groups.append(Group(group_name(ms), ms, {m: list(w) for m, w in widths.items()}))
    groups = [g for g in groups if g.levels > 1] + [g for g in groups if g.levels == 1]
    norm = sum((weight_cost_weight if kinds[n] == "weight" else act_cost_weight) * elements[n] for n in names)
    if norm <= 0:
        raise PipelineError("search: the cost weights give every site zero cost (search.weight_cost_weight / act_cost_weight)")
    return SearchSpace(groups, kinds, elements, norm, weight_cost_weight, act_cost_weight)


def tied_members(graph: SiteGraph, names: Sequence[str], ties: Sequence[str]) -> dict[str, list[str]]:
    """{root site: member sites in `names` order}: sites joined when any tie rule gives them the same key (union-find)."""
    parent = {n: n for n in names}

    def find(x: str) -> str:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for tie in ties:
        first: dict[str, str] = {}
        for n in names:
            k = tie_key(graph, n, tie)
            if k is None:
                continue
            if k in first:
                parent[find(n)] = find(first[k])
            else:
                first[k] = n
    members: dict[str, list[str]] = {}
    for n in names:
        members.setdefault(find(n), []).append(n)
    return members


def group_name(members: Sequence[str]) -> str:
    """A readable name: the site itself, or the common prefix plus '{a,b,...}' leaves."""
    if len(members) == 1:
        return members[0]
    parts = [m.split(".") for m in members]
    common = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        common.append(items[0])
    prefix = ".".join(common)
    leaves = [m[len(prefix) + 1 :] if prefix else m for m in members]
    return (prefix + "." if prefix else "") + "{" + ",".join(leaves) + "}"


def space_hash(payload: Mapping) -> str:
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:10]
