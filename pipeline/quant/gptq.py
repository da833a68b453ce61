"""GPTQ: weight rounding that compensates each column's error on the columns not yet quantized.

Plain rounding treats every weight alone; what the layer's output feels is the error
E = W - Q weighted by the statistics of its inputs, tr(E H Eᵀ) with H = Σ x xᵀ over the
calibration tokens (the Hessian of the layer's squared output error). GPTQ (Frantar et
al., 2022, after Optimal Brain Quantization) quantizes the input columns one at a time
with the usual quantizer (same scales, zero points and rounding mode), and after each
column spreads its rounding error over the remaining columns through the Cholesky factor
of H⁻¹, so later columns absorb what earlier ones lost. Scales come from the weight's
observer as before; only the choice between the two neighbouring codes changes, so the
result is an ordinary integer weight on the grid.

The calibrate stage accumulates H for every Linear (and Conv2d) whose weight spec asks
`gptq: true` (`HessianHooks`); binding (`calibration.quantize_weight`, through `_round_weight`) calls
`gptq_fake_quantize`.
Folded weights W·diag(s) see inputs x / s, so their Hessian is diag(1/s) H diag(1/s).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.quant.observers import coprime_at_least
from pipeline.quant.quantizers import clamp_and_scale_, round_to_int, rounded_bounds

HESSIAN_KEY = "hessian"
"""CalibState tensor `<weight site>/hessian`: (in, in) float32, Σ x xᵀ over calibration tokens."""


@torch.no_grad()
def gptq_fake_quantize(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    rounding: str = "half_up",
    damp: float = 0.01,
    block: int = 128,
) -> Tensor:
    """W fake-quantized on its per-row grid, columns rounded in GPTQ order with error feedback.

    Args:
        weight: (out, in) float.
        hessian: (in, in) Σ x xᵀ of the layer's inputs (any positive scale; symmetric PSD).
        scale, zero_point: (out,) or one element: the grid of every row (from the weight's observer).
        damp: added to H's diagonal as a fraction of its mean diagonal (numerical safety).
        block: columns per lazy batch update (speed only; the result does not depend on it
            beyond float rounding).
    Returns:
        (out, in) float32 tensor on the grid: (clamp(code, qmin, qmax) - zp) * scale per row.
        With a diagonal H there is nothing to propagate and the result is plain rounding.
    """
    w = weight.detach().to(torch.float32).clone()
    cols = w.shape[1]
    h = hessian.detach().to(w.device, torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0  # inputs never seen active: nothing to compensate with them
    order = torch.argsort(torch.diagonal(h), descending=True)  # "act order": the loudest inputs first
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp * float(torch.diagonal(h).mean()))
    # upper Cholesky factor of H^-1: row i holds how column i's error maps onto columns > i
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).to(torch.float32)
    scale = scale.detach().to(w).reshape(-1).expand(w.shape[0])  # one per row of W: per column of Wᵀ below
    low, high = rounded_bounds(zero_point.detach().to(w).reshape(-1).expand(w.shape[0]), qmin, qmax)
    # On Wᵀ (in, out) each weight column is a contiguous row, and the rank-1 updates are in place on whole rows.
    wt = w.T.contiguous()
    out = torch.empty_like(wt)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        w_block, u_block = wt[start:stop], u[start:stop, start:stop]
        errors = torch.empty_like(w_block)
        for i in range(stop - start):  # sequential by construction: each column sees the errors before it
            column = w_block[i]
            q = round_to_int(torch.div(column, scale, out=out[start + i]), rounding, in_place=True)
            clamp_and_scale_(q, scale, low, high)  # in place: out's row
            error = torch.sub(column, q, out=errors[i]).div_(u_block[i, i])
            w_block[i + 1 :].sub_(u_block[i, i + 1 :, None] * error)
        wt[stop:].sub_((errors.T @ u[start:stop, stop:]).T)
    out = out.T
    return out[:, torch.argsort(order)]


def output_error(weight: Tensor, qweight: Tensor, hessian: Tensor) -> float:
    """tr((W - Q) H (W - Q)ᵀ): the summed squared output error over the tokens that built H."""
    e = (weight.detach() - qweight.detach()).double()
    return float(((e @ hessian.double()) * e).sum())


TOKEN_STRIDE = 4
"""H is built from about every 4th input token: Σ x xᵀ costs about 1.5 FP32 forwards per token on a
ViT (in² per token and layer), a quarter of that keeps calibration cheap, and 512 CIFAR images
still give ~8,000 tokens for the widest input (fc2, 4·C)."""


class HessianHooks:
    """Forward pre-hooks that accumulate H = Σ x xᵀ of chosen Linear / Conv2d layers' inputs (float32).

    Inputs are flattened to (tokens, in) (a Conv2d's to its patches, in the order of
    weight.flatten(1)), and every k-th token enters H, k the smallest integer >= `stride` coprime
    with the layer's tokens per image (`observers.coprime_at_least`). Consecutive batches continue
    the count, so the picks walk through every token position (64 patches with k = 4 would
    sample only 16 of them, the same ones in every image). H is kept on the layer's device.
    `remove()` detaches the hooks; `hessians` maps the weight site name (`<path>.weight`) to H.
    """

    def __init__(self, model: nn.Module, paths: list[str], stride: int = TOKEN_STRIDE):
        self.hessians: dict[str, Tensor] = {}
        self.stride = max(1, stride)
        self._offset: dict[str, int] = {}
        self._handles = [model.get_submodule(p).register_forward_pre_hook(self._hook(f"{p}.weight")) for p in paths]

    def _hook(self, key: str):
        def hook(module: nn.Module, args) -> None:
            x = args[0].detach().to(torch.float32)
            if isinstance(module, nn.Conv2d):  # (B, C*kh*kw, L) patches -> tokens
                x = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride).transpose(1, 2)
            per_image = math.prod(x.shape[1:-1])  # tokens per image (1 for a (B, in) input)
            stride = coprime_at_least(self.stride, per_image)
            x = x.reshape(-1, x.shape[-1])
            start = self._offset.get(key, 0)
            self._offset[key] = (start - x.shape[0]) % stride  # where the next batch's first pick lies
            x = x[start::stride]
            h = self.hessians.get(key)
            if h is None:
                self.hessians[key] = x.T @ x
            else:
                h.addmm_(x.T, x)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
