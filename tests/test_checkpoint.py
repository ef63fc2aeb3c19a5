"""Resumable calibration (``--checkpoint DIR``): a run interrupted after block k and resumed equals
an uninterrupted run, byte for byte; a checkpoint of another run is refused in one line."""
import json
import signal
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxq
from onnxq import OnnxqError, QuantConfig
from onnxq.calibration import save_npz
from onnxq.config import AWQConfig, CalibrationConfig, GPTQConfig
from tests.tiny_transformer import make_tiny_transformer

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=2, hidden=128, ffn=256, vocab=VOCAB, seed=3)


def feeds(count=8, seq=24, seed=1):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (1, seq)).astype(np.int64)} for _ in range(count)]


def config(algorithm, sequential=True):
    """``algorithm``; ``"gptq float target"``: GPTQ with ``gptq.float_target`` (a float path cached too)."""
    return QuantConfig(algorithm=algorithm.split()[0], block_size=32, awq=AWQConfig(grid=5),
                       gptq=GPTQConfig(float_target=algorithm.endswith("float target")),
                       calibration=CalibrationConfig(samples=8, sequential=sequential))


def initializers(model) -> dict[str, bytes]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in proto.graph.initializer}


class StopAfter:
    """A progress wrapper that lets ``blocks`` blocks finish, then raises KeyboardInterrupt (Ctrl-C)."""

    def __init__(self, blocks):
        self.blocks = blocks

    def __call__(self, iterable, **_):
        for i, item in enumerate(iterable):
            if i == self.blocks:
                raise KeyboardInterrupt
            yield item


@pytest.mark.parametrize("algorithm,sequential,stop", [("gptq", True, 2), ("awq", True, 1), ("awq", False, 3),
                                                       ("gptq float target", True, 3)])
def test_interrupted_then_resumed_equals_uninterrupted(model, tmp_path, algorithm, sequential, stop):
    whole = initializers(onnxq.quantize(model, config(algorithm, sequential), feeds()))
    folder = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        onnxq.quantize(model, config(algorithm, sequential), feeds(), checkpoint=folder, progress=StopAfter(stop))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["done"] == list(range(stop)) and manifest["blocks"] == 5
    states = sorted(p.name for p in folder.glob("state-*"))
    assert states == ([f"state-{stop - 1:04d}"] if sequential else [])  # only the last block's activations
    resumed = onnxq.quantize(model, config(algorithm, sequential), feeds(), checkpoint=folder)
    assert initializers(resumed) == whole
    assert json.loads((folder / "manifest.json").read_text())["done"] == list(range(5))
    again = onnxq.quantize(model, config(algorithm, sequential), feeds(), checkpoint=folder)  # all replayed
    assert initializers(again) == whole


def test_checkpoint_of_another_run_is_refused(model, tmp_path):
    folder = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        onnxq.quantize(model, config("gptq"), feeds(), checkpoint=folder, progress=StopAfter(1))
    for other_config, other_feeds in [(config("awq"), feeds()), (config("gptq"), feeds(seed=2))]:
        with pytest.raises(OnnxqError, match="was made for another model, settings or calibration data"):
            onnxq.quantize(model, other_config, other_feeds, checkpoint=folder)
    other_model = make_tiny_transformer(num_layers=2, hidden=128, ffn=256, vocab=VOCAB, seed=4)
    with pytest.raises(OnnxqError, match="another model"):
        onnxq.quantize(other_model, config("gptq"), feeds(), checkpoint=folder)


def test_cli_sigint_says_what_is_saved_and_the_same_command_resumes(model, tmp_path):
    """A real Ctrl-C (SIGINT) in the middle of a CLI run: the message names the saved blocks; the rerun
    replays them and writes the same model as a run without interruption."""
    src, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    save_npz(data, feeds(count=48, seq=64))
    common = ["--algo", "gptq", "--calib-data", str(data), "--samples", "48", "--block-size", "32", "--quiet"]

    def cli(out, *extra):
        return [sys.executable, "-m", "onnxq", "-v", "quantize", str(src), str(out), *common, *extra]

    subprocess.run(cli(tmp_path / "whole.onnx"), check=True, capture_output=True)
    folder = tmp_path / "ckpt"
    out = tmp_path / "q.onnx"
    process = subprocess.Popen(cli(out, "--checkpoint", str(folder)), stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if ignored here
    lines = []
    for line in process.stderr:  # -v logs one line per finished block
        lines.append(line)
        if line.startswith("INFO onnxq.calibration.driver: block 1 "):
            process.send_signal(2)
            break
    rest = process.stderr.read()
    assert process.wait(timeout=60) == 130, rest
    last = rest.strip().splitlines()[-1]
    assert last.startswith("onnxq: interrupted; nothing was written") and "calibration blocks are saved in" in last
    assert "the same command resumes there" in last and not out.exists()
    done = json.loads((folder / "manifest.json").read_text())["done"]
    assert 2 <= len(done) < 5, done
    resumed = subprocess.run(cli(out, "--checkpoint", str(folder)), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.count("(from the checkpoint)") == len(done)
    assert initializers(onnx.load(out)) == initializers(onnx.load(tmp_path / "whole.onnx"))
