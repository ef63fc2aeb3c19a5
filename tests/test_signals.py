"""Interrupted runs (issue 15): SIGINT, SIGTERM and SIGHUP during quantization and during the save.

A real ``python -m onnxq quantize`` of a 96 MiB model (external data) is signalled while it
quantizes (its progress bar has moved) or while it saves (its temp folder exists; the process
is paused with SIGSTOP as soon as it appears, so the signal lands inside the save); the five
runs go side by side. Afterwards
the output paths are absent or complete, no temp folder or lock file is left, the exit code is
128 + the signal and one line says what is on disk. Also: a Ctrl-C during the start-up imports,
one after the final rename, and the next run's clean-up of what a killed run left.
"""
from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.atomic import LOCK_SUFFIX, TEMP_MARK
from onnxq.cli import main
from onnxq.io import load_model

ROOT = Path(__file__).resolve().parents[1]
LAYERS, DIM = 6, 2048  # 6 x 2048x2048 fp32 = 96 MiB


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """``y = x @ W_0 @ ... @ W_5`` with its weights in ``big.onnx.data``."""
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i in range(LAYERS):
        inits.append(numpy_helper.from_array(rng.standard_normal((DIM, DIM), dtype=np.float32) * 0.02, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], name=f"layers.{i}.mm"))
        current = f"h{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", DIM])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["b", DIM])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path, save_as_external_data=True, location="big.onnx.data", size_threshold=0)
    return path


def _default_dispositions() -> None:
    """In the child: SIGINT, SIGTERM and SIGHUP at their defaults even if the test runner ignores them (a
    runner started with ``nohup`` or as a background job of a script passes SIG_IGN on, and onnxq, as it
    should, leaves an inherited SIG_IGN alone)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


class _Run:
    """``python -m onnxq quantize MODEL OUT`` in a subprocess, its stderr collected as it comes."""

    def __init__(self, model: Path, out: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "onnxq", "quantize", str(model), str(out), "--external-data", "always"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_default_dispositions,
        )
        self._err = bytearray()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for chunk in iter(lambda: self.proc.stderr.read1(4096), b""):
            self._err += chunk

    @property
    def err(self) -> str:
        return self._err.decode(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended before {what}: {self.err}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s: {self.err}"
            time.sleep(0.002)

    def finish(self) -> tuple[int, str]:
        code = self.proc.wait(timeout=120)
        self._reader.join(timeout=10)
        return code, self.err


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_MARK in p.name or p.name.endswith(LOCK_SUFFIX))


def _check_absent_or_complete(out: Path, message: str) -> None:
    names = sorted(p.name for p in out.parent.iterdir())
    assert names in ([], [out.name, out.name + ".data"]), names
    if names:
        assert "it is complete" in message
        model = load_model(out)  # every external tensor's bytes are there
        assert [n.op_type for n in model.graph] == ["MatMulNBits"] * LAYERS
    else:
        assert "nothing was written" in message


CASES = [(signal.SIGINT, "quantize"), (signal.SIGTERM, "quantize"), (signal.SIGHUP, "quantize"),
         (signal.SIGINT, "save"), (signal.SIGTERM, "save")]


def _interrupt(run: _Run, out_dir: Path, sig: int, phase: str) -> None:
    """Wait for ``phase`` of ``run``, then send ``sig``."""
    if phase == "quantize":
        # tqdm prints at most every 0.1 s: some count of quantized nodes >= 1 (rarely all of them)
        run.wait_for(lambda: re.search(rf" [1-9]\d*/{LAYERS} ", run.err) is not None, "progress")
        run.proc.send_signal(sig)
    else:
        run.wait_for(lambda: any(TEMP_MARK in p.name for p in out_dir.iterdir()), "temp folder")
        run.proc.send_signal(signal.SIGSTOP)
        run.proc.send_signal(sig)
        run.proc.send_signal(signal.SIGCONT)


def test_interrupted_runs_leave_nothing_half_written(big_model, tmp_path):
    """The five cases run side by side (each one's timing comes from watching it, not from the clock)."""
    runs, errors = {}, {}
    for sig, phase in CASES:
        out_dir = tmp_path / f"{signal.Signals(sig).name}-{phase}"
        out_dir.mkdir()
        runs[out_dir] = (sig, phase, _Run(big_model, out_dir / "q.onnx"))

    def drive(out_dir: Path) -> None:
        sig, phase, run = runs[out_dir]
        try:
            _interrupt(run, out_dir, sig, phase)
        except AssertionError as exc:
            errors[out_dir.name] = str(exc)
            run.proc.kill()

    threads = [threading.Thread(target=drive, args=(out_dir,)) for out_dir in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for out_dir, (sig, phase, run) in runs.items():
        code, err = run.finish()
        assert code == 128 + sig, (out_dir.name, err)
        assert "Traceback" not in err, (out_dir.name, err)
        lines = [line for line in err.splitlines() if line.startswith("onnxq: interrupted")]
        assert len(lines) == 1, (out_dir.name, err)
        if sig != signal.SIGINT:
            assert signal.Signals(sig).name in lines[0]
        assert _leftovers(out_dir) == [], out_dir.name
        _check_absent_or_complete(out_dir / "q.onnx", lines[0])


def test_interrupt_during_startup_imports(big_model, tmp_path):
    """Ctrl-C while ``python -m onnxq`` is still importing numpy / onnx: one line, exit 130, no traceback."""
    out = tmp_path / "q.onnx"
    run = _Run(big_model, out)
    maps = Path(f"/proc/{run.proc.pid}/maps")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # inside onnxq's own imports (numpy loaded), not the interpreter's start
        try:
            if "numpy" in maps.read_text():
                break
        except OSError:
            pass
        time.sleep(0.005)
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert code == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("onnxq: interrupted"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


class _SignalOnWrite(io.StringIO):
    """A stdout that sends this process a real SIGINT when the first line is printed (after the save)."""

    def write(self, text: str) -> int:
        if not self.getvalue():
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


def test_interrupt_after_the_final_rename_says_it_is_complete(tmp_path, capsys, monkeypatch):
    from tests.graphs import matmul_model, weight

    model, out = tmp_path / "m.onnx", tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    onnx.save(matmul_model(weight((128, 64), seed=0)), model)
    monkeypatch.setattr(sys, "stdout", _SignalOnWrite())
    # Python's own SIGINT handler, even in a runner that inherited SIGINT ignored (a background job)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert main(["quantize", str(model), str(out)]) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"onnxq: interrupted after {out} was written; it is complete"
    assert [n.op_type for n in load_model(out).graph] == ["MatMulNBits"]
    assert _leftovers(out.parent) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_next_run_removes_what_a_killed_run_left(tmp_path, capsys):
    """A run killed with SIGKILL leaves its temp folder and lock file; the next run into that folder removes
    the temp folders of dead pids (ours only: other names and live pids are left alone) and takes over the lock."""
    from tests.graphs import matmul_model, weight

    model = tmp_path / "m.onnx"
    onnx.save(matmul_model(weight((128, 64), seed=0)), model)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dead = _dead_pid()
    stale = out_dir / f"q.onnx{TEMP_MARK}{dead}-abc123"
    stale.mkdir()
    (stale / "q.onnx.data").write_bytes(b"\0" * 1000)
    (out_dir / f"other.onnx{TEMP_MARK}{dead}-x").write_bytes(b"stale file")
    live = out_dir / f"other.onnx{TEMP_MARK}1-x"  # pid 1 is running
    live.mkdir()
    (out_dir / f"q.onnx{LOCK_SUFFIX}").write_text(f"{dead}\n")
    (out_dir / "notes.onnxq-tmp-draft").write_text("not ours")
    assert main(["quantize", str(model), str(out_dir / "q.onnx"), "--quiet"]) == 0
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["q.onnx", live.name, "notes.onnxq-tmp-draft"])
