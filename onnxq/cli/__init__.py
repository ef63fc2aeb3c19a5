"""``python -m onnxq``: the command-line converter.

One module per subcommand (``add_parser(subparsers)`` and ``run(args) -> int``),
shared pieces in :mod:`onnxq.cli.common`, and one error handler, in :func:`main`:
every user error (bad file, bad setting, nothing to quantize, a failed read or
write) is printed as one line ``onnxq: error: ...`` on stderr with exit code 2.

The subcommand modules are all imported to build the parser, so at module level
they import only what the parser needs and what ``import onnxq`` loads anyway; the
rest of a command's dependencies (onnxruntime through :mod:`onnxq.eval`, tqdm, the
convert and unpack passes, onnxruntime.quantization for SmoothQuant) are imported
when that command runs.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from onnxq.cli import convert, eval, inspect, quantize, summary, unpack
from onnxq.cli.common import EXIT_USAGE, Parser
from onnxq.errors import OnnxqError

__all__ = ["main", "build_parser"]

# in the order `--help` lists them
_COMMANDS = {"quantize": quantize, "convert": convert, "eval": eval, "summary": summary, "unpack": unpack,
             "inspect": inspect}

_EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; ``args.command`` names the one given."""
    parser = Parser(prog="python -m onnxq", description="Weight-only quantization of ONNX models for ONNX Runtime.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in _COMMANDS.values():
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0, 2 for a user error, 130 when interrupted)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return _COMMANDS[args.command].run(args)
    except OnnxqError as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error(_os_error_message(exc))
    except KeyboardInterrupt:
        print("onnxq: interrupted; nothing was written", file=sys.stderr)
        return _EXIT_INTERRUPTED


def _error(message: str) -> int:
    print(f"onnxq: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _os_error_message(exc: OSError) -> str:
    """``cannot read/write PATH: reason``; just the reason when the error names no file."""
    reason = exc.strerror or str(exc)
    if exc.filename is None:
        return reason
    path = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
    return f"cannot read/write {path}: {reason}"
