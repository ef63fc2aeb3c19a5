"""The layer rules of docs/ARCHITECTURE.md, checked on the source: what each package may import.

Reads every module of ``onnxq`` with ``ast`` (nothing is imported) and fails on an
import that points up the layer order, on ``core/`` importing onnx / onnxruntime /
onnx_ir, and on any module importing a private ``_name`` from another onnxq module.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnxq"

# package -> onnxq packages it must not import (top-level modules: api, config, io, report, errors, weight_only)
FORBIDDEN = {
    "core": {"formats", "graph", "algorithms", "passes", "calibration", "recipes", "eval", "cli", "api", "config",
             "io", "report", "weight_only"},
    "graph": {"formats", "algorithms", "passes", "calibration", "recipes", "eval", "cli", "api", "config", "report",
              "weight_only"},
    "formats": {"algorithms", "passes", "calibration", "recipes", "eval", "cli", "api", "config", "report",
                "weight_only"},
    "algorithms": {"formats", "graph", "passes", "calibration", "recipes", "eval", "cli", "api", "config", "io",
                   "report", "weight_only"},
    "passes": {"calibration", "recipes", "eval", "cli", "api", "report", "weight_only"},
    "calibration": {"recipes", "eval", "cli", "api", "report", "weight_only"},
    "recipes": {"eval", "cli", "api", "weight_only"},
    "eval": {"formats", "graph", "algorithms", "passes", "recipes", "cli", "api", "config", "report", "weight_only"},
    "config": {"graph", "passes", "calibration", "recipes", "eval", "cli", "api", "report", "weight_only"},
}
for _layer_name in ("core", "graph", "formats", "algorithms", "passes", "calibration", "recipes", "eval", "config"):
    FORBIDDEN[_layer_name] = FORBIDDEN[_layer_name] | {"model_folder"}  # folder handling is the CLI's
THIRD_PARTY_FORBIDDEN = {"core": {"onnx", "onnxruntime", "onnx_ir"}, "algorithms": {"onnx", "onnxruntime", "onnx_ir"}}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path):
    """``(module, names)`` of every import in the file (relative imports resolved against onnxq)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [alias.name for alias in node.names]


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    layer = _layer(path)
    for module, names in _imports(path):
        parts = module.split(".")
        if parts[0] in THIRD_PARTY_FORBIDDEN.get(layer, ()):
            pytest.fail(f"{path.relative_to(PACKAGE)} ({layer}/) imports {module}")
        if parts[0] != "onnxq" or len(parts) < 2:
            continue
        target = parts[1]
        assert target not in FORBIDDEN.get(layer, ()), f"{path.relative_to(PACKAGE)} ({layer}) imports {module}"
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.relative_to(PACKAGE)} imports private {private} from {module}"


def test_every_package_is_covered():
    packages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages - {"cli"} <= set(FORBIDDEN), packages - set(FORBIDDEN)
