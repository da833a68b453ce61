"""Hutchinson's estimator of Hessian traces (and weighted diagonals) by double backward.

For a scalar loss L and tensors p_1..p_k (parameters, or zero perturbations added to
activations), draw Rademacher vectors v (entries +-1) for all of them at once and form
the Hessian-vector product Hv = d(grad L . v)/dp by a second backward pass. Then

    E[v_i . (Hv)_i] = Tr(H_ii)                 (the block of H belonging to p_i)
    E[v_i * (Hv)_i] = diag(H_ii)               (elementwise)

because E[v v^T] = I; cross terms between different tensors vanish in expectation, so
one joint HVP per sample estimates every block trace. `hutchinson_trace` averages
samples until `iters` or until the running mean of the total trace moves less than
`tol` (relative) over the last sample, after `min_iters`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor


@dataclass
class HutchinsonResult:
    """Per-tensor trace estimates (mean over samples) and their standard errors."""

    traces: list[float]
    stderr: list[float]
    iters: int
    converged: bool
    diag: list[Tensor | None] = field(default_factory=list)  # mean of reduce(v * Hv) per tensor, when asked for
    history: list[float] = field(default_factory=list)  # running mean of the total trace after each sample

    @property
    def total(self) -> float:
        return float(sum(self.traces))


def rademacher_like(t: Tensor, generator: torch.Generator | None) -> Tensor:
    """+-1 entries, same shape/dtype/device as t (drawn on CPU from `generator`, so results do not depend on the device)."""
    v = torch.randint(0, 2, t.shape, generator=generator, dtype=torch.int8)
    return (v.to(t.device, t.dtype) * 2 - 1)


def hutchinson_trace(
    loss_fn: Callable[[], Tensor],
    params: Sequence[Tensor],
    iters: int = 50,
    tol: float = 1e-2,
    generator: torch.Generator | None = None,
    min_iters: int = 8,
    diag_reduce: Sequence[Callable[[Tensor], Tensor] | None] | None = None,
) -> HutchinsonResult:
    """Estimate Tr(H_ii) for every tensor in `params` of the Hessian of `loss_fn()`.

    `loss_fn` is called once (its graph is kept and differentiated twice); every tensor
    in `params` must require grad and take part in the loss. `diag_reduce[i]`, if given,
    maps the elementwise product v_i * (Hv)_i to a smaller tensor (e.g. a sum per channel)
    whose mean over samples is returned in `diag` (an estimate of the reduced diagonal).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    params = list(params)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    sums = [0.0] * len(params)
    sq_sums = [0.0] * len(params)
    diag_sums: list[Tensor | None] = [None] * len(params)
    history: list[float] = []
    converged = False
    n = 0
    for n in range(1, iters + 1):
        vs = [rademacher_like(params[i], generator) for i in live]
        hvs = torch.autograd.grad([grads[i] for i in live], [params[i] for i in live], grad_outputs=vs, retain_graph=True, allow_unused=True)
        for i, v, hv in zip(live, vs, hvs):
            if hv is None:
                continue
            prod = (v * hv).detach()
            t = float(prod.sum())
            sums[i] += t
            sq_sums[i] += t * t
            if diag_reduce is not None and diag_reduce[i] is not None:
                r = diag_reduce[i](prod).double()
                diag_sums[i] = r if diag_sums[i] is None else diag_sums[i] + r
        total = sum(sums) / n
        history.append(total)
        if n >= max(2, min_iters) and tol > 0:
            previous = history[-2]
            if abs(total - previous) <= tol * max(abs(total), 1e-30):
                converged = True
                break
    del grads, loss
    traces = [s / n for s in sums]
    stderr = [((max(q / n - (s / n) ** 2, 0.0)) / max(n - 1, 1)) ** 0.5 for s, q in zip(sums, sq_sums)]
    diag = [None if d is None else (d / n).float() for d in diag_sums]
    return HutchinsonResult(traces, stderr, n, converged, diag, history)
