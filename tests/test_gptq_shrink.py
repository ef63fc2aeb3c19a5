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
