"""Every way a ``quantize`` run can fail, as a new user meets it (issue 15).

Each case asserts the same contract: exit code 2, exactly one ``onnxq: error:`` line on
stderr, no traceback, and the output folder exactly as it was (hidden files included: no
temp folder, no lock file, no ``.data`` file left behind). Inputs: missing, empty,
truncated, random bytes, broken external data; settings and ``--config``; every kind of bad
calibration data; outputs: onto the input (by path, ``..``, symlink, its external data), a
directory, a missing or read-only folder, a full disk (a small tmpfs, when the test runs as
root), an output another process is writing. The Python API raises :class:`OnnxqError` with
the same one-line message for the filesystem errors.

Runs the CLI in-process (``onnxq.cli.main``); only the concurrent writer is a second process.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxq
from onnxq.cli import main
from onnxq.io import load_model
from tests.graphs import matmul_model, weight

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "models" / "example.onnx"  # input_ids [batch, seq] -> logits, vocabulary 512


def _save_external(proto: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, path, save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Every input the cases read, in one folder (built once)."""
    root = tmp_path_factory.mktemp("inputs")
    onnx.save(matmul_model(weight((128, 64), seed=0), name="layers.0.mlp"), root / "float.onnx")
    valid = (root / "float.onnx").read_bytes()
    (root / "empty.onnx").write_bytes(b"")
    (root / "truncated.onnx").write_bytes(valid[: len(valid) // 2])
    (root / "random.onnx").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "no_model").mkdir()
    (root / "two_models").mkdir()
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(root / "float.onnx", root / "two_models" / name)
    (root / "folder_model").mkdir()
    shutil.copy(root / "float.onnx", root / "folder_model" / "model.onnx")
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    onnx.save(helper.make_model(graph), root / "relu.onnx")
    onnxq.save(onnxq.quantize(str(root / "float.onnx")), root / "quantized.onnx")  # nothing left to quantize
    w = weight((64, 16), seed=1)
    w[0, 0] = np.nan
    onnx.save(matmul_model(w), root / "nan.onnx")
    _save_external(matmul_model(weight((512, 512), seed=2), name="mm"), root / "ext" / "ext.onnx")
    for damage in ("missing", "truncated"):
        model = _save_external(matmul_model(weight((64, 16), seed=3), name="mm"), root / f"ext_{damage}" / "m.onnx")
        data = model.with_name("m.onnx.data")
        if damage == "missing":
            data.unlink()
        else:
            data.write_bytes(data.read_bytes()[:100])
    shutil.copy(EXAMPLE, root / "lm.onnx")  # no tokenizer.json beside it
    configs = {"list.json": "[1, 2]", "bad.json": "{bits", "unknown.json": '{"bitz": 4}', "bits3.json": '{"bits": 3}'}
    for name, text in configs.items():
        (root / name).write_text(text)
    np.savez(root / "wrong_names.npz", **{"0/tokens": np.zeros((1, 8), np.int64)})
    np.savez(root / "wrong_dtype.npz", **{"0/input_ids": np.zeros((1, 8), np.float32)})
    (root / "random.npz").write_bytes(np.random.default_rng(1).bytes(500))
    np.save(root / "float_ids.npy", np.random.default_rng(2).random(100).astype(np.float32))
    np.save(root / "short_ids.npy", np.arange(5, dtype=np.int64))
    np.save(root / "ids.npy", np.random.default_rng(3).integers(0, 512, 256).astype(np.int64))
    np.save(root / "beyond_vocab.npy", np.full(64, 10**6, dtype=np.int64))
    (root / "text.txt").write_text("some calibration text " * 50)
    return root


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """The output folder, holding a hidden file and an earlier output that no failure may touch."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / ".hidden").write_text("keep")
    (folder / "earlier.onnx").write_bytes(b"an earlier output")
    return folder


def _snapshot(folder: Path) -> dict[str, tuple]:
    """Every entry under ``folder`` (hidden ones included) with its type, size and mtime."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            stat = path.lstat()
            entries[str(path.relative_to(folder))] = (path.is_dir(), stat.st_size, stat.st_mtime_ns)
    return entries


def _fails(capsys, argv: list[str], watched: Path, message: str) -> str:
    """Run the CLI; assert exit 2, one ``onnxq: error:`` line containing ``message``, no traceback,
    ``watched`` unchanged. Returns the error line."""
    before = _snapshot(watched)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("onnxq: error: ")]
    assert len(errors) == 1, err
    assert message in errors[0], err
    assert "Traceback" not in err, err
    assert _snapshot(watched) == before, "the output folder changed"
    return errors[0]


CASES = [
    # -- the input
    ("{in}/nope.onnx", [], "model file not found"),
    ("{in}/empty.onnx", [], "is empty (0 bytes)"),
    ("{in}/truncated.onnx", [], "is not a valid ONNX model"),
    ("{in}/random.onnx", [], "is not a valid ONNX model"),
    ("{in}/no_model", [], "no .onnx model in folder"),
    ("{in}/two_models", [], "holds 2 .onnx models"),
    ("{in}/ext_missing/m.onnx", [], "external data file of tensor 'W' not found"),
    ("{in}/ext_truncated/m.onnx", [], "is truncated: tensor 'W' needs bytes up to"),
    ("{in}/relu.onnx", [], "no quantizable MatMul/Gemm node found (no MatMul or Gemm nodes)"),
    ("{in}/quantized.onnx", [], "no quantizable MatMul/Gemm node found (the model is already quantized: 1 MatMulNBits;"),
    ("{in}/nan.onnx", [], "NaN/Inf"),
    # -- settings
    ("{in}/float.onnx", ["--bits", "3"], "bits must be 2, 4 or 8"),
    ("{in}/float.onnx", ["--bits", "four"], "invalid int value"),
    ("{in}/float.onnx", ["--block-size", "48"], "block_size must be a power of two"),
    ("{in}/float.onnx", ["--block-size", "0"], "block_size must be a positive integer"),
    ("{in}/float.onnx", ["--bits", "2", "--block-size", "512"], "block_size <= 256"),
    ("{in}/float.onnx", ["--format", "bnb4", "--block-size", "512"], "MatMulBnb4 block_size must be one of"),
    ("{in}/float.onnx", ["--accuracy-level", "7"], "accuracy_level must be in 0..4"),
    ("{in}/float.onnx", ["--exclude", "("], "not a valid regex"),
    ("{in}/float.onnx", ["--include", "["], "not a valid regex"),
    ("{in}/float.onnx", ["--exclude", ".*"], "no quantizable MatMul/Gemm node found"),
    ("{in}/float.onnx", ["--algo", "nope"], "invalid choice"),
    # -- --config
    ("{in}/float.onnx", ["--config", "{in}/nope.json"], "config file not found"),
    ("{in}/float.onnx", ["--config", "{in}/bad.json"], "cannot read config file"),
    ("{in}/float.onnx", ["--config", "{in}/list.json"], "must hold a JSON object, found list"),
    ("{in}/float.onnx", ["--config", "{in}/unknown.json"], "unknown keys ['bitz']"),
    ("{in}/float.onnx", ["--config", "{in}/bits3.json"], "bits must be 2, 4 or 8"),
    # -- calibration data
    ("{in}/lm.onnx", ["--algo", "gptq"], "needs calibration data"),
    ("{in}/lm.onnx", ["--algo", "smoothquant"], "needs calibration data"),
    ("{in}/lm.onnx", ["--algo", "gptq", "--calib-data", "{in}/nope.npz"], "calibration file not found"),
    ("{in}/lm.onnx", ["--algo", "gptq", "--calib-data", "{in}/wrong_names.npz"], "is not an input of the model"),
    ("{in}/lm.onnx", ["--algo", "awq", "--calib-data", "{in}/wrong_dtype.npz"], "the model expects int64"),
    ("{in}/lm.onnx", ["--algo", "gptq", "--calib-data", "{in}/random.npz"], "cannot read calibration file"),
    ("{in}/lm.onnx", ["--algo", "gptq", "--calib-data", "{in}/float_ids.npy"], "1-D integer array"),
    ("{in}/lm.onnx", ["--algo", "gptq", "--calib-data", "{in}/short_ids.npy", "--seq-len", "64"], "fewer than seq_len"),
    ("{in}/lm.onnx", ["--algo", "gptq", "--calib-data", "{in}/beyond_vocab.npy", "--seq-len", "8"],
     "onnxruntime failed on a calibration sample"),
    ("{in}/lm.onnx", ["--algo", "smoothquant", "--calib-data", "{in}/beyond_vocab.npy", "--seq-len", "8"],
     "onnxruntime failed on a calibration sample"),
    ("{in}/lm.onnx", ["--algo", "gptq", "--calib-data", "{in}/text.txt"], "give --tokenizer"),
    ("{in}/lm.onnx", ["--algo", "gptq", "--calib-data", "{in}/ids.npy", "--samples", "0"], "samples must be"),
    ("{in}/lm.onnx", ["--algo", "gptq", "--calib-data", "{in}/ids.npy", "--seq-len", "0"], "seq_len and samples"),
]


@pytest.mark.parametrize("model,flags,message", CASES, ids=[f"{i:02d}-{c[2][:28]}" for i, c in enumerate(CASES)])
def test_bad_input_or_settings(inputs, out_dir, capsys, model, flags, message):
    def fill(text: str) -> str:
        return text.replace("{in}", str(inputs))

    _fails(capsys, ["quantize", fill(model), out_dir / "q.onnx", "--quiet", *map(fill, flags)], out_dir, message)


@pytest.mark.parametrize("damage,message", [("missing", "external data file of tensor 'W' not found"),
                                            ("truncated", "is truncated: tensor 'W' needs bytes up to")])
def test_inspect_broken_external_data(inputs, capsys, damage, message):
    _fails(capsys, ["inspect", inputs / f"ext_{damage}" / "m.onnx"], inputs, message)


def test_unreadable_input(inputs, out_dir, capsys, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: file modes do not deny reading")
    model = tmp_path / "secret.onnx"
    shutil.copy(inputs / "float.onnx", model)
    model.chmod(0)
    _fails(capsys, ["quantize", model, out_dir / "q.onnx", "--quiet"], out_dir, "permission denied")


# -- outputs that must be refused before anything is written -----------------------------------------

@pytest.mark.parametrize("alias", ["same", "dotdot", "symlink"])
def test_output_is_the_input(inputs, out_dir, capsys, alias):
    model = inputs / "float.onnx"
    if alias == "same":
        out = model
    elif alias == "dotdot":
        out = inputs / "no_model" / ".." / "float.onnx"
    else:
        out = out_dir / "link.onnx"
        out.symlink_to(model)
    _fails(capsys, ["quantize", model, out, "--quiet"], out.parent, "output path is the input model")
    assert model.read_bytes() == (inputs / "folder_model" / "model.onnx").read_bytes()


@pytest.mark.parametrize("target", ["model", "data"])
def test_output_onto_the_inputs_external_data(inputs, out_dir, capsys, target):
    model, data = inputs / "ext" / "ext.onnx", inputs / "ext" / "ext.onnx.data"
    if target == "model":  # OUT is the data file itself
        out = data
    else:  # OUT.data is (a symlink to) the input's data file
        out = out_dir / "ext.onnx"
        (out_dir / "ext.onnx.data").symlink_to(data)
    _fails(capsys, ["quantize", model, out, "--quiet"], out.parent, "is the input's external data file")


def test_missing_output_folder(inputs, out_dir, capsys):
    _fails(capsys, ["quantize", inputs / "float.onnx", out_dir / "no" / "q.onnx"], out_dir, "output folder does not exist")


@pytest.mark.parametrize("what", ["model", "data"])
def test_output_is_a_directory(inputs, out_dir, capsys, what):
    (out_dir / ("q.onnx" if what == "model" else "q.onnx.data")).mkdir()
    line = _fails(capsys, ["quantize", inputs / "float.onnx", out_dir / "q.onnx", "--quiet", "--external-data", "always"],
                  out_dir, "it is a directory")
    assert line.startswith("onnxq: error: cannot write ")


def test_folder_output_not_empty(inputs, out_dir, capsys):
    _fails(capsys, ["quantize", inputs / "folder_model", out_dir, "--quiet"], out_dir, "exists and is not empty")


# -- the filesystem refuses the write -----------------------------------------------------------------

def _mount_tmpfs(path: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (root only): smaller than the 512x512 model's int4 output (~150 KB)."""
    mount = tmp_path / "small"
    _mount_tmpfs(mount, "size=64k")
    (mount / ".hidden").write_text("keep")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder the run cannot write to: a read-only tmpfs as root (root ignores file modes), else mode 0555."""
    folder = tmp_path / "ro"
    if os.geteuid() == 0:
        _mount_tmpfs(folder, "size=64k,ro")
        yield folder
        subprocess.run(["umount", "-l", str(folder)], check=False)
    else:
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


@pytest.mark.parametrize("external", ["never", "always"])
def test_disk_full(inputs, small_disk, capsys, external):
    _fails(capsys, ["quantize", inputs / "ext" / "ext.onnx", small_disk / "q.onnx", "--quiet", "--external-data",
                    external], small_disk, f"cannot write {small_disk / 'q.onnx'}: No space left on device")


def test_read_only_folder(inputs, read_only_folder, capsys):
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    _fails(capsys, ["quantize", inputs / "float.onnx", read_only_folder / "q.onnx", "--quiet"], read_only_folder,
           f"cannot write {read_only_folder / 'q.onnx'}: {reason}")


@pytest.mark.parametrize("external", [False, True])
def test_api_save_raises_one_line(inputs, small_disk, external):
    model = onnxq.quantize(inputs / "ext" / "ext.onnx")
    before = _snapshot(small_disk)
    with pytest.raises(onnxq.OnnxqError) as info:
        onnxq.save(model, small_disk / "q.onnx", external_data=external)
    assert str(info.value) == f"cannot write {small_disk / 'q.onnx'}: No space left on device"
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained OSError to print
    assert _snapshot(small_disk) == before


def test_api_save_read_only_and_directory(inputs, read_only_folder, out_dir):
    model = onnxq.quantize(inputs / "float.onnx")
    with pytest.raises(onnxq.OnnxqError, match=r"^cannot write .*q\.onnx: (Read-only file system|Permission denied)$"):
        onnxq.save(model, read_only_folder / "q.onnx")
    (out_dir / "q.onnx").mkdir()
    with pytest.raises(onnxq.OnnxqError, match=r"^cannot write .*q\.onnx: it is a directory$"):
        onnxq.save(model, out_dir / "q.onnx")


# -- another writer holds the output ------------------------------------------------------------------

def _wait_stopped(pid: int, timeout: float = 30) -> None:
    """Wait until ``pid`` is in the stopped state ('T' in /proc/PID/stat)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert time.monotonic() < deadline, f"pid {pid} did not stop"
        time.sleep(0.005)


def test_output_being_written_by_another_run(inputs, out_dir, capsys, tmp_path):
    """Two real onnxq runs on one output: the second (here, in-process) stops at once with one line naming
    the first's pid; the first, paused meanwhile, then finishes with a complete model."""
    big = _save_external(matmul_model(weight((1024, 1024), seed=4), name="mm"), tmp_path / "big" / "big.onnx")
    out = out_dir / "q.onnx"
    first = subprocess.Popen([sys.executable, "-m", "onnxq", "quantize", str(big), str(out), "--quiet"], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    lock = out_dir / "q.onnx.onnxq-lock"
    try:
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
            assert first.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        _wait_stopped(first.pid)  # the signal is asynchronous: until then the first run may still write
        _fails(capsys, ["quantize", inputs / "float.onnx", out, "--quiet"], out_dir,
               f"{out} is being written by pid {first.pid}")
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert [n.op_type for n in load_model(out).graph] == ["MatMulNBits"]
    assert sorted(p.name for p in out_dir.iterdir()) == [".hidden", "earlier.onnx", "q.onnx", "q.onnx.data"]


def test_config_file_is_not_overwritten_by_a_failed_run(inputs, out_dir, capsys):
    """A failure after the settings are read (no quantizable node) leaves a --config file beside the output alone."""
    config = out_dir / "plan.json"
    config.write_text(json.dumps({"bits": 8}))
    _fails(capsys, ["quantize", inputs / "relu.onnx", out_dir / "q.onnx", "--config", config, "--quiet"], out_dir,
           "no quantizable MatMul/Gemm node found")
