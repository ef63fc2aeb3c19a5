"""The peers' fixed mixed-precision heuristics as per-node overrides (no calibration data needed).

* ``lm_head8``: the last MatMul, the one whose output reaches a graph output (the lm_head),
  in 8 bits (the ONNX Runtime GenAI builder's ``last_matmul`` selector, ORT's ``int8 lm_head``).
* ``mixed_layers8``: llama.cpp's choice of the most quantization-sensitive matmuls, as the GenAI
  model builder's ``mixed_layers`` selector applies it (ModelOpt calls the idea ``layers_8bit``):
  the attention ``qkv_proj`` / ``v_proj`` and the MLP ``down_proj`` of layer ``i`` in 8 bits when
  ``i < L/8``, ``i >= 7L/8`` or ``(i - round(L/8)) % 3 == 2`` (``L``: the number of layers).
  Layers and roles are read from the node names that the exporters write
  (``/model/layers.3/mlp/down_proj/MatMul``, ``model.layers.3.self_attn.v_proj``, ...).

:func:`preset_overrides` returns ``{pattern: {"bits": 8}}`` overrides to merge into a
:class:`~onnxq.config.QuantConfig`; the base settings (block size, scheme) stay as configured.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import onnx_ir as ir

from onnxq.config import QuantConfig
from onnxq.errors import OnnxqError
from onnxq.graph.sites import lm_head_site
from onnxq.passes.quantize_weights import plan_sites

__all__ = ["PRESETS", "layer_index", "preset_overrides", "upgraded_layers"]

PRESETS = ("lm_head8", "mixed_layers8")
_LAYER = re.compile(r"(?:^|[./_])(?:layers?|h|blocks?|decoder[._]layers)[./_](\d+)(?=[./_]|$)")
_SENSITIVE = re.compile(r"(?:^|[./_])(?:qkv_proj|v_proj|down_proj)(?=[./_]|$)")


def layer_index(name: str) -> int | None:
    """The decoder-layer number in a node name (``/model/layers.12/mlp/down_proj/MatMul`` -> 12)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def upgraded_layers(num_layers: int) -> list[int]:
    """The layers ``mixed_layers`` upgrades: the first and last eighth, and every third in between."""
    eighth = num_layers / 8
    return [i for i in range(num_layers) if i < eighth or i >= 7 * eighth or (i - round(eighth)) % 3 == 2]


def preset_overrides(model: ir.Model, config: QuantConfig, presets: Sequence[str]) -> dict[str, dict]:
    """Exact-name overrides ``{"re:^<name>$": {"bits": 8}}`` for the nodes the named presets upgrade.

    Raises:
        OnnxqError: an unknown preset, or a preset that finds no node to upgrade in this model
            (e.g. node names without layer numbers for ``mixed_layers8``).
    """
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise OnnxqError(f"unknown preset {unknown[0]!r}; expected one of {PRESETS}")
    planned, _ = plan_sites(model, config, embeddings=False)
    sites = [p.site for p in planned if p.site.node.graph is model.graph]
    chosen: list[str] = []
    if "lm_head8" in presets:
        head = lm_head_site(sites, model.graph)
        if head is None:
            raise OnnxqError("preset lm_head8: no quantized MatMul reaches a graph output")
        chosen.append(head.name)
    if "mixed_layers8" in presets:
        layers = {s.name: layer_index(s.name) for s in sites}
        numbered = [i for i in layers.values() if i is not None]
        if not numbered:
            raise OnnxqError("preset mixed_layers8: no node name carries a layer number "
                             "(e.g. '/model/layers.3/mlp/down_proj/MatMul')")
        upgrade = set(upgraded_layers(max(numbered) + 1))
        picked = [s.name for s in sites if layers[s.name] in upgrade and _SENSITIVE.search(s.name)]
        if not picked:
            raise OnnxqError("preset mixed_layers8: no qkv_proj, v_proj or down_proj node found in the upgraded layers")
        chosen += picked
    return {f"re:^{re.escape(name)}$": {"bits": 8} for name in dict.fromkeys(chosen)}
