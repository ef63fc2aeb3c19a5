"""``python -m onnxruntime_genai.models.builder``, with transformers 5's Gemma 3 RoPE config read.

onnxruntime-genai 0.18's Gemma3 builder reads transformers 4's config attributes:
``rope_theta`` (global layers), ``rope_local_base_freq`` (sliding-window layers) and a flat
``rope_parameters`` with a ``rope_type``. transformers 5 (5.24 here) turns both into one
per-layer-type dict, ``rope_parameters = {"full_attention": {...}, "sliding_attention":
{...}}``, even when config.json has the transformers 4 keys, and the builder stops with
``KeyError: 'rope_type'`` in ``make_rope_init`` (its Gemma4 builder reads the nested form;
its Gemma3 one does not). The builder 0.18 itself needs transformers 5 (it imports
``Qwen3_5ForConditionalGeneration``), so no released combination builds Gemma 3 as is.

This runs the builder unchanged after giving a Gemma3 config the flat attributes it
expects, when both layer types use default RoPE (Gemma 3 270M and 1B). Every other model
and every argument goes through untouched. Runs in ``.venv-export``:

    .venv-export/bin/python scripts/genai_builder.py -i HF_DIR -o OUT -p fp32 -e cpu \\
        --extra_options hf_token=false
"""

from __future__ import annotations

import runpy

import onnxruntime_genai.models  # noqa: F401 - puts the builder's folder on sys.path (``builders``)
from builders.gemma import Gemma3Model

__all__ = ["flatten_gemma3_rope"]

_GEMMA3_INIT = Gemma3Model.__init__


def flatten_gemma3_rope(config) -> None:
    """Give a transformers 5 Gemma3 config the flat RoPE attributes of transformers 4 (in place).

    ``rope_parameters["full_attention"]`` -> ``rope_theta`` and a flat ``rope_parameters``;
    ``rope_parameters["sliding_attention"]["rope_theta"]`` -> ``rope_local_base_freq``.
    Left as is unless both layer types use default (unscaled) RoPE.
    """
    rope = getattr(config, "rope_parameters", None)
    if not isinstance(rope, dict) or set(rope) != {"full_attention", "sliding_attention"}:
        return
    full, local = rope["full_attention"], rope["sliding_attention"]
    if full.get("rope_type") != "default" or local.get("rope_type") != "default":
        return
    config.rope_theta = full["rope_theta"]
    config.rope_local_base_freq = local["rope_theta"]
    config.rope_parameters = dict(full)


def _gemma3_init(self, config, *args, **kwargs) -> None:
    flatten_gemma3_rope(config)
    _GEMMA3_INIT(self, config, *args, **kwargs)


if __name__ == "__main__":
    Gemma3Model.__init__ = _gemma3_init
    runpy.run_module("onnxruntime_genai.models.builder", run_name="__main__", alter_sys=True)
