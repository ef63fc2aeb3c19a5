"""Mixed precision under an effective-bits budget (the ModelOpt ``auto_quantize`` idea, on ONNX).

Each weight site may take one format from a candidate list (e.g. ``int4_b128``,
``int8_b128``, ``float``). The search

1. groups sites that must share a format: siblings reading the same input (q/k/v,
   up/gate, so one scale search / one activation format serves them) and sites
   sharing one weight;
2. measures each group's sensitivity to each candidate through onnxruntime: the
   model runs on a few calibration samples with only that group's weights replaced
   by their round-to-nearest fake-quantized values, and the loss is the KL divergence
   of the output distribution from the float model's (``loss="kl"``, for logits) or
   the relative squared error of the outputs (``loss="mse"``). The weights are fed as
   session inputs, so one session serves every measurement;
3. assumes the losses add up across groups and picks formats greedily (largest loss
   reduction per extra bit first) until the average bits per weight reaches the budget.

Bits per weight are what the configured format stores, as it counts them
(:meth:`onnxq.formats.base.Format.stored_bits`: codes, padding, scales and zero points;
MatMulNBits ``int4_b128`` with fp32 scales is ``4 + 32/128 = 4.25`` bits; ``float`` is the
model's own dtype, 32 for fp32). The plan is a :class:`~onnxq.config.QuantConfig`
with one exact-name override per site, saved as JSON that ``quantize --config`` reads.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import onnx_ir as ir

from onnxq.calibration import ActivationProbe, materialize
from onnxq.config import NodeSettings, QuantConfig
from onnxq.core import quantize_weight
from onnxq.errors import OnnxqError
from onnxq.formats import Format, WeightSettings, get_format
from onnxq.graph.sites import WeightSite
from onnxq.passes.quantize_weights import Progress, plan_sites

__all__ = ["Candidate", "MixedPrecisionPlan", "parse_candidates", "search_mixed_precision", "DEFAULT_CANDIDATES"]

logger = logging.getLogger(__name__)

DEFAULT_CANDIDATES = "int4_b128,int4_b32,int8_b128"
_CANDIDATE = re.compile(r"^int(?P<bits>[248])(?:_b(?P<block>-1|\d+))?(?:_(?P<scheme>sym|asym))?$")


@dataclass(frozen=True)
class Candidate:
    """One format a site may take: ``bits=None`` means left in float."""

    name: str
    bits: int | None
    block_size: int = 32
    symmetric: bool = True

    def settings_for(self, site: WeightSite, fmt: Format) -> WeightSettings:
        """This candidate's settings for ``site``, resolved and checked by ``fmt`` (quantized candidates only)."""
        settings = NodeSettings(self.bits, self.block_size, self.symmetric, 0, False)
        return fmt.resolve(settings, site.k, site.n, f"candidate {self.name!r} on node {site.name!r}")

    def bits_per_weight(self, site: WeightSite, fmt: Format) -> float:
        """Stored bits per weight of ``site`` in this candidate, as ``fmt`` stores it."""
        if self.bits is None:
            return float(site.dtype.itemsize * 8)
        return fmt.stored_bits(site.k, site.n, self.settings_for(site, fmt), site.dtype) / (site.k * site.n)

    def override(self) -> dict:
        if self.bits is None:
            return {"skip": True}
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric}


def parse_candidates(spec: str | Sequence[str], base: QuantConfig) -> list[Candidate]:
    """``"int4_b128,int8_b128,float"`` -> candidates (scheme defaults to ``base.symmetric``)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    candidates = []
    for name in names:
        if name == "float":
            candidates.append(Candidate(name, None))
            continue
        match = _CANDIDATE.match(name)
        if match is None:
            raise OnnxqError(f"unknown format candidate {name!r}; expected e.g. int4_b128, int8_b32_asym, float")
        symmetric = base.symmetric if match["scheme"] is None else match["scheme"] == "sym"
        block = int(match["block"]) if match["block"] else base.block_size
        # the main settings' checks, and the format's own
        base.with_updates(bits=int(match["bits"]), block_size=block, symmetric=symmetric, overrides={})
        candidates.append(Candidate(name, int(match["bits"]), block, symmetric))
    if len(candidates) < 2:
        raise OnnxqError(f"mixed precision needs at least two format candidates, got {names}")
    return candidates


@dataclass
class MixedPrecisionPlan:
    """The chosen format per site and what the search measured."""

    assignments: dict[str, str]  # site name -> candidate name
    groups: list[list[str]]
    sensitivity: dict[str, dict[str, float]]  # first site of a group -> candidate -> loss
    target_bits: float
    effective_bits: float
    loss: str
    candidates: list[Candidate] = field(repr=False)
    group_bits: list[list[float]] = field(repr=False, default_factory=list)  # [group][candidate] stored bits
    total_weights: int = 0

    def for_budget(self, effective_bits: float) -> "MixedPrecisionPlan":
        """The plan for another budget from the same measured sensitivities (no new measurement)."""
        names = [c.name for c in self.candidates]
        sensitivity = [[self.sensitivity[group[0]][name] for name in names] for group in self.groups]
        floor = sum(min(row) for row in self.group_bits) / self.total_weights
        if effective_bits < floor - 1e-9:
            raise OnnxqError(f"effective bits {effective_bits} is below the smallest possible {floor:.3f} "
                             f"for candidates {names}")
        choice, used = _choose(sensitivity, self.group_bits, effective_bits * self.total_weights)
        assignments = {site: names[choice[i]] for i, group in enumerate(self.groups) for site in group}
        counts = {name: sum(1 for v in assignments.values() if v == name) for name in names}
        logger.info("mixed precision: %.3f bits per weight (budget %.3f); nodes per format: %s",
                    used / self.total_weights, effective_bits, counts)
        return replace(self, assignments=assignments, target_bits=float(effective_bits),
                       effective_bits=float(used / self.total_weights))

    def to_config(self, base: QuantConfig) -> QuantConfig:
        """``base`` with one exact-name override per site."""
        by_name = {c.name: c for c in self.candidates}
        overrides = {f"re:^{re.escape(site)}$": by_name[choice].override() for site, choice in self.assignments.items()}
        return base.with_updates(overrides={**overrides, **dict(base.overrides)})

    def save(self, path: str | os.PathLike, base: QuantConfig) -> None:
        """Write the plan as a ``QuantConfig`` JSON (what ``quantize --config`` reads) plus the search record."""
        data = self.to_config(base).to_dict()
        data["_mixed_precision"] = {
            "target_bits": self.target_bits, "effective_bits": self.effective_bits, "loss": self.loss,
            "assignments": self.assignments, "groups": self.groups, "sensitivity": self.sensitivity,
        }
        with open(path, "w") as f:
            json.dump(data, f, indent=1)

    def summary_rows(self) -> list[tuple]:
        rows = []
        for group in self.groups:
            choice = self.assignments[group[0]]
            rows.append((", ".join(group), choice, self.sensitivity[group[0]].get(choice, 0.0)))
        return rows


def _groups(sites: list[WeightSite]) -> list[list[WeightSite]]:
    """Union of sites sharing an activation or a weight, in site order."""
    parent = list(range(len(sites)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_by_key: dict[tuple, int] = {}
    for i, site in enumerate(sites):
        for key in (("act", id(site.activation)), ("src", id(site.source))):
            if key in first_by_key:
                parent[find(i)] = find(first_by_key[key])
            else:
                first_by_key[key] = i
    groups: dict[int, list[WeightSite]] = {}
    for i, site in enumerate(sites):
        groups.setdefault(find(i), []).append(site)
    return list(groups.values())


def _stored(site: WeightSite, weight_kn: np.ndarray) -> np.ndarray:
    """A ``[K, N]`` float32 weight in the orientation, shape and dtype the site's source stores."""
    data = weight_kn / np.float32(site.alpha) if site.alpha != 1.0 else weight_kn
    if site.transpose:
        data = data.T
    return np.ascontiguousarray(data.reshape(site.tensor.shape.numpy()), dtype=site.dtype.numpy())


def _loss_fn(kind: str):
    def kl(reference: np.ndarray, output: np.ndarray) -> float:
        ref = reference.astype(np.float64)
        out = output.astype(np.float64)
        log_p = ref - ref.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        log_q = out - out.max(-1, keepdims=True)
        log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
        return float((np.exp(log_p) * (log_p - log_q)).sum(-1).mean())

    def mse(reference: np.ndarray, output: np.ndarray) -> float:
        return float(np.sum((output.astype(np.float64) - reference) ** 2) / max(np.sum(reference.astype(np.float64) ** 2), 1e-30))

    return {"kl": kl, "mse": mse}[kind]


def search_mixed_precision(
    model: ir.Model,
    config: QuantConfig,
    calibration_data,
    effective_bits: float,
    candidates: str | Sequence[str] = DEFAULT_CANDIDATES,
    *,
    samples: int = 4,
    loss: str = "auto",
    progress: Progress | None = None,
    providers: list[str] | None = None,
) -> MixedPrecisionPlan:
    """Choose a format per weight site so the average bits per weight is at most ``effective_bits``.

    Args:
        model: the float model (not modified; its weights are read, memory-mapped when external).
        config: base settings (node selection, scheme default for candidates, algorithm used later).
        calibration_data: reader / feeds as for :func:`onnxq.quantize`; ``samples`` of them are used.
        effective_bits: the budget, average stored bits per quantizable weight.
        candidates: format names, e.g. ``"int4_b128,int8_b128,float"``.
        loss: ``"kl"`` (outputs are logits), ``"mse"``, or ``"auto"`` (``kl`` when the first
            output is named like logits, else ``mse``).

    Returns:
        A :class:`MixedPrecisionPlan`; ``plan.to_config(config)`` gives the settings to quantize with.
    """
    formats = parse_candidates(candidates, config)
    fmt = get_format(config.format)
    feeds = materialize(calibration_data, samples, model_inputs=model)
    planned, _ = plan_sites(model, config, embeddings=False)
    sites = [p.site for p in planned if p.site.node.graph is model.graph]
    if not sites:
        raise OnnxqError("no quantizable MatMul/Gemm node found for the mixed-precision search")
    groups = _groups(sites)
    weights_of = lambda group: sum(s.k * s.n for s in group)  # noqa: E731
    total = sum(weights_of(g) for g in groups)
    bits = [[sum(c.bits_per_weight(s, fmt) * s.k * s.n for s in g) for c in formats] for g in groups]
    cheapest = [int(np.argmin(row)) for row in bits]
    floor = sum(bits[i][cheapest[i]] for i in range(len(groups))) / total
    if effective_bits < floor - 1e-9:
        raise OnnxqError(f"effective bits {effective_bits} is below the smallest possible {floor:.3f} "
                         f"for candidates {[c.name for c in formats]}")
    output_name = model.graph.outputs[0].name
    kind = loss if loss != "auto" else ("kl" if "logit" in output_name.lower() else "mse")
    if kind not in ("kl", "mse"):
        raise OnnxqError(f"loss must be 'kl', 'mse' or 'auto', got {loss!r}")
    sensitivity = _measure(model, groups, formats, fmt, feeds, output_name, _loss_fn(kind), progress, providers)

    plan = MixedPrecisionPlan(
        assignments={},
        groups=[[s.name for s in g] for g in groups],
        sensitivity={g[0].name: {formats[c].name: sensitivity[i][c] for c in range(len(formats))}
                     for i, g in enumerate(groups)},
        target_bits=float(effective_bits),
        effective_bits=0.0,
        loss=kind,
        candidates=formats,
        group_bits=bits,
        total_weights=total,
    )
    return plan.for_budget(effective_bits)


def _choose(sensitivity: list[list[float]], bits: list[list[float]], budget: float) -> tuple[list[int], float]:
    """Greedy knapsack: start from each group's cheapest format, then take the upgrade with the
    largest loss reduction per extra bit while it fits. Returns (choice per group, bits used)."""
    choice = [int(np.argmin(row)) for row in bits]
    used = sum(bits[i][choice[i]] for i in range(len(bits)))
    while True:
        best = None
        for i in range(len(bits)):
            for c in range(len(bits[i])):
                extra = bits[i][c] - bits[i][choice[i]]
                gain = sensitivity[i][choice[i]] - sensitivity[i][c]
                if extra <= 0 or gain <= 0 or used + extra > budget + 1e-6:
                    continue
                ratio = gain / extra
                if best is None or ratio > best[0]:
                    best = (ratio, i, c, extra)
        if best is None:
            return choice, used
        _, i, c, extra = best
        choice[i] = c
        used += extra


def _measure(model, groups, formats, fmt, feeds, output_name, loss_fn, progress, providers) -> list[list[float]]:
    """``sensitivity[group][candidate]``: loss with only that group in that format (float: 0)."""
    sources: dict[str, WeightSite] = {}
    for group in groups:
        for site in group:
            sources.setdefault(site.source.name, site)
    graph = model.graph
    moved = [graph.initializers[name] for name in sources if name in graph.initializers]
    if len(moved) != len(sources):
        raise OnnxqError("mixed precision needs every weight as an initializer of the main graph "
                         "(Constant-node or subgraph weights are not supported by the search)")
    for value in moved:
        graph.initializers.pop(value.name)
        graph.inputs.append(value)
    try:
        probe = ActivationProbe(model, [output_name], providers=providers)
        float_weights = {name: site.tensor.numpy() for name, site in sources.items()}
        references = [probe.run({**feed, **float_weights})[output_name] for feed in feeds]
    finally:
        pass
    try:
        sensitivity: list[list[float]] = []
        items = list(enumerate(groups))
        wrapped = progress(items, desc="sensitivity", unit="group") if progress else items
        for _, group in wrapped:
            row = []
            for candidate in formats:
                if candidate.bits is None:
                    row.append(0.0)
                    continue
                replaced = dict(float_weights)
                for site in group:
                    settings = candidate.settings_for(site, fmt)
                    q = quantize_weight(site.weight(), settings.bits, settings.block_size, settings.symmetric,
                                        scale_dtype=site.dtype.numpy())
                    replaced[site.source.name] = _stored(site, q.dequantize())
                losses = [loss_fn(ref, probe.run({**feed, **replaced})[output_name]) for feed, ref in zip(feeds, references)]
                row.append(float(np.mean(losses)))
            sensitivity.append(row)
        return sensitivity
    finally:
        for value in moved:
            graph.inputs.remove(value)
            graph.register_initializer(value)
