"""The per-node summary printed after quantization and by ``inspect``."""
from __future__ import annotations

from typing import Sequence

from onnxq.passes import QuantizedNodeRecord, SkippedNode

__all__ = ["format_table", "format_records", "format_skipped", "summary_line"]


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


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:.2f} MB" if nbytes >= 1e5 else f"{nbytes / 1e3:.1f} kB"


def format_records(records: Sequence[QuantizedNodeRecord]) -> str:
    """One row per quantized node: node, K x N, bits, block, sym/asym, acc level, bytes, error."""
    rows = [
        (
            r.name, r.kind, f"{r.k}x{r.n}", r.bits, r.block_size, "sym" if r.symmetric else "asym",
            r.accuracy_level, _mb(r.bytes_before),
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


def summary_line(records: Sequence[QuantizedNodeRecord], skipped: Sequence[SkippedNode]) -> str:
    """Totals: nodes, unique weights, bytes before/after, worst relative error."""
    unique = [r for r in records if r.shared_with is None]
    before = sum(r.bytes_before for r in unique)
    after = sum(r.bytes_after for r in unique)
    worst = max((r.relative_error for r in records), default=0.0)
    levels = sorted({r.accuracy_level for r in records})
    return (
        f"quantized {len(records)} nodes ({len(unique)} unique weights), left {len(skipped)} in float; "
        f"weights {_mb(before)} -> {_mb(after)} ({after / before:.1%}); "
        f"worst relative weight error {worst:.4f}; accuracy_level {','.join(map(str, levels))}"
    )
