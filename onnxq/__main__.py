"""``python -m onnxq``: a Ctrl-C while the CLI is still importing ends with one line, not a traceback."""
import signal
import sys


def run() -> int:
    """Import the CLI and run it; exit code 130 when interrupted before the command's own handler runs
    (during the imports).

    Once the command has returned, its output is complete and its temp files are gone: a signal
    during the interpreter's shutdown is then ignored rather than reported as a traceback.
    """
    try:
        from onnxq.cli import main

        code = main()
    except KeyboardInterrupt:
        print("onnxq: interrupted; nothing was written", file=sys.stderr)
        return 130
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    return code


if __name__ == "__main__":
    sys.exit(run())
