"""Streaming per-site statistics: FP32 tensor vs quantized tensor, accumulated batch by batch.

A `SiteStats` keeps, per batch, only small tensors on the tensors' device: three
per-token norms (|ref|, |ref - test|, |test|), a fixed-range value
histogram of ref, the code histogram and, for the logits and softmax rows, top-k
hits. `result()` reduces them once into the metrics of pipeline.profile.metrics
(same definitions and units) with one host transfer, so the per-batch cost is a
handful of vectorised passes and no host synchronisation.

Value histograms (for the KL and the plots) have bins that hold whole quantization cells
(`HistGrid`): a bin spans m >= 1 levels of the site's grid, with edges halfway between
levels where the levels sit at multiples of one step (per-tensor uniform sites; log2 sites on
the -log2 axis). Rounding to the grid then moves no value to another bin, so the KL measures
how the distribution moved (clipping, upstream error), not how the bin width beats against
the step (bins narrower than the step leave empty quantized bins between the levels, and
their FP32 mass alone would make the KL several nats).

The bins are fixed before any data: a uniform site's span its grid, [(qmin - zp) s, (qmax - zp) s]
(the union over channels), plus one bin on each side for FP32 values beyond it (clipped); a log2
site's are its levels. So the histograms, and the KL, do not depend on which batch came first.

The quantized tensor's value histogram comes from the code histogram when the
caller gives the value of every code column (`add_code_index(..., values)`): a
quantized tensor takes only those values, so no pass over it is needed. The
FP32 tensor's value histogram (for the KL) is built from an evenly strided
sample of whole rows, at most HIST_SAMPLES_PER_IMAGE values per image of the batch (every value of
smaller tensors; see `spread_sample`), and the softmax rows' top-k hit rates from at most
ROW_SAMPLES_PER_IMAGE rows per image; a sampled batch weighs by its full size (values, rows). The
sample's share of each batch is then the same whatever `profile.batch_size` is, so the estimates
do not move with the batching; the KL's sampling bias, about (occupied bins - 1) / (2 samples), is
taken off in `result()` (`SiteStats._hist_kl`).
Everything else (energies, cosines, code counts) uses every value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.profile.codes import level_counts, levels_in_use
from pipeline.profile.metrics import bit_utilization, cosine_from_dots, kl_from_counts, logit_kl, sqnr_from_energy, topk_hit_rates
from pipeline.quant.counts import bincount
from pipeline.quant.observers import coprime_at_least

HIST_BINS = 256
HIST_SAMPLES_PER_IMAGE = 2**11
"""The FP32 tensor's value histogram takes at most this many values per image (per entry of the first
dim: an image of a batch, a row of a weight) of each batch, an evenly strided sample."""
WEIGHT_HIST_SAMPLES = 2**16
"""A weight's value histogram (one batch: the weight) takes at most this many values."""
ROW_SAMPLES_PER_IMAGE = 32
"""Softmax rows per image of each batch that enter the top-k hit rates (an evenly strided sample); logits use every row."""


def memory_order(x: Tensor) -> Tensor:
    """x's elements as a 1-d tensor in memory order: a view, no copy, when x is a permuted dense tensor.

    Histograms do not depend on element order, and the site tensors of attention (q, k, v are
    views into the qkv output) are often permuted: flattening them in logical order would copy.
    """
    if x.is_contiguous():
        return x.view(-1)
    order = sorted(range(x.ndim), key=lambda d: (x.stride(d), x.shape[d]), reverse=True)
    permuted = x.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else x.reshape(-1)


def token_norms(x: Tensor, dim: int) -> Tensor:
    """L2 norm of x's vectors along `dim` (x's shape without `dim`), reduced where the vectors lie.

    Along the fastest-varying dimension `torch.linalg.vector_norm` is one fused pass. Along another
    one (the image input's 3 colour channels of a (B, 3, H, W) batch) it is ~100x slower than
    squaring and summing across that dimension, which runs over contiguous rows; moving the
    dimension last instead would copy the tensor.
    """
    if x.stride(dim) == 1:
        return torch.linalg.vector_norm(x, dim=dim)
    return x.square().sum(dim).sqrt_()


def spread_sample(x: Tensor, limit: int) -> Tensor:
    """At most `limit` of x's values, spread over the whole tensor: all of them when x is small enough.

    x is read as rows of its fastest-varying dimension (in memory order, e.g. channels of a token,
    keys of an attention row); every k-th row is taken, whole, so the sample touches few cache lines
    and has every index of that dimension. k is the smallest stride >= rows / (limit // row length)
    that is coprime with the next dimension (e.g. tokens), so consecutive picks walk through all of
    its indices instead of aliasing with them. Rows longer than `limit` fall back to every k-th value.
    Returns a 1-d tensor or a (rows, row length) view.
    """
    flat = memory_order(x)
    if flat.numel() <= limit:
        return flat
    by_stride = sorted(range(x.ndim), key=lambda d: (x.stride(d), x.shape[d]))
    row = x.shape[by_stride[0]]
    if row > limit:  # long rows: every k-th value, k coprime with the row length
        return flat[:: coprime_at_least(-(-flat.numel() // limit), row)]
    rows = flat.view(-1, row)
    next_dim = x.shape[by_stride[1]] if x.ndim > 1 else 1
    return rows[:: coprime_at_least(-(-rows.shape[0] // (limit // row)), next_dim)]


@dataclass(frozen=True)
class HistGrid:
    """The level grid a site's value-histogram bins follow.

    `step`: distance between levels (value units; per-channel sites: the median channel's step).
    `aligned`: the levels are the multiples of `step` (per-tensor uniform: (q - zp) * s), so the
    bin edges go halfway between them. `lo`, `hi`: the lowest and highest level (value units; the
    union over channels), which fix the bins' span before any data; None: the first batch sets it.
    `log2_frac_bits`: a log2 site, binned on -log2(x) * 2^f, where the levels are the integers
    0..`log2_levels` - 1; the last bin also holds what underflows (x below the smallest level,
    flushed to 0).
    """

    step: float = 1.0
    aligned: bool = False
    log2_frac_bits: int | None = None
    log2_levels: int = 0
    lo: float | None = None
    hi: float | None = None

    @property
    def log2(self) -> bool:
        return self.log2_frac_bits is not None


class Workspace:
    """Reusable buffers, one per dtype, for one temporary at a time (a batch's ref - test, code indices).

    Shared by the SiteStats of one pass, so each site's temporaries reuse memory instead of
    allocating (and page-faulting) a fresh full-size tensor.
    """

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, Tensor] = {}

    def like(self, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """A contiguous `dtype` tensor of x's shape on x's device (contents undefined, valid until the next call)."""
        n, buffer = x.numel(), self._buffers.get(dtype)
        if buffer is None or buffer.numel() < n or buffer.device != x.device:
            buffer = self._buffers[dtype] = torch.empty(n, dtype=dtype, device=x.device)
        return buffer[:n].view(x.shape)


class SiteStats:
    """Accumulates one site's error energies, token cosines, value histograms, code counts and top-k hits.

    - `add_code_index(index, rows, width, values=None)`: histogram indices from `codes.code_index`
      (or `add_codes(counts)` with a ready (K, L + 2) histogram); `values` (K or 1, L + 2) the
      dequantized value of each column, so that the quantized tensor's histogram follows from the
      counts. Call it before `add_pair` for the same batch.
    - `add_pair(ref, test)`: FP32 and quantized tensors of one batch (same shape); vectors along `token_dim`.
    - `add_rows(ref, test, kl=False)`: rows along the last dim: top-1 / top-5 agreement, logit KL with `kl`.

    The value histograms have at most `bins` bins, each holding whole cells of `grid` when one is
    given (see `HistGrid`): over the grid's levels plus one bin each side for values beyond them.
    Without a grid span, the first batch fixes the range ([min, max] of both tensors, `bins` equal
    bins) and later values beyond it are counted in the edge bins. `bins=None` (tensors of few
    values, the logits) keeps every value and bins them all at the end, √n bins (at least 8, at
    most HIST_BINS) over their whole range. Counts accumulate in place on the tensors' device.
    """

    def __init__(self, token_dim: int = -1, bins: int | None = HIST_BINS, workspace: Workspace | None = None, grid: HistGrid | None = None):
        self.token_dim = token_dim
        self.bins = bins  # at most; None: keep the values, sqrt(all values) bins at the end (logits)
        self._kept: list[tuple[Tensor, Tensor]] | None = [] if bins is None else None
        self.workspace = workspace
        self.grid = grid
        self.elements = 0
        self._sampled = 0  # FP32 values that entered the value histogram (the rest of `elements` were not sampled)
        self.hist_range: tuple[float, float] | None = None
        self._tokens: list[Tensor] = []  # per batch (3, T) float32: |r|, |r - t|, |t|
        self._ref_counts: Tensor | None = None  # (bins,)
        self._test_counts: Tensor | None = None  # (bins,), when the values of the codes are unknown
        self._codes: Tensor | None = None  # (K * (L + 2),)
        self._code_shape: tuple[int, int] | None = None
        self._values: Tensor | None = None  # (K or 1, L + 2)
        self._affine: tuple[Tensor, Tensor] | None = None  # histogram index = x * a + b
        self.rows = 0
        self.top1 = 0.0
        self.top5: float | None = None
        self.kl_sum: float | None = None

    # -- accumulation ---------------------------------------------------------------
    @staticmethod
    def _count(total: Tensor | None, index: Tensor, size: int) -> Tensor:
        """total + counts of `index` (integer, values in 0..size-1): (size,) int64."""
        counts = bincount(memory_order(index), size)  # in memory order: a view, no copy
        return counts if total is None else total.add_(counts)

    def add_code_index(self, index: Tensor, rows: int, width: int, values: Tensor | None = None) -> None:
        """Count code-histogram indices (see `codes.code_index`): `rows` x `width` columns."""
        self._check_codes(rows, width, values)
        self._codes = self._count(self._codes, index, rows * width)

    def add_codes(self, counts: Tensor, values: Tensor | None = None) -> None:
        """Add a ready (K, L + 2) code histogram: [clipped low, qmin..qmax, clipped high] per row (channel)."""
        self._check_codes(*counts.shape, values)
        flat = counts.reshape(-1).to(torch.int64)
        self._codes = flat.clone() if self._codes is None else self._codes.add_(flat)

    def _check_codes(self, rows: int, width: int, values: Tensor | None) -> None:
        if self._code_shape not in (None, (rows, width)):
            raise ValueError(f"code histogram {rows}x{width} differs from the earlier {self._code_shape}")
        if values is not None and values.shape[0] not in (1, rows):
            raise ValueError(f"values {tuple(values.shape)} do not match {rows} rows of counts")
        self._code_shape = (rows, width)
        if values is not None and self.elements == 0:
            self._values = values  # only from the first batch on: all of test's histogram comes from codes

    def add_pair(self, ref: Tensor, test: Tensor, limit: int | None = None) -> None:
        """Accumulate the per-token norms of ref, ref - test and test and the value histograms of one batch.

        `limit`: at most this many of ref's values enter its histogram (default: HIST_SAMPLES_PER_IMAGE per
        entry of dim 0, an image of an activation batch).
        """
        if ref.shape != test.shape:
            raise ValueError(f"ref {tuple(ref.shape)} and test {tuple(test.shape)} differ in shape")
        r, t = ref.float(), test.float()
        d = torch.sub(r, t, out=self.workspace.like(r)) if self.workspace is not None else r - t
        per_token = torch.stack([token_norms(r, self.token_dim), token_norms(d, self.token_dim), token_norms(t, self.token_dim)])
        self._tokens.append(per_token.reshape(3, -1))
        self.elements += ref.numel()
        if self._kept is not None:  # few values: binned all together at the end
            self._kept.append((r.detach().reshape(-1), t.detach().reshape(-1)))
            self._sampled += ref.numel()
            return
        if self.hist_range is None:
            self._set_range(r, t)
        limit = limit or HIST_SAMPLES_PER_IMAGE * (ref.shape[0] if ref.ndim > 1 else 1)
        self._ref_counts, sampled = self._count_sample(self._ref_counts, r, limit)
        self._sampled += sampled
        if self._values is None:
            self._test_counts, _ = self._count_sample(self._test_counts, t, limit)

    def _count_sample(self, total: Tensor | None, x: Tensor, limit: int) -> tuple[Tensor, int]:
        """(total + x's value histogram from an evenly spread sample of at most `limit` values, the sample's size).

        A sampled batch's counts are scaled up to its number of values, so that batches of
        different sizes weigh by their size: (bins,) float64, an estimate of x's full counts.
        """
        sample = spread_sample(x, limit)
        counts = self._count(None, self._bin_index(sample), self.bins)
        weight = x.numel() / sample.numel()
        if total is None:
            return counts.double().mul_(weight), sample.numel()
        return total.add_(counts, alpha=weight), sample.numel()

    def _bin_kept(self) -> None:
        """Bin every kept value (`bins=None`) over the range of all of them."""
        r, t = (torch.cat(parts) for parts in zip(*self._kept))
        self.bins, self.hist_range = None, None
        self._set_range(r, t)
        self._ref_counts = self._count(None, self._bin_index(r), self.bins).double()
        self._test_counts = self._count(None, self._bin_index(t), self.bins).double()

    def _set_range(self, r: Tensor, t: Tensor) -> None:
        """The bins: over the grid's span when it is known (no data read), else [min, max] over r and t (one host sync)."""
        grid = self.grid
        most = self.bins or min(HIST_BINS, max(8, math.isqrt(r.numel())))
        if grid is not None and grid.log2:  # one bin per level on -log2 x, then underflow
            self.bins, edge, width = grid.log2_levels + 1, -0.5, 1.0
        elif grid is not None and grid.step > 0 and grid.lo is not None and math.isfinite(grid.hi - grid.lo):
            levels_per_bin = max(1, math.ceil((grid.hi - grid.lo) / (grid.step * most)))
            width = levels_per_bin * grid.step
            edge = grid.lo - grid.step / 2 if grid.aligned else grid.lo
            inner = math.floor((grid.hi - edge) / width) + 1
            self.bins, edge = inner + 2, edge - width  # one bin each side for the FP32 values beyond the grid
        else:
            lo, hi = torch.aminmax(r)
            tlo, thi = torch.aminmax(t)
            lo, hi = torch.stack([torch.minimum(lo, tlo), torch.maximum(hi, thi)]).tolist()
            hi = hi if hi > lo else lo + 1.0
            self.bins, edge, width = most, lo, (hi - lo) / most
        self.hist_range = (edge, edge + self.bins * width)
        self._affine = (r.new_full((), 1.0 / width), r.new_full((), -edge / width))

    def _bin_index(self, x: Tensor) -> Tensor:
        """Bin of each value: (x - edge) / width, clamped to [0, bins - 1] and truncated (int32, x's shape).

        A log2 grid bins -log2(x) * 2^f (0 -> +inf: the last bin).
        """
        scale, shift = self._affine
        if self.grid is not None and self.grid.log2:
            x = torch.log2(x.float()).mul_(-(2.0**self.grid.log2_frac_bits))
        # one fused pass; after the clamp to >= 0, truncation is the floor
        return torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype)).clamp_(0, self.bins - 1).int()

    def add_rows(self, ref: Tensor, test: Tensor, kl: bool = False, limit: int | None = None) -> None:
        """Top-1 and (rows longer than 5) top-5 agreement of rows along the last dim; logit KL with `kl`.

        With `limit`, batches of more rows contribute an evenly strided sample of at most `limit` rows
        (attention maps: thousands of rows per batch, where top-k is the costliest metric).
        """
        rows = ref.numel() // ref.shape[-1]  # a sampled batch still weighs by all its rows
        if limit is not None and rows > limit:
            flat_r, flat_t = ref.reshape(-1, ref.shape[-1]), test.reshape(-1, test.shape[-1])
            stride = -(-rows // limit)
            ref, test = flat_r[::stride], flat_t[::stride]
        ks = (1, 5) if ref.shape[-1] > 5 else (1,)
        rates = topk_hit_rates(ref, test, ks)
        self.top1 += rates[0] * rows
        if len(rates) > 1:
            self.top5 = (self.top5 or 0.0) + rates[1] * rows
        if kl:
            self.kl_sum = (self.kl_sum or 0.0) + logit_kl(ref, test) * rows
        self.rows += rows

    # -- results --------------------------------------------------------------------
    def test_counts(self) -> Tensor:
        """The quantized tensor's value histogram (bins,), from its code counts when their values are known."""
        if self._values is None:
            return self._test_counts
        if self._test_counts is None:
            self._test_counts = self._levels_histogram()
        return self._test_counts

    def _levels_histogram(self) -> Tensor:
        codes = self._codes.view(self._code_shape)
        if self._values.shape[0] == 1:  # the same values in every row: count per column first
            codes = codes.sum(0, keepdim=True)
        values = self._values.expand_as(codes)
        return torch.zeros(self.bins, dtype=codes.dtype, device=codes.device).index_add_(0, self._bin_index(values).flatten(), codes.flatten())

    def result(self, bits: int | None = None) -> dict[str, float | int | None]:
        """The site's metrics (units as in pipeline.profile.metrics.SiteMetrics).

        sqnr_db (dB), mse, cos_mean / cos_min (per-token cosine), hist_kl (nats); with codes:
        sat_low_pct / sat_high_pct / sat_pct (% of values clipped), levels_used of levels_total
        (= 2^bits), level_pct (%), effective_bits (bits, log2 of the levels used) and, with
        per-channel counts, channel_level_pct (median over channels of the % of the levels a channel
        could reach that it uses: distinct codes / min(2^bits, values counted in the channel));
        with rows: top1_agreement / top5_hit_rate (0..1) and logit_kl (nats).
        """
        if self.elements == 0:
            raise ValueError("no batch was added")
        if self._kept:
            self._bin_kept()
        norm_r, norm_d, norm_t = torch.cat(self._tokens, dim=1).double()
        sq_r, sq_d = norm_r.square(), norm_d.square()
        # d = r - t: <r, t> = (|r|^2 + |t|^2 - |d|^2) / 2 from float32 norms: the cosine's error is about
        # 1e-7 * |r| / |t|, so exact to ~1e-7 unless the quantized token is orders of magnitude smaller
        cos = cosine_from_dots((sq_r + norm_t.square() - sq_d) / 2, norm_r, norm_t)
        signal, noise, cos_mean, cos_min = torch.stack([sq_r.sum(), sq_d.sum(), cos.mean(), cos.min()]).tolist()
        out: dict[str, float | int | None] = {
            "sqnr_db": sqnr_from_energy(signal, noise),
            "mse": noise / self.elements,
            "cos_mean": cos_mean,
            "cos_min": cos_min,
            "hist_kl": self._hist_kl(),
        }
        if self._codes is not None:
            out.update(self._code_metrics(bits))
        if self.rows:
            out["top1_agreement"] = self.top1 / self.rows
            out["top5_hit_rate"] = None if self.top5 is None else self.top5 / self.rows
            if self.kl_sum is not None:
                out["logit_kl"] = self.kl_sum / self.rows
        return out

    def _hist_kl(self) -> float:
        """KL(FP32 || quantized) of the value histograms (nats), less its sampling bias.

        The quantized histogram is exact (from the codes); the FP32 one is estimated from n of the N
        values. A histogram estimated from n values over k occupied bins overstates the KL by about
        (k - 1) / (2n) on average (the Miller-Madow bias of its entropy), times (1 - n/N) for a sample
        drawn without replacement: that is subtracted (and the result floored at 0), so that the figure
        does not grow with the number of bins a site occupies or shrink as more images are profiled.
        """
        kl = kl_from_counts(self._ref_counts, self.test_counts())
        if self._sampled >= self.elements:
            return kl
        occupied = int((self._ref_counts > 0).sum())
        return max(0.0, kl - (occupied - 1) / (2 * self._sampled) * (1 - self._sampled / self.elements))

    def _code_metrics(self, bits: int | None) -> dict[str, float | int | None]:
        counts = self._codes.view(self._code_shape).cpu()  # (K, L + 2)
        total = counts.sum(0)
        n = float(total.sum())
        low, high = 100.0 * float(total[0]) / n, 100.0 * float(total[-1]) / n
        bits = bits or max(1, math.ceil(math.log2(counts.shape[1] - 2)))
        used = torch.nonzero(level_counts(total)).flatten()  # the stored codes in use
        levels, effective, fraction = bit_utilization(used, bits)
        channel = None
        if counts.shape[0] > 1:  # a channel cannot use more levels than it has values (head.in: one per image)
            reachable = counts.sum(1).double().clamp(max=2**bits).clamp(min=1)
            channel = 100.0 * float((levels_in_use(counts) / reachable).median())
        return {
            "sat_low_pct": low,
            "sat_high_pct": high,
            "sat_pct": low + high,
            "levels_used": levels,
            "levels_total": 2**bits,
            "level_pct": 100.0 * fraction,
            "effective_bits": effective,
            "channel_level_pct": channel,
        }

    def histograms(self) -> dict[str, object] | None:
        """{'range': (lo, hi), 'ref': (bins,), 'test': (bins,), 'axis'} on the CPU, for plots; None before any batch.

        `axis` names the binned quantity: "value", or for a log2 site "-log2(x) * 2^f" (the level index).
        """
        if self._kept:
            self._bin_kept()
        if self._ref_counts is None:
            return None
        axis = "value"
        if self.grid is not None and self.grid.log2:
            axis = "-log2(x)" + (f" * 2^{self.grid.log2_frac_bits}" if self.grid.log2_frac_bits else "") + ", last bin: underflow"
        return {"range": self.hist_range, "ref": self._ref_counts.cpu(), "test": self.test_counts().cpu(), "axis": axis}
