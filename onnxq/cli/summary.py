"""``python -m onnxq summary MODEL.onnx``: the quantized nodes of a model and their formats, read from its graph."""
from __future__ import annotations

import argparse
from pathlib import Path

from onnxq.cli.common import model_input
from onnxq.report import print_quant_summary

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``summary`` command to ``subparsers``; returns its parser."""
    sm = subparsers.add_parser("summary", help="list the quantized nodes of a model and their formats")
    sm.add_argument("model", type=Path, help="a model, or a model folder (ONNX Runtime GenAI, Optimum)")
    return sm


def run(args: argparse.Namespace) -> int:
    """Print the table of :func:`onnxq.report.print_quant_summary` for ``args.model``."""
    print_quant_summary(model_input(args.model)[0])
    return 0
