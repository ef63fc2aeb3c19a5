"""Real all-MiniLM-L6-v2 layer weights and their recorded input activations, for solver tests.

``models/real_layers.npz`` holds, in MatMul orientation (``y = x @ w``):
``"<layer>.weight"`` float16 ``[K, N]``, ``"<layer>.bias"`` ``[N]`` and ``"<layer>.x"`` float16
``[T, K]`` real inputs, for the layers ``q`` (attention query), ``fc1`` and ``fc2`` (the MLP),
plus ``"q.k_weight"`` / ``"q.v_weight"``: the key/value weights that read the same input as ``q``,
and ``"source"``: a string saying where it all comes from (``scripts/make_real_layers_fixture.py``).
Tests that need it skip, saying why, when the file is missing.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

__all__ = ["LAYERS", "REAL_LAYERS_PATH", "real_layer", "real_siblings", "output_error"]

REAL_LAYERS_PATH = Path(__file__).resolve().parents[1] / "models" / "real_layers.npz"
LAYERS = ("q", "fc1", "fc2")


@lru_cache(maxsize=1)
def _arrays() -> dict[str, np.ndarray]:
    if not REAL_LAYERS_PATH.exists():
        pytest.skip(f"real layer fixture {REAL_LAYERS_PATH} is missing (real MiniLM weights + activations)")
    with np.load(REAL_LAYERS_PATH) as data:
        return {name: data[name].astype(np.float32) for name in data.files if data[name].dtype.kind == "f"}


def real_layer(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(weight [K, N], x [T, K])`` float32 of one real layer (``name`` in :data:`LAYERS`)."""
    arrays = _arrays()
    return arrays[f"{name}.weight"], arrays[f"{name}.x"]


def real_siblings() -> tuple[list[np.ndarray], np.ndarray]:
    """``([q, k, v] weights [K, N], x [T, K])``: the attention projections sharing one input."""
    arrays = _arrays()
    return [arrays["q.weight"], arrays["q.k_weight"], arrays["q.v_weight"]], arrays["q.x"]


def output_error(x: np.ndarray, weight: np.ndarray, approx: np.ndarray) -> float:
    """Relative output error ``||x W - x W_hat||_F^2 / ||x W||_F^2`` (float64)."""
    x = x.astype(np.float64)
    diff = x @ (weight.astype(np.float64) - approx.astype(np.float64))
    ref = x @ weight.astype(np.float64)
    return float(np.vdot(diff, diff) / np.vdot(ref, ref))
