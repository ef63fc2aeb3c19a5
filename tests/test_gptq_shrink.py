"""GPTQ's Hessian shrinkage towards its diagonal (``hessian_shrink``): the ends and the checks."""
from pathlib import Path

import numpy as np
import pytest

from onnxq import OnnxqError
from onnxq.algorithms.gptq import GPTQConfig, gptq_solve
from onnxq.core import quantize_weight


def _problem(seed=0, k=256, n=48, t=512):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, k)).astype(np.float32) @ rng.standard_normal((k, k)).astype(np.float32) / 8
    return rng.standard_normal((k, n)).astype(np.float32), 2.0 / t * (x.T.astype(np.float64) @ x)


@pytest.mark.parametrize("act_order", [False, True])
def test_full_shrink_is_rtn_and_zero_is_the_paper(act_order):
    weight, hessian = _problem()
    rtn = quantize_weight(weight, 4, 32, True)
    full = gptq_solve(weight, hessian, 4, 32, act_order=act_order, hessian_shrink=1.0).qweight
    np.testing.assert_array_equal(full.codes, rtn.codes)  # a diagonal Hessian feeds no error forward
    plain = gptq_solve(weight, hessian, 4, 32, act_order=act_order).qweight
    zero = gptq_solve(weight, hessian, 4, 32, act_order=act_order, hessian_shrink=0.0).qweight
    np.testing.assert_array_equal(zero.codes, plain.codes)
    assert not np.array_equal(plain.codes, rtn.codes)


def test_partial_shrink_lies_between_on_the_true_objective():
    """On the Hessian it was given, GPTQ (0) <= shrunk (0.5) <= RTN (1) in output error."""
    weight, hessian = _problem(1)

    def loss(lam):
        q = gptq_solve(weight, hessian, 4, 32, hessian_shrink=lam).qweight.dequantize()
        d = (weight - q).astype(np.float64)
        return float(np.einsum("kn,kj,jn->", d, hessian, d))

    assert loss(0.0) < loss(0.5) < loss(1.0)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "0.5"])
def test_bad_shrink_is_a_one_line_error(bad):
    weight, hessian = _problem(k=64, n=8)
    with pytest.raises(OnnxqError, match="hessian_shrink"):
        gptq_solve(weight, hessian, 4, 32, hessian_shrink=bad)
    with pytest.raises(OnnxqError, match="hessian_shrink"):
        GPTQConfig(hessian_shrink=bad)


def test_cli_rejects_a_bad_shrink_before_writing(tmp_path, capsys):
    from onnxq.cli import main

    out = tmp_path / "q.onnx"
    calib = tmp_path / "calib.txt"
    calib.write_text("some text")
    assert main(["quantize", str(Path(__file__).parents[1] / "models" / "example.onnx"), str(out), "--algo", "gptq", "--hessian-shrink", "2",
                 "--calib-data", str(calib)]) == 2
    assert "hessian_shrink must be in [0, 1]" in capsys.readouterr().err and not out.exists()


def test_cli_float32_factor(tmp_path, capsys):
    """--float32-factor: refused below --hessian-shrink 0.25 before anything is written; at the default shrink
    it quantizes, its packed weights match the float64 factor's up to a few rounding flips, and onnxruntime
    runs both models to nearly the same logits."""
    import onnx
    from onnx import numpy_helper

    from onnxq.cli import main
    from tests.graphs import run

    model = Path(__file__).parents[1] / "models" / "example.onnx"
    calib = tmp_path / "ids.npy"  # 16 windows of 64 tokens for the example model (vocabulary 512)
    np.save(calib, np.random.default_rng(0).integers(0, 512, 16 * 64).astype(np.int64))
    refused = tmp_path / "refused.onnx"
    assert main(["quantize", str(model), str(refused), "--algo", "gptq", "--calib-data", str(calib),
                 "--seq-len", "64", "--hessian-shrink", "0.1", "--float32-factor", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "float32 factor needs hessian_shrink >= 0.25" in err and len(err.strip().splitlines()) == 1
    assert not refused.exists()
    packed, logits = {}, {}
    ids = np.random.default_rng(1).integers(0, 512, (2, 16)).astype(np.int64)
    for flag in ([], ["--float32-factor"]):
        out = tmp_path / f"q{len(flag)}.onnx"
        assert main(["quantize", str(model), str(out), "--algo", "gptq", "--calib-data", str(calib),
                     "--seq-len", "64", *flag]) == 0
        settings = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("onnxq: gptq"))
        assert ("GPTQ float32 factor" in settings) == bool(flag)
        graph = onnx.load(out).graph
        inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        packed[len(flag)] = [inits[n.input[1]] for n in graph.node if n.op_type == "MatMulNBits"]
        (logits[len(flag)],) = run(out, {"input_ids": ids})
    assert packed[0] and len(packed[0]) == len(packed[1])
    assert np.isfinite(logits[1]).all()
    assert np.linalg.norm(logits[1] - logits[0]) <= 0.05 * np.linalg.norm(logits[0])
    same = sum(int((a == b).sum()) for a, b in zip(packed[0], packed[1]))
    total = sum(a.size for a in packed[0])
    assert same / total > 0.99


def test_gptq_algorithm_passes_float32_factor_to_the_solver():
    """The registered GPTQ solves with GPTQConfig.float32_factor: on MiniLM's fc2 (int3 block 128, shrink 0.25,
    no act order, one BLAS thread as conftest sets) the float32 factor flips 151 of 589,824 codes, so each
    config must give its own solver's codes."""
    from onnxq.algorithms import SiblingGroup, get_algorithm
    from onnxq.formats.base import WeightSettings
    from tests.real_layers import real_layer

    w, x = real_layer("fc2")
    x = x.astype(np.float64)
    h = (2.0 / len(x) * x.T @ x).astype(np.float32)
    group = SiblingGroup("x", ("fc2",), [w], [WeightSettings(bits=3, block_size=128, symmetric=True)], np.float32)
    codes = {}
    for fast in (False, True):
        config = GPTQConfig(hessian_shrink=0.25, act_order=False, float32_factor=fast, refine=0)
        solution = get_algorithm("gptq").solve(group, {"hessian": h}, config)
        direct = gptq_solve(w, h, 3, 128, True, hessian_shrink=0.25, float32_factor=fast)
        np.testing.assert_array_equal(solution.qweights[0].codes, direct.qweight.codes)
        codes[fast] = direct.qweight.codes
    assert (codes[False] != codes[True]).sum() > 0


def test_cli_gptq_clip(tmp_path, capsys):
    """--gptq-clip: the settings line says so, the block scales differ from those without it (for gptq:
    clipped blocks are smaller in magnitude, none larger), onnxruntime runs the model; the same for awq+gptq; refused with dynamic groups."""
    import onnx
    from onnx import numpy_helper

    from onnxq.cli import main
    from tests.graphs import run

    model = Path(__file__).parents[1] / "models" / "example.onnx"
    calib = tmp_path / "ids.npy"
    np.save(calib, np.random.default_rng(0).integers(0, 512, 16 * 64).astype(np.int64))
    ids = np.random.default_rng(1).integers(0, 512, (2, 16)).astype(np.int64)
    for algo in ("gptq", "awq+gptq"):
        scales = {}
        for flag in ([], ["--gptq-clip"]):
            out = tmp_path / f"{algo}{len(flag)}.onnx"
            assert main(["quantize", str(model), str(out), "--algo", algo, "--calib-data", str(calib),
                         "--seq-len", "64", "--gptq-refine", "0", *flag]) == 0
            settings = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("onnxq:"))
            assert ("GPTQ clip search" in settings) == bool(flag)
            graph = onnx.load(out).graph
            scales[bool(flag)] = np.concatenate([numpy_helper.to_array(t).ravel() for t in graph.initializer
                                                 if t.name.endswith("_scales")])
            assert np.isfinite(run(out, {"input_ids": ids})[0]).all()
        assert not np.array_equal(scales[True], scales[False])
        if algo == "gptq":  # static scales from the same weights (awq+gptq's input scales follow the calibration)
            assert (np.abs(scales[True]) <= np.abs(scales[False]) * (1 + 1e-6)).all()
    config = tmp_path / "dynamic.json"
    config.write_text('{"gptq": {"static_groups": false, "clip_search": true}}')
    refused = tmp_path / "refused.onnx"
    assert main(["quantize", str(model), str(refused), "--algo", "gptq", "--calib-data", str(calib),
                 "--seq-len", "64", "--config", str(config)]) == 2
    assert "needs gptq.static_groups" in capsys.readouterr().err and not refused.exists()
