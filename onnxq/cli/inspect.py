"""``python -m onnxq inspect MODEL.onnx [settings]``: what would be quantized, and why other nodes would not."""
from __future__ import annotations

import argparse
from pathlib import Path

from onnxq.api import inspect_model, why_nothing_to_quantize
from onnxq.cli.common import add_settings, config_from, model_input
from onnxq.io import load_model
from onnxq.report import format_skipped, format_table

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``inspect`` command to ``subparsers``; returns its parser."""
    i = subparsers.add_parser("inspect", help="show what would be quantized and why nodes would be skipped")
    i.add_argument("model", type=Path, help="a model, or a model folder (ONNX Runtime GenAI, Optimum)")
    add_settings(i)
    return i


def run(args: argparse.Namespace) -> int:
    """Print the nodes the settings would quantize, those left in float with the reason, and the totals."""
    model_file, _, defaults = model_input(args.model)
    config = config_from(args, defaults)
    model = load_model(model_file)  # read once: the plan and, when nothing is planned, the reason
    planned, skipped = inspect_model(model, config)
    if planned:
        print(format_table(("node", "op", "K", "N", "would become"), planned))
    else:
        print("nothing would be quantized" + ("" if skipped else why_nothing_to_quantize(model, [])))
    if skipped:
        print()
        print(format_skipped(skipped))
    print()
    print(f"{len(planned)} nodes would be quantized, {len(skipped)} left in float (accuracy_level {config.accuracy_level})")
    return 0
