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
    "HessianAccumulator",
    "MeanSquareAccumulator",
    "RowSampler",
    "rows_of",
]


class Accumulator(Protocol):
    """What the calibration loop calls for each sample."""

    def update(self, x: np.ndarray, mask: np.ndarray | None = None) -> None: ...


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


class _ChannelStat:
    def __init__(self, k: int | None):
        self.k = k
        self.count = 0

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

    def update(self, x: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add the rows of ``x: [..., K]`` (masked rows dropped)."""
        rows = self._rows(x, mask)
        if rows.shape[0] == 0:
            return
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        self._sum += rows.T @ rows  # numpy: syrk for a matrix times its own transpose
        self.count += rows.shape[0]


class _ChannelMean(_ChannelStat):
    """The mean of a per-row, per-channel quantity ``[K]`` float64 (:meth:`_row_sums` of the rows)."""

    def __init__(self, k: int | None = None):
        super().__init__(k)
        self._sum: np.ndarray | None = None

    def _row_sums(self, rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def update(self, x: np.ndarray, mask: np.ndarray | None = None) -> None:
        rows = self._rows(x, mask)
        partial = self._row_sums(rows)
        self._sum = partial if self._sum is None else self._sum + partial
        self.count += rows.shape[0]

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

    def update(self, x: np.ndarray, mask: np.ndarray | None = None) -> None:
        rows = self._rows(x, mask)
        if rows.shape[0] == 0:
            return
        partial = np.abs(rows).max(axis=0).astype(np.float64)
        self._max = partial if self._max is None else np.maximum(self._max, partial)
        self.count += rows.shape[0]

    def value(self) -> np.ndarray:
        """``[K]`` max ``|x|`` over all rows seen (zeros before any row)."""
        return np.zeros(self.k or 0, np.float64) if self._max is None else self._max.copy()


class RowSampler(_ChannelStat):
    """A uniform random sample of at most ``max_rows`` activation rows (reservoir sampling,
    Vitter's Algorithm R), e.g. the inputs on which AWQ measures ``||x W - x Q(W)||``.

    Row ``i`` (0-based over all rows seen) draws one ``u ~ U[0, 1)`` from
    ``numpy.random.default_rng(seed)``; rows ``i < max_rows`` fill slot ``i``, later rows
    replace slot ``floor(u * (i + 1))`` when it is ``< max_rows``. One draw per row makes
    the sample independent of how rows are split into updates.
    """

    def __init__(self, max_rows: int, seed: int = 0, k: int | None = None):
        if max_rows < 1:
            raise OnnxqError(f"max_rows must be >= 1, got {max_rows}")
        super().__init__(k)
        self.max_rows = max_rows
        self._rng = np.random.default_rng(seed)
        self._buffer: np.ndarray | None = None

    def update(self, x: np.ndarray, mask: np.ndarray | None = None) -> None:
        rows = self._rows(x, mask)
        t = rows.shape[0]
        if t == 0:
            return
        if self._buffer is None:
            self._buffer = np.zeros((self.max_rows, self.k), np.float32)
        index = self.count + np.arange(t)
        u = self._rng.random(t)
        slots = np.where(index < self.max_rows, index, np.floor(u * (index + 1)).astype(np.int64))
        taken = np.flatnonzero(slots < self.max_rows)
        # several rows of this update may land in one slot: the last one wins, as in a sequential loop
        last_first, unique_pos = np.unique(slots[taken][::-1], return_index=True)
        winners = taken[len(taken) - 1 - unique_pos]
        self._buffer[last_first] = rows[winners]
        self.count += t

    def rows(self) -> np.ndarray:
        """``[min(count, max_rows), K]`` float32 sampled rows (a copy)."""
        if self._buffer is None:
            return np.zeros((0, self.k or 0), np.float32)
        return self._buffer[: min(self.count, self.max_rows)].copy()
