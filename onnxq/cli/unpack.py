"""``python -m onnxq unpack QUANT.onnx OUT.onnx``: quantized weights back to float MatMul/Gather."""
from __future__ import annotations

import argparse
from pathlib import Path

from onnxq.api import save
from onnxq.cli.common import check_output
from onnxq.io import external_data_files, load_model

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``unpack`` command to ``subparsers``; returns its parser."""
    u = subparsers.add_parser("unpack", help="dequantize quantized weights back to float MatMul/Gather")
    u.add_argument("input", type=Path)
    u.add_argument("output", type=Path)
    return u


def run(args: argparse.Namespace) -> int:
    """Dequantize ``args.input`` and write the float model to ``args.output``."""
    from onnxq.passes.unpack import unpack_model  # imported when the command runs, not to build the parser

    model = load_model(args.input)
    check_output(args.input, args.output, external_data_files(model))
    model = unpack_model(model)
    save(model, args.output)
    print(f"wrote {args.output}")
    return 0
