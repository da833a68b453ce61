"""Error and utilisation metrics for one quantization site.

A *site* is one tensor in the network (a weight, an activation, attention
scores, logits, ...).  For every site we have

* ``ref``   -- the FP32 tensor produced by the unquantized model,
* ``test``  -- the quantized-then-dequantized tensor, same shape as ``ref``,
* ``codes`` -- optionally, the integer codes the NPU would actually store.

Every function here is a pure, vectorised function of tensors: it works on
CPU and CUDA tensors alike, reduces with torch on the tensors' device and
returns plain Python numbers.  Error metrics are computed in float64 so that
tiny errors (high SQNR) are not swamped by float32 rounding.

Units are stated in each docstring: dB, nats, percent (0..100) or
fraction/share (0..1).

Summary
-------
=========================  ===============================================
``sqnr_db``                signal-to-quantization-noise ratio, dB
``sqnr_from_energy``       the same from accumulated energies (streaming)
``mse``                    mean squared error
``token_cosine``           per-token cosine similarity, (mean, min)
``cosine_from_dots``       per-token cosines from dots and norms (streaming)
``histogram_kl``           KL divergence of the value histograms, nats
``kl_from_counts``         the same from two accumulated histograms
``saturation_rate``        % of codes sitting on qmin / qmax
``saturation_from_values`` % of pre-clamp values outside [qmin, qmax]
``bit_utilization``        integer levels used / effective bits
``topk_hit_rate``          top-k agreement of rows (e.g. logits), 0..1, ties split fairly
``topk_hit_rates``         the same for several k from one top-k
``argmax_agreement``       argmax agreement of rows as deployed (first max wins), 0..1
``logit_kl``               mean KL(softmax(ref) || softmax(test)), nats
``compute_site_metrics``   all of the above that apply -> ``SiteMetrics``
=========================  ===============================================
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = [
    "SiteMetrics",
    "argmax_agreement",
    "bit_utilization",
    "compute_site_metrics",
    "cosine_from_dots",
    "histogram_kl",
    "kl_from_counts",
    "logit_kl",
    "mse",
    "saturation_from_values",
    "saturation_rate",
    "sqnr_db",
    "sqnr_from_energy",
    "token_cosine",
    "topk_hit_rate",
    "topk_hit_rates",
]


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def _check_pair(ref: Tensor, test: Tensor) -> None:
    """Raise ``ValueError`` unless ``ref`` and ``test`` have the same, non-empty shape."""
    if ref.shape != test.shape:
        raise ValueError(
            f"ref and test must have the same shape, got ref {tuple(ref.shape)} "
            f"and test {tuple(test.shape)}"
        )
    if ref.numel() == 0:
        raise ValueError(f"ref and test are empty (shape {tuple(ref.shape)})")


def _rows(x: Tensor, dim: int) -> Tensor:
    """Move ``dim`` last and flatten all other dims: shape (..., C, ...) -> (R, C).

    A 0-d tensor is rejected because it has no vector dimension.
    """
    if x.dim() == 0:
        raise ValueError("expected a tensor with at least one dimension, got a scalar")
    return x.movedim(dim, -1).reshape(-1, x.shape[dim])


def _f64(x: Tensor) -> Tensor:
    """Return ``x`` as float64 on its own device."""
    return x.to(torch.float64)


# --------------------------------------------------------------------------
# Whole-tensor error metrics
# --------------------------------------------------------------------------


def sqnr_db(ref: Tensor, test: Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB.

    ``SQNR = 10 * log10( sum(ref^2) / sum((ref - test)^2) )``

    Shapes: ``ref`` and ``test`` any identical shape.  Computed in float64.
    Returns ``+inf`` when the error is exactly zero (``test == ref``) and
    ``-inf`` when ``ref`` is all zeros but ``test`` is not.
    Rule of thumb: each extra bit of a uniform quantizer adds about 6 dB.
    """
    _check_pair(ref, test)
    r, t = _f64(ref), _f64(test)
    return sqnr_from_energy(r.square().sum().item(), (r - t).square().sum().item())


def sqnr_from_energy(signal: float, noise: float) -> float:
    """SQNR in dB from accumulated energies: ``10 * log10(signal / noise)``.

    ``signal = sum(ref^2)`` and ``noise = sum((ref - test)^2)`` (e.g. summed
    over batches by a streaming profiler).  ``+inf`` when ``noise == 0``,
    ``-inf`` when ``signal == 0`` and ``noise > 0``.
    """
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def mse(ref: Tensor, test: Tensor) -> float:
    """Mean squared error ``mean((ref - test)^2)`` over all elements, in float64.

    Shapes: any identical shape.  Units: the square of the tensor's units.
    """
    _check_pair(ref, test)
    return (_f64(ref) - _f64(test)).square().mean().item()


def token_cosine(ref: Tensor, test: Tensor, dim: int = -1) -> tuple[float, float]:
    """Cosine similarity of per-token vectors, returned as ``(mean, min)``.

    The vectors run along ``dim``; all other dims are flattened into tokens,
    e.g. an activation of shape (B, N, C) with ``dim=-1`` gives B*N cosines

        ``cos_i = <ref_i, test_i> / (||ref_i|| * ||test_i||)``  in [-1, 1].

    Conventions for zero vectors: zero in both -> 1.0 (perfect match);
    zero in exactly one -> 0.0.  Computed in float64; unitless.
    """
    _check_pair(ref, test)
    r, t = _rows(_f64(ref), dim), _rows(_f64(test), dim)  # (R, C)
    cos = cosine_from_dots((r * t).sum(dim=1), r.norm(dim=1), t.norm(dim=1))
    return cos.mean().item(), cos.min().item()


def cosine_from_dots(dot: Tensor, norm_ref: Tensor, norm_test: Tensor) -> Tensor:
    """Per-token cosines ``dot / (norm_ref * norm_test)`` clamped to [-1, 1], shape of ``dot``.

    ``dot = <ref_i, test_i>``, ``norm_* = ||.||_2`` per token (same shapes).
    Zero-vector conventions as in :func:`token_cosine`: both zero -> 1.0,
    exactly one zero -> 0.0.  Unitless.
    """
    denom = norm_ref * norm_test
    # Where a norm is zero: 1.0 if both are (then they are equal), else 0.0; the quotient's 0/0 or
    # x/0 there is discarded by the where. A NaN norm gives a NaN cosine, as it should.
    zero_case = (norm_ref == norm_test).to(dot.dtype)
    return torch.where(denom == 0, zero_case, (dot / denom).clamp(-1.0, 1.0))


def histogram_kl(ref: Tensor, test: Tensor, bins: int = 256, eps: float = 1e-10) -> float:
    """KL divergence ``KL(P_ref || P_test)`` of the two value histograms, in nats.

    Both tensors are histogrammed with ``bins`` equal-width bins on the common
    range ``[lo, hi] = [min(ref.min, test.min), max(ref.max, test.max)]``
    (the value ``hi`` falls in the last bin).  With bin counts ``c_i`` and
    ``n`` elements, the smoothed probabilities are

        ``p_i = (c_i / n + eps) / (1 + bins * eps)``

    i.e. ``eps`` of probability is added to every bin and the result is
    renormalised; this keeps ``log(p / q)`` finite when a bin is empty in
    ``test`` (an empty bin in ``test`` that holds mass ``m`` in ``ref``
    contributes roughly ``m * log(m / eps)``).  Then

        ``KL = sum_i p_i * log(p_i / q_i)``  >= 0, and exactly 0 when the
        histograms are identical.

    If all values of both tensors are equal (``lo == hi``) the histograms are
    identical and 0.0 is returned.  Raises ``ValueError`` on non-finite values.
    """
    _check_pair(ref, test)
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    r, t = _f64(ref).flatten(), _f64(test).flatten()
    lo = torch.minimum(r.min(), t.min()).item()
    hi = torch.maximum(r.max(), t.max()).item()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"histogram_kl needs finite values, got range [{lo}, {hi}]")
    if lo == hi:
        return 0.0
    width = (hi - lo) / bins

    def _counts(x: Tensor) -> Tensor:
        idx = ((x - lo) / width).floor().clamp(0, bins - 1).long()  # (n,)
        return torch.bincount(idx, minlength=bins)  # (bins,)

    return kl_from_counts(_counts(r), _counts(t), eps)


def kl_from_counts(ref_counts: Tensor, test_counts: Tensor, eps: float = 1e-10) -> float:
    """``KL(P_ref || P_test)`` in nats from two histograms on the same bins.

    ``ref_counts``, ``test_counts``: (bins,) counts (any numeric dtype, e.g.
    accumulated over batches).  Each is normalised by its own total and
    smoothed as in :func:`histogram_kl`:
    ``p_i = (c_i / n + eps) / (1 + bins * eps)``.  Returns 0.0 when both
    histograms are empty.
    """
    if ref_counts.shape != test_counts.shape or ref_counts.dim() != 1:
        raise ValueError(f"need two 1-d histograms of the same length, got {tuple(ref_counts.shape)} and {tuple(test_counts.shape)}")
    bins = ref_counts.numel()

    def _probs(counts: Tensor) -> Tensor:
        c = _f64(counts)
        total = c.sum().clamp_min(1.0)
        return (c / total + eps) / (1.0 + bins * eps)

    p, q = _probs(ref_counts), _probs(test_counts)
    return (p * (p.log() - q.log())).sum().clamp_min(0.0).item()


# --------------------------------------------------------------------------
# Integer-code metrics
# --------------------------------------------------------------------------


def _check_range(qmin: int, qmax: int) -> None:
    if qmin >= qmax:
        raise ValueError(f"need qmin < qmax, got qmin={qmin}, qmax={qmax}")


def saturation_rate(codes: Tensor, qmin: int, qmax: int) -> tuple[float, float]:
    """Share of integer codes sitting on the range ends, as ``(low %, high %)``.

    ``low = 100 * count(codes == qmin) / numel``,
    ``high = 100 * count(codes == qmax) / numel``, each in 0..100.

    Works on the *clamped* codes, so it cannot tell a value that was clipped
    from one that rounded exactly onto the boundary: it is an upper bound on
    the clipping rate.  Use :func:`saturation_from_values` for the exact
    clipping rate when the pre-clamp values are available.
    Shape: ``codes`` any shape (integer or integer-valued float).
    """
    _check_range(qmin, qmax)
    if codes.numel() == 0:
        raise ValueError("codes is empty")
    low = (codes == qmin).double().mean().item() * 100.0
    high = (codes == qmax).double().mean().item() * 100.0
    return low, high


def saturation_from_values(
    x_scaled_unclamped: Tensor, qmin: int, qmax: int
) -> tuple[float, float]:
    """Share of pre-clamp values that the clamp actually clips, as ``(low %, high %)``.

    ``low = 100 * count(x < qmin) / numel``,
    ``high = 100 * count(x > qmax) / numel``, each in 0..100 (strict
    inequalities: a value exactly on ``qmin``/``qmax`` is *not* counted).

    ``x_scaled_unclamped`` is the tensor just before ``clamp(qmin, qmax)``,
    i.e. ``round(x / scale) + zero_point``.  If the un-rounded
    ``x / scale + zero_point`` is passed instead, values in
    ``[qmin - 0.5, qmin)`` (and ``(qmax, qmax + 0.5]``) are counted as clipped
    although rounding alone would have put them on the boundary.
    Shape: any.
    """
    _check_range(qmin, qmax)
    if x_scaled_unclamped.numel() == 0:
        raise ValueError("x_scaled_unclamped is empty")
    low = (x_scaled_unclamped < qmin).double().mean().item() * 100.0
    high = (x_scaled_unclamped > qmax).double().mean().item() * 100.0
    return low, high


def bit_utilization(codes: Tensor, bits: int) -> tuple[int, float, float]:
    """How much of the ``bits``-bit integer grid the codes actually use.

    Returns ``(levels, effective_bits, fraction)`` with

    * ``levels``         -- number of distinct code values present,
    * ``effective_bits`` -- ``log2(levels)`` in bits (0.0 when ``levels <= 1``),
    * ``fraction``       -- ``levels / 2**bits`` in 0..1.

    Example: 8-bit codes using 16 distinct values -> ``(16, 4.0, 0.0625)``.
    Shape: ``codes`` any shape (integer or integer-valued float).
    """
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    levels = int(torch.unique(codes).numel())
    effective = math.log2(levels) if levels > 1 else 0.0
    return levels, effective, levels / float(2**bits)


# --------------------------------------------------------------------------
# Row-wise ranking / distribution metrics (logits, attention rows, ...)
# --------------------------------------------------------------------------


def topk_hit_rate(ref_rows: Tensor, test_rows: Tensor, k: int = 1, dim: int = -1) -> float:
    """Top-k agreement of rows, as a share in 0..1.

    Rows run along ``dim``; all other dims are flattened (e.g. logits (B, K)
    -> B rows, attention (B, H, N, N) -> B*H*N rows).  For each row let
    ``R`` be the index set of the ``k`` largest ``ref`` values and ``T`` the
    same for ``test``.  The row's hit is

        ``hit = |R ∩ T| / k``

    and the result is the mean over rows.  For ``k = 1`` this is 1 when the
    argmaxes agree and 0 otherwise; for ``k > 1`` it is the fraction of the
    ref top-k indices that are also in the test top-k (order inside the top-k
    is ignored; this is *not* all-or-nothing set equality).

    Ties are read, not broken by index order.  In ``test`` (common in quantized
    rows: a log2 softmax puts several probabilities on one level) they are split
    fairly: when the k-th largest test value is shared by ``m`` entries and ``s``
    of the k places are left for them, each of those entries is in ``T`` with
    weight ``s / m``, its chance under a random tie-break.  In ``ref`` every entry
    tied with the k-th largest counts as a top-k entry (the FP32 row has no
    preference among them).  So a row compared with itself scores 1; a row whose
    FP32 argmax ties with one other entry for the quantized maximum scores 0.5 at
    k = 1; a flat quantized row scores k / row length, the chance level.
    """
    return topk_hit_rates(ref_rows, test_rows, (k,), dim)[0]


def topk_hit_rates(ref_rows: Tensor, test_rows: Tensor, ks: tuple[int, ...] = (1, 5), dim: int = -1) -> list[float]:
    """:func:`topk_hit_rate` for several ``k`` at once (shares in 0..1, in the order of ``ks``).

    One ``torch.topk`` per tensor with the largest ``k``; each ``k`` reads its
    cut-offs (the k-th largest ref and test values) from those sorted values.
    """
    _check_pair(ref_rows, test_rows)
    r, t = _rows(ref_rows, dim), _rows(test_rows, dim)  # (R, C)
    for k in ks:
        if not 1 <= k <= r.shape[1]:
            raise ValueError(f"k must be in [1, {r.shape[1]}] (row length), got {k}")
    top = max(ks)
    top_r, top_t = r.topk(top, dim=1).values, t.topk(top, dim=1).values  # (R, top), largest first
    rates = []
    for k in ks:
        in_ref = r >= top_r[:, k - 1 : k]  # (R, C): at least the k-th largest ref value
        cut = top_t[:, k - 1 : k]  # (R, 1): the k-th largest test value
        above = (t > cut).sum(dim=1, keepdim=True)  # (R, 1): surely in T
        tied = (t == cut).sum(dim=1, keepdim=True)  # (R, 1): share the k - above places left
        in_test = torch.where(t > cut, 1.0, torch.where(t == cut, (k - above).double() / tied, 0.0))  # (R, C): chance of being in T
        rates.append((in_test * in_ref).sum(dim=1).div(k).clamp_(max=1.0).mean())
    return torch.stack(rates).tolist()


def argmax_agreement(ref_logits: Tensor, test_logits: Tensor, dim: int = -1) -> float:
    """Share (0..1) of rows whose argmax along ``dim`` agrees, as deployed: on a tie the first maximal
    index wins (``torch.argmax``), as the NPU's argmax reads the classes in order."""
    _check_pair(ref_logits, test_logits)
    return (ref_logits.argmax(dim=dim) == test_logits.argmax(dim=dim)).double().mean().item()


def logit_kl(ref_logits: Tensor, test_logits: Tensor, dim: int = -1) -> float:
    """Mean over rows of ``KL(softmax(ref) || softmax(test))``, in nats.

    Rows run along ``dim`` (all other dims flattened).  Per row, with
    ``log p = log_softmax(ref)`` and ``log q = log_softmax(test)`` in float64,

        ``KL = sum_j p_j * (log p_j - log q_j)``  >= 0.

    Classes with ``p_j = 0`` (e.g. a ``-inf`` ref logit) contribute 0.
    """
    _check_pair(ref_logits, test_logits)
    log_p = torch.log_softmax(_rows(_f64(ref_logits), dim), dim=1)  # (R, C)
    log_q = torch.log_softmax(_rows(_f64(test_logits), dim), dim=1)  # (R, C)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=1).clamp_min(0.0).mean().item()


# --------------------------------------------------------------------------
# Per-site bundle
# --------------------------------------------------------------------------


@dataclass
class SiteMetrics:
    """All metrics of one quantization site; a field is ``None`` when not computable.

    Units: ``sqnr_db`` dB; ``mse`` squared tensor units; cosines unitless;
    ``hist_kl`` and ``logit_kl`` nats; ``sat_*_pct`` percent (0..100);
    ``effective_bits`` bits; ``level_fraction``, ``top1_agreement`` and
    ``top5_hit_rate`` shares (0..1).
    """

    sqnr_db: float
    mse: float
    cos_mean: float
    cos_min: float
    hist_kl: float
    sat_low_pct: float | None = None
    sat_high_pct: float | None = None
    levels_used: int | None = None
    effective_bits: float | None = None
    level_fraction: float | None = None
    top1_agreement: float | None = None
    top5_hit_rate: float | None = None
    logit_kl: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        """Return the fields as a flat ``{name: value}`` dict (e.g. for logging)."""
        return asdict(self)


def compute_site_metrics(
    ref: Tensor,
    test: Tensor,
    codes: Tensor | None = None,
    bits: int | None = None,
    qmin: int | None = None,
    qmax: int | None = None,
    token_dim: int = -1,
    topk_rows: bool = False,
) -> SiteMetrics:
    """Compute every metric that the given inputs allow for one site.

    Always: SQNR, MSE, token cosine along ``token_dim``, histogram KL.
    With ``codes``, ``qmin`` and ``qmax``: saturation rates (on codes).
    With ``codes`` and ``bits``: bit utilisation.
    With ``topk_rows=True`` (``ref``/``test`` are logits or score rows along
    ``token_dim``): top-1 agreement and logit KL, plus the top-5 hit rate
    when rows have more than 5 entries (with 5 or fewer it would be
    trivially 1.0, so it is left ``None``).
    """
    _check_pair(ref, test)
    cos_mean, cos_min = token_cosine(ref, test, dim=token_dim)
    out = SiteMetrics(
        sqnr_db=sqnr_db(ref, test),
        mse=mse(ref, test),
        cos_mean=cos_mean,
        cos_min=cos_min,
        hist_kl=histogram_kl(ref, test),
    )
    if codes is not None and qmin is not None and qmax is not None:
        out.sat_low_pct, out.sat_high_pct = saturation_rate(codes, qmin, qmax)
    if codes is not None and bits is not None:
        out.levels_used, out.effective_bits, out.level_fraction = bit_utilization(codes, bits)
    if topk_rows:
        out.top1_agreement = topk_hit_rate(ref, test, k=1, dim=token_dim)
        out.logit_kl = logit_kl(ref, test, dim=token_dim)
        if ref.shape[token_dim] > 5:
            out.top5_hit_rate = topk_hit_rate(ref, test, k=5, dim=token_dim)
    return out
