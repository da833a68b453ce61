"""Streaming per-site statistics: FP32 tensor vs quantized tensor, accumulated batch by batch.

A `SiteStats` keeps only sums, per-token extremes and fixed histograms on the
tensors' device, so a profile over many images holds one batch of site tensors
at a time; `result()` turns them into the metrics of
pipeline.profile.metrics (same definitions and units) with one host transfer.

Per batch and site the cost is a handful of vectorised passes: one
difference, three per-token reductions, the code histogram and the value
histograms. Nothing is moved to the host until `result()`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from pipeline.profile.codes import level_counts
from pipeline.profile.metrics import bit_utilization, cosine_from_dots, kl_from_counts, logit_kl, sqnr_from_energy, topk_hit_rate

HIST_BINS = 256


class SiteStats:
    """Accumulates one site's error, cosine, value histograms, code counts and top-k hits.

    - `add_pair(ref, test)`: FP32 and quantized tensors of the same shape; vectors run along `token_dim`.
    - `add_codes(counts)`: a `code_counts` histogram (clipped low, qmin..qmax, clipped high).
    - `add_rows(ref, test)`: rows along the last dim for top-1 / top-5 agreement (and, with `kl=True`, logit KL).
    """

    def __init__(self, token_dim: int = -1, bins: int = HIST_BINS):
        self.token_dim = token_dim
        self.bins = bins
        self.elements = 0
        self.tokens = 0
        self.signal: Tensor | float = 0.0  # sum ref^2, float64
        self.noise: Tensor | float = 0.0  # sum (ref - test)^2, float64
        self.cos_sum: Tensor | float = 0.0
        self.cos_min: Tensor | None = None
        self.hist_range: tuple[float, float] | None = None
        self.hist_ref: Tensor | None = None
        self.hist_test: Tensor | None = None
        self.counts: Tensor | None = None
        self.rows = 0
        self.top1 = 0.0
        self.top5: float | None = None
        self.kl_sum: float | None = None

    # -- accumulation ---------------------------------------------------------------
    def add_pair(self, ref: Tensor, test: Tensor, levels: tuple[Tensor, Tensor] | None = None) -> None:
        """Accumulate energies, per-token cosines and value histograms of one batch (shapes equal).

        `levels` = (values (L,), counts (L,)): the quantized tensor takes only these values, this
        often (a per-tensor uniform site: its dequantized codes); its histogram is then built
        from them instead of from `test`, which saves a pass.
        """
        if ref.shape != test.shape:
            raise ValueError(f"ref {tuple(ref.shape)} and test {tuple(test.shape)} differ in shape")
        r, t = ref.float(), test.float()
        if self.token_dim != -1:
            r, t = r.movedim(self.token_dim, -1), t.movedim(self.token_dim, -1)
        d = r - t
        norm_r = torch.linalg.vector_norm(r, dim=-1).double()  # (tokens...)
        norm_d = torch.linalg.vector_norm(d, dim=-1).double()
        dot_rd = torch.linalg.vecdot(r, d, dim=-1).double()
        # test = ref - d: <r, t> = |r|^2 - <r, d>, |t|^2 = |r|^2 - 2<r, d> + |d|^2 (no pass over t needed)
        sq_r, sq_d = norm_r.square(), norm_d.square()
        dot = sq_r - dot_rd
        norm_t = (sq_r - 2 * dot_rd + sq_d).clamp_min(0.0).sqrt()
        cos = cosine_from_dots(dot, norm_r, norm_t)
        self.signal = self.signal + sq_r.sum()
        self.noise = self.noise + sq_d.sum()
        self.cos_sum = self.cos_sum + cos.sum()
        self.cos_min = cos.min() if self.cos_min is None else torch.minimum(self.cos_min, cos.min())
        self.tokens += cos.numel()
        self.elements += ref.numel()
        self._add_histograms(r, t, levels)

    def _add_histograms(self, ref: Tensor, test: Tensor, levels: tuple[Tensor, Tensor] | None) -> None:
        first = self.hist_range is None
        if first:  # fixed from the first batch: [min, max] of both tensors
            lo, hi = torch.aminmax(ref)
            if levels is None:
                tlo, thi = torch.aminmax(test)
            else:
                values, counts = levels
                used = counts > 0
                tlo, thi = torch.where(used, values, math.inf).min(), torch.where(used, values, -math.inf).max()
            lo, hi = float(torch.minimum(lo, tlo)), float(torch.maximum(hi, thi))
            self.hist_range = (lo, hi if hi > lo else lo + 1.0)
        # later batches: values beyond the first batch's range go to the edge bins
        self.hist_ref = _accumulate(self.hist_ref, self._histogram(ref, clamp=not first))
        if levels is None:
            self.hist_test = _accumulate(self.hist_test, self._histogram(test, clamp=not first))
        else:
            self.hist_test = _accumulate(self.hist_test, self._weighted_histogram(*levels))

    def _histogram(self, x: Tensor, clamp: bool) -> Tensor:
        lo, hi = self.hist_range
        if clamp:
            x = x.clamp(lo, hi)
        return torch.histc(x, bins=self.bins, min=lo, max=hi).double()

    def _weighted_histogram(self, values: Tensor, counts: Tensor) -> Tensor:
        """histc's binning, (v - lo) * bins / (hi - lo) floored, of `values` weighted by `counts`."""
        lo, hi = self.hist_range
        idx = ((values.double() - lo) * self.bins / (hi - lo)).floor_().clamp_(0, self.bins - 1).long()
        return torch.zeros(self.bins, dtype=torch.float64, device=values.device).index_add_(0, idx, counts.double())

    def add_codes(self, counts: Tensor) -> None:
        """Add a `code_counts` histogram: (qmax - qmin + 3,) = [clipped low, qmin..qmax, clipped high]."""
        self.counts = _accumulate(self.counts, counts.double())

    def add_rows(self, ref: Tensor, test: Tensor, kl: bool = False) -> None:
        """Top-1 and (rows longer than 5) top-5 agreement of rows along the last dim; logit KL with `kl`."""
        rows = ref.numel() // ref.shape[-1]
        self.top1 += topk_hit_rate(ref, test, k=1) * rows
        if ref.shape[-1] > 5:
            self.top5 = (self.top5 or 0.0) + topk_hit_rate(ref, test, k=5) * rows
        if kl:
            self.kl_sum = (self.kl_sum or 0.0) + logit_kl(ref, test) * rows
        self.rows += rows

    # -- results --------------------------------------------------------------------
    def result(self, bits: int | None = None) -> dict[str, float | int | None]:
        """The site's metrics (units as in pipeline.profile.metrics.SiteMetrics).

        sqnr_db (dB), mse, cos_mean / cos_min, hist_kl (nats); with codes: sat_low_pct /
        sat_high_pct / sat_pct (% of values clipped), levels_used of levels_total (= 2^bits),
        level_pct (%), effective_bits (bits, log2 of the levels used); with rows:
        top1_agreement / top5_hit_rate (0..1) and logit_kl (nats).
        """
        if self.elements == 0:
            raise ValueError("no batch was added")
        host = {k: float(v) for k, v in (("signal", self.signal), ("noise", self.noise), ("cos_sum", self.cos_sum), ("cos_min", self.cos_min))}
        out: dict[str, float | int | None] = {
            "sqnr_db": sqnr_from_energy(host["signal"], host["noise"]),
            "mse": host["noise"] / self.elements,
            "cos_mean": host["cos_sum"] / self.tokens,
            "cos_min": host["cos_min"],
            "hist_kl": kl_from_counts(self.hist_ref, self.hist_test) if self.hist_test is not None else None,
        }
        if self.counts is not None:
            out.update(self._code_metrics(bits))
        if self.rows:
            out["top1_agreement"] = self.top1 / self.rows
            out["top5_hit_rate"] = None if self.top5 is None else self.top5 / self.rows
            if self.kl_sum is not None:
                out["logit_kl"] = self.kl_sum / self.rows
        return out

    def _code_metrics(self, bits: int | None) -> dict[str, float | int]:
        counts = self.counts.cpu()
        n = float(counts.sum())
        low, high = 100.0 * float(counts[0]) / n, 100.0 * float(counts[-1]) / n
        used = torch.nonzero(level_counts(counts)).flatten()  # indices of the stored codes in use
        total_bits = bits if bits else max(1, math.ceil(math.log2(counts.numel() - 2)))
        levels, effective, fraction = bit_utilization(used, total_bits)
        return {
            "sat_low_pct": low,
            "sat_high_pct": high,
            "sat_pct": low + high,
            "levels_used": levels,
            "levels_total": 2**total_bits,
            "level_pct": 100.0 * fraction,
            "effective_bits": effective,
        }

    def histograms(self) -> dict[str, object] | None:
        """{'range': (lo, hi), 'ref': (bins,), 'test': (bins,)} on the CPU, for plots; None before any batch."""
        if self.hist_ref is None or self.hist_test is None:
            return None
        return {"range": self.hist_range, "ref": self.hist_ref.cpu(), "test": self.hist_test.cpu()}


def _accumulate(total: Tensor | None, value: Tensor) -> Tensor:
    return value if total is None else total + value
