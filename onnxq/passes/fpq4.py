"""Rewrite weight sites into the legacy com.microsoft MatMulFpQ4 (only when asked for).

MatMulFpQ4 runs only on hosts whose MLAS has the FpQ4 GEMM (x86-64 with AVX-512); on
other hosts ORT loads the model and fails at run time. It takes float32 activations
and 4-bit codes in blocks of 32 (symmetric -> ``blk_quant_type`` 0, asymmetric -> 1).
Use MatMulNBits unless a runtime needs this op.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.errors import OnnxqError
from onnxq.formats.matmul_fpq4 import FPQ4_BLOCK, make_matmul_fpq4_node, pack_fpq4
from onnxq.formats.matmul_nbits import MS_DOMAIN
from onnxq.passes.bnb4 import finite_weight, initializer_names, register_values, replace_site_with_node
from onnxq.passes.matmul_nbits import QuantizedNodeRecord, WeightQuantizer, _remove_unused, rtn_weight_quantizer
from onnxq.graph.sites import SkippedNode, find_weight_sites

__all__ = ["MatMulToFpQ4Pass"]

logger = logging.getLogger(__name__)


def _value(array: np.ndarray, name: str) -> ir.Value:
    tensor = ir.tensor(array, name=name)
    return ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


class MatMulToFpQ4Pass(ir.passes.InPlacePass):
    """Replace float32 MatMul / Gemm / Transpose->MatMul on constant weights with MatMulFpQ4.

    Args:
        config: node selection and ``symmetric``; ``bits`` must be 4 and ``block_size`` 32
            (the only layout the op has).
        weight_quantizer: ``(site, W [K, N], settings, scale_dtype) -> (QuantizedWeight, error)``.
    """

    def __init__(self, config: QuantConfig | None = None,
                 weight_quantizer: WeightQuantizer = rtn_weight_quantizer) -> None:
        super().__init__()
        self.config = config or QuantConfig()
        self.weight_quantizer = weight_quantizer
        self.records: list[QuantizedNodeRecord] = []
        self.skipped: list[SkippedNode] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        sites, self.skipped = find_weight_sites(model)
        taken = initializer_names(model)
        cache: dict[tuple, tuple[ir.Value, ir.Value, int, int, str, float]] = {}
        for site in sites:
            settings = self.config.settings_for(site.name)
            if settings is None:
                self.skipped.append(SkippedNode(site.name, site.node.op_type, self.config.skip_reason(site.name)))
                continue
            if site.dtype != ir.DataType.FLOAT:
                self.skipped.append(SkippedNode(site.name, site.node.op_type,
                                                f"MatMulFpQ4 needs float32 weights, got {site.dtype.name}"))
                continue
            if settings.bits != 4 or settings.block_size != FPQ4_BLOCK:
                raise OnnxqError(f"MatMulFpQ4 stores 4-bit codes in blocks of 32; node {site.name!r} asks for "
                                 f"bits={settings.bits}, block_size={settings.block_size}")
            key = (site.weight_key, settings)
            if key not in cache:
                weight = finite_weight(site)
                qweight, err = self.weight_quantizer(site, weight, settings, np.float32)
                del weight
                blob, blk_quant_type = pack_fpq4(qweight)
                prefix = site.source.name or site.name
                blob_value = _value(blob, f"{prefix}_FpQ4")
                shape_value = _value(np.array([site.k, site.n], dtype=np.int64), f"{prefix}_FpQ4_shape")
                register_values(site, [blob_value, shape_value], taken)
                cache[key] = (blob_value, shape_value, blk_quant_type, blob.nbytes, site.name, err)
            blob_value, shape_value, blk_quant_type, nbytes, first, err = cache[key]
            node = make_matmul_fpq4_node(site.node.inputs[0], blob_value, shape_value, blk_quant_type,
                                         name=f"{site.name}_FpQ4")
            replace_site_with_node(site, node, taken)
            self.records.append(QuantizedNodeRecord(
                site.name, site.kind, site.k, site.n, 4, FPQ4_BLOCK, settings.symmetric, 0,
                site.k * site.n * site.dtype.itemsize, nbytes, err, None if first == site.name else first,
            ))
        if not self.records:
            return ir.passes.PassResult(model, False)
        _remove_unused(model)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        logger.info("MatMulFpQ4: quantized %d nodes (%d unique weights), skipped %d",
                    len(self.records), len(cache), len(self.skipped))
        return ir.passes.PassResult(model, True)
