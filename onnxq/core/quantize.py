"""Round-to-nearest blockwise quantization (the numerics of ORT's MLAS packer).

Conventions, bit-exact with ``onnxruntime``'s ``quantize_matmul_{2,4,8}bits`` for
float32 weights (checked in ``tests/test_core_ort_oracle.py``):

* asymmetric: ``lo = min(min(x) * ratio, 0)``, ``hi = max(max(x) * ratio, 0)``,
  ``scale = (hi - lo) / (2**b - 1)``, ``zp = clip(roundf(-lo / scale), 0, 2**b - 1)``
  (0 when scale is 0), ``r = 1 / scale`` (0 when scale is 0),
  ``q = clip(roundf(x * r + zp), 0, 2**b - 1)``; ``roundf`` is C's (halves away from
  zero), computed exactly.
* symmetric ("full range"): the block's value of largest magnitude ``e`` (the
  minimum on a tie) maps exactly to ``-2**(b-1)``: ``scale = e * ratio / -2**(b-1)``
  (a signed scale), ``zp = 2**(b-1)``, so all ``2**b`` codes are usable.

Scales are rounded to ``scale_dtype`` (the dtype they will be stored in) *before*
codes are computed, so the codes fit the scale the runtime sees; asymmetric zero
points come from the unrounded scale. This is also what ORT's float16 packer does,
so float16 results are bit-exact with it too.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from onnxq.core.packing import SUPPORTED_BITS
from onnxq.core.padding import pad_tensor, weight_to_blocks
from onnxq.core.weight import PackedQuantizedWeight, QuantizedWeight

__all__ = [
    "DEFAULT_CLIP_RATIOS",
    "ROUNDING_OFFSET",
    "check_quant_params",
    "quantize_blocks",
    "quantize_with_params",
    "dequantize_blocks",
    "quantize_weight",
    "quantize_weight_with_error",
    "quant_tensor",
    "qdq_tensor",
    "search_clip",
    "relative_error",
]

DEFAULT_CLIP_RATIOS = tuple(round(1.0 - 0.02 * i, 2) for i in range(11))  # 1.00 .. 0.80

_COLUMN_CHUNK = 512  # output columns quantized at once: bounds temporaries to ~chunk*K*4 bytes per thread
_THREADS = min(4, os.cpu_count() or 1)


def check_quant_params(bits: int, block_size: int) -> None:
    """Raise ``ValueError`` for settings no format can hold."""
    if not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")
    if block_size != -1 and (not isinstance(block_size, (int, np.integer)) or block_size < 1):
        raise ValueError(f"block_size must be a positive integer or -1 (per channel), got {block_size!r}")


def _round_half_up(x: np.ndarray) -> np.ndarray:
    """C's ``roundf`` for ``x >= 0`` (halves away from zero), exactly, in place.

    ``floor(x + 0.5)`` is not exact: for the float just below ``n + 0.5`` the sum
    rounds up. Negative inputs are only ever clipped to 0 afterwards, and both forms
    give a value <= 0 for them.
    """
    floor = np.floor(x)
    np.subtract(x, floor, out=x)  # the fraction, exact for floats
    np.add(floor, x >= np.float32(0.5), out=x)
    return x


def quantize_blocks(
    blocks: np.ndarray,
    bits: int,
    symmetric: bool,
    ratio: float | np.ndarray = 1.0,
    scale_dtype: np.dtype | type = np.float32,
    axis: int = -1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``blocks`` block by block; each block is one 1-D slice along ``axis``.

    Args:
        blocks: float values, e.g. ``[..., block_size]`` (``axis=-1``) or the K-major
            view ``[k_blocks, block_size, N]`` of a ``[K, N]`` weight (``axis=1``).
        bits: code width, 2..8.
        symmetric: full-range symmetric (implied zero point ``2**(bits-1)``) or asymmetric.
        ratio: clip ratio applied to the block range; a scalar or an array shaped
            like ``blocks`` without ``axis``.
        scale_dtype: dtype the scales will be stored in (float32/float16/bfloat16 via ml_dtypes).
        axis: the axis that runs along one block.

    Returns:
        ``(codes uint8 like blocks, scales float32, zero_points uint8)``, the last two
        shaped like ``blocks`` without ``axis``; for symmetric blocks every zero point
        equals ``2**(bits-1)``.
    """
    blocks = np.asarray(blocks, dtype=np.float32)
    qmax = np.float32((1 << bits) - 1)
    ratio = np.asarray(ratio, dtype=np.float32)
    vmin = blocks.min(axis=axis)
    vmax = blocks.max(axis=axis)
    if symmetric:
        extreme = np.where(np.abs(vmax) > np.abs(vmin), vmax, vmin) * ratio
        scales = (extreme / np.float32(-(1 << (bits - 1)))).astype(np.float32)
    else:
        lo = np.minimum(vmin * ratio, np.float32(0))
        hi = np.maximum(vmax * ratio, np.float32(0))
        scales = ((hi - lo) / qmax).astype(np.float32)
    if symmetric:
        zero_points = np.full(scales.shape, 1 << (bits - 1), dtype=np.float32)
    else:  # as ORT's packer: roundf(-lo / scale) with the unrounded scale (0 for an all-zero block)
        zero_points = np.divide(-lo, scales, out=np.zeros_like(scales), where=scales != 0)
        zero_points = np.clip(_round_half_up(zero_points), 0, qmax)
    scales = scales.astype(scale_dtype).astype(np.float32)
    recip = np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales != 0)
    codes = blocks * np.expand_dims(recip, axis)
    codes += np.expand_dims(zero_points, axis)
    codes = np.clip(_round_half_up(codes), 0, qmax, out=codes)
    return codes.astype(np.uint8), scales, zero_points.astype(np.uint8)


def quantize_with_params(values: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, bits: int) -> np.ndarray:
    """Codes for ``values: [..., L]`` given fixed ``scales``/``zero_points: [...]`` (uint8 ``[..., L]``).

    Same rounding as :func:`quantize_blocks` (reciprocal multiply, round half up),
    so ``quantize_with_params(b, *quantize_blocks(b, ...)[1:], bits)`` reproduces its codes.
    Used by solvers (GPTQ) that fix a block's scale before quantizing its columns.
    """
    scales = np.asarray(scales, dtype=np.float32)
    recip = np.divide(np.float32(1), scales, out=np.zeros_like(scales), where=scales != 0)
    codes = np.asarray(values, dtype=np.float32) * recip[..., None]
    codes += np.asarray(zero_points, dtype=np.float32)[..., None]
    return np.clip(_round_half_up(codes), 0, (1 << bits) - 1, out=codes).astype(np.uint8)


def dequantize_blocks(codes: np.ndarray, scales: np.ndarray, zero_points: np.ndarray) -> np.ndarray:
    """``(codes [..., bs] - zero_points[..., None]) * scales[..., None]`` in float32."""
    zp = np.asarray(zero_points, dtype=np.float32)[..., None]
    return (np.asarray(codes, dtype=np.float32) - zp) * np.asarray(scales, dtype=np.float32)[..., None]


def _block_error(blocks: np.ndarray, bits: int, symmetric: bool, ratio, scale_dtype, axis: int = -1) -> np.ndarray:
    codes, scales, zps = quantize_blocks(blocks, bits, symmetric, ratio, scale_dtype, axis)
    diff = (codes.astype(np.float32) - np.expand_dims(zps, axis)) * np.expand_dims(scales, axis) - blocks
    return np.einsum("...i,...i->...", np.moveaxis(diff, axis, -1), np.moveaxis(diff, axis, -1))


def _best_block_ratios(blocks, bits, symmetric, ratios, scale_dtype, axis: int = -1) -> np.ndarray:
    shape = np.delete(np.array(blocks.shape), axis % blocks.ndim)
    best_err = np.full(shape, np.inf, dtype=np.float32)
    best_ratio = np.ones(shape, dtype=np.float32)
    for ratio in ratios:
        err = _block_error(blocks, bits, symmetric, ratio, scale_dtype, axis)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_ratio = np.where(better, np.float32(ratio), best_ratio)
    return best_ratio


def _for_column_chunks(n: int, work: Callable[[int, int], None], chunk: int = _COLUMN_CHUNK) -> None:
    """Call ``work(start, stop)`` on chunks of ``chunk`` of ``n`` output columns, on up to ``_THREADS`` threads.

    numpy releases the GIL inside its loops, so chunks run in parallel; each
    chunk writes a disjoint slice of the outputs.
    """
    chunks = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    if len(chunks) == 1 or _THREADS == 1:
        for start, stop in chunks:
            work(start, stop)
        return
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        for future in [pool.submit(work, start, stop) for start, stop in chunks]:
            future.result()


def _k_major_blocks(weight: np.ndarray, block_size: int) -> np.ndarray:
    """``weight: [K, N]`` -> float32 ``[k_blocks, block_size, N]`` (a view when no padding/cast is needed)."""
    k = weight.shape[0]
    k_blocks = -(-k // block_size)
    padded = pad_tensor(np.asarray(weight, dtype=np.float32), block_size, k_blocks)
    return padded.reshape(k_blocks, block_size, weight.shape[1])


def quantize_weight(
    weight: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    ratio: float = 1.0,
    mse_clip: bool = False,
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS,
    scale_dtype: np.dtype | type = np.float32,
) -> QuantizedWeight:
    """RTN-quantize ``weight: [K, N]`` in blocks of ``block_size`` along K.

    ``block_size=-1`` quantizes each output column as one block (per channel).
    With ``mse_clip`` each block picks, from ``clip_ratios``, the clip ratio that
    minimises its squared reconstruction error (a per-block version of the
    clip search in Neural Compressor / AWQ, arXiv 2306.00978 sec. 3.3).
    Work is done in the weight's own K-major layout on chunks of output columns,
    so temporaries stay small and only the uint8 codes are transposed.
    """
    return quantize_weight_with_error(weight, bits, block_size, symmetric, ratio, mse_clip, clip_ratios, scale_dtype)[0]


def quantize_weight_with_error(
    weight: np.ndarray,
    bits: int = 4,
    block_size: int = 32,
    symmetric: bool = True,
    ratio: float = 1.0,
    mse_clip: bool = False,
    clip_ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS,
    scale_dtype: np.dtype | type = np.float32,
) -> tuple[QuantizedWeight, float]:
    """:func:`quantize_weight` plus its :func:`relative_error`, computed in the same pass over each tile.

    ``weight: [K, N]`` (float32, float16 or bfloat16; a memory-mapped view is read once, tile by
    tile). Without ``mse_clip`` the weight is cut into tiles of whole blocks along K and
    :data:`_TILE_COLUMNS` output columns (about :data:`_TILE_ELEMENTS` values, so a tile and its
    temporaries stay in a core's L2 cache); each tile is quantized, its codes written to their
    place in ``codes: [N, k_blocks, block_size]`` and its share of ``||W - dequant(Q)||^2`` taken
    from the rounding residual it already holds (``scale^2 * (q - x / scale - zp)^2`` per value).
    Codes and scales equal :func:`quantize_blocks` on the whole weight, bit for bit. A weight
    holding NaN or Inf gets a NaN error (its blocks' min/max carry them): callers that skip a
    separate finiteness pass check the error instead.
    """
    check_quant_params(bits, block_size)
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight [K, N], got shape {weight.shape}")
    k, n = weight.shape
    bs = k if block_size == -1 else block_size
    k_blocks = -(-k // bs)
    scales = np.empty((n, k_blocks), dtype=np.float32)
    zero_points = np.empty((n, k_blocks), dtype=np.uint8)
    sums: list[tuple[float, float]] = []
    if mse_clip:
        codes = np.empty((n, k_blocks, bs), dtype=np.uint8)
        _mse_clip_chunks(weight, bits, bs, symmetric, clip_ratios, scale_dtype, codes, scales, zero_points, sums)
        return QuantizedWeight(codes, scales, None if symmetric else zero_points, bits, bs, k), _relative(sums)
    packed = bits in SUPPORTED_BITS and (bs * bits) % 16 == 0 and np.little_endian  # whole uint16 words per block
    out = np.empty((n, k_blocks, bs * bits // 8 if packed else bs), dtype=np.uint8)
    rows, cols = _tile_shape(k, n, bs)

    def quantize_strip(start: int, stop: int) -> None:
        sums.append(_quantize_strip(weight[:, start:stop], bits, bs, symmetric, ratio, scale_dtype, rows, packed,
                                    out[start:stop], scales[start:stop], zero_points[start:stop]))

    _for_column_chunks(n, quantize_strip, cols)
    zps = None if symmetric else zero_points
    qweight = PackedQuantizedWeight(out, scales, zps, bits, bs, k) if packed else QuantizedWeight(out, scales, zps, bits, bs, k)
    return qweight, _relative(sums)


_TILE_ELEMENTS = 128 * 1024
"""Values of one tile (512 KiB of float32): the tile, its float temporary and its codes fit in L2."""
_TILE_COLUMNS = 1024
"""At most this many output columns per tile: rows of 4 KiB, long enough for the prefetcher."""
ROUNDING_OFFSET = np.nextafter(np.float32(0.5), np.float32(0))
"""``floor(v + 0.49999997f)`` equals C's ``roundf(v)`` for every float32 ``v >= 0`` (and is
<= 0 for ``v < 0``): a value just below ``n + 0.5`` cannot round up into ``n + 1``, and an exact
half still reaches it. :func:`_round_half_up` needs four passes for the same result."""


def _tile_shape(k: int, n: int, block_size: int) -> tuple[int, int]:
    """``(rows, cols)`` of a tile: whole blocks along K, about :data:`_TILE_ELEMENTS` values."""
    cols = min(n, _TILE_COLUMNS, max(16, _TILE_ELEMENTS // block_size))
    blocks = max(1, _TILE_ELEMENTS // (cols * block_size))
    return blocks * block_size, cols


def _pack_words(codes: np.ndarray, bits: int, out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """Float codes ``[t, bs, c]`` -> uint16 words ``out: [t, bs * bits / 16, c]``: the ``16 // bits`` codes
    of one word, lowest K first (``sum_i codes[:, w * per_word + i] << bits * i``, exact in float32),
    so on a little-endian host a word is two bytes of :func:`pack_bits`' layout. ``scratch``: float32,
    at least ``out.size`` values."""
    per_word = 16 // bits
    words = np.multiply(codes[:, per_word - 1::per_word], np.float32(1 << bits),
                        out=scratch[:out.size].reshape(out.shape))
    for i in range(per_word - 2, 0, -1):
        words += codes[:, i::per_word]
        words *= np.float32(1 << bits)
    words += codes[:, 0::per_word]
    np.copyto(out, words, casting="unsafe")
    return out


def _quantize_strip(
    strip: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    ratio: float,
    scale_dtype: np.dtype | type,
    rows: int,
    packed: bool,
    out: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray,
) -> tuple[float, float]:
    """Quantize ``strip: [K, cols]`` tile by tile (``rows`` of K at a time); returns
    ``(||W - dequant||^2, ||W||^2)``.

    Writes ``scales`` and ``zero_points: [cols, k_blocks]`` and ``out``: the packed codes
    ``[cols, k_blocks, block_size * bits / 8]`` (:meth:`QuantizedWeight.packed_codes`: padded codes 0)
    when ``packed``, else the codes ``[cols, k_blocks, block_size]`` (padded codes those of 0, as
    :func:`quantize_blocks` writes them). A tile that is not float32 rows (float16/bfloat16, a
    transposed view) is first copied into a float32 buffer; the K tail of a ``K % block_size``
    weight is quantized from a zero-padded copy.
    """
    k, cols = strip.shape
    qmax = np.float32((1 << bits) - 1)
    ratio = np.float32(ratio)
    buffer = np.empty(rows * cols, dtype=np.float32)
    rounded = np.empty(rows * cols, dtype=np.float32)
    tile_codes = np.empty(0 if packed else rows * cols, dtype=np.uint8)
    tile_words = np.empty(rows * cols * bits // 16 if packed else 0, dtype=np.uint16)
    out_words = out.view(np.uint16) if packed else None  # [cols, k_blocks, block_size * bits / 16]
    staging = None  # a float32 copy of the tile when the strip is not float32 rows, or for the padded tail
    err = ref = 0.0
    for row in range(0, k, rows):
        x = strip[row:row + rows]
        valid = x.shape[0]
        if x.dtype != np.float32 or valid % block_size or x.strides[1] != x.itemsize:
            if staging is None:
                staging = np.empty(rows * cols, dtype=np.float32)
            padded_rows = -(-valid // block_size) * block_size
            tile = staging[:padded_rows * cols].reshape(padded_rows, cols)
            tile[:valid] = x  # a transposed view (Gemm transB, Transpose->MatMul) is read once, in its own order
            tile[valid:] = 0
            x = tile
        t = x.shape[0] // block_size
        first = row // block_size
        blocks = x.reshape(t, block_size, cols)
        vmin = blocks.min(axis=1)
        vmax = blocks.max(axis=1)
        if not (np.isfinite(vmin).all() and np.isfinite(vmax).all()):  # min/max carry any NaN/Inf of the tile
            return float("nan"), float("nan")
        if symmetric:
            extreme = np.where(np.abs(vmax) > np.abs(vmin), vmax, vmin) * ratio
            tile_scales = (extreme / np.float32(-(1 << (bits - 1)))).astype(np.float32)
            zp = np.float32(1 << (bits - 1))
        else:
            lo = np.minimum(vmin * ratio, np.float32(0))
            tile_scales = ((np.maximum(vmax * ratio, np.float32(0)) - lo) / qmax).astype(np.float32)
            zps = np.divide(-lo, tile_scales, out=np.zeros_like(tile_scales), where=tile_scales != 0)
            zps = np.clip(_round_half_up(zps), 0, qmax)
            zero_points[:, first:first + t] = zps.T
            zp = zps[:, None, :]
        tile_scales = tile_scales.astype(scale_dtype).astype(np.float32)
        recip = np.divide(np.float32(1), tile_scales, out=np.zeros_like(tile_scales), where=tile_scales != 0)
        values = np.multiply(blocks, recip[:, None, :], out=buffer[:blocks.size].reshape(blocks.shape))
        values += zp  # v = x / scale + zp, rounded as quantize_blocks rounds it
        q = np.add(values, ROUNDING_OFFSET, out=rounded[:blocks.size].reshape(blocks.shape))
        np.floor(q, out=q)
        np.clip(q, 0, qmax, out=q)  # the codes, as floats
        values -= q  # v - q: the rounding residual in units of the scale
        err += float(np.vdot(np.einsum("tbc,tbc->tc", values, values), tile_scales * tile_scales))
        ref += float(np.einsum("ij,ij->j", x, x).sum(dtype=np.float64))
        if packed:
            q.reshape(-1, cols)[valid:] = 0  # the padded tail of K is stored as code 0
            words = _pack_words(q, bits, tile_words[:blocks.size * bits // 16].reshape(t, -1, cols), buffer)
            out_words[:, first:first + t] = words.transpose(2, 0, 1)
        else:
            codes = tile_codes[:blocks.size].reshape(blocks.shape)
            np.copyto(codes, q, casting="unsafe")
            out[:, first:first + t] = codes.transpose(2, 0, 1)
        scales[:, first:first + t] = tile_scales.T
    if symmetric:
        zero_points[...] = 1 << (bits - 1)
    return err, ref


def _mse_clip_chunks(weight, bits, bs, symmetric, clip_ratios, scale_dtype, codes, scales, zero_points, sums) -> None:
    """The per-block clip search (``mse_clip``) on chunks of :data:`_COLUMN_CHUNK` output columns."""
    k = weight.shape[0]

    def quantize_chunk(start: int, stop: int) -> None:
        blocks = _k_major_blocks(weight[:, start:stop], bs)  # [k_blocks, bs, chunk]; padded rows are 0
        chunk_ratio = _best_block_ratios(blocks, bits, symmetric, clip_ratios, scale_dtype, 1)
        chunk_codes, chunk_scales, chunk_zps = quantize_blocks(blocks, bits, symmetric, chunk_ratio, scale_dtype, 1)
        codes[start:stop] = chunk_codes.transpose(2, 0, 1)
        scales[start:stop] = chunk_scales.T
        zero_points[start:stop] = chunk_zps.T
        diff = chunk_codes.astype(np.float32)
        diff -= chunk_zps[:, None, :]
        diff *= chunk_scales[:, None, :]
        diff -= blocks
        diff = diff.reshape(-1, stop - start)[:k]  # padded rows are not part of the weight
        sums.append((float(np.vdot(diff, diff)), float(np.vdot(blocks, blocks))))

    _for_column_chunks(weight.shape[1], quantize_chunk)


def _relative(sums: list[tuple[float, float]]) -> float:
    err = sum(e for e, _ in sums)
    ref = sum(r for _, r in sums)
    return float(np.sqrt(err / ref)) if ref > 0 else float(np.sqrt(err))


def _as_groups(data: np.ndarray, group_size: int) -> np.ndarray:
    data = np.asarray(data, dtype=np.float32)
    if group_size == -1:
        return data.reshape(data.shape[0], -1)
    if data.size % group_size:
        raise ValueError(f"data of size {data.size} does not split into groups of {group_size}")
    return data.reshape(-1, group_size)


def quant_tensor(
    data: np.ndarray,
    num_bits: int = 4,
    group_size: int = 32,
    scheme: str = "asym",
    dtype: str = "int",
    ratio: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize ``data`` group by group (Neural Compressor's signature and defaults).

    The numerics are ORT's (this module's docstring), not NC's: the asymmetric range
    always includes 0, symmetric is full range, and rounding is reciprocal-multiply
    round-half-up (see docs/NC_API.md for the differences).

    ``data`` is reshaped to ``[-1, group_size]`` (``group_size=-1``: one group per row
    of ``data``), each row being one group. Numerics follow this module's docstring.

    Returns ``(q [G, group_size], scale [G, 1], zero_point [G, 1])``: for
    ``scheme="asym"`` or ``dtype="uint"``, ``q`` is unsigned (uint8) with its zero
    point; for ``scheme="sym", dtype="int"``, ``q`` is signed (int8) and the zero
    point is 0. In all cases ``data ~= (q - zero_point) * scale``.
    """
    if scheme not in ("sym", "asym"):
        raise ValueError(f"scheme must be 'sym' or 'asym', got {scheme!r}")
    if dtype not in ("int", "uint"):
        raise ValueError(f"dtype must be 'int' or 'uint', got {dtype!r}")
    check_quant_params(num_bits, group_size)
    groups = _as_groups(data, group_size)
    codes, scales, zps = quantize_blocks(groups, num_bits, scheme == "sym", ratio)
    if scheme == "sym" and dtype == "int":
        signed = codes.astype(np.int16) - (1 << (num_bits - 1))
        return signed.astype(np.int8), scales[:, None], np.zeros((len(scales), 1), dtype=np.int8)
    return codes, scales[:, None], zps[:, None]


def qdq_tensor(
    data: np.ndarray,
    num_bits: int = 4,
    group_size: int = 32,
    scheme: str = "asym",
    dtype: str = "int",
    ratio: float = 1.0,
) -> np.ndarray:
    """Quantize then dequantize ``data``; returns float32 of ``data``'s shape."""
    q, scale, zp = quant_tensor(data, num_bits, group_size, scheme, dtype, ratio)
    restored = (q.astype(np.float32) - zp.astype(np.float32)) * scale
    return restored.reshape(np.shape(data))


def search_clip(
    tensor: np.ndarray,
    bits: int = 4,
    group_size: int = 32,
    scheme: str = "asym",
    ratios: tuple[float, ...] = DEFAULT_CLIP_RATIOS,
) -> float:
    """Pick the clip ratio (one for the whole tensor) with the lowest qdq MSE.

    ``tensor: [K, N]`` is quantized in blocks of ``group_size`` along K, as the
    weight of a MatMul. Returns the best ratio from ``ratios`` (ties: the first).
    """
    check_quant_params(bits, group_size)
    blocks = weight_to_blocks(np.asarray(tensor), tensor.shape[0] if group_size == -1 else group_size)
    errors = [float(_block_error(blocks, bits, scheme == "sym", r, np.float32).sum()) for r in ratios]
    return float(ratios[int(np.argmin(errors))])


def relative_error(weight: np.ndarray, qweight: QuantizedWeight) -> float:
    """``||W - dequant(Q)||_F / ||W||_F`` for ``weight: [K, N]``, computed in column chunks."""
    zero_points = qweight.effective_zero_points()
    sums: list[tuple[float, float]] = []

    def chunk_error(start: int, stop: int) -> None:
        blocks = _k_major_blocks(weight[:, start:stop], qweight.block_size)  # [k_blocks, bs, chunk]
        codes = np.ascontiguousarray(qweight.codes[start:stop].transpose(1, 2, 0))  # uint8: a cheap transpose
        restored = (codes.astype(np.float32) - zero_points[start:stop].T[:, None, :]) * qweight.scales[start:stop].T[:, None, :]
        diff = (restored - blocks).reshape(-1, stop - start)[: qweight.k]  # padded rows are not part of the weight
        sums.append((float(np.vdot(diff, diff)), float(np.vdot(blocks, blocks))))

    _for_column_chunks(qweight.n, chunk_error)
    return _relative(sums)
