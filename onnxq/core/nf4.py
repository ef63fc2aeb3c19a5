"""NF4 / FP4 4-bit float codes (QLoRA, arXiv 2305.14314) and bitsandbytes-style blockwise absmax.

Two APIs live here:

* :func:`quantize_4bit` keeps Neural Compressor's signature and numerics: one scale
  per row of a 2-D tensor, values snapped to the nearest table entry (ties go to
  the lower entry), ``return_int`` gives Neural Compressor's int8 bit codes.
* :func:`quantize_bnb4` / :class:`Bnb4Weight` produce the layout of ONNX Runtime's
  ``com.microsoft.MatMulBnb4`` bit-exactly (the numerics of ORT's
  ``quantize_matmul_bnb4``): the weight is taken as ``W^T: [N, K]``, flattened
  row-major and cut into blocks of ``block_size`` consecutive elements (a block
  may span two rows when ``K`` is not a multiple of ``block_size``); each block
  stores ``absmax = max|x|`` and codes ``c = table_index(x / absmax)`` (multiply by
  the float32 reciprocal, then compare with the float32 decision thresholds);
  codes are packed two per byte, the even flat index in the HIGH nibble.
  ``dequant = table[c] * absmax``.

quant_type 0 is FP4 (1 sign, 2 exponent bits with bias 3, 1 mantissa bit,
normalised by 12), quant_type 1 is NF4.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "FP4",
    "NF4",
    "NF4_TABLE",
    "FP4_TABLE",
    "FLOAT_MAPPING",
    "INT_MAPPING",
    "quantize_4bit",
    "quant_type_of",
    "quantize_bnb4",
    "dequantize_bnb4",
    "pack_bnb4",
    "unpack_bnb4",
    "Bnb4Weight",
    "quantize_weight_bnb4",
]

FP4 = 0
NF4 = 1

NF4_TABLE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)
"""NF4 value of each code 0..15 (code order = ascending value)."""

FP4_TABLE = np.array(
    [
        0.0, 5.208333333e-03, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
        -0.0, -5.208333333e-03, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25,
    ],
    dtype=np.float32,
)
"""FP4 value of each code 0..15 (bit 3 = sign; magnitudes are {0, 0.0625, 2, 3, 4, 6, 8, 12} / 12)."""

# Decision thresholds as ORT compares them (float32 literals): code = #(thresholds < x).
_NF4_THRESHOLDS = np.array(
    [
        -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
        -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
        0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
        0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
    ],
    dtype=np.float32,
)
# FP4: magnitude rank = #(thresholds < |x|), then the rank's 3-bit code; sign bit for x < 0.
_FP4_MAG_THRESHOLDS = np.array(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], dtype=np.float32
)
_FP4_MAG_CODES = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=np.uint8)

# --- Neural Compressor compatible tables -------------------------------------------------
_NC_NF4 = NF4_TABLE.astype(np.float64).tolist()
_NC_FP4_BNB = [-12.0, -8.0, -6.0, -4.0, -3.0, -2.0, -0.0625, 0, 0.0625, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
_NC_FP4_E2M1 = [-6.0, -4.0, -3.0, -2.0, -1.5, -1.0, -0.0625, 0, 0.0625, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
FLOAT_MAPPING = {"nf4": _NC_NF4, "fp4": _NC_FP4_BNB, "fp4_e2m1_bnb": _NC_FP4_BNB, "fp4_e2m1": _NC_FP4_E2M1}
"""Neural Compressor's value tables per ``data_type`` (ascending)."""
INT_MAPPING = {
    "nf4": [7, 1, 2, 3, 4, 5, 6, 0, -8, -7, -6, -5, -4, -3, -2, -1],
    "fp4": [-5, -6, -3, -4, -1, -2, -7, 0, 1, 6, 7, 4, 5, 2, 3],
    "fp4_e2m1_bnb": [-5, -6, -3, -4, -1, -2, -7, 0, 1, 6, 7, 4, 5, 2, 3],
    "fp4_e2m1": [-1, -2, -3, -4, -5, -6, -7, 0, 1, 2, 3, 4, 5, 6, 7],
}
"""Neural Compressor's int8 bit code of each table entry (what ``return_int=True`` returns)."""


def quantize_4bit(
    tensor: np.ndarray, quantile: float = 1.0, data_type: str = "nf4", return_int: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray, None]:
    """Quantize each row of ``tensor: [G, L]`` to a 4-bit float table (Neural Compressor semantics).

    ``scale[g] = max|tensor[g]| * quantile / max(table)``; every value is replaced by the
    table entry nearest to ``tensor / scale`` (a value on a midpoint goes to the lower
    entry). All-zero rows stay zero.

    Returns:
        ``return_int=False``: float32 ``[G, L]``, the quantize-dequantized tensor.
        ``return_int=True``: ``(q int8 [G, L], scale float32 [G, 1], None)`` with
        ``q`` the Neural Compressor bit codes of :data:`INT_MAPPING` (as Neural
        Compressor returns a third, empty zero-point slot).
    """
    if data_type not in FLOAT_MAPPING:
        raise ValueError(f"data_type must be one of {sorted(FLOAT_MAPPING)}, got {data_type!r}")
    data = np.asarray(tensor, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"quantize_4bit expects a 2-D tensor [G, L] (one scale per row), got shape {data.shape}")
    table = np.asarray(FLOAT_MAPPING[data_type], dtype=np.float32)
    mids = ((np.asarray(FLOAT_MAPPING[data_type][:-1]) + np.asarray(FLOAT_MAPPING[data_type][1:])) / 2).astype(
        np.float32
    )
    scale = (np.abs(data).max(axis=1) * np.float32(quantile) / np.float32(max(FLOAT_MAPPING[data_type])))[:, None]
    scale = scale.astype(np.float32)
    nonzero = scale != 0
    scaled = np.divide(data, scale, out=np.zeros_like(data), where=nonzero)
    index = np.searchsorted(mids, scaled, side="left")  # #(mids < x): x <= mid[0] -> 0, x > mid[-1] -> last
    if return_int:
        codes = np.asarray(INT_MAPPING[data_type], dtype=np.int8)[index]
        return codes, scale, None
    return table[index] * scale


def quant_type_of(data_type: str | int) -> int:
    """``"fp4"``/0 -> 0 (FP4), ``"nf4"``/1 -> 1 (NF4), as MatMulBnb4's ``quant_type``."""
    names = {"fp4": FP4, "nf4": NF4, FP4: FP4, NF4: NF4}
    key = data_type.lower() if isinstance(data_type, str) else int(data_type)
    if key not in names:
        raise ValueError(f"4-bit float type must be 'nf4' (1) or 'fp4' (0), got {data_type!r}")
    return names[key]


def _table(quant_type: int) -> np.ndarray:
    return NF4_TABLE if quant_type == NF4 else FP4_TABLE


def _codes_for_normalised(x: np.ndarray, quant_type: int) -> np.ndarray:
    """Codes of values already divided by their block absmax (float32), as ORT's decision trees."""
    if quant_type == NF4:
        return np.searchsorted(_NF4_THRESHOLDS, x, side="left").astype(np.uint8)
    rank = np.searchsorted(_FP4_MAG_THRESHOLDS, np.abs(x), side="left")
    return _FP4_MAG_CODES[rank] | np.where(x < 0, np.uint8(8), np.uint8(0))


def quantize_bnb4(flat: np.ndarray, block_size: int, quant_type: int) -> tuple[np.ndarray, np.ndarray]:
    """Blockwise absmax quantization of ``flat: [numel]``.

    Returns ``(codes uint8 [numel], absmax float32 [ceil(numel / block_size)])``; the last
    block may be partial. Numerics follow ORT's ``QuantizeBlockBnb4`` exactly.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    flat = np.asarray(flat, dtype=np.float32).reshape(-1)
    numel = flat.size
    blocks = -(-numel // block_size)
    padded = np.zeros(blocks * block_size, dtype=np.float32)
    padded[:numel] = flat
    padded = padded.reshape(blocks, block_size)
    absmax = np.abs(padded).max(axis=1)
    recip = np.divide(np.float32(1), absmax, out=np.zeros_like(absmax), where=absmax != 0)
    codes = _codes_for_normalised(padded * recip[:, None], quant_type)
    return codes.reshape(-1)[:numel], absmax


def dequantize_bnb4(codes: np.ndarray, absmax: np.ndarray, block_size: int, quant_type: int) -> np.ndarray:
    """``table[codes] * absmax[i // block_size]`` in float32, ``codes: [numel]`` -> ``[numel]``."""
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    scale = np.repeat(np.asarray(absmax, dtype=np.float32).reshape(-1), block_size)[: codes.size]
    return _table(quant_type)[codes] * scale


def pack_bnb4(codes: np.ndarray, fill: int = 0) -> np.ndarray:
    """Pack codes ``[numel]`` into ``[(numel + 1) // 2]`` bytes, even index in the high nibble.

    An odd ``numel`` leaves one low nibble, set to ``fill`` (ORT writes the code of 0.0 there).
    """
    codes = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(fill))
    pairs = codes.reshape(-1, 2)
    return (pairs[:, 0] << np.uint8(4)) | pairs[:, 1]


def unpack_bnb4(packed: np.ndarray, numel: int) -> np.ndarray:
    """Inverse of :func:`pack_bnb4`: bytes -> codes ``[numel]``."""
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    codes = np.empty((packed.size, 2), dtype=np.uint8)
    codes[:, 0] = packed >> np.uint8(4)
    codes[:, 1] = packed & np.uint8(0x0F)
    return codes.reshape(-1)[:numel]


@dataclass(frozen=True)
class Bnb4Weight:
    """A ``[K, N]`` weight in MatMulBnb4 layout.

    Attributes:
        packed: uint8 ``[(N*K + 1) // 2]``: codes of ``W^T`` flattened row-major, high nibble first.
        absmax: float32 ``[ceil(N*K / block_size)]`` (already rounded to the dtype it is stored in).
        quant_type: 0 FP4, 1 NF4.
        block_size: elements per absmax block along the flattened ``W^T``.
        k, n: the weight's shape.
    """

    packed: np.ndarray
    absmax: np.ndarray
    quant_type: int
    block_size: int
    k: int
    n: int

    def dequantize(self) -> np.ndarray:
        """float32 ``[K, N]``: the weight MatMulBnb4 computes with."""
        codes = unpack_bnb4(self.packed, self.k * self.n)
        flat = dequantize_bnb4(codes, self.absmax, self.block_size, self.quant_type)
        return np.ascontiguousarray(flat.reshape(self.n, self.k).T)


def quantize_weight_bnb4(
    weight: np.ndarray,
    quant_type: int | str = NF4,
    block_size: int = 64,
    absmax_dtype: np.dtype | type = np.float32,
) -> Bnb4Weight:
    """Quantize ``weight: [K, N]`` to MatMulBnb4 layout (bit-exact with ORT's ``quantize_matmul_bnb4``).

    ``absmax_dtype`` is the dtype absmax is stored in (the activation's dtype); codes are
    computed with the unrounded float32 absmax, as ORT does.
    """
    weight = np.asarray(weight)
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D weight [K, N], got shape {weight.shape}")
    qt = quant_type_of(quant_type)
    k, n = weight.shape
    codes, absmax = quantize_bnb4(np.ascontiguousarray(weight.T, dtype=np.float32).reshape(-1), block_size, qt)
    absmax = absmax.astype(absmax_dtype).astype(np.float32)
    zero_code = int(_codes_for_normalised(np.zeros(1, dtype=np.float32), qt)[0])
    return Bnb4Weight(pack_bnb4(codes, fill=zero_code), absmax, qt, block_size, k, n)
