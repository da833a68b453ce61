"""Calibration observers (torch.ao style): they watch activations or weights and propose quantization ranges.

Contract, shared by every observer:

* ``forward(x)`` only records statistics and returns x unchanged (the same tensor object).
* ``calculate_qparams(bits, signed, symmetric, rounding)`` turns the statistics into (scale, zero_point)
  via :func:`pipeline.quant.quantizers.choose_qparams`. Range searches (omse, kl) run here, once per bit
  width, so a single calibration pass serves 8 and 16 bits alike.
* ``stats()`` returns the statistics as tensors, for saving.

Granularity: ``per_tensor`` gives 0-d scale/zero_point; ``per_channel`` gives shape (C,) with C = x.shape[axis]
(axis=-1 for a (B, N, C) activation: one range per hidden channel; axis=0 for a weight of shape (out, in)).
Internally every statistic is kept per "row": x is viewed as a (C, M) matrix, C = 1 per tensor
(see :func:`channel_rows`), so each observer has a single code path for both granularities.
"""

from __future__ import annotations

import inspect
import math
from numbers import Real
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pipeline.quant.counts import bincount
from pipeline.quant.quantizers import choose_qparams, fake_quantize_broadcast, qrange

GRANULARITIES = ("per_tensor", "per_channel")
MAX_QUANTILE_SAMPLES = 1 << 16
"""The percentile observer subsamples longer rows to this many values before selecting order statistics
(per batch and channel: cheap, and the EMA smooths the sampling noise)."""
TOPK_TAIL = 4096
"""row_quantile selects by topk when the quantile lies this close to either end of a row."""
OMSE_CHUNK_BYTES = 256 * 1024 * 1024
"""Memory budget for the omse candidate search; candidates are evaluated in chunks that fit."""
OMSE_LOSSES = ("l1", "l2", "huber")
MIN_HIST_MAX = 2.0**-100
"""Floor of the KL histogram range, so bins / hist_max stays finite in float32."""
KL_TIE_TOLERANCE = 1e-9
"""Divergences within this (relative, or absolute below 1) of the least count as ties in the KL search."""
_GOLDEN_RATIO_FRACTION = (math.sqrt(5.0) - 1.0) / 2.0


def _is_real(value: object) -> bool:
    """True for int/float-like numbers (bool excluded)."""
    return isinstance(value, Real) and not isinstance(value, bool)


class NonFiniteError(ValueError):
    """An observer saw NaN or Inf; the caller adds the name of the site."""


# ----------------------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------------------


def check_granularity(granularity: str) -> None:
    """Raise ValueError unless granularity is one of GRANULARITIES."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")


def channel_rows(x: Tensor, granularity: str, axis: int) -> Tensor:
    """x as a (C, M) float matrix: one row per channel, M = x.numel() / C values per row.

    per_channel: move dimension ``axis`` to the front and flatten the rest -> (x.shape[axis], M).
    per_tensor:  flatten everything -> (1, x.numel()).
    float16/bfloat16/integer input is converted to float32; a view is returned where torch can.
    """
    check_granularity(granularity)
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    if granularity == "per_tensor":
        return x.reshape(1, -1)
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be in {-x.ndim}..{x.ndim - 1} for a {x.ndim}-d input, got {axis}")
    return x.movedim(axis, 0).reshape(x.shape[axis], -1)


def coprime_at_least(stride: int, size: int) -> int:
    """The smallest k >= stride (and >= 1) with gcd(k, size) == 1.

    Every k-th item of a sequence with period `size` (tokens of an image, channels of a token) then
    walks through all positions of the period instead of aliasing with it.
    """
    stride = max(1, stride)
    while math.gcd(stride, size) != 1:
        stride += 1
    return stride


def coprime_stride(length: int) -> int:
    """The smallest integer >= golden_ratio_fraction * length that is coprime with length (>= 1).

    Stepping through 0..length-1 with this stride (mod length) visits every position once and spreads
    consecutive picks far apart, so a subsample does not alias with periodic structure (e.g. channels).
    """
    return coprime_at_least(int(length * _GOLDEN_RATIO_FRACTION), length)


def spread_column_subsample(rows: Tensor, max_columns: int) -> Tensor:
    """Deterministic subsample of the columns of a (C, M) matrix down to at most max_columns columns.

    Columns (k * coprime_stride(M)) mod M for k = 0..max_columns-1: distinct, spread over the whole row.
    Returns rows itself when M <= max_columns.
    """
    length = rows.shape[1]
    if length <= max_columns:
        return rows
    index = (torch.arange(max_columns, device=rows.device) * coprime_stride(length)) % length
    return rows[:, index]


def row_quantile(rows: Tensor, q: float) -> Tensor:
    """Per-row q-quantile of a (C, M) matrix with linear interpolation (the torch.quantile / numpy default).

    position = q * (M - 1); result = v[floor(position)] + frac(position) * (v[floor + 1] - v[floor]),
    where v is the sorted row. Tail quantiles (the two order statistics within TOPK_TAIL of either
    end, e.g. alpha = 0.99999) come from one torch.topk; others from torch.kthvalue. Returns (C,).
    """
    length = rows.shape[1]
    position = q * (length - 1)
    below = math.floor(position)
    fraction = position - below
    above = min(below + 1, length - 1)
    if length - below <= TOPK_TAIL:  # upper tail: order statistics counted from the top
        top = rows.topk(length - below, dim=1, largest=True, sorted=True).values  # top[:, j] = v[M-1-j]
        lower, upper = top[:, length - 1 - below], top[:, length - 1 - above]
    elif above + 1 <= TOPK_TAIL:  # lower tail
        bottom = rows.topk(above + 1, dim=1, largest=False, sorted=True).values  # bottom[:, j] = v[j]
        lower, upper = bottom[:, below], bottom[:, above]
    else:
        lower = rows.kthvalue(below + 1, dim=1).values
        upper = rows.kthvalue(above + 1, dim=1).values if fraction else lower
    return lower + fraction * (upper - lower) if fraction else lower


def power_of_two_above(values: Tensor) -> Tensor:
    """Smallest power of two strictly greater than each value (values >= 0; 1.0 for 0). Same shape, float32.

    With frexp: v = m * 2^e, m in [0.5, 1), so 2^e > v and 2^(e-1) <= v.
    """
    return torch.ldexp(torch.ones_like(values, dtype=torch.float32), torch.frexp(values.to(torch.float32)).exponent)


def huber(errors: Tensor, delta: Tensor) -> Tensor:
    """Elementwise Huber loss: 0.5 e^2 where |e| <= delta, else delta * (|e| - 0.5 delta)."""
    magnitude = errors.abs()
    return torch.where(magnitude <= delta, 0.5 * magnitude.square(), delta * (magnitude - 0.5 * delta))


class HistogramPrefixSums(NamedTuple):
    """Prefix sums of a (C, bins) histogram h, each of shape (C, bins + 1): entry j covers bins 0..j-1."""

    mass: Tensor  # sum of h
    nonzero: Tensor  # number of bins with h > 0
    mass_log_mass: Tensor  # sum of h log h (0 log 0 = 0)


def histogram_prefix_sums(hist: Tensor) -> HistogramPrefixSums:
    """Prefix sums of a (C, bins) float64 histogram, so any contiguous group's statistics cost O(1)."""
    pad = hist.new_zeros(hist.shape[0], 1)

    def prefix(values: Tensor) -> Tensor:
        return torch.cat([pad, values.cumsum(dim=1)], dim=1)

    return HistogramPrefixSums(prefix(hist), prefix((hist > 0).to(hist.dtype)), prefix(torch.xlogy(hist, hist)))


def kl_divergence_for_threshold(
    hist: Tensor, prefix: HistogramPrefixSums, threshold_bin: int, levels: int, eps: float = 1e-8
) -> Tensor:
    """KL(P || Q) of clipping a histogram at bin edge ``threshold_bin`` and quantizing to ``levels`` levels.

    TensorRT-style entropy calibration, vectorised over rows (channels). With i = threshold_bin:
      P: bins 0..i-1 of h, with the mass of the clipped bins i.. added to bin i-1; p = P / sum(P).
      Q: bins 0..i-1 of h (without the clipped mass) merged into ``levels`` groups of i // levels bins
         (the last group takes the remainder); each group's mass is spread evenly over the bins of the
         group where P > 0; q = Q / sum(Q), and q = eps where P > 0 but Q = 0 (missing mass costs a
         large but finite amount).
      KL = sum over P > 0 of p log(p / q).
    Evaluated from prefix sums in O(C * levels) instead of O(C * bins): q is constant within a group, so
      KL = sum(P log P) / S - log S - sum_g PM_g log q_g / S,
    with S = sum(P) (the total count), PM_g = P mass of group g, q_g = QM_g / (N_g * sum(Q)),
    QM_g = h mass of group g, N_g = number of bins of group g with P > 0.

    Args:
        hist: (C, bins) float64 counts; prefix: histogram_prefix_sums(hist).
    Returns:
        (C,) float64 divergences.
    """
    i = threshold_bin
    total = prefix.mass[:, -1]
    kept = prefix.mass[:, i]
    clipped = total - kept
    last = hist[:, i - 1]
    last_reference = last + clipped
    reference_log_reference = prefix.mass_log_mass[:, i - 1] + torch.xlogy(last_reference, last_reference)

    width = i // levels
    edges = torch.tensor([g * width for g in range(levels)] + [i], device=hist.device)
    group_mass = prefix.mass[:, edges[1:]] - prefix.mass[:, edges[:-1]]  # (C, levels)
    group_nonzero = prefix.nonzero[:, edges[1:]] - prefix.nonzero[:, edges[:-1]]
    group_nonzero[:, -1] += ((last == 0) & (clipped > 0)).to(hist.dtype)  # bin i-1 made non-zero by clipping
    group_reference = group_mass.clone()
    group_reference[:, -1] += clipped
    q = group_mass / (group_nonzero.clamp(min=1.0) * kept.clamp(min=1.0).unsqueeze(1))
    q = torch.where(group_mass > 0, q, eps)
    cross = torch.xlogy(group_reference, q).sum(dim=1)
    return (reference_log_reference - cross) / total - torch.log(total)


# ----------------------------------------------------------------------------------------------------------
# Observers
# ----------------------------------------------------------------------------------------------------------


class Observer(nn.Module):
    """Base observer: validates input, keeps per-row min/max buffers, squeezes outputs per granularity.

    Buffers min_val / max_val have shape (C,) (C = 1 per tensor) and start at +inf / -inf with shape (1,),
    which broadcasts to (C,) on the first batch. Subclasses implement ``_observe(rows)`` for a (C, M) batch.
    """

    def __init__(self, granularity: str = "per_tensor", axis: int = -1) -> None:
        super().__init__()
        check_granularity(granularity)
        if isinstance(axis, bool) or not isinstance(axis, int):
            raise ValueError(f"axis must be an int, got {axis!r}")
        self.granularity = granularity
        self.axis = axis
        self.batches_seen = 0
        self.register_buffer("min_val", torch.full((1,), math.inf))
        self.register_buffer("max_val", torch.full((1,), -math.inf))

    # -- recording -----------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Record statistics of x (any shape; per channel needs dimension ``axis``); return x unchanged."""
        if x.numel() == 0:
            raise ValueError(f"observed an empty tensor of shape {tuple(x.shape)}")
        if not torch.isfinite(torch.stack(torch.aminmax(x.detach()))).all():  # NaN and Inf reach min or max
            raise NonFiniteError("observed NaN or Inf values")
        with torch.no_grad():
            rows = channel_rows(x.detach(), self.granularity, self.axis)
            if self.batches_seen > 0 and rows.shape[0] != self.min_val.numel():
                raise ValueError(f"observer saw {self.min_val.numel()} channels before, now {rows.shape[0]}")
            self._observe(rows)
        self.batches_seen += 1
        return x

    def _observe(self, rows: Tensor) -> None:
        raise NotImplementedError

    def _update_running_range(self, batch_min: Tensor, batch_max: Tensor) -> None:
        """min_val = min(min_val, batch_min), max_val = max(max_val, batch_max); shapes (C,)."""
        self.min_val = torch.minimum(self.min_val.to(batch_min.device), batch_min)
        self.max_val = torch.maximum(self.max_val.to(batch_max.device), batch_max)

    # -- results -------------------------------------------------------------------------------------------

    def _squeeze(self, values: Tensor) -> Tensor:
        """(1,) -> 0-d per tensor; (C,) unchanged per channel."""
        return values.reshape(()) if self.granularity == "per_tensor" else values

    def _require_data(self) -> None:
        if self.batches_seen == 0:
            raise ValueError("observer has seen no data")

    def calculate_qparams(
        self, bits: int, signed: bool, symmetric: bool, rounding: str = "half_up"
    ) -> tuple[Tensor, Tensor]:
        """(scale float32, zero_point int32): 0-d per tensor, (C,) per channel."""
        self._require_data()
        scale, zero_point = self._qparams_per_row(bits, signed, symmetric, rounding)
        return self._squeeze(scale), self._squeeze(zero_point)

    def _qparams_per_row(self, bits: int, signed: bool, symmetric: bool, rounding: str) -> tuple[Tensor, Tensor]:
        """Default: choose_qparams on the recorded [min_val, max_val]; (C,) outputs."""
        return choose_qparams(self.min_val, self.max_val, bits, signed, symmetric, rounding)

    def stats(self) -> dict[str, Tensor]:
        """Recorded statistics: min and max (0-d per tensor, (C,) per channel) and batches_seen."""
        return {
            "min": self._squeeze(self.min_val.clone()) if self.batches_seen else self.min_val.clone(),
            "max": self._squeeze(self.max_val.clone()) if self.batches_seen else self.max_val.clone(),
            "batches_seen": torch.tensor(self.batches_seen),
        }

    def extra_repr(self) -> str:
        return f"granularity={self.granularity}, axis={self.axis}, batches_seen={self.batches_seen}"


class MinMaxObserver(Observer):
    """Running minimum and maximum over all batches."""

    def __init__(self, granularity: str = "per_tensor", axis: int = -1) -> None:
        super().__init__(granularity, axis)

    def _observe(self, rows: Tensor) -> None:
        self._update_running_range(rows.amin(dim=1), rows.amax(dim=1))


def _check_sigma_warmup(sigma: float, warmup: int) -> None:
    if not (_is_real(sigma) and 0.0 < sigma <= 1.0):
        raise ValueError(f"sigma must be in (0, 1], got {sigma!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an integer >= 1, got {warmup!r}")


class EmaObserver(Observer):
    """Exponential moving average of per-batch min/max, after a plain min/max warm-up.

    Batches 1..warmup: min_val = min(min_val, batch_min), max_val = max(max_val, batch_max).
    Later batches:     min_val = (1 - sigma) * min_val + sigma * batch_min (the same for max_val).
    warmup >= 1 because the first batch must initialise the range.
    """

    def __init__(self, granularity: str = "per_tensor", axis: int = -1, sigma: float = 0.01, warmup: int = 5) -> None:
        super().__init__(granularity, axis)
        _check_sigma_warmup(sigma, warmup)
        self.sigma = float(sigma)
        self.warmup = warmup

    def _batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """(batch_min, batch_max) of a (C, M) batch, shapes (C,)."""
        return rows.amin(dim=1), rows.amax(dim=1)

    def _observe(self, rows: Tensor) -> None:
        batch_min, batch_max = self._batch_range(rows)
        if self.batches_seen < self.warmup:
            self._update_running_range(batch_min, batch_max)
        else:
            keep = 1.0 - self.sigma
            self.min_val = keep * self.min_val.to(batch_min.device) + self.sigma * batch_min
            self.max_val = keep * self.max_val.to(batch_max.device) + self.sigma * batch_max

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sigma={self.sigma}, warmup={self.warmup}"


class PercentileObserver(EmaObserver):
    """Per-batch percentiles instead of min/max, combined across batches like EmaObserver.

    batch range = (quantile(1 - alpha), quantile(alpha)) per row, linear interpolation (see row_quantile);
    rows longer than MAX_QUANTILE_SAMPLES (2^16) are first subsampled deterministically (spread_column_subsample).
    Warm-up: min of the lower / max of the upper percentiles; afterwards the EMA with sigma.
    """

    def __init__(
        self,
        granularity: str = "per_tensor",
        axis: int = -1,
        alpha: float = 0.9999,
        sigma: float = 0.01,
        warmup: int = 5,
    ) -> None:
        super().__init__(granularity, axis, sigma, warmup)
        if not (_is_real(alpha) and 0.5 < alpha <= 1.0):
            raise ValueError(f"alpha must be in (0.5, 1], got {alpha!r}")
        self.alpha = float(alpha)

    def _batch_range(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        rows = spread_column_subsample(rows, MAX_QUANTILE_SAMPLES)
        return row_quantile(rows, 1.0 - self.alpha), row_quantile(rows, self.alpha)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, alpha={self.alpha}"


DISTINCT_DRAW_FACTOR = 16
"""`sample_columns` draws distinct columns when a batch has at most this many times as many as it needs."""


def sample_columns(total: int, count: int, generator: torch.Generator) -> Tensor:
    """`count` column indices, uniform over 0..total-1 (int64, (count,)); count <= total.

    Distinct (a random permutation's first `count`) when total <= DISTINCT_DRAW_FACTOR * count, so a
    row that fits in the sample (a weight row: observed once) is kept whole. Beyond that, independent
    draws: O(count) instead of O(total), and they repeat a column with probability below
    count / total <= 1 / DISTINCT_DRAW_FACTOR.
    """
    if total <= DISTINCT_DRAW_FACTOR * count:
        return torch.randperm(total, generator=generator)[:count]
    return torch.randint(0, total, (count,), generator=generator)


class OmseObserver(Observer):
    """Range search minimising the quantization error (OMSE-style) over a stored sample of the data.

    forward: running min/max, plus a uniform random sample of at most ``max_samples`` columns (values per
        channel) over everything seen so far: each batch offers ``max_samples`` of its columns (drawn by
        `sample_columns`: distinct unless the batch holds over 16x as many), each with a pseudo-random key
        from a generator seeded with (seed, batch number), and the sample keeps the columns with the
        smallest keys ("bottom-k" sampling). Over batches of equal size every column is equally likely to
        be kept (a short last batch is slightly over-represented), and the result is deterministic given the inputs. All channels share the same columns (token positions).
    calculate_qparams: candidate ranges [r * min_val, r * max_val], first for r in linspace(1, min_ratio,
        grid), then ``grid`` finer ratios around each channel's best (symmetric modes use
        r * max(|min|, |max|) through choose_qparams); each candidate's error fq(x) - x over the sample
        plus the running extremes is scored with ``loss`` and the best candidate is taken per channel
        (ties go to the wider range). Candidates are evaluated vectorised, in chunks within ~256 MB.
        At ``bits >= search_max_bits`` (default 12) rounding noise is negligible next to any clipping,
        so the search is skipped and the min/max range is returned.
        Losses: l1 = mean |e|, l2 = mean e^2, huber = mean Huber(e) with threshold huber_delta * s_full,
        s_full the step of the channel's unclipped min/max range: huber_delta is measured in steps, the
        same for every candidate (scale-free: errors below delta steps, such as rounding noise, count
        quadratically, larger clipping errors linearly; delta -> 0 gives l1's choice, delta -> inf l2's).
    """

    def __init__(
        self,
        granularity: str = "per_tensor",
        axis: int = -1,
        loss: str = "l1",
        huber_delta: float = 1.0,
        grid: int = 24,
        min_ratio: float = 0.01,
        max_samples: int | None = None,
        seed: int = 0,
        search_max_bits: int = 12,
    ) -> None:
        super().__init__(granularity, axis)
        self.search_max_bits = int(search_max_bits)
        if loss not in OMSE_LOSSES:
            raise ValueError(f"unknown omse loss {loss!r}; choose one of {', '.join(OMSE_LOSSES)}")
        if not (_is_real(huber_delta) and huber_delta > 0):
            raise ValueError(f"huber_delta must be > 0, got {huber_delta!r}")
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be an integer >= 1, got {grid!r}")
        if not (_is_real(min_ratio) and 0.0 < min_ratio <= 1.0):
            raise ValueError(f"min_ratio must be in (0, 1], got {min_ratio!r}")
        if max_samples is None:  # a channel needs fewer samples than a whole tensor
            max_samples = 8192 if granularity == "per_tensor" else 512
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
            raise ValueError(f"max_samples must be an integer >= 1, got {max_samples!r}")
        self.loss = loss
        self.huber_delta = float(huber_delta)
        self.grid = grid
        self.min_ratio = float(min_ratio)
        self.max_samples = max_samples
        self.seed = int(seed)
        self.register_buffer("samples", torch.empty(1, 0))
        self.register_buffer("sample_keys", torch.empty(0))

    def _observe(self, rows: Tensor) -> None:
        self._update_running_range(rows.amin(dim=1), rows.amax(dim=1))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batches_seen)
        # Offer max_samples columns drawn uniformly from this batch, each with a random key. Over
        # equal-sized batches, keeping the smallest keys is a uniform sample of all columns.
        offered = min(self.max_samples, rows.shape[1])
        columns = sample_columns(rows.shape[1], offered, generator)
        keys = torch.rand(offered, generator=generator, dtype=torch.float64)
        new_samples = rows[:, columns.to(rows.device)].to(torch.float32)
        if self.batches_seen == 0:
            all_samples, all_keys = new_samples, keys
        else:
            all_samples = torch.cat([self.samples.to(rows.device), new_samples], dim=1)
            all_keys = torch.cat([self.sample_keys.cpu(), keys])
        if all_keys.numel() > self.max_samples:
            all_keys, keep = torch.topk(all_keys, self.max_samples, largest=False)
            all_samples = all_samples[:, keep.to(rows.device)]
        self.samples, self.sample_keys = all_samples, all_keys

    def candidate_errors(self, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int, rounding: str, delta: Tensor) -> Tensor:
        """Mean loss of fake-quantizing the stored samples with each candidate: (G, C) from (G, C) qparams.

        `delta` (C,): the huber loss's threshold in value units, the same for every candidate of a channel
        (a candidate's own step would discount a narrower range's clipping errors by that step).
        """
        # The running extremes join the sample, so the search always sees what a clipped range would cut.
        samples = torch.cat([self.samples, self.min_val.unsqueeze(1), self.max_val.unsqueeze(1)], dim=1).unsqueeze(0)  # (1, C, S+2)
        per_candidate_bytes = 4 * 4 * samples[0].numel()  # ~4 float32 temporaries of shape (C, S)
        chunk = max(1, OMSE_CHUNK_BYTES // max(1, per_candidate_bytes))
        errors = []
        for start in range(0, scale.shape[0], chunk):
            chunk_scale = scale[start : start + chunk].unsqueeze(-1)  # (g, C, 1)
            chunk_zero_point = zero_point[start : start + chunk].unsqueeze(-1)
            error = fake_quantize_broadcast(samples, chunk_scale, chunk_zero_point, qmin, qmax, rounding).sub_(samples)  # a fresh tensor: no second (g, C, S) temporary
            if self.loss == "l1":
                per_value = error.abs_()
            elif self.loss == "l2":
                per_value = error.square_()
            else:
                per_value = huber(error, delta.view(1, -1, 1))
            errors.append(per_value.mean(dim=-1))
        return torch.cat(errors)

    def _qparams_per_row(self, bits: int, signed: bool, symmetric: bool, rounding: str) -> tuple[Tensor, Tensor]:
        """Coarse-to-fine search: `grid` ratios over [min_ratio, 1], then `grid` finer ratios around
        each channel's best coarse ratio (one coarse step either side)."""
        if bits >= self.search_max_bits:
            return super()._qparams_per_row(bits, signed, symmetric, rounding)
        qmin, qmax = qrange(bits, signed)
        device = self.min_val.device
        full_range_step = choose_qparams(self.min_val, self.max_val, bits, signed, symmetric, rounding)[0]
        delta = self.huber_delta * full_range_step  # (C,): huber_delta steps of the unclipped range
        coarse = torch.linspace(1.0, self.min_ratio, self.grid, device=device).unsqueeze(1).expand(-1, self.min_val.numel())
        best = self._best_ratio(coarse, bits, signed, symmetric, rounding, qmin, qmax, delta)  # (C,)
        step = (1.0 - self.min_ratio) / max(1, self.grid - 1)
        offsets = torch.linspace(step, -step, self.grid, device=device).unsqueeze(1)  # (G, 1), wider first
        fine = (best.unsqueeze(0) + offsets).clamp(self.min_ratio, 1.0)  # (G, C)
        ratio = self._best_ratio(fine, bits, signed, symmetric, rounding, qmin, qmax, delta)
        return choose_qparams(ratio * self.min_val, ratio * self.max_val, bits, signed, symmetric, rounding)

    def _best_ratio(self, ratios: Tensor, bits: int, signed: bool, symmetric: bool, rounding: str, qmin: int, qmax: int, delta: Tensor) -> Tensor:
        """ratios (G, C) -> per-channel ratio (C,) with the least loss (ties: the first, i.e. the wider)."""
        candidate_min = ratios * self.min_val  # (G, C)
        candidate_max = ratios * self.max_val
        scale, zero_point = choose_qparams(candidate_min.flatten(), candidate_max.flatten(), bits, signed, symmetric, rounding)
        scale, zero_point = scale.view_as(candidate_min), zero_point.view_as(candidate_min)
        best = self.candidate_errors(scale, zero_point, qmin, qmax, rounding, delta).argmin(dim=0, keepdim=True)  # (1, C)
        return ratios.gather(0, best).squeeze(0)

    def stats(self) -> dict[str, Tensor]:
        """min, max and batches_seen (the sample stays in memory: it is large and only serves the search)."""
        return super().stats()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, loss={self.loss}, grid={self.grid}, max_samples={self.max_samples}"


class KlObserver(Observer):
    """Histogram of |x| per channel and TensorRT-style entropy (KL divergence) calibration.

    Histogram: ``bins`` equal bins of |x| over [0, hist_max) per channel, where hist_max is the smallest
    power of two strictly above every |x| seen (so with `bins` a power of two, as by default, bin widths are
    powers of two and bin indices are exact).
    When a batch exceeds hist_max, it doubles k times and every 2^k neighbouring bins merge into one; this
    re-binning is exact (old bin edges are edges of the new bins), and costs at most a factor 2 of resolution
    compared with a histogram over the final range. All channels are filled at once: per-channel bin
    indices are offset by channel * bins and counted with one bincount over the flattened (C * bins) buffer.

    Threshold search (calculate_qparams): for every candidate bin edge i (from ``levels`` to ``bins`` in
    steps of ``threshold_stride``, plus ``bins`` itself; stride 1 is TensorRT's exhaustive search),
    kl_divergence_for_threshold of clipping |x| at T = i * hist_max / bins; the T with the least divergence
    wins, per channel, the smallest one on ties. The candidate loop runs over thresholds only; channels are
    vectorised (cost O(candidates * C * levels)).

    Ranges: channels whose observed min is >= 0 (non-negative data, e.g. softmax outputs)
    are clipped to [0, T] and, unless signed symmetric, use all 2^bits levels over it; other channels are
    clipped to [-T, T] (symmetric) or [max(min, -T), min(max, T)] (asymmetric) and use 2^(bits-1) levels
    per sign. If the level count reaches the number of bins (e.g. 16 bits with 2048 bins) the histogram
    cannot resolve any clipping, and the full range [min, max] is used.
    """

    def __init__(
        self, granularity: str = "per_tensor", axis: int = -1, bins: int = 2048, threshold_stride: int = 8
    ) -> None:
        super().__init__(granularity, axis)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 16:
            raise ValueError(f"bins must be an integer >= 16, got {bins!r}")
        if isinstance(threshold_stride, bool) or not isinstance(threshold_stride, int) or threshold_stride < 1:
            raise ValueError(f"threshold_stride must be an integer >= 1, got {threshold_stride!r}")
        self.bins = bins
        self.threshold_stride = threshold_stride
        self.register_buffer("histogram", torch.zeros(1, bins, dtype=torch.int64))
        self.register_buffer("hist_max", torch.zeros(1))

    def _observe(self, rows: Tensor) -> None:
        self._update_running_range(rows.amin(dim=1), rows.amax(dim=1))
        magnitudes = rows.abs()
        batch_absmax = magnitudes.amax(dim=1)
        if self.batches_seen == 0:
            self.hist_max = power_of_two_above(batch_absmax.clamp(min=MIN_HIST_MAX))
            self.histogram = torch.zeros(rows.shape[0], self.bins, dtype=torch.int64, device=rows.device)
        else:
            self._widen_histogram(batch_absmax)
        channels = rows.shape[0]
        bin_index = (magnitudes * (self.bins / self.hist_max).unsqueeze(1)).long()  # < bins since |x| < hist_max
        bin_index += (torch.arange(channels, device=rows.device) * self.bins).unsqueeze(1)
        counts = bincount(bin_index, channels * self.bins)
        self.histogram = self.histogram + counts.view(channels, self.bins)

    def _widen_histogram(self, batch_absmax: Tensor) -> None:
        """Double hist_max per channel k times until it exceeds batch_absmax, merging 2^k old bins into one."""
        hist_max = self.hist_max.to(batch_absmax.device)
        new_hist_max = torch.maximum(hist_max, power_of_two_above(batch_absmax.clamp(min=MIN_HIST_MAX)))
        doublings = torch.log2(new_hist_max / hist_max).long()  # exact: a ratio of powers of two
        self.hist_max = new_hist_max
        shift = doublings.clamp_(max=62).unsqueeze(1)  # a shift >= log2(bins) already merges all into bin 0
        channels = self.histogram.shape[0]
        device = self.histogram.device
        old_bins = torch.arange(self.bins, device=device).unsqueeze(0)
        new_index = (old_bins >> shift.to(device)) + (torch.arange(channels, device=device) * self.bins).unsqueeze(1)
        merged = torch.zeros(channels * self.bins, dtype=torch.int64, device=device)
        merged.scatter_add_(0, new_index.flatten(), self.histogram.flatten())
        self.histogram = merged.view(channels, self.bins)

    def best_threshold_bins(self, levels: int, channel_mask: Tensor | None = None) -> Tensor:
        """(C,) candidate bin edge i (1..bins) with the least KL divergence for quantization to ``levels`` levels.

        channel_mask: optional (C,) bool mask of the channels to search (default all); the output covers those.
        """
        hist = self.histogram.to(torch.float64)
        if channel_mask is not None:
            hist = hist[channel_mask]
        prefix = histogram_prefix_sums(hist)
        candidates = list(range(levels, self.bins, self.threshold_stride)) + [self.bins]
        divergences = torch.stack([kl_divergence_for_threshold(hist, prefix, i, levels) for i in candidates])  # (K, C)
        # Often a whole plateau of thresholds ties (e.g. every threshold between the bulk of the data and an
        # outlier); take the smallest threshold within float noise of the minimum: the finest resolution.
        least = divergences.min(dim=0).values
        near_least = divergences <= least + KL_TIE_TOLERANCE * least.abs().clamp(min=1.0)
        first_near_least = near_least.to(torch.int8).argmax(dim=0)  # argmax returns the first maximum
        return torch.tensor(candidates, device=hist.device)[first_near_least]

    def thresholds(self, bits: int, signed: bool, symmetric: bool) -> Tensor:
        """(C,) clipping threshold T on |x| for the given quantization, in the units of x."""
        nonnegative = self.min_val >= 0
        levels_nonnegative = 2 ** bits if not (signed and symmetric) else 2 ** (bits - 1)
        levels_two_sided = 2 ** (bits - 1)
        threshold_bin = torch.full_like(self.hist_max, self.bins, dtype=torch.int64)
        for mask, levels in ((nonnegative, levels_nonnegative), (~nonnegative, levels_two_sided)):
            if mask.any() and levels < self.bins:
                threshold_bin[mask] = self.best_threshold_bins(levels, mask).to(threshold_bin.device)
        absmax = torch.maximum(self.min_val.abs(), self.max_val.abs())
        return torch.minimum(threshold_bin * (self.hist_max / self.bins), absmax)

    def _qparams_per_row(self, bits: int, signed: bool, symmetric: bool, rounding: str) -> tuple[Tensor, Tensor]:
        qrange(bits, signed)  # validates bits before the search
        threshold = self.thresholds(bits, signed, symmetric)
        low = -threshold if symmetric else torch.maximum(self.min_val, -threshold)
        low = torch.where(self.min_val >= 0, 0.0, low)
        high = torch.minimum(self.max_val, threshold)
        return choose_qparams(low, high, bits, signed, symmetric, rounding)

    def stats(self) -> dict[str, Tensor]:
        """min, max, batches_seen, the (C, bins) histogram of |x| and its per-channel range hist_max."""
        return {**super().stats(), "histogram": self.histogram.clone(), "hist_max": self.hist_max.clone()}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bins={self.bins}, threshold_stride={self.threshold_stride}"


OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "ema": EmaObserver,
    "percentile": PercentileObserver,
    "omse": OmseObserver,
    "kl": KlObserver,
    "histogram": KlObserver,
}


def build_observer(name: str, **kwargs: object) -> Observer:
    """Instantiate OBSERVERS[name](**kwargs); ValueError for an unknown name or an argument it does not take."""
    if name not in OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose one of {', '.join(OBSERVERS)}")
    cls = OBSERVERS[name]
    accepted = list(inspect.signature(cls).parameters)
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {', '.join(unknown)} for observer {name!r}; accepted: {', '.join(accepted)}"
        )
    return cls(**kwargs)
