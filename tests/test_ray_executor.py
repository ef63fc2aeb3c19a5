"""Calibration on a real local Ray cluster (2 worker processes on this machine): the same codes as
the in-process run, through the API and through ``--executor ray``; a worker killed mid-block is
retried and the result is unchanged. Skipped when the ``ray`` extra is not installed."""
import os
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
from tests.graphs import run
from tests.tiny_transformer import make_tiny_transformer

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'onnxq[ray]')")

from onnxq.calibration.ray_executor import RayExecutor  # noqa: E402

VOCAB = 97


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=2, hidden=128, ffn=256, vocab=VOCAB, seed=3)


@pytest.fixture(scope="module")
def executor():
    ray_executor = RayExecutor(workers=2)
    yield ray_executor
    ray_executor.close()


def feeds(count=12, seq=32, seed=1):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (1, seq)).astype(np.int64)} for _ in range(count)]


def config(algorithm, sequential=True):
    """``algorithm``; ``"... float target"``: with ``gptq.float_target`` (the float path sharded too)."""
    return QuantConfig(algorithm=algorithm.split()[0], block_size=32, awq=AWQConfig(grid=5),
                       gptq=GPTQConfig(float_target=algorithm.endswith("float target")),
                       calibration=CalibrationConfig(samples=12, sequential=sequential))


def initializers(model) -> dict[str, np.ndarray]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def differing(a: dict, b: dict) -> int:
    """Elements of the packed weights, scales and other initializers that differ (same names and shapes)."""
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape for k in a)
    return sum(int((a[k] != b[k]).sum()) for k in a)


def output_error(quantized, reference_model) -> float:
    feed = {"input_ids": np.random.default_rng(99).integers(0, VOCAB, (2, 32)).astype(np.int64)}
    (y,), (ref,) = run(quantized, feed), run(reference_model, feed)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("algorithm,sequential", [("gptq", True), ("awq", True), ("gptq", False), ("awq+gptq", True),
                                                  ("awq+gptq float target", True)])
def test_ray_equals_in_process(model, executor, algorithm, sequential):
    """Samples sharded over 2 workers, statistics merged: codes equal the in-process run's (a Hessian
    summed in another order may flip a code at a rounding tie; here none did, and the bound is 0.1%)."""
    local = onnxq.quantize(model, config(algorithm, sequential), feeds())
    on_ray = onnxq.quantize(model, config(algorithm, sequential), feeds(), executor=executor)
    a, b = initializers(local), initializers(on_ray)
    total = sum(v.size for v in a.values())
    assert differing(a, b) <= total // 1000, f"{differing(a, b)} of {total} elements differ"
    assert output_error(on_ray, model) == pytest.approx(output_error(local, model), rel=1e-3)


def test_ray_with_a_checkpoint_resumes_like_in_process(model, executor, tmp_path):
    """A run interrupted on Ray resumes in process from its checkpoint (and the other way round would too:
    the checkpoint holds every sample's activations, not a worker's shard)."""
    whole = initializers(onnxq.quantize(model, config("gptq"), feeds()))

    def stop_after_two(blocks, **_):
        for i, block in enumerate(blocks):
            if i == 2:
                raise KeyboardInterrupt
            yield block

    with pytest.raises(KeyboardInterrupt):
        onnxq.quantize(model, config("gptq"), feeds(), executor=executor, checkpoint=tmp_path, progress=stop_after_two)
    resumed = initializers(onnxq.quantize(model, config("gptq"), feeds(), checkpoint=tmp_path))
    assert differing(resumed, whole) == 0


def _cli(src, out, data, algorithm, *extra, env=None):
    command = [sys.executable, "-m", "onnxq", "quantize", str(src), str(out), "--algo", algorithm,
               "--calib-data", str(data), "--samples", "12", "--block-size", "32", "--awq-grid", "5", "--quiet",
               *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ray_cli")
    onnx.save(model, folder / "m.onnx")
    save_npz(folder / "calib.npz", feeds())
    return folder


def test_cli_executor_ray_gptq_equals_in_process(files):
    local = _cli(files / "m.onnx", files / "local.onnx", files / "calib.npz", "gptq")
    on_ray = _cli(files / "m.onnx", files / "ray.onnx", files / "calib.npz", "gptq", "--executor", "ray",
                  "--workers", "2")
    assert local.returncode == 0 and on_ray.returncode == 0, on_ray.stderr
    assert differing(initializers(onnx.load(files / "local.onnx")), initializers(onnx.load(files / "ray.onnx"))) == 0


@pytest.mark.parametrize("stage", ["collect", "advance"])
def test_worker_killed_mid_block_is_retried(files, tmp_path, stage):
    """ONNXQ_RAY_KILL_ONCE: the first task of ``stage`` SIGKILLs its own worker process; Ray reruns the
    task on a new worker and the output equals the in-process run's."""
    reference = files / "local-awq.onnx"
    if not reference.exists():
        assert _cli(files / "m.onnx", reference, files / "calib.npz", "awq").returncode == 0
    marker = tmp_path / "killed"
    env = {**os.environ, "ONNXQ_RAY_KILL_ONCE": f"{stage}:{marker}"}
    result = _cli(files / "m.onnx", tmp_path / "q.onnx", files / "calib.npz", "awq", "--executor", "ray", "--workers",
                  "2", env=env)
    assert result.returncode == 0, result.stderr
    pid = int(marker.read_text())  # a worker really died
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert differing(initializers(onnx.load(reference)), initializers(onnx.load(tmp_path / "q.onnx"))) == 0


def test_ray_errors_are_one_line(files, tmp_path):
    result = subprocess.run([sys.executable, "-c", "import sys; sys.modules['ray'] = None; from onnxq.cli import main; "
                             f"sys.exit(main(['quantize', {str(files / 'm.onnx')!r}, {str(tmp_path / 'q.onnx')!r}, "
                             f"'--algo', 'gptq', '--calib-data', {str(files / 'calib.npz')!r}, '--executor', 'ray', "
                             "'--quiet']))"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["onnxq: error: --executor ray needs Ray: pip install 'onnxq[ray]'"]
    for extra, message in [(["--workers", "2"], "--workers needs --executor ray or ray://HOST:PORT"),
                           (["--executor", "spark"], "unknown executor 'spark' (expected local, ray or ray://HOST:PORT)")]:
        result = _cli(files / "m.onnx", tmp_path / "q.onnx", files / "calib.npz", "gptq", *extra)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines()[-1] == f"onnxq: error: {message}"
    assert not (tmp_path / "q.onnx").exists()
    with pytest.raises(OnnxqError, match="workers must be >= 1"):
        RayExecutor(workers=0)
