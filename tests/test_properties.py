"""Property tests (hypothesis): bit packing and the quantizer's invariants, for every bit width and format.

* ``pack_bits`` / ``unpack_bits`` (and the zero-point packers) round-trip any codes of 2, 4 or 8
  bits, any length (padding filled as asked), in the documented LSB-first layout;
* ``quantize_weight`` for bits 2..8, sym and asym, odd K and any block size: codes and zero points
  in range, every element within one scale step of its block's grid, exact zeros stay exactly
  zero, a symmetric block's largest magnitude is exact;
* every registered format (``onnxq.formats.registered_formats``) packs a quantized weight, builds
  its node and reads back exactly the weight it packed, in exactly ``Format.stored_bytes`` bytes;
  NF4/FP4 weights stay within half a codebook gap of the block's absmax.

Examples are derandomized and bounded, so the module runs in seconds and the same way each time.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onnxq.core import pack_bits, pack_zero_points, quantize_weight, unpack_bits, unpack_zero_points
from onnxq.core.nf4 import FLOAT_MAPPING
from onnxq.formats import WeightLayout, WeightSettings, registered_formats
from onnxq.graph.constants import constant_value

PROFILE = settings(max_examples=40, deadline=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
KINDS = ("normal", "uniform", "outliers", "constant", "zeros", "sparse")


def _weight(kind: str, k: int, n: int, seed: int) -> np.ndarray:
    """A float32 ``[k, n]`` weight of one of :data:`KINDS` (seeded)."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        w = rng.standard_normal((k, n)) * 0.05
    elif kind == "uniform":
        w = rng.uniform(-1, 1, (k, n))
    elif kind == "outliers":
        w = rng.standard_normal((k, n)) * 0.02
        w[rng.integers(0, k, max(1, k // 50)), rng.integers(0, n)] = 3.0
    elif kind == "constant":
        w = np.full((k, n), rng.uniform(-2, 2))
    elif kind == "zeros":
        w = np.zeros((k, n))
    else:  # mostly exact zeros
        w = rng.standard_normal((k, n)) * (rng.random((k, n)) < 0.2)
    return w.astype(np.float32)


weights = st.builds(_weight, st.sampled_from(KINDS), st.integers(1, 300), st.integers(1, 6), st.integers(0, 2**16))


# -- packing ------------------------------------------------------------------------------------------

@PROFILE
@given(bits=st.sampled_from((2, 4, 8)), lead=st.lists(st.integers(1, 3), max_size=2), length=st.integers(1, 70),
       seed=st.integers(0, 2**16), data=st.data())
def test_pack_unpack_round_trip(bits, lead, length, seed, data):
    codes = np.random.default_rng(seed).integers(0, 1 << bits, (*lead, length)).astype(np.uint8)
    fill = data.draw(st.integers(0, (1 << bits) - 1))
    packed = pack_bits(codes, bits, fill=fill)
    per_byte = 8 // bits
    assert packed.dtype == np.uint8 and packed.shape == (*lead, -(-length // per_byte))
    np.testing.assert_array_equal(unpack_bits(packed, bits, length), codes)
    padded = unpack_bits(packed, bits, packed.shape[-1] * per_byte)
    assert np.all(padded[..., length:] == fill)
    j = data.draw(st.integers(0, length - 1))  # element j: bits (j % per_byte) * bits.. of byte j // per_byte
    np.testing.assert_array_equal((packed[..., j // per_byte] >> ((j % per_byte) * bits)) & ((1 << bits) - 1),
                                  codes[..., j])


@PROFILE
@given(bits=st.sampled_from((2, 4, 8)), n=st.integers(1, 5), k_blocks=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_zero_points_round_trip(bits, n, k_blocks, seed):
    zps = np.random.default_rng(seed).integers(0, 1 << bits, (n, k_blocks)).astype(np.uint8)
    packed = pack_zero_points(zps, bits)
    assert packed.shape == (n, -(-k_blocks * bits // 8))
    np.testing.assert_array_equal(unpack_zero_points(packed, bits, k_blocks), zps)
    tail = unpack_bits(packed, bits, packed.shape[-1] * (8 // bits))[:, k_blocks:]
    assert np.all(tail == 1 << (bits - 1))  # ORT's default zero point in unused slots


# -- the quantizer ------------------------------------------------------------------------------------

@PROFILE
@given(w=weights, bits=st.integers(2, 8), block=st.sampled_from((-1, 1, 7, 16, 32, 64, 128, 500)),
       symmetric=st.booleans())
def test_quantize_invariants(w, bits, block, symmetric):
    k, n = w.shape
    q = quantize_weight(w, bits, block, symmetric)
    bs = k if block == -1 else block
    k_blocks = -(-k // bs)
    qmax = (1 << bits) - 1
    assert q.codes.shape == (n, k_blocks, bs) and q.codes.dtype == np.uint8 and q.codes.max() <= qmax
    assert q.scales.shape == (n, k_blocks) and q.k == k
    assert (q.zero_points is None) == symmetric
    if not symmetric:
        assert q.zero_points.shape == (n, k_blocks) and q.zero_points.max() <= qmax
    restored = q.dequantize()
    assert restored.shape == (k, n) and restored.dtype == np.float32
    # every element within one step of its block's grid (the ends may clip by up to one step)
    step = np.repeat(np.abs(q.scales).T, bs, axis=0)[:k]  # [K, N]
    assert np.all(np.abs(restored - w) <= step * (1 + 1e-5) + 1e-7)
    assert np.all(restored[w == 0] == 0)  # 0 is always on the grid
    if symmetric:  # full range: each block's largest-magnitude value maps to code 0 exactly
        padded = np.zeros((k_blocks * bs, n), np.float32)
        padded[:k] = w
        blocks = padded.reshape(k_blocks, bs, n)
        restored_padded = np.zeros_like(padded)
        restored_padded[:k] = restored
        rblocks = restored_padded.reshape(k_blocks, bs, n)
        vmin, vmax = blocks.min(axis=1), blocks.max(axis=1)
        extreme = np.where(np.abs(vmax) > np.abs(vmin), vmax, vmin)  # [k_blocks, N], ties: the minimum
        at = np.argmax(blocks == extreme[:, None, :], axis=1)
        picked = np.take_along_axis(rblocks, at[:, None, :], axis=1)[:, 0, :]
        real = (np.arange(k_blocks)[:, None] * bs + at) < k  # the extreme may be a padded zero
        np.testing.assert_array_equal(picked[real], extreme[real])


# -- every format: pack, build, read back -------------------------------------------------------------

BLOCKS = (-1, 16, 24, 32, 64, 128, 256, 512, 1024)


def _codebook_error(quant_type: str) -> float:
    """The largest distance from a point of [-1, 1] to the nearest NF4/FP4 code (absmax units)."""
    table = np.sort(np.asarray(FLOAT_MAPPING[quant_type], dtype=np.float64))
    return float(max(np.max(np.diff(table)) / 2, 1 - table[-1], table[0] + 1))


@pytest.mark.parametrize("fmt", registered_formats(), ids=lambda f: f.name)
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(w=weights, data=st.data())
def test_format_reads_back_what_it_packed(fmt, w, data):
    from onnxq.core.nf4 import quant_type_of

    k, n = w.shape
    bits = data.draw(st.sampled_from(fmt.bits), label="bits")
    symmetric = data.draw(st.booleans(), label="symmetric")
    quant_type = data.draw(st.sampled_from(("nf4", "fp4")), label="quant_type")
    dtype = data.draw(st.sampled_from(fmt.dtypes), label="dtype")
    candidates = [WeightSettings(bits, fmt.resolve_block_size(b, k), symmetric, quant_type=quant_type)
                  for b in BLOCKS]
    runnable = [s for s in candidates if s.block_size is not None and fmt.validate(s, k, n) is None]
    assert runnable, f"{fmt.name}: no candidate block size runs with {bits} bits"
    chosen = data.draw(st.sampled_from(runnable), label="settings")
    if fmt.int_codes:
        payload = quantize_weight(w, bits, chosen.block_size, symmetric, scale_dtype=dtype.numpy())
    else:
        payload = fmt.quantize(w, chosen, dtype)
    packed = fmt.pack(payload, chosen, dtype, "w", WeightLayout())
    assert packed.nbytes == fmt.stored_bytes(k, n, chosen, dtype)
    activation = None if fmt.replaces == "weight" else ir.val("ids" if fmt.sites == "gather" else "x")
    constants: list[ir.Value] = []

    def constant(array: np.ndarray, name: str) -> ir.Value:
        constants.append(constant_value(array, name))
        return constants[-1]

    nodes, output = fmt.make_nodes(activation, packed, chosen, name="node", bias=None, constant=constant)
    ir.Graph([] if activation is None else [activation], [output], nodes=nodes,
             initializers=[*packed.values(), *constants], opset_imports={"": 21})  # readers want initializers
    (node,) = [node for node in nodes if node.op_type == fmt.op_type]
    read = fmt.read(node).dequantize()
    # GatherBlockQuantized's data holds whole blocks (a Slice after it drops the padding): [K padded, N]
    assert read.shape == ((-(-k // chosen.block_size) * chosen.block_size) if fmt.sites == "gather" else k, n)
    np.testing.assert_array_equal(read[:k], payload.dequantize())
    if not fmt.int_codes:  # NF4 / FP4: within half a codebook gap of each block's absmax
        absmax = np.repeat(payload.absmax, chosen.block_size)[: k * n].reshape(n, k).T
        bound = absmax * _codebook_error(quant_type) * (1 + 2e-3) + 1e-7  # absmax rounded to fp16 at worst
        assert payload.quant_type == quant_type_of(quant_type)
        assert np.all(np.abs(read - w) <= bound)
