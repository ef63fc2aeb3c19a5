"""Streaming statistics of activations, one sample at a time.

Every accumulator takes activations ``x: [..., K]`` (the input of a MatMul whose
weight is ``[K, N]``), flattens them to rows ``[T, K]`` (``T`` = product of the
leading dims, row-major) and updates its statistic, so the result does not depend
on how the rows are split into calls (up to float rounding).

Padding: ``update(x, mask=...)`` drops the rows where ``mask == 0``. ``mask`` is any
array with ``T`` elements in the same row-major order as ``x.shape[:-1]``; for
``x: [batch, seq, K]`` that is the model's ``attention_mask: [batch, seq]`` (also
when the graph has reshaped ``x`` to ``[batch*seq, K]``).

Sums are kept in float64; :class:`RowSampler` stores rows in float32.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

from onnxq.errors import OnnxqError

__all__ = [
    "Accumulator",
    "AbsMaxAccumulator",
    "AbsMeanAccumulator",
    "CrossAccumulator",
    "HessianAccumulator",
    "MeanSquareAccumulator",
    "RowSampler",
    "cap_outlier_tokens",
    "outlier_token_weights",
    "rows_of",
]


class Accumulator(Protocol):
    """What the calibration loop calls for each sample.

    ``update(x, mask, sample=i)``: ``sample`` is the calibration sample's index in the whole run
    (only :class:`RowSampler` reads it). ``merge(other)`` adds what another accumulator of the same
    kind saw (a shard of the samples, e.g. on another Ray worker): the result equals one
    accumulator that saw both, up to float summation order.
    """

    count: int

    def update(self, x: np.ndarray, mask: np.ndarray | None = None, sample: int | None = None) -> None: ...

    def merge(self, other: "Accumulator") -> None: ...


def rows_of(x: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``x: [..., K]`` as rows ``[T, K]`` (a view when possible), without the masked-out rows.

    Raises:
        OnnxqError: ``x`` has rank 0, ``mask`` has the wrong number of elements, or
            ``x`` holds NaN/Inf.
    """
    x = np.asarray(x)
    if x.ndim == 0:
        raise OnnxqError("activations must have a channel axis, found a scalar")
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None:
        mask = np.asarray(mask).reshape(-1)
        if mask.size != rows.shape[0]:
            raise OnnxqError(
                f"mask has {mask.size} elements but the activations {x.shape} have {rows.shape[0]} rows"
            )
        rows = rows[mask != 0]
    if not np.isfinite(rows).all():
        raise OnnxqError(f"activations {x.shape} contain NaN or Inf")
    return rows


def outlier_token_weights(rows: np.ndarray, ratio: float) -> np.ndarray | None:
    """Per-row factors ``[T]`` float64 that scale every row of ``rows: [T, K]`` whose squared norm
    exceeds ``ratio`` times the median squared norm down to exactly that cap (1 for the others), or
    None when no row is capped (or ``ratio <= 0``). :func:`cap_outlier_tokens` applies them."""
    if ratio <= 0 or rows.shape[0] == 0:
        return None
    norms = np.einsum("tk,tk->t", rows, rows, dtype=np.float64)
    cap = ratio * float(np.median(norms))
    over = norms > cap
    if cap <= 0 or not over.any():
        return None
    weights = np.ones(rows.shape[0])
    weights[over] = np.sqrt(cap / norms[over])
    return weights


def cap_outlier_tokens(rows: np.ndarray, ratio: float) -> np.ndarray:
    """Rows ``[T, K]`` with every row whose squared norm exceeds ``ratio`` times the median
    squared norm of ``rows`` scaled down to exactly that cap (the others unchanged; a new array
    only when a row is capped).

    Why: LLMs put "massive activations" (Sun et al., arXiv 2402.17762) on a few tokens, above
    all the first token of a sequence (the attention sink) and some delimiters, in the inputs of
    a few ``down_proj`` layers: on SmolLM2-135M the first tokens of 8 windows carry 99.9% of
    ``sum_t ||x_t||^2`` of layer 11's ``down_proj`` input (a norm up to ~560x the median). GPTQ's
    Hessian ``X^T X`` then describes those tokens; the output there is itself massive and is
    normalised away by the next RMSNorm, so fitting it spends the solver's freedom where the
    model does not look. Capping a row keeps its direction (a weight
    ``min(1, sqrt(cap / ||x_t||^2))`` per token), so ordinary tokens decide the statistic.
    ``ratio <= 0`` returns ``rows`` unchanged. The calibration executor applies it to the
    Hessian only (:class:`~onnxq.calibration.executor.StatisticsPlan`).
    """
    weights = outlier_token_weights(rows, ratio)
    return rows if weights is None else rows * weights.astype(rows.dtype)[:, None]


class _ChannelStat:
    def __init__(self, k: int | None):
        self.k = k
        self.count = 0

    def _check_merge(self, other: "_ChannelStat") -> None:
        if type(other) is not type(self) or (self.k is not None and other.k is not None and other.k != self.k):
            raise OnnxqError(f"cannot merge {type(other).__name__}(K={other.k}) into {type(self).__name__}(K={self.k})")
        self.k = self.k if self.k is not None else other.k

    def _rows(self, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        rows = rows_of(x, mask)
        if self.k is None:
            self.k = rows.shape[1]
        elif rows.shape[1] != self.k:
            raise OnnxqError(f"activations have {rows.shape[1]} channels; this statistic has K={self.k}")
        return rows


class HessianAccumulator(_ChannelStat):
    """GPTQ's proxy Hessian ``H = 2/n * sum_rows x^T x``: ``[K, K]`` float64 (arXiv 2210.17323).

    Equal to GPTQ's running ``add_batch`` average (``H *= n / (n + t); n += t; H += 2/n X^T X``)
    but kept as the float64 sum ``S = sum X^T X`` and the row count ``n``, ``H = 2/n S``: one
    ``syrk``-style product per update (``X^T X``, only one triangle computed) and one addition,
    no ``[K, K]`` rescaling per update. Here ``n`` counts rows (tokens), where GPTQ counts
    sequences; the two differ by the constant sequence length, which GPTQ's relative damping
    (``percdamp * mean(diag H)``) cancels, and counting rows keeps ``H`` comparable when padding
    rows are masked out.

    ``dtype``: precision of each update's ``X^T X`` product (float64 by default; float32 is
    about twice as fast on CPU, with relative error ~1e-6, and is what the calibration driver
    uses). The sum is always float64.
    """

    def __init__(self, k: int, dtype: type | np.dtype = np.float64):
        super().__init__(k)
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise OnnxqError(f"HessianAccumulator dtype must be float32 or float64, got {self.dtype}")
        self._sum = np.zeros((k, k), np.float64)

    @property
    def hessian(self) -> np.ndarray:
        """``[K, K]`` float64 ``2/n * sum x^T x`` over the rows seen so far (zeros before any row; a new array)."""
        return self._sum * (2.0 / self.count) if self.count else self._sum.copy()

    def update(self, x: np.ndarray, mask: np.ndarray | None = None, sample: int | None = None) -> None:
        """Add the rows of ``x: [..., K]`` (masked rows dropped)."""
        rows = self._rows(x, mask)
        if rows.shape[0] == 0:
            return
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self._sum += rows.T @ rows  # numpy: syrk for a matrix times its own transpose
        self.count += rows.shape[0]

    def merge(self, other: "HessianAccumulator") -> None:
        """Add another shard's sum and row count."""
        self._check_merge(other)
        self._sum = self._sum + other._sum  # a new array: a shard's arrays from Ray's object store are read-only
        self.count += other.count


class CrossAccumulator(_ChannelStat):
    """``C = 2/n * sum_rows x_q^T x_f``: ``[K, K]`` float64, the cross product of a quantized model's
    input rows ``x_q`` with the float model's rows ``x_f`` of the same tokens, on the scale of
    :class:`HessianAccumulator` (``C == H`` when the two agree). GPTQ's float target
    (:func:`onnxq.algorithms.float_target.float_target_weight`) reads it.

    ``ratio``: each token's pair of rows is scaled by the factor
    :func:`outlier_token_weights` gives ``x_q``'s rows, so ``C`` and a Hessian accumulated from
    :func:`cap_outlier_tokens` rows weigh the tokens alike.
    """

    def __init__(self, k: int, ratio: float = 0.0):
        super().__init__(k)
        self.ratio = float(ratio)
        self._sum = np.zeros((k, k), np.float64)

    @property
    def cross(self) -> np.ndarray:
        """``[K, K]`` float64 ``2/n * sum x_q^T x_f`` (zeros before any row; a new array)."""
        return self._sum * (2.0 / self.count) if self.count else self._sum.copy()

    def update_pair(self, x_quant: np.ndarray, x_float: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add the rows of ``x_quant`` and ``x_float`` (both ``[..., K]``, the same tokens; masked rows dropped).

        Raises:
            OnnxqError: the two differ in shape, or hold NaN/Inf.
        """
        if np.shape(x_quant) != np.shape(x_float):
            raise OnnxqError(f"quantized-path activations {np.shape(x_quant)} and float-path activations "
                             f"{np.shape(x_float)} differ in shape")
        rows_q = self._rows(x_quant, mask)
        rows_f = self._rows(x_float, mask)
        if rows_q.shape[0] == 0:
            return
        weights = outlier_token_weights(rows_q, self.ratio)
        rows_q = np.ascontiguousarray(rows_q, dtype=np.float32)
        rows_f = np.ascontiguousarray(rows_f, dtype=np.float32)
        if weights is not None:
            factors = weights.astype(np.float32)[:, None]
            rows_q, rows_f = rows_q * factors, rows_f * factors
        self._sum += rows_q.T @ rows_f
        self.count += rows_q.shape[0]

    def update(self, x: np.ndarray, mask: np.ndarray | None = None, sample: int | None = None) -> None:
        """Rows that are the same in both models (``x_f == x_q``): adds what a Hessian would."""
        self.update_pair(x, x, mask)

    def merge(self, other: "CrossAccumulator") -> None:
        """Add another shard's sum and row count."""
        self._check_merge(other)
        self._sum = self._sum + other._sum
        self.count += other.count


class _ChannelMean(_ChannelStat):
    """The mean of a per-row, per-channel quantity ``[K]`` float64 (:meth:`_row_sums` of the rows)."""

    def __init__(self, k: int | None = None):
        super().__init__(k)
        self._sum: np.ndarray | None = None

    def _row_sums(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def update(self, x: np.ndarray, mask: np.ndarray | None = None, sample: int | None = None) -> None:
        rows = self._rows(x, mask)
        partial = self._row_sums(rows)
        self._sum = partial if self._sum is None else self._sum + partial
        self.count += rows.shape[0]

    def merge(self, other: "_ChannelMean") -> None:
        """Add another shard's per-channel sum and row count."""
        self._check_merge(other)
        if other._sum is not None:
            self._sum = other._sum.copy() if self._sum is None else self._sum + other._sum
        self.count += other.count

    def value(self) -> np.ndarray:
        """``[K]`` mean over all rows seen (zeros before any row)."""
        if self._sum is None or self.count == 0:
            return np.zeros(self.k or 0, np.float64)
        return self._sum / self.count


class AbsMeanAccumulator(_ChannelMean):
    """Mean ``|x|`` per input channel, ``[K]`` float64: AWQ's activation scale ``s_x`` (arXiv 2306.00978)."""

    def _row_sums(self, rows: np.ndarray) -> np.ndarray:
        return np.abs(rows).sum(axis=0, dtype=np.float64)


class MeanSquareAccumulator(_ChannelMean):
    """Mean ``x^2`` per input channel, ``[K]`` float64: ``diag(H) / 2`` of GPTQ's Hessian without the
    ``[K, K]`` product (k_quant's importance; llama.cpp's importance matrix)."""

    def _row_sums(self, rows: np.ndarray) -> np.ndarray:
        rows = rows.astype(np.float64)
        return np.einsum("tk,tk->k", rows, rows)


class AbsMaxAccumulator(_ChannelStat):
    """Max ``|x|`` per input channel, ``[K]`` float64 (SmoothQuant's ``max|X_j|``, arXiv 2211.10438)."""

    def __init__(self, k: int | None = None):
        super().__init__(k)
        self._max: np.ndarray | None = None

    def update(self, x: np.ndarray, mask: np.ndarray | None = None, sample: int | None = None) -> None:
        rows = self._rows(x, mask)
        if rows.shape[0] == 0:
            return
        partial = np.abs(rows).max(axis=0).astype(np.float64)
        self._max = partial if self._max is None else np.maximum(self._max, partial)
        self.count += rows.shape[0]

    def merge(self, other: "AbsMaxAccumulator") -> None:
        """Take the larger maximum of each channel."""
        self._check_merge(other)
        if other._max is not None:
            self._max = other._max.copy() if self._max is None else np.maximum(self._max, other._max)
        self.count += other.count

    def value(self) -> np.ndarray:
        """``[K]`` max ``|x|`` over all rows seen (zeros before any row)."""
        return np.zeros(self.k or 0, np.float64) if self._max is None else self._max.copy()


class RowSampler(_ChannelStat):
    """A uniform random sample of at most ``max_rows`` activation rows, without replacement, e.g.
    the inputs on which AWQ measures ``||x W - x Q(W)||``.

    Bottom-k sampling: every row gets a key ``u ~ U[0, 1)`` and the sample is the ``max_rows``
    rows with the smallest keys (a uniform sample; Vitter's reservoir sampling is the streaming
    special case), returned in the order the rows were seen. Keys do not depend on how rows are
    split into updates: with ``update(..., sample=i)`` row ``j`` of sample ``i`` takes the
    ``j``-th draw of ``numpy.random.default_rng([seed, i])``, so samplers that saw disjoint sets of
    samples :meth:`merge` into exactly the sampler that saw them all (data-parallel calibration);
    without ``sample`` the keys are one stream ``numpy.random.default_rng(seed)`` over all rows.
    """

    def __init__(self, max_rows: int, seed: int = 0, k: int | None = None):
        if max_rows < 1:
            raise OnnxqError(f"max_rows must be >= 1, got {max_rows}")
        super().__init__(k)
        self.max_rows = max_rows
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._keys = np.zeros(0, np.float64)
        self._order = np.zeros(0, np.int64)  # (sample << 32) + row, or the row's index in the stream
        self._buffer: np.ndarray | None = None
        self._streamed = False
        self._sampled = False

    def update(self, x: np.ndarray, mask: np.ndarray | None = None, sample: int | None = None) -> None:
        rows = self._rows(x, mask)
        t = rows.shape[0]
        if t == 0:
            return
        if sample is None:
            self._streamed = True
            keys, order = self._rng.random(t), self.count + np.arange(t, dtype=np.int64)
        else:
            self._sampled = True
            keys = np.random.default_rng([self.seed, sample]).random(t)
            order = (np.int64(sample) << 32) + np.arange(t, dtype=np.int64)
        self._add(keys, order, rows)
        self.count += t

    def _add(self, keys: np.ndarray, order: np.ndarray, rows: np.ndarray) -> None:
        if self._buffer is None:
            self._buffer = np.zeros((self.max_rows, self.k), np.float32)
        size = self._keys.size
        if size == self.max_rows:  # full: only rows below the largest kept key can enter
            entering = keys < self._keys.max()
            keys, order, rows = keys[entering], order[entering], rows[entering]
        if keys.size == 0:
            return
        free = self.max_rows - size
        if keys.size <= free:  # room for all of them
            self._buffer[size:size + keys.size] = rows
            self._keys, self._order = np.concatenate([self._keys, keys]), np.concatenate([self._order, order])
            return
        # keep the max_rows smallest keys of old and new; new winners overwrite the buffer slots
        # (free ones first, then those of evicted old rows): only the entering rows are copied
        all_keys = np.concatenate([self._keys, keys])
        kept = np.zeros(all_keys.size, bool)
        kept[np.argpartition(all_keys, self.max_rows - 1)[: self.max_rows]] = True
        winners = np.flatnonzero(kept[size:])
        slots = np.concatenate([np.arange(size, self.max_rows), np.flatnonzero(~kept[:size])])
        self._buffer[slots] = rows[winners]
        new_keys = np.concatenate([self._keys, np.full(free, np.inf)])
        new_order = np.concatenate([self._order, np.zeros(free, np.int64)])
        new_keys[slots], new_order[slots] = keys[winners], order[winners]
        self._keys, self._order = new_keys, new_order

    def merge(self, other: "RowSampler") -> None:
        """Add the rows another sampler (same ``max_rows`` and ``seed``, other samples) kept."""
        self._check_merge(other)
        if other.max_rows != self.max_rows or other.seed != self.seed:
            raise OnnxqError("cannot merge row samplers with different max_rows or seed")
        if self._streamed or other._streamed:
            raise OnnxqError("only row samplers updated with sample indices can be merged")
        if self._buffer is not None and not self._buffer.flags.writeable:  # e.g. from Ray's object store
            self._buffer = self._buffer.copy()
        if other._buffer is not None:
            self._add(other._keys, other._order, other._buffer[: other._keys.size])
        self._sampled = self._sampled or other._sampled
        self.count += other.count

    def rows(self) -> np.ndarray:
        """``[min(count, max_rows), K]`` float32 sampled rows, in the order they were seen (a copy)."""
        if self._buffer is None:
            return np.zeros((0, self.k or 0), np.float32)
        return self._buffer[: self._keys.size][np.argsort(self._order, kind="stable")]
