"""``python -m onnxq convert IN.onnx OUT.onnx --to qdq|nbits``: MatMulNBits <-> QDQ, bit-exact."""
from __future__ import annotations

import argparse
from pathlib import Path

from onnxq.api import save
from onnxq.cli.common import check_output
from onnxq.io import external_data_files, load_model

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``convert`` command to ``subparsers``; returns its parser."""
    c = subparsers.add_parser("convert", help="convert between MatMulNBits and QDQ (bit-exact)")
    c.add_argument("input", type=Path)
    c.add_argument("output", type=Path)
    c.add_argument("--to", choices=("qdq", "nbits"), required=True)
    c.add_argument("--accuracy-level", type=int, default=0, help="for --to nbits (default 0)")
    return c


def run(args: argparse.Namespace) -> int:
    """Convert ``args.input`` to the format ``args.to`` and write ``args.output``."""
    from onnxq.passes.convert import convert_model  # imported when the command runs, not to build the parser

    model = load_model(args.input)
    check_output(args.input, args.output, external_data_files(model))
    model = convert_model(model, args.to, accuracy_level=args.accuracy_level)
    save(model, args.output)
    print(f"wrote {args.output}")
    return 0
