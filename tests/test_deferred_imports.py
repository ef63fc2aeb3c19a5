"""The CLI defers sympy (onnx_ir imports it, no command uses it): not loaded by a quantize run, and
loaded, transparently, by the first use of it (onnx_ir's symbolic-dimension arithmetic, a user's
own ``import sympy``, ``from sympy import ...``, a submodule import).

Each check runs in a fresh interpreter: this test process has imported onnx_ir already.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_PRELUDE = """
import sys
import onnxq.cli
def deferred(name):
    return "_deferred_spec" in sys.modules[name].__dict__
"""


def _run(body: str) -> str:
    code = _PRELUDE + textwrap.dedent(body)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_a_quantize_run_does_not_import_sympy_and_its_output_runs(tmp_path):
    out = _run(f"""
        assert deferred("sympy") and deferred("onnx_ir._symbolic_shapes")
        from onnxq.cli import main
        assert main(["quantize", "models/example.onnx", {str(tmp_path / "q.onnx")!r}, "--quiet"]) == 0
        print("deferred after quantize:", deferred("sympy"))
    """)
    assert "deferred after quantize: True" in out
    import onnxruntime as ort

    assert ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).get_inputs()


def test_symbolic_dimension_arithmetic_loads_sympy_and_is_right():
    out = _run("""
        import onnx_ir as ir
        dim = (ir.SymbolicDim("batch") + 1) * 2
        print("dim:", dim.value)
        print("deferred:", deferred("sympy"))
        import sympy
        print("real:", type(sympy) is type(sys), sympy.Symbol("x") + 1)
    """)
    assert "dim: 2*batch + 2" in out
    assert "deferred: False" in out
    assert "real: True x + 1" in out


def test_a_users_sympy_imports_work_before_anything_loaded_it():
    out = _run("""
        import sympy.polys
        from sympy import Rational
        import sympy
        print(Rational(1, 3) + sympy.Rational(1, 6), sympy.polys.Poly("x**2 + 1").degree())
        import onnx_ir as ir
        print((ir.SymbolicDim("n") // 2).value)
    """)
    assert out.split() == ["1/2", "2", "floor(n/2)"]


def test_nothing_is_deferred_once_onnx_ir_is_imported():
    code = "import onnx_ir, sys, onnxq.cli; print(type(sys.modules['sympy']).__name__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "module"
