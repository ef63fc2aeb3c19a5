"""Lossless conversion between ORT's quantized ops and standard QDQ.

``to="qdq"``: MatMulNBits -> ``MatMul(A, DequantizeLinear(q [K, N], axis=0))`` (+ ``Add`` of
its bias) and GatherBlockQuantized -> ``Gather(DequantizeLinear(q [V, D], axis=1), ids)``;
a tied weight (GatherBlockQuantized reading MatMulNBits' B) becomes one DequantizeLinear
``[V, D]`` read by the Gather and, through a Transpose, by the MatMul. The default opset is
raised to 21. MatMulNBits' ``accuracy_level`` has no QDQ equivalent and is dropped.

``to="nbits"``: a constant blocked (or per-axis) DequantizeLinear feeding ``MatMul`` (axis 0),
``Transpose -> MatMul`` or ``Gemm`` (matching orientation, alpha 1) becomes MatMulNBits, and
one feeding ``Gather`` (axis 1) becomes GatherBlockQuantized sharing MatMulNBits'
initializers. Codes need 2, 4 or 8 bits and a power-of-two block >= 16; other chains
stay QDQ and are reported as skipped.

Codes, scales and zero points are carried over unchanged, so nbits -> qdq -> nbits
reproduces the original initializers byte for byte (the 2-bit width travels in the
DequantizeLinear's ``metadata_props``).
"""
from __future__ import annotations

import logging
import re

import numpy as np
import onnx_ir as ir

from onnxq.core import QuantizedWeight
from onnxq.errors import OnnxqError
from onnxq.formats import MS_DOMAIN, WeightSettings, get_format
from onnxq.formats.gather_block_quantized import make_gather_block_quantized_nodes, read_gather_block_quantized
from onnxq.formats.matmul_nbits import (
    MatMulNBitsInitializers,
    make_matmul_nbits_initializers,
    make_matmul_nbits_node,
    read_matmul_nbits,
)
from onnxq.formats.qdq import QDQWeight, make_dequantize_node, make_qdq_initializers, read_qdq_weight
from onnxq.graph.constants import add_initializer, constant_tensor
from onnxq.graph.edit import home_graph, register_values, remove_unused
from onnxq.graph.names import initializer_names, node_names, unique_name
from onnxq.graph.opset import upgrade_opset
from onnxq.graph.sites import SkippedNode
from onnxq.passes.unpack import packed_source, packed_weight_key

__all__ = ["convert_model", "NBitsToQDQPass", "QDQToNBitsPass", "CONVERSIONS"]

logger = logging.getLogger(__name__)

CONVERSIONS = ("qdq", "nbits")
_GATHER = get_format("gather")


def _stem(name: str | None, fallback: str) -> str:
    """``W_Q4`` / ``W_q4`` -> ``W``: the weight's name without a bit-width suffix."""
    return re.sub(r"_[qQ]\d$", "", name) if name else fallback


class NBitsToQDQPass(ir.passes.InPlacePass):
    """MatMulNBits / GatherBlockQuantized -> DequantizeLinear + MatMul / Gather (see module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self.converted: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes = [n for n in model.graph.all_nodes()
                 if n.domain == MS_DOMAIN and n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
        if not nodes:
            return ir.passes.PassResult(model, False)
        upgrade_opset(model)
        nodes = [n for n in model.graph.all_nodes()
                 if n.domain == MS_DOMAIN and n.op_type in ("MatMulNBits", "GatherBlockQuantized")]
        keys = {id(n): packed_weight_key(n) for n in nodes}
        gathered = {keys[id(n)] for n in nodes if n.op_type == "GatherBlockQuantized"}
        partners = {keys[id(n)]: n for n in nodes if n.op_type == "MatMulNBits"}
        taken = initializer_names(model)
        names = node_names(model)
        chains: dict[tuple, ir.Value] = {}

        def chain(node: ir.Node, transposed: bool) -> ir.Value:
            key = (keys[id(node)], transposed)
            if key not in chains:
                source = node if node.op_type == "MatMulNBits" else partners.get(keys[id(node)], node)
                if source.op_type == "MatMulNBits":
                    qweight, packed = read_matmul_nbits(source), source.inputs[1]
                else:
                    qweight, packed = read_gather_block_quantized(source), packed_source(source.inputs[0])
                scales = source.inputs[2]
                inits = make_qdq_initializers(qweight, scales.const_value.dtype, _stem(packed.name, source.name),
                                              transposed=transposed)
                graph = home_graph(packed, source)
                register_values(graph, inits.values(), taken)
                dq = make_dequantize_node(inits, name=unique_name(names, f"{_stem(packed.name, source.name)}_dq"))
                graph.insert_before(graph.node(0), dq)
                chains[key] = dq.outputs[0]
            return chains[key]

        for node in nodes:
            graph = node.graph
            base = _stem(node.name, node.op_type)  # "fc1_Q4" -> "fc1": converting back restores the name
            if node.op_type == "MatMulNBits":
                tied = keys[id(node)] in gathered
                weight = chain(node, tied)
                new_nodes = []
                if tied:
                    transpose = ir.node("Transpose", [weight], attributes={"perm": [1, 0]},
                                        name=unique_name(names, f"{base}_weight_transpose"))
                    new_nodes.append(transpose)
                    weight = transpose.outputs[0]
                new_nodes.append(ir.node("MatMul", [node.inputs[0], weight], name=unique_name(names, base)))
                bias = node.inputs[5] if len(node.inputs) > 5 else None
                if bias is not None:
                    new_nodes.append(ir.node("Add", [new_nodes[-1].outputs[0], bias],
                                             name=unique_name(names, f"{base}_bias")))
            else:
                new_nodes = [ir.node("Gather", [chain(node, True), node.inputs[1]], attributes={"axis": 0},
                                     name=unique_name(names, base))]
                partner = partners.get(keys[id(node)])
                trailing = None if partner is None else _padding_slice(node, partner.attributes["K"].as_int())
                if trailing is not None:  # the shared table has the true width: the Slice has nothing to cut
                    ir.convenience.replace_nodes_and_values(graph, node, [node, trailing], new_nodes,
                                                            [trailing.outputs[0]], [new_nodes[-1].outputs[0]])
                    self.converted.append(node.name)
                    continue
            ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]],
                                                    [new_nodes[-1].outputs[0]])
            self.converted.append(node.name)
        remove_unused(model)  # also the Reshapes that fed a shared GatherBlockQuantized
        if not any(n.domain == MS_DOMAIN for n in model.graph.all_nodes()):
            model.opset_imports.pop(MS_DOMAIN, None)
        logger.info("converted %d MatMulNBits/GatherBlockQuantized nodes to QDQ (%d DequantizeLinear)",
                    len(self.converted), len(chains))
        return ir.passes.PassResult(model, True)


def _padding_slice(gather: ir.Node, k: int) -> ir.Node | None:
    """The ``Slice(out, [0], [k], [-1])`` after a GatherBlockQuantized on a padded table, if it is the only reader."""
    out = gather.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or uses[0][1] != 0:
        return None
    sl = uses[0][0]
    if sl.op_type != "Slice" or sl.domain != "" or len(sl.inputs) < 4:
        return None
    consts = [constant_tensor(v) for v in sl.inputs[1:]]
    if any(c is None for c in consts[:3]):
        return None
    starts, ends, axes = (c.numpy().reshape(-1).tolist() for c in consts[:3])
    steps = consts[3].numpy().reshape(-1).tolist() if len(consts) > 3 and consts[3] is not None else [1]
    return sl if (starts, ends, axes, steps) == ([0], [k], [-1], [1]) else None


class QDQToNBitsPass(ir.passes.InPlacePass):
    """Constant DequantizeLinear + MatMul / Transpose->MatMul / Gemm / Gather -> MatMulNBits / GatherBlockQuantized."""

    def __init__(self, accuracy_level: int = 0) -> None:
        super().__init__()
        self.accuracy_level = accuracy_level
        self.converted: list[str] = []
        self.skipped: list[SkippedNode] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        taken = initializer_names(model)
        names = node_names(model)
        for dq in [n for n in model.graph.all_nodes() if n.op_type == "DequantizeLinear" and n.domain == ""]:
            read = read_qdq_weight(dq)
            if isinstance(read, str):
                continue
            reason = _nbits_reason(read.qweight)
            inits: MatMulNBitsInitializers | None = None
            for consumer, user, target in _weight_uses(dq, read):
                if reason is None and target == "Gather" and _GATHER.dtype_reason(read.scale_dtype) is not None:
                    self.skipped.append(SkippedNode(consumer.name, "Gather", _GATHER.dtype_reason(read.scale_dtype)))
                    continue
                if reason is not None or isinstance(user, str):
                    self.skipped.append(SkippedNode(consumer.name, consumer.op_type, reason or user))
                    continue
                if inits is None:
                    inits = make_matmul_nbits_initializers(read.qweight, read.scale_dtype,
                                                           _stem(dq.inputs[0].name, dq.name))
                    register_values(home_graph(dq.inputs[0], dq), inits.values(), taken)
                self._replace(consumer, user, target, inits, taken, names)
                self.converted.append(consumer.name)
            for transpose, _ in list(dq.outputs[0].uses()):
                orphan = not any(o.uses() or o.is_graph_output() for o in transpose.outputs)
                if transpose.op_type == "Transpose" and orphan:
                    transpose.graph.remove(transpose, safe=True)
            if not any(o.uses() or o.is_graph_output() for o in dq.outputs):
                dq.graph.remove(dq, safe=True)
        if not self.converted:
            return ir.passes.PassResult(model, False)
        remove_unused(model)
        model.opset_imports.setdefault(MS_DOMAIN, 1)
        logger.info("converted %d QDQ weight uses to MatMulNBits/GatherBlockQuantized, left %d",
                    len(self.converted), len(self.skipped))
        return ir.passes.PassResult(model, True)

    def _replace(self, consumer: ir.Node, user: dict, target: str, inits: MatMulNBitsInitializers,
                 taken: set[str], names: set[str]) -> None:
        graph = consumer.graph
        if target == "Gather":
            nodes, out = make_gather_block_quantized_nodes(
                inits, consumer.inputs[1], name=unique_name(names, f"{consumer.name}_Q{inits.bits}"),
                constant=lambda array, name: add_initializer(graph, array, name, taken),
            )
        else:
            bias = None
            add = user.get("add")
            if add is not None:
                other = add.inputs[0] if add.inputs[1] is consumer.outputs[0] else add.inputs[1]
                same = tuple(other.shape or ()) == (inits.n,) and other.dtype == inits.scales.dtype
                if other.is_initializer() and same:
                    bias = other
                else:
                    user = {**user, "bias": np.asarray(constant_tensor(other).numpy(), dtype=np.float32).reshape(-1)}
            if bias is None and user.get("bias") is not None:
                bias = add_initializer(graph, user["bias"].astype(inits.scales.dtype.numpy()),
                                       f"{consumer.name}_bias", taken, inits.scales.dtype)
            node = make_matmul_nbits_node(consumer.inputs[0], inits, accuracy_level=self.accuracy_level, bias=bias,
                                          name=unique_name(names, f"{consumer.name}_Q{inits.bits}"))
            nodes, out = [node], node.outputs[0]
            if user.get("gap"):
                axes = add_initializer(graph, np.arange(user["gap"], dtype=np.int64), f"{consumer.name}_unsqueeze_axes", taken)
                nodes.append(ir.node("Unsqueeze", [out, axes], name=unique_name(names, f"{consumer.name}_unsqueeze")))
                out = nodes[-1].outputs[0]
        old_nodes, last = [consumer], consumer
        if target != "Gather" and user.get("add") is not None:
            old_nodes.append(user["add"])
            last = user["add"]
        ir.convenience.replace_nodes_and_values(graph, consumer, old_nodes, nodes, [last.outputs[0]], [out])


def _nbits_reason(qweight: QuantizedWeight) -> str | None:
    """Why a QDQ weight cannot become MatMulNBits (the format's own limits), or None."""
    settings = WeightSettings(qweight.bits, qweight.block_size, qweight.symmetric)
    return get_format("nbits").validate(settings, qweight.k, qweight.n)


def _weight_uses(dq: ir.Node, read: QDQWeight) -> list[tuple[ir.Node, dict | str, str]]:
    """``(consumer, details or reason, target op)`` for each node reading the DequantizeLinear as a weight."""
    out = dq.outputs[0]
    uses = []
    for consumer, index in list(out.uses()):
        if consumer.op_type == "Transpose" and consumer.domain == "" and index == 0:
            perm = consumer.attributes.get("perm")
            if read.transposed and read.leading_ones == 0 and (perm is None or list(perm.as_ints()) == [1, 0]):
                for mm, mm_index in list(consumer.outputs[0].uses()):
                    uses.append((mm, *_matmul_use(mm, mm_index, 0, read.qweight.n)))
            continue
        if consumer.op_type == "Gather" and consumer.domain == "" and index == 0:
            axis = consumer.attributes["axis"].as_int() if consumer.attributes.get("axis") is not None else 0
            ok = read.transposed and read.leading_ones == 0 and axis in (0, -2)
            uses.append((consumer, {} if ok else "Gather needs a [V, D] table quantized along D (axis=1)", "Gather"))
        elif consumer.op_type in ("MatMul", "Gemm") and consumer.domain == "":
            if consumer.op_type == "Gemm":
                uses.append((consumer, *_gemm_use(consumer, index, read)))
            elif read.transposed:
                uses.append((consumer, "MatMul reads q [N, K] without a Transpose", "MatMulNBits"))
            else:
                uses.append((consumer, *_matmul_use(consumer, index, read.leading_ones, read.qweight.n)))
    return uses


def _matmul_use(mm: ir.Node, index: int, leading_ones: int, n: int) -> tuple[dict | str, str]:
    if mm.op_type != "MatMul" or mm.domain != "" or index != 1:
        return f"{mm.op_type} input {index} is not a MatMul weight", "MatMulNBits"
    rank_a = None if mm.inputs[0].shape is None else len(mm.inputs[0].shape)
    if leading_ones and rank_a is None:
        return "B has leading size-1 axes and A's rank is unknown", "MatMulNBits"
    gap = max(0, leading_ones + 2 - rank_a) if leading_ones else 0
    details: dict = {"gap": gap}
    add = _bias_add(mm, n) if not gap else None
    if add is not None:
        details["add"] = add
    return details, "MatMulNBits"


def _bias_add(mm: ir.Node, n: int) -> ir.Node | None:
    """The ``Add(MatMul, b)`` (``b`` a constant ``[N]``) to fold into MatMulNBits' bias when it alone reads the MatMul."""
    out = mm.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    add, index = uses[0]
    if add.op_type != "Add" or add.domain != "" or len(add.inputs) != 2:
        return None
    other = add.inputs[1 - index]
    bias = constant_tensor(other)
    if bias is None or tuple(bias.shape) != (n,) or None not in (other.dtype, out.dtype) and other.dtype != out.dtype:
        return None
    return add


def _gemm_use(gemm: ir.Node, index: int, read: QDQWeight) -> tuple[dict | str, str]:
    attrs = gemm.attributes
    get = lambda name, default: attrs[name].value if attrs.get(name) is not None else default  # noqa: E731
    if index != 1 or get("transA", 0) != 0:
        return "Gemm with the weight as A or transA=1", "MatMulNBits"
    if bool(get("transB", 0)) != read.transposed:
        return "Gemm transB does not match the DequantizeLinear axis", "MatMulNBits"
    if get("alpha", 1.0) != 1.0:
        return "Gemm alpha != 1 (folding it would change the scales)", "MatMulNBits"
    bias = None
    if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
        c = constant_tensor(gemm.inputs[2])
        if c is None or c.size != read.qweight.n:
            return "Gemm C is not a constant of N elements", "MatMulNBits"
        bias = np.asarray(c.numpy(), dtype=np.float32).reshape(-1) * np.float32(get("beta", 1.0))
    return {"bias": bias}, "MatMulNBits"


def convert_model(model: ir.Model, to: str, *, accuracy_level: int = 0) -> ir.Model:
    """Convert ``model`` in place between MatMulNBits/GatherBlockQuantized (``"nbits"``) and QDQ (``"qdq"``).

    Raises:
        OnnxqError: unknown target, nothing to convert, or an opset upgrade that fails.
    """
    if to not in CONVERSIONS:
        raise OnnxqError(f"convert target must be one of {CONVERSIONS}, got {to!r}")
    conversion = NBitsToQDQPass() if to == "qdq" else QDQToNBitsPass(accuracy_level)
    if not conversion(model).modified:
        found = "MatMulNBits/GatherBlockQuantized nodes" if to == "qdq" else "constant DequantizeLinear weights"
        skipped = getattr(conversion, "skipped", [])
        detail = f" (left: {'; '.join(f'{s.name}: {s.reason}' for s in skipped[:5])})" if skipped else ""
        raise OnnxqError(f"nothing to convert to {to}: no {found} found{detail}")
    return model
