"""Perturbing one site of a SiteGraph, and re-running only the part of the model after it.

- `replace_forward(site, fn)`: the activation site returns `fn(x)` instead of x (an instance
  attribute shadows `Site.forward`; removed on exit). Used for noise injection and for the
  zero perturbations whose Hessian the Hutchinson estimator measures.
- `replace_weight(graph, name, w)`: the Linear/Conv of a weight site uses `w` (through its
  `qweight`, the path the quantized model takes) until exit.

The model after a perturbed site is re-run by `pipeline.profile.collect.SuffixRunner` (shared
with the profiler's isolated mode).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import Tensor

from pipeline.quant.sites import Site, SiteGraph


@contextmanager
def replace_forward(site: Site, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    site.forward = fn  # shadows the class method for this instance only
    try:
        yield
    finally:
        del site.forward


@contextmanager
def replace_weight(graph: SiteGraph, name: str, weight: Tensor) -> Iterator[None]:
    module = graph.module(name.rsplit(".", 1)[0])
    site = module.weight_site
    old_mode, old_q = site.mode, module.qweight
    module.qweight, site.mode = weight, "quant"
    try:
        yield
    finally:
        module.qweight, site.mode = old_q, old_mode


def weight_of(graph: SiteGraph, name: str) -> Tensor:
    return graph.module(name.rsplit(".", 1)[0]).weight
