"""Writing outputs so that nothing is lost or half-written: a lock per output, a temp folder, one commit.

Every writer of a model (``onnxq.io.save_model``, model folders, SmoothQuant) goes the same way:

1. :func:`output_lock` holds ``OUT.onnxq-lock`` beside the output (an ``flock``; the file holds
   the writer's pid): a second writer of the same output fails at once with
   ``OUT is being written by pid N``. The kernel drops the lock when its process dies, so a
   lock file left by a killed run is simply taken over.
2. :func:`temp_folder` makes ``OUT.onnxq-tmp-<pid>-<random>/`` beside the output (same file
   system, so the final renames are atomic) and first removes stale ones: folders of that
   pattern, in that folder, whose pid is no longer running.
3. :func:`commit` renames the written files into place, model last, with SIGINT/SIGTERM/SIGHUP
   held until it is done, and undoes every rename if one fails: a model and its external-data
   file appear together, or the previous ones stay.

Filesystem errors become :class:`~onnxq.errors.OnnxqError` ``cannot write OUT: <reason>``
(:func:`write_error`), which the CLI prints as one line.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from onnxq.errors import OnnxqError

try:
    import fcntl
except ImportError:  # Windows: no flock, outputs are written without the lock
    fcntl = None

__all__ = ["LOCK_SUFFIX", "TEMP_MARK", "HELD_SIGNALS", "commit", "output_lock", "remove_stale_temp_folders",
           "temp_folder", "write_error"]

TEMP_MARK = ".onnxq-tmp-"
"""Temp folders are named ``OUT + TEMP_MARK + "<pid>-<random>"``."""
LOCK_SUFFIX = ".onnxq-lock"
HELD_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

_SHORT_WRITE = re.compile(r"(\d+) requested and \d+ written")
_TEMP_PATTERN = re.compile(rf"^.+{re.escape(TEMP_MARK)}(\d+)-[^/]+$")
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
_held_locks: dict[Path, int] = {}  # lock path -> depth: a process may lock an output it already holds
_held_guard = threading.Lock()


def write_error(path: str | os.PathLike, exc: OSError) -> OnnxqError:
    """``cannot write PATH: <reason>`` for ``exc`` raised while writing ``path``.

    A short write without an errno (numpy's ``N requested and M written``) when the disk has
    less than N bytes free reads as ``No space left on device``. Call it before the temp files
    are removed (they hold the space).
    """
    reason = exc.strerror or str(exc)
    short = _SHORT_WRITE.search(str(exc)) if exc.errno is None else None
    if short is not None:
        try:
            full = shutil.disk_usage(_folder(Path(path))).free < int(short.group(1))
        except OSError:
            full = False
        if full:
            reason = os.strerror(errno.ENOSPC)
    return OnnxqError(f"cannot write {path}: {reason}")


def _folder(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _pid_running(pid: int) -> bool:
    if os.name == "nt":  # os.kill would terminate it: never take a Windows temp folder for stale
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temp_folders(folder: str | os.PathLike) -> list[Path]:
    """Remove ``*.onnxq-tmp-<pid>-*`` entries of ``folder`` whose pid is not running; returns them."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_PATTERN.match(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or _pid_running(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextmanager
def temp_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A new empty folder ``OUT.onnxq-tmp-<pid>-<random>`` beside ``path`` (stale ones removed first),
    removed with its contents when the block ends, however it ends.

    Raises:
        OnnxqError: the folder cannot be created (``cannot write PATH: <reason>``).
    """
    path = Path(path)
    remove_stale_temp_folders(_folder(path))
    tmp = None
    try:
        with _signals_held():  # a signal between mkdir and the assignment would leave it behind
            try:
                tmp = Path(tempfile.mkdtemp(prefix=f"{path.name}{TEMP_MARK}{os.getpid()}-", dir=_folder(path)))
            except OSError as exc:
                raise write_error(path, exc) from None
        yield tmp
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of the output ``path`` (``OUT.onnxq-lock`` beside it) while the block runs.

    Re-entrant within a process (the CLI locks the output for the whole run, the save inside
    locks it again). The lock file is removed when the outermost holder is done.

    Raises:
        OnnxqError: ``OUT is being written by pid N``; the output folder does not exist; the lock
            cannot be created (``cannot write OUT: <reason>``, e.g. a read-only folder).
    """
    path = Path(path)
    folder = _folder(path)
    if not folder.is_dir():
        raise OnnxqError(f"output folder does not exist: {folder}")
    lock = folder / (path.name + LOCK_SUFFIX)
    key = Path(os.path.abspath(lock))
    with _held_guard:
        depth = _held_locks.get(key, 0)
        if depth:
            _held_locks[key] = depth + 1
    if depth:
        try:
            yield
        finally:
            with _held_guard:
                _held_locks[key] -= 1
        return
    fd = None
    try:
        with _signals_held():  # the lock file is ours from its creation on
            fd = _acquire(path, lock)
            with _held_guard:
                _held_locks[key] = 1
        yield
    finally:
        if fd is not None:
            with _held_guard:
                del _held_locks[key]
            if fcntl is None:  # Windows: an open file cannot be removed
                os.close(fd)
                lock.unlink(missing_ok=True)
            else:  # removed while still locked: a writer that opened it meanwhile sees the inode change
                lock.unlink(missing_ok=True)
                os.close(fd)


def _acquire(path: Path, lock: Path) -> int:
    """Open and ``flock`` ``lock`` (retrying when another holder removed it meanwhile); returns the fd."""
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise write_error(path, exc) from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OnnxqError(f"{path} is being written by pid {holder} (lock {lock}); wait for it, "
                             "or choose another output") from None
        except OSError as exc:
            if exc.errno not in _NO_LOCKS:
                os.close(fd)
                raise write_error(path, exc) from None
            # a file system without flock (some network mounts): written unlocked, as before
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not a file its holder unlinked meanwhile
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Delay SIGINT/SIGTERM/SIGHUP until the block is done, then act on the first one that came."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: pending.append(signum))
                for sig in HELD_SIGNALS if signal.getsignal(sig) is not None}  # None: not set from Python
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler != signal.SIG_IGN:
                signal.raise_signal(pending[0])


def commit(moves: Sequence[tuple[Path, Path]], remove: Sequence[Path] = ()) -> None:
    """Rename each ``(written, final)`` of ``moves`` into place, in order, and remove ``remove``: all or nothing.

    Put the model last: it is what readers open. When anything besides the model's own path
    exists (an earlier data file, a path in ``remove``), the earlier files are first moved into
    the folder of the first written file, so that no earlier model is ever seen beside a new
    data file; if a rename fails, the new files are removed and the earlier ones put back.
    Signals are held for the few renames this takes (:data:`HELD_SIGNALS`).

    Raises:
        OSError: a rename failed (nothing changed at the final paths).
    """
    backup = moves[0][0].parent
    others = [final for _, final in moves[:-1]] + list(remove)
    aside = [final for final in others if os.path.lexists(final)]
    model = moves[-1][1]
    if aside and os.path.lexists(model):
        aside.insert(0, model)
    saved: list[tuple[Path, Path]] = []
    placed: list[Path] = []
    with _signals_held():
        try:
            for i, final in enumerate(aside):
                kept = backup / f"{TEMP_MARK}earlier-{i}"
                os.replace(final, kept)
                saved.append((kept, final))
            for written, final in moves:
                os.replace(written, final)
                placed.append(final)
        except BaseException:
            for final in placed:
                final.unlink(missing_ok=True)
            for kept, final in reversed(saved):
                os.replace(kept, final)
            raise
