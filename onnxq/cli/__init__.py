"""``python -m onnxq``: the command-line converter.

One module per subcommand (``add_parser(subparsers)`` and ``run(args) -> int``),
shared pieces in :mod:`onnxq.cli.common`, and one error handler, in :func:`main`:
every user error (bad file, bad setting, nothing to quantize, a failed read or
write) is printed as one line ``onnxq: error: ...`` on stderr with exit code 2. SIGINT,
SIGTERM and SIGHUP stop a run the same way: temp files are removed (the writers' ``finally``
blocks run), one line says whether the output was written, and the exit code is 128 + the signal.

The subcommand modules are all imported to build the parser, so at module level
they import only what the parser needs and what ``import onnxq`` loads anyway; the
rest of a command's dependencies (onnxruntime through :mod:`onnxq.eval`, tqdm, the
convert and unpack passes, onnxruntime.quantization for SmoothQuant) are imported
when that command runs.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from onnxq.deferred_imports import defer_sympy

defer_sympy()  # before the subcommands import onnx_ir, which imports sympy (0.5 s) that no command uses

from onnxq.cli import convert, eval, generate, inspect, quantize, summary, unpack  # noqa: E402
from onnxq.cli.common import EXIT_USAGE, Parser  # noqa: E402
from onnxq.errors import OnnxqError  # noqa: E402

__all__ = ["Interrupted", "main", "build_parser"]

# in the order `--help` lists them
_COMMANDS = {"quantize": quantize, "convert": convert, "eval": eval, "generate": generate, "summary": summary,
             "unpack": unpack, "inspect": inspect}

def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; ``args.command`` names the one given."""
    parser = Parser(prog="python -m onnxq", description="Weight-only quantization of ONNX models for ONNX Runtime.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in _COMMANDS.values():
        module.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0, 2 for a user error, 128 + the signal when interrupted).

    SIGTERM and SIGHUP are handled like SIGINT (Ctrl-C): the run stops, its temp files are removed,
    and one line says what is on disk.
    """
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    output = getattr(args, "output", None)  # the written path of quantize / convert / unpack
    output = output if isinstance(output, Path) else None  # (eval's --output names a model output)
    before = _identity(output)
    with _signals_interrupt():
        try:
            return _COMMANDS[args.command].run(args)
        except OnnxqError as exc:
            return _error(str(exc))
        except OSError as exc:
            return _error(_os_error_message(exc))
        except KeyboardInterrupt as exc:
            signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
            print(f"onnxq: {_interrupted(signum, output, before)}{_checkpoint_note(args)}", file=sys.stderr)
            return 128 + signum


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that cleanup runs as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`Interrupted` while the block runs (unless ignored, as under nohup)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
                previous[sig] = signal.signal(sig, _raise_interrupted)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _identity(path: Path | None) -> tuple[int, int] | None:
    """``(inode, mtime)`` of ``path``, None when absent: a changed identity means a new, complete output."""
    try:
        stat = path.stat() if path is not None else None
    except OSError:
        return None
    return None if stat is None else (stat.st_ino, stat.st_mtime_ns)


def _interrupted(signum: int, output: Path | None, before: tuple[int, int] | None) -> str:
    """What an interrupted run left: outputs are renamed into place whole, so a new one is complete."""
    how = "interrupted" if signum == signal.SIGINT else f"interrupted by {signal.Signals(signum).name}"
    after = _identity(output)
    if after is not None and after != before:
        return f"{how} after {output} was written; it is complete"
    if after is not None:
        return f"{how}; nothing was written ({output} is as it was)"
    return f"{how}; nothing was written"


def _checkpoint_note(args: argparse.Namespace) -> str:
    """``; K of N blocks are saved in DIR: ...`` when the run had a ``--checkpoint`` with finished blocks."""
    directory = getattr(args, "checkpoint", None)
    if directory is None:
        return ""
    from onnxq.calibration.checkpoint import saved_blocks

    saved = saved_blocks(directory)
    if saved is None:
        return ""
    done, total = saved
    return f"; {done} of {total} calibration blocks are saved in {directory}: the same command resumes there"


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
