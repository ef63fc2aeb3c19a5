"""Neural Compressor's torch weight-only helpers on numpy arrays (its signatures and numerics).

Weights are laid out as torch ``Linear`` weights: ``weight: [out, in]``, and groups
run along ``in`` (each row is cut into groups of ``group_size`` consecutive inputs;
when ``in`` is not a multiple of ``group_size`` the last, shorter group holds the
tail). This is the transpose of onnxq's ``[K, N]`` convention.

Numerics, transcribed from Neural Compressor 2.x
(``neural_compressor/adaptor/torch_utils/weight_only.py``), computed in float32 with
numpy's division and round-half-to-even (as ``torch.round``):

* asymmetric (:func:`qdq_weight_asym`): ``wmin = min(min(x), 0) * quantile``,
  ``wmax = max(max(x), 0) * quantile`` (both 0: ``-1, +1``),
  ``scale = (wmax - wmin) / (2**b - 1)``, ``zp = round(-wmin / scale)``,
  ``q = clip(round(x / scale) + zp, 0, 2**b - 1)``, ``x ~= (q - zp) * scale``.
* symmetric (:func:`qdq_weight_sym`): ``amax = max|x| * quantile`` (0: 1);
  ``full_range=False``: ``scale = amax / (2**(b-1) - 1)``; ``full_range=True``:
  ``scale = amax / 2**(b-1)``, negated when ``|max(x)| > |min(x)|``, so the value of
  largest magnitude maps to ``-2**(b-1)`` (onnxq's symmetric convention);
  ``q = clip(round(x / scale), -2**(b-1), 2**(b-1) - 1)``, ``x ~= q * scale``.
* ``data_type`` ``"nf4"``, ``"fp4"`` (= ``"fp4_e2m1_bnb"``) or ``"fp4_e2m1"``: one absmax
  scale per group and the nearest table value (:func:`onnxq.core.nf4.quantize_4bit`).

Differences from Neural Compressor, all deliberate: inputs are never modified
(NC's functions work in place on the torch tensor); results are float32 whatever the
input dtype (NC keeps the tensor's dtype); ``return_int`` codes are integer-valued
float32 arrays, as NC returns float tensors (cast with ``.astype(np.int8)`` etc.);
an unknown ``scheme``/``data_type``, a non-4-bit float type or non-finite weights
raise :class:`~onnxq.errors.OnnxqError` instead of silently falling back; all-zero
groups of NF4/FP4 stay zero (NC divides by a zero scale and returns NaN).
"""
from __future__ import annotations

import numpy as np

from onnxq.core.nf4 import FLOAT_MAPPING, INT_MAPPING, quantize_4bit
from onnxq.errors import OnnxqError

__all__ = [
    "qdq_weight_asym",
    "qdq_weight_sym",
    "qdq_weight_actor",
    "quant_weight",
    "quant_weight_w_scale",
    "search_clip",
    "NC_CLIP_RATIOS",
]

NC_CLIP_RATIOS = tuple(1 - i / 200 for i in range(40))
"""Clip ratios tried by :func:`search_clip`: 1.0, 0.995, ..., 0.805 (NC's ``n_grid=200, max_shrink=0.2``)."""

QuantResult = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]


def _rows(weight: np.ndarray, what: str = "weight") -> np.ndarray:
    """A float32 copy of a 2-D ``weight``; rejects other ranks and NaN/Inf."""
    data = np.array(weight, dtype=np.float32)
    if data.ndim != 2:
        raise OnnxqError(f"{what} must be 2-D [out, in] (rows are groups), got shape {data.shape}")
    if not np.isfinite(data).all():
        raise OnnxqError(f"{what} has {int(data.size - np.isfinite(data).sum())} NaN/Inf values")
    return data


def _check_bits(num_bits: int, low: int = 1) -> None:
    if not isinstance(num_bits, (int, np.integer)) or not low <= num_bits <= 8:
        raise OnnxqError(f"num_bits must be an integer in {low}..8, got {num_bits!r}")


def _check_scheme(scheme: str) -> None:
    if scheme not in ("sym", "asym"):
        raise OnnxqError(f"scheme must be 'sym' or 'asym', got {scheme!r}")


def _check_data_type(data_type: str, num_bits: int) -> None:
    if data_type != "int" and data_type not in FLOAT_MAPPING:
        raise OnnxqError(f"data_type must be 'int' or one of {sorted(FLOAT_MAPPING)}, got {data_type!r}")
    if data_type != "int" and num_bits != 4:
        raise OnnxqError(f"data_type {data_type!r} is a 4-bit type; got num_bits={num_bits}")


def qdq_weight_asym(
    weight: np.ndarray, num_bits: int = 4, quantile: float = 1.0, return_int: bool = False
) -> np.ndarray | QuantResult:
    """Asymmetric min/max quantization of each row of ``weight: [G, L]`` (one group per row).

    Returns the quantize-dequantized float32 ``[G, L]``, or with ``return_int``
    ``(q [G, L], scale [G, 1], zp [G, 1])`` (integer-valued float32 ``q`` in
    ``[0, 2**num_bits - 1]`` and ``zp``), with ``weight ~= (q - zp) * scale``.
    """
    _check_bits(num_bits)
    w = _rows(weight)
    maxq = np.float32(2**num_bits - 1)
    wmin = np.minimum(w.min(axis=1), np.float32(0)) * np.float32(quantile)
    wmax = np.maximum(w.max(axis=1), np.float32(0)) * np.float32(quantile)
    empty = (wmin == 0) & (wmax == 0)
    wmin[empty], wmax[empty] = -1, 1
    scale = ((wmax - wmin) / maxq)[:, None]
    zp = np.round(-wmin[:, None] / scale)
    q = np.clip(np.round(w / scale) + zp, 0, maxq)
    if return_int:
        return q, scale, zp
    return (q - zp) * scale


def qdq_weight_sym(
    weight: np.ndarray, num_bits: int = 4, quantile: float = 1.0, return_int: bool = False, full_range: bool = False
) -> np.ndarray | QuantResult:
    """Symmetric quantization of each row of ``weight: [G, L]`` (see the module docstring).

    Returns the quantize-dequantized float32 ``[G, L]``, or with ``return_int``
    ``(q [G, L], scale [G, 1], None)`` (integer-valued float32 ``q`` in
    ``[-2**(b-1), 2**(b-1) - 1]``; with ``full_range`` the scale may be negative),
    with ``weight ~= q * scale``.
    """
    _check_bits(num_bits, low=2)
    w = _rows(weight)
    maxq = np.float32(2 ** (num_bits - 1) - 1)
    minq = np.float32(-(2 ** (num_bits - 1)))
    max_val, min_val = w.max(axis=1), w.min(axis=1)
    flip = np.abs(max_val) > np.abs(min_val)
    wmax = np.maximum(np.abs(max_val), np.abs(min_val)) * np.float32(quantile)
    wmax[wmax == 0] = 1
    if full_range:
        scale = wmax / -minq
        scale = np.where(flip, -scale, scale)
    else:
        scale = wmax / maxq
    scale = scale[:, None]
    q = np.clip(np.round(w / scale), minq, maxq)
    if return_int:
        return q, scale, None
    return q * scale


def qdq_weight_actor(
    weight: np.ndarray,
    num_bits: int,
    scheme: str,
    quantile: float = 1.0,
    data_type: str = "int",
    return_int: bool = False,
    full_range: bool = False,
) -> np.ndarray | QuantResult:
    """Quantize each row of ``weight: [G, L]``: NF4/FP4, symmetric or asymmetric integers.

    Dispatches to :func:`onnxq.core.nf4.quantize_4bit` (``data_type`` other than
    ``"int"``; ``return_int`` gives NC's 4-bit codes of
    :data:`~onnxq.core.nf4.INT_MAPPING` as float32 and ``zp=None``), :func:`qdq_weight_sym`
    or :func:`qdq_weight_asym`.
    """
    _check_bits(num_bits)
    _check_scheme(scheme)
    _check_data_type(data_type, num_bits)
    if data_type != "int":
        w = _rows(weight)
        if return_int:
            codes, scale, _ = quantize_4bit(w, quantile, data_type, return_int=True)
            return codes.astype(np.float32), scale, None
        return quantize_4bit(w, quantile, data_type)
    if scheme == "sym":
        return qdq_weight_sym(weight, num_bits, quantile, return_int, full_range)
    return qdq_weight_asym(weight, num_bits, quantile, return_int)


def quant_weight(
    weight: np.ndarray,
    num_bits: int = 4,
    group_size: int = -1,
    scheme: str = "asym",
    quantile: float = 1.0,
    data_type: str = "int",
    return_int: bool = False,
    full_range: bool = False,
) -> np.ndarray | QuantResult:
    """Quantize ``weight: [out, in]`` in groups of ``group_size`` along ``in``.

    ``group_size=-1`` (or ``in < group_size``): one group per row. When ``in`` is not a
    multiple of ``group_size`` the last group of each row is the shorter tail.

    Returns the quantize-dequantized float32 ``[out, in]``, or with ``return_int``
    ``(q [out, in], scale [out, n_groups], zp [out, n_groups] or None)``, ``zp`` being
    ``None`` for ``scheme="sym"`` and NF4/FP4. ``num_bits <= 0`` returns a float32 copy
    of ``weight`` (NC: the weight itself, unquantized).
    """
    if isinstance(num_bits, (int, np.integer)) and num_bits <= 0:
        return _rows(weight)
    if group_size != -1 and (not isinstance(group_size, (int, np.integer)) or group_size < 1):
        raise OnnxqError(f"group_size must be a positive integer or -1, got {group_size!r}")
    w = _rows(weight)
    out_features, in_features = w.shape

    def actor(part: np.ndarray):
        return qdq_weight_actor(part, num_bits, scheme, quantile, data_type, return_int, full_range)

    if group_size == -1 or in_features < group_size:
        return actor(w)
    split = in_features // group_size * group_size
    parts = [actor(w[:, :split].reshape(-1, group_size))]
    if split < in_features:
        parts.append(actor(w[:, split:]))
    if not return_int:
        return np.concatenate([parts[0].reshape(out_features, split), *parts[1:]], axis=1)
    q = np.concatenate([parts[0][0].reshape(out_features, split), *(p[0] for p in parts[1:])], axis=1)
    scale = np.concatenate([p[1].reshape(out_features, -1) for p in parts], axis=1)
    zp = None if parts[0][2] is None else np.concatenate([p[2].reshape(out_features, -1) for p in parts], axis=1)
    return q, scale, zp


def quant_weight_w_scale(
    weight: np.ndarray,
    scale: np.ndarray,
    zp: np.ndarray | None,
    group_size: int = -1,
    data_type: str = "int",
) -> np.ndarray:
    """Codes of ``weight: [out, in]`` for given ``scale``/``zp: [out, n_groups]`` (NC semantics).

    ``data_type="int"``: ``round(weight / scale + zp)`` per group (``zp=None``:
    ``round(weight / scale)``), **not clipped** to the code range, as in NC; with the
    ``scale``/``zp`` of :func:`quant_weight` (``quantile=1``) it returns
    ``quant_weight(..., return_int=True)[0]``. ``group_size=-1``: ``scale``/``zp`` are
    ``[out, 1]``. NF4/FP4: NC's 4-bit codes of the table value nearest to
    ``weight / scale`` (NC supports only one scale per row there; here any
    ``group_size`` works). Returns integer-valued float32 ``[out, in]``.
    """
    if data_type != "int":
        _check_data_type(data_type, 4)
    if group_size != -1 and (not isinstance(group_size, (int, np.integer)) or group_size < 1):
        raise OnnxqError(f"group_size must be a positive integer or -1, got {group_size!r}")
    w = _rows(weight)
    out_features, in_features = w.shape
    scale = np.asarray(scale, dtype=np.float32).reshape(out_features, -1)
    n_groups = 1 if group_size == -1 else -(-in_features // group_size)
    if scale.shape[1] != n_groups:
        raise OnnxqError(f"scale must be [out={out_features}, {n_groups}] for group_size {group_size}, "
                         f"got {np.shape(scale)}")
    width = in_features if group_size == -1 else group_size
    group_of = np.minimum(np.arange(in_features) // width, n_groups - 1)  # the tail shares the last group
    x = w / scale[:, group_of]
    if data_type != "int":
        table = np.asarray(FLOAT_MAPPING[data_type], dtype=np.float64)
        mids = ((table[:-1] + table[1:]) / 2).astype(np.float32)
        index = np.searchsorted(mids, x, side="left")  # midpoints go to the lower entry, as NC
        return np.asarray(INT_MAPPING[data_type], dtype=np.float32)[index]
    if zp is not None:
        x = x + np.asarray(zp, dtype=np.float32).reshape(out_features, -1)[:, group_of]
    return np.round(x)


def search_clip(
    weight: np.ndarray,
    num_bits: int = 4,
    group_size: int = 32,
    scheme: str = "asym",
    data_type: str = "int",
    enable_full_range: bool = False,
) -> float:
    """The clip ratio (``quantile``) in :data:`NC_CLIP_RATIOS` minimising the mean squared
    error of :func:`quant_weight` on ``weight: [out, in]`` (first one on ties).

    NC's ``search_clip(m, ...)`` takes a torch module and reads ``m.weight``; this one
    takes the weight array. (:func:`onnxq.core.search_clip` is onnxq's own, for
    ``[K, N]`` MatMul weights.)
    """
    w = _rows(weight)
    best_error, best_ratio = float("inf"), None
    for ratio in NC_CLIP_RATIOS:
        restored = quant_weight(w, num_bits, group_size, scheme, ratio, data_type, full_range=enable_full_range)
        error = float(np.mean((w - restored) ** 2))
        if error < best_error:
            best_error, best_ratio = error, ratio
    return best_ratio
