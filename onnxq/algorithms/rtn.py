"""Round to nearest: each block's codes from its own min/max (optionally with a per-block clip search)."""
from __future__ import annotations

from typing import Any, Mapping

from onnxq.algorithms.registry import Algorithm, SiblingGroup, Solution, register_algorithm
from onnxq.core.quantize import quantize_weight_with_error

__all__ = ["RTN"]


@register_algorithm
class RTN(Algorithm):
    """Round-to-nearest (:func:`onnxq.core.quantize_weight`), per weight, no data."""

    name = "rtn"

    def solve(self, group: SiblingGroup, stats: Mapping[str, Any], options: Any) -> Solution:
        results = [quantize_weight_with_error(w, s.bits, s.block_size, s.symmetric, mse_clip=s.mse_clip,
                                              scale_dtype=group.scale_dtype)
                   for w, s in zip(group.weights, group.settings)]
        return Solution([q for q, _ in results], [e for _, e in results])
