"""Plain-text reports on quantized models: one table builder for all of them.

Two sources, one format (:func:`format_table`):

* the records a quantization run leaves (``onnxq.api.records_of``): one row per
  quantized node (:func:`format_records`), one per node left in float
  (:func:`format_skipped`) and the totals (:func:`summary_line`), printed after
  ``quantize`` and by ``inspect``;
* the graph of any quantized model, whether onnxq produced it in this process or it
  was loaded from disk (ModelOpt's ``print_quant_summary`` idea): every node of a
  registered format (MatMulNBits, MatMulBnb4, MatMulFpQ4, GatherBlockQuantized, constant
  blocked DequantizeLinear), described by that format (:func:`quant_summary`,
  :func:`print_quant_summary`).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence, TextIO

import onnx
import onnx_ir as ir

from onnxq.formats import format_of_node
from onnxq.formats.base import int_attributes
from onnxq.io import load_model

if TYPE_CHECKING:  # only read by attribute here: no run-time import of the passes
    from onnxq.passes import QuantizedNodeRecord, SkippedNode

__all__ = [
    "QuantizedNodeInfo",
    "format_records",
    "format_skipped",
    "format_table",
    "print_quant_summary",
    "quant_summary",
    "model_weight_bytes",
    "summary_line",
]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned numbers and left-aligned text."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    out = [line(cells[0]), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells[1:])
    return "\n".join(out)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


# -- records of a quantization run ----------------------------------------------------

def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def format_records(records: Sequence[QuantizedNodeRecord]) -> str:
    """One row per quantized node: node, K x N, bits, block, sym/asym, acc level, bytes, error."""
    rows = [
        (
            r.name, r.kind, f"{r.k}x{r.n}", r.bits, r.block_size, "sym" if r.symmetric else "asym",
            "-" if r.accuracy_level is None else r.accuracy_level, _mb(r.bytes_before),
            f"shared with {r.shared_with}" if r.shared_with else _mb(r.bytes_after),
            r.relative_error,
        )
        for r in records
    ]
    headers = ("node", "op", "K x N", "bits", "block", "scheme", "acc_lvl", "before", "after", "rel_err")
    return format_table(headers, rows)


def format_skipped(skipped: Sequence[SkippedNode]) -> str:
    """One row per node left in float, with the reason."""
    return format_table(("node", "op", "left in float because"), [(s.name, s.op_type, s.reason) for s in skipped])


def model_weight_bytes(model: ir.Model) -> int:
    """Bytes of every initializer the model holds (all graphs; external data counted, not read)."""
    return sum(value.const_value.nbytes for graph in model.graphs() for value in graph.initializers.values()
               if value.const_value is not None)


def summary_line(records: Sequence[QuantizedNodeRecord], skipped: Sequence[SkippedNode],
                 model_bytes: tuple[int, int] | None = None) -> str:
    """Totals: nodes, unique weights, bytes before/after, worst relative error.

    ``model_bytes``: ``(before, after)`` bytes of every weight the input and the output model hold
    (:func:`model_weight_bytes`), so tables and weights left in float are counted too.
    """
    unique = [r for r in records if r.shared_with is None]
    before = sum(r.bytes_before for r in unique)
    after = sum(r.bytes_after for r in unique)
    worst = max((r.relative_error for r in records), default=0.0)
    levels = sorted({r.accuracy_level for r in records if r.accuracy_level is not None})
    whole = ""
    if model_bytes is not None:
        whole = f"; all weights in the model {_mb(model_bytes[0])} -> {_mb(model_bytes[1])} " \
                f"({model_bytes[1] / max(model_bytes[0], 1):.1%})"
    return (
        f"quantized {len(records)} nodes ({len(unique)} unique weights), left {len(skipped)} in float; "
        f"quantized weights {_mb(before)} -> {_mb(after)} ({after / before:.1%}){whole}; "
        f"worst relative weight error {worst:.4f}; accuracy_level {','.join(map(str, levels)) or '-'}"
    )


# -- the quantized nodes of a model graph ---------------------------------------------

@dataclass(frozen=True)
class QuantizedNodeInfo:
    """One quantized node of a model."""

    name: str
    op_type: str
    shape: str  # "K x N" for matmuls, "rows x cols" for embeddings / DQ weights
    data_format: str  # e.g. "int4 block 32 asym", "nf4 block 64"
    accuracy_level: int | None
    stored_bytes: int


def _const_bytes(node: ir.Node) -> int:
    return sum(v.const_value.nbytes for v in node.inputs if v is not None and v.const_value is not None)


def _info(node: ir.Node) -> QuantizedNodeInfo | None:
    """The node as its format describes it, or None when no registered format writes it."""
    fmt = format_of_node(node)
    described = None if fmt is None else fmt.describe_node(node)
    if described is None:
        return None
    accuracy_level = int_attributes(node).get("accuracy_level", 0) if fmt.uses_accuracy_level else None
    return QuantizedNodeInfo(node.name, node.op_type, *described, accuracy_level, _const_bytes(node))


def quant_summary(model: ir.Model | onnx.ModelProto | str | os.PathLike) -> list[QuantizedNodeInfo]:
    """Every quantized node of ``model`` (subgraphs included), in graph order."""
    ir_model = load_model(model)
    return [info for node in ir_model.graph.all_nodes() if (info := _info(node)) is not None]


def print_quant_summary(model: ir.Model | onnx.ModelProto | str | os.PathLike, file: TextIO | None = None) -> None:
    """Write a table of the quantized nodes of ``model`` and totals to ``file`` (default stdout)."""
    out = file or sys.stdout
    infos = quant_summary(model)
    rows = [(i.name, i.op_type, i.shape, i.data_format, "-" if i.accuracy_level is None else i.accuracy_level,
             i.stored_bytes) for i in infos]
    out.write(format_table(("node", "op", "shape", "format", "acc_lvl", "stored bytes"), rows) + "\n")
    per_op: dict[str, int] = {}
    for info in infos:
        per_op[info.op_type] = per_op.get(info.op_type, 0) + 1
    counts = ", ".join(f"{count} {op}" for op, count in per_op.items()) or "no quantized nodes"
    out.write(f"{counts}\n")
