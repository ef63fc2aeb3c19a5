"""Mixed precision under an effective-bits budget (the ModelOpt ``auto_quantize`` idea, on ONNX).

Each weight site may take one format from a candidate list (e.g. ``int4``, ``int8``,
``int4_b32``, ``float``). The search

1. groups sites that must share a format: siblings reading the same input (q/k/v,
   up/gate, so one scale search / one activation format serves them) and sites
   sharing one weight;
2. measures each group's sensitivity: the model runs on a few calibration samples with
   only that group's weights replaced by their round-to-nearest fake-quantized values,
   and the loss is the KL divergence of the output distribution from the float model's
   (``loss="kl"``, for logits) or the relative squared error of the outputs (``loss="mse"``).
   What makes it fast: the weights are session inputs (one session per block serves every
   measurement); only the part of the model after the group's block runs, from that block's
   cached inputs (the whole model for a weight that other nodes read too, such as a tied
   embedding table's Gather: both of its uses are measured); the samples run as one batch;
   and with ``measure="proxy"`` (default) only the group's coarsest candidate is run through
   the model: the loss of each other
   candidate is that loss scaled by the ratio of the group's own output errors
   ``||X (W - Q_c(W))||^2``, measured on the same run's input rows ``X`` (a per-layer proxy
   that is exact when the output loss is quadratic in the layer's output error).
   ``measure="all"`` runs every candidate;
3. assumes the losses add up across groups and picks formats greedily (largest loss
   reduction per extra bit first) until the average bits per weight reaches the budget.

Bits per weight are counted two ways (``counting``):

* ``"nominal"`` (default, as ModelOpt's ``auto_quantize`` counts ``effective_bits``): the
  format's weight bits, int4 = 4 whatever the block, int8 = 8, float = 16;
* ``"stored"``: what the configured format stores, as it counts it
  (:meth:`onnxq.formats.base.Format.stored_bits`: codes, padding, scales and zero points;
  MatMulNBits ``int4_b128`` with fp32 scales is ``4 + 32/128 = 4.25`` bits; ``float`` is the
  model's own dtype, 32 for fp32).

The plan is a :class:`~onnxq.config.QuantConfig` with one exact-name override per site,
saved as JSON that ``quantize --config`` reads.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from onnxq.calibration import ActivationProbe, materialize
from onnxq.calibration.blocks import find_blocks
from onnxq.config import NodeSettings, QuantConfig
from onnxq.core import quantize_weight
from onnxq.errors import OnnxqError
from onnxq.formats import Format, WeightSettings, get_format
from onnxq.graph.edit import only_used_by
from onnxq.graph.sites import WeightSite
from onnxq.passes.quantize_weights import Progress, plan_sites

__all__ = ["DEFAULT_CANDIDATES", "Candidate", "MixedPrecisionPlan", "parse_candidates", "search_mixed_precision"]

logger = logging.getLogger(__name__)

DEFAULT_CANDIDATES = "int4,int8"
COUNTINGS = ("nominal", "stored")
MEASURES = ("proxy", "all")
PROXY_ROWS = 256  # input rows per group for the proxy's output-error ratios
_KL_CHUNK = 1 << 20
"""float32 logits per chunk of the KL (4 MiB: 21 positions at a 49k vocabulary, 4 at 262k), so that a
chunk's temporary is reused by the allocator instead of being mapped, page-faulted and unmapped."""
_THREADS = os.cpu_count() or 1
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

    def bits_per_weight(self, site: WeightSite, fmt: Format, counting: str = "stored") -> float:
        """Bits per weight of ``site`` in this candidate: nominal (float = 16), or as ``fmt`` stores it."""
        if counting == "nominal":
            return 16.0 if self.bits is None else float(self.bits)
        if self.bits is None:
            return float(site.dtype.itemsize * 8)
        return fmt.stored_bits(site.k, site.n, self.settings_for(site, fmt), site.dtype) / (site.k * site.n)

    def override(self) -> dict:
        if self.bits is None:
            return {"skip": True}
        return {"bits": self.bits, "block_size": self.block_size, "symmetric": self.symmetric}


def parse_candidates(spec: str | Sequence[str], base: QuantConfig) -> list[Candidate]:
    """``"int4,int8_b128,float"`` -> candidates (block defaults to ``base.block_size``, scheme to ``base.symmetric``)."""
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
    total_weights: int = 0
    counting: str = "nominal"  # the budget's counting, one of COUNTINGS
    # counting -> [group][candidate] bits of the group's weights in that candidate, for every counting
    group_bits: dict[str, list[list[float]]] = field(repr=False, default_factory=dict)
    bits_per_weight: dict[str, float] = field(default_factory=dict)  # counting -> the plan's average

    def for_budget(self, effective_bits: float) -> MixedPrecisionPlan:
        """The plan for another budget from the same measured sensitivities (no new measurement)."""
        names = [c.name for c in self.candidates]
        sensitivity = [[self.sensitivity[group[0]][name] for name in names] for group in self.groups]
        floor = sum(min(row) for row in self.group_bits[self.counting]) / self.total_weights
        if effective_bits < floor - 1e-9:
            raise OnnxqError(f"{self.counting} bits per weight {effective_bits} is below the smallest possible "
                             f"{floor:.3f} for candidates {names}")
        choice, used = _choose(sensitivity, self.group_bits[self.counting], effective_bits * self.total_weights)
        assignments = {site: names[choice[i]] for i, group in enumerate(self.groups) for site in group}
        counts = {name: sum(1 for v in assignments.values() if v == name) for name in names}
        per_weight = {counting: float(sum(bits[i][c] for i, c in enumerate(choice)) / self.total_weights)
                      for counting, bits in self.group_bits.items()}
        plan = replace(self, assignments=assignments, target_bits=float(effective_bits),
                       effective_bits=float(used / self.total_weights), bits_per_weight=per_weight)
        logger.info("mixed precision: %.3f %s bits per weight (budget %.3f%s); nodes per format: %s",
                    plan.effective_bits, self.counting, effective_bits, plan.other_countings(), counts)
        return plan

    def other_countings(self) -> str:
        """E.g. ``", 4.398 nominal"``: the plan's bits per weight under the countings it was not searched in."""
        return "".join(f", {value:.3f} {way}" for way, value in self.bits_per_weight.items() if way != self.counting)

    def to_config(self, base: QuantConfig) -> QuantConfig:
        """``base`` with one exact-name override per site."""
        by_name = {c.name: c for c in self.candidates}
        overrides = {f"re:^{re.escape(site)}$": by_name[choice].override() for site, choice in self.assignments.items()}
        return base.with_updates(overrides={**overrides, **dict(base.overrides)})

    def save(self, path: str | os.PathLike, base: QuantConfig) -> None:
        """Write the plan as a ``QuantConfig`` JSON (what ``quantize --config`` reads) plus the search record."""
        data = self.to_config(base).to_dict()
        data["_mixed_precision"] = {
            "target_bits": self.target_bits, "effective_bits": self.effective_bits, "counting": self.counting,
            "bits_per_weight": self.bits_per_weight, "loss": self.loss,
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


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 ``log softmax`` over the last axis."""
    shifted = logits.astype(np.float32) - logits.max(-1, keepdims=True).astype(np.float32)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


class _KL:
    """Mean KL(p_reference || p_output) per position, for logits ``[..., vocab]``.

    Per position, with the output's logits ``z`` shifted by their maximum (``z' = z - max z``) and
    ``sum_v p_v = 1``: ``KL = sum_v p_v log p_v - sum_v p_v z'_v + log sum_v exp(z'_v)`` (the same
    decomposition as :func:`onnxq.eval.compare_lms`). The reference's ``p`` and ``sum p log p`` are
    kept; an output costs one max, subtraction, dot product and exp per logit, summed in float64,
    on chunks of :data:`_KL_CHUNK` logits in parallel threads (numpy releases the GIL). The two
    full log-softmaxes it replaces took most of Gemma 3's search (262k vocabulary: 831 s, now
    219 s; docs/SPEED.md).
    """

    def __init__(self, reference: np.ndarray) -> None:
        log_p = _log_softmax(reference).reshape(-1, reference.shape[-1])
        self.p = np.exp(log_p)
        self.p_log_p = np.einsum("tv,tv->t", self.p, log_p, dtype=np.float64)

    def __call__(self, output: np.ndarray) -> float:
        z = np.asarray(output, dtype=np.float32).reshape(self.p.shape)
        chunk = max(1, _KL_CHUNK // z.shape[1])

        def positions(start: int) -> np.ndarray:
            rows = slice(start, start + chunk)
            shifted = z[rows] - z[rows].max(axis=-1, keepdims=True)
            cross = np.einsum("tv,tv->t", self.p[rows], shifted, dtype=np.float64)
            np.exp(shifted, out=shifted)
            return self.p_log_p[rows] - cross + np.log(shifted.sum(axis=-1, dtype=np.float64))

        with ThreadPoolExecutor(_THREADS) as pool:
            return float(np.concatenate(list(pool.map(positions, range(0, len(z), chunk)))).mean())


class _RelativeSquaredError:
    """``||output - reference||^2 / ||reference||^2``."""

    def __init__(self, reference: np.ndarray) -> None:
        self.reference = reference.astype(np.float64)
        self.norm = max(float(np.sum(self.reference ** 2)), 1e-30)

    def __call__(self, output: np.ndarray) -> float:
        return float(np.sum((output.astype(np.float64) - self.reference) ** 2) / self.norm)


_LOSSES = {"kl": _KL, "mse": _RelativeSquaredError}


def search_mixed_precision(
    model: ir.Model,
    config: QuantConfig,
    calibration_data,
    effective_bits: float,
    candidates: str | Sequence[str] = DEFAULT_CANDIDATES,
    *,
    samples: int = 4,
    loss: str = "auto",
    counting: str = "nominal",
    measure: str = "proxy",
    progress: Progress | None = None,
    providers: list[str] | None = None,
) -> MixedPrecisionPlan:
    """Choose a format per weight site so the average bits per weight is at most ``effective_bits``.

    Args:
        model: the float model (not modified; its weights are read, memory-mapped when external).
        config: base settings (node selection, block size and scheme defaults for candidates,
            algorithm used later).
        calibration_data: reader / feeds as for :func:`onnxq.quantize`; ``samples`` of them are used.
        effective_bits: the budget, average bits per quantizable weight as ``counting`` counts them.
        candidates: format names, e.g. ``"int4,int8"`` or ``"int4_b128,int8_b128,float"``.
        loss: ``"kl"`` (outputs are logits), ``"mse"``, or ``"auto"`` (``kl`` when the first
            output is named like logits, else ``mse``).
        counting: ``"nominal"`` (ModelOpt's: int4 = 4, int8 = 8, float = 16) or ``"stored"``
            (codes, padding, scales and zero points as the format stores them).
        measure: ``"proxy"`` (one model run per group, the other candidates scaled by the
            group's own output error) or ``"all"`` (one model run per group and candidate).

    Returns:
        A :class:`MixedPrecisionPlan`; ``plan.to_config(config)`` gives the settings to quantize with.
    """
    if counting not in COUNTINGS:
        raise OnnxqError(f"counting must be one of {COUNTINGS}, got {counting!r}")
    if measure not in MEASURES:
        raise OnnxqError(f"measure must be one of {MEASURES}, got {measure!r}")
    formats = parse_candidates(candidates, config)
    fmt = get_format(config.format)
    feeds = materialize(calibration_data, samples, model_inputs=model)
    planned, _ = plan_sites(model, config, embeddings=False)
    sites = [p.site for p in planned if p.site.node.graph is model.graph]
    if not sites:
        raise OnnxqError("no quantizable MatMul/Gemm node found for the mixed-precision search")
    groups = _groups(sites)
    weights_of = lambda group: sum(s.k * s.n for s in group)
    total = sum(weights_of(g) for g in groups)
    bits_by_counting = {way: [[sum(c.bits_per_weight(s, fmt, way) * s.k * s.n for s in g) for c in formats]
                              for g in groups] for way in COUNTINGS}
    bits = bits_by_counting[counting]
    floor = sum(min(row) for row in bits) / total
    if effective_bits < floor - 1e-9:
        raise OnnxqError(f"{counting} bits per weight {effective_bits} is below the smallest possible {floor:.3f} "
                         f"for candidates {[c.name for c in formats]}")
    output_name = model.graph.outputs[0].name
    kind = loss if loss != "auto" else ("kl" if "logit" in output_name.lower() else "mse")
    if kind not in ("kl", "mse"):
        raise OnnxqError(f"loss must be 'kl', 'mse' or 'auto', got {loss!r}")
    start = time.perf_counter()
    sensitivity = _Measurement(model, sites, groups, formats, fmt, output_name, _LOSSES[kind], providers).run(
        _batched(feeds, model), measure, progress)
    logger.info("sensitivity of %d groups x %d candidates (%s) in %.1f s", len(groups), len(formats), measure,
                time.perf_counter() - start)

    plan = MixedPrecisionPlan(
        assignments={},
        groups=[[s.name for s in g] for g in groups],
        sensitivity={g[0].name: {formats[c].name: sensitivity[i][c] for c in range(len(formats))}
                     for i, g in enumerate(groups)},
        target_bits=float(effective_bits),
        effective_bits=0.0,
        loss=kind,
        candidates=formats,
        total_weights=total,
        counting=counting,
        group_bits=bits_by_counting,
    )
    return plan.for_budget(effective_bits)


def _batched(feeds: list[dict[str, np.ndarray]], model: ir.Model) -> list[dict[str, np.ndarray]]:
    """The feeds as one batch (concatenated along axis 0) when they have the same shapes and every
    graph input takes a free batch dimension; otherwise unchanged."""
    if len(feeds) < 2:
        return feeds
    first = feeds[0]
    same = all(f.keys() == first.keys() and all(f[k].shape == first[k].shape for k in first) for f in feeds)
    inputs = {v.name: v for v in model.graph.inputs}
    free = all(name in inputs and inputs[name].shape is not None and len(inputs[name].shape) >= 1
               and not isinstance(inputs[name].shape[0], int) and first[name].ndim >= 1 for name in first)
    if not (same and free):
        return feeds
    return [{name: np.concatenate([f[name] for f in feeds], axis=0) for name in first}]


def _choose(sensitivity: list[list[float]], bits: list[list[float]], budget: float) -> tuple[list[int], float]:
    """Greedy knapsack: start from each group's cheapest format (of equally cheap ones, the lowest
    loss: under nominal counting int4 at block 32 costs what int4 at block 128 does), then take the
    upgrade with the largest loss reduction per extra bit while it fits. Returns (choice per group,
    bits used)."""
    choice = [min(range(len(row)), key=lambda c, row=row, loss=loss: (row[c], loss[c]))
              for row, loss in zip(bits, sensitivity)]
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


class _Measurement:
    """``sensitivity[group][candidate]``: the output loss with only that group in that format (float: 0).

    The float model runs once on the (batched) feeds and keeps its output and the inputs of every
    block that later blocks read (the residual stream). A group is then measured by running only
    the model's suffix from its block, on those cached values, with the group's weights replaced.
    """

    def __init__(self, model, sites, groups, formats, fmt, output_name, loss_type, providers) -> None:
        self.model, self.groups, self.formats, self.fmt = model, groups, formats, fmt
        self.output_name, self.loss_type, self.providers = output_name, loss_type, providers
        self.blocks = find_blocks(model, sites)
        block_of = {id(site.node): block.index for block in self.blocks for site in block.sites}
        # a group whose weight another node also reads (a tied table's Gather, before the first block) runs
        # from the graph's inputs: a suffix from its block, fed cached float values, would miss that reader
        self.group_block = [0 if _read_elsewhere(group) else min(block_of[id(site.node)] for site in group)
                            for group in groups]
        produced: dict[str, int] = {}
        for block in self.blocks:
            for name in block.outputs:
                produced.setdefault(name, block.index)
        self.cuts = []  # per block: the values computed before it that it or later blocks read
        for block in self.blocks:
            later = {name for other in self.blocks[block.index:] for name in other.inputs}
            self.cuts.append(sorted(name for name in later if produced.get(name, block.index) < block.index))

    def run(self, feeds, measure: str, progress) -> list[list[float]]:
        sources: dict[str, WeightSite] = {}
        for group in self.groups:
            for site in group:
                sources.setdefault(site.source.name, site)
        graph = self.model.graph
        moved = [graph.initializers[name] for name in sources if name in graph.initializers]
        if len(moved) != len(sources):
            raise OnnxqError("mixed precision needs every weight as an initializer of the main graph "
                             "(Constant-node or subgraph weights are not supported by the search)")
        for value in moved:
            graph.initializers.pop(value.name)
            graph.inputs.append(value)
        try:
            return self._measure(feeds, {name: site.tensor.numpy() for name, site in sources.items()}, measure,
                                 progress)
        finally:
            for value in moved:
                graph.inputs.remove(value)
                graph.register_initializer(value)

    def _measure(self, feeds, float_weights, measure, progress) -> list[list[float]]:
        cached = sorted({name for cut in self.cuts for name in cut})
        reference = ActivationProbe(self.model, [self.output_name, *cached], providers=self.providers)
        outputs = [reference.run({**feed, **float_weights}) for feed in feeds]
        del reference
        # each measured run writes the model's output into one reused array per shape: an LM's logits are
        # large (Gemma 3: 537 MB), and fresh pages for every run cost more than the loss computed on them
        by_shape: dict[tuple, np.ndarray] = {}
        buffers = [by_shape.setdefault((values[self.output_name].shape, values[self.output_name].dtype),
                                       np.empty_like(values[self.output_name])) for values in outputs]
        losses = [self.loss_type(values.pop(self.output_name)) for values in outputs]
        probes: dict[int, ActivationProbe] = {}
        order = sorted(range(len(self.groups)), key=lambda i: self.group_block[i])
        sensitivity: list[list[float]] = [[] for _ in self.groups]
        wrapped = progress(order, desc="sensitivity", unit="group") if progress else order
        for i in wrapped:
            group, block = self.groups[i], self.group_block[i]
            activations = list(dict.fromkeys(site.activation.name for site in group))
            if block not in probes:
                probes.clear()  # one suffix session alive at a time
                probes[block] = ActivationProbe(self.model, [self.output_name, *self._inputs_of(block)],
                                                feed_names=self.cuts[block], providers=self.providers)
            sensitivity[i] = self._group(group, probes[block], activations, feeds, outputs, losses, buffers,
                                         float_weights, measure)
        return sensitivity

    def _inputs_of(self, block: int) -> list[str]:
        return [name for group, b in zip(self.groups, self.group_block) if b == block
                for name in dict.fromkeys(site.activation.name for site in group)]

    def _group(self, group, probe, activations, feeds, outputs, loss_fns, buffers, float_weights,
               measure) -> list[float]:
        candidates = [c for c, candidate in enumerate(self.formats) if candidate.bits is not None]
        if not candidates:
            return [0.0] * len(self.formats)
        measured = candidates if measure == "all" else [  # proxy: the coarsest, the best-resolved loss
            min(candidates, key=lambda c: (self.formats[c].bits, -self.formats[c].block_size))]
        losses: dict[int, float] = {}
        rows: dict[str, list[np.ndarray]] = {name: [] for name in activations}
        kept: list[np.ndarray] = []  # proxy: the measured candidate's weights, for its own output error
        # one candidate's quantized weights alive at a time: a tied table's are as large as the table
        for c in measured:
            dequantized = self._dequantized(group, self.formats[c])
            replaced = {**float_weights, **{site.source.name: _stored(site, q) for site, q in zip(group, dequantized)}}
            values = []
            for feed, reference, loss_fn, buffer in zip(feeds, outputs, loss_fns, buffers):
                cut = {name: reference[name] for name in probe.input_names if name in reference}
                result = probe.run({**feed, **replaced, **cut}, out={self.output_name: buffer})
                values.append(loss_fn(result[self.output_name]))
                if measure == "proxy":
                    for name in activations:
                        rows[name].append(result[name].reshape(-1, result[name].shape[-1]))
            losses[c] = float(np.mean(values))
            kept = dequantized if measure == "proxy" else []
            del replaced, dequantized
        if measure == "all":
            return [losses.get(c, 0.0) for c in range(len(self.formats))]
        (probe_c,) = measured
        x = {name: _row_sample(np.concatenate(parts)) for name, parts in rows.items()}
        errors = [0.0] * len(self.formats)
        for c in candidates:
            errors[c] = _output_error(group, kept if c == probe_c else self._dequantized(group, self.formats[c]), x)
        scale = losses[probe_c] / errors[probe_c] if errors[probe_c] > 0 else 0.0
        return [e * scale for e in errors]

    def _dequantized(self, group, candidate) -> list[np.ndarray]:
        """Per site: its weight ``[K, N]`` round-to-nearest quantized to ``candidate`` and dequantized."""
        dequantized = []
        for site in group:
            settings = candidate.settings_for(site, self.fmt)
            dequantized.append(quantize_weight(site.weight(), settings.bits, settings.block_size, settings.symmetric,
                                               scale_dtype=site.dtype.numpy()).dequantize())
        return dequantized


def _read_elsewhere(group: list[WeightSite]) -> bool:
    """Whether a node other than the group's own (and a Transpose feeding only them) reads a group's weight's values."""
    own = {id(site.node) for site in group}
    own |= {id(user) for site in group for user, _ in site.source.uses()
            if user.op_type == "Transpose" and all(only_used_by(out, own) for out in user.outputs)}
    return not all(only_used_by(site.source, own) for site in group)


def _row_sample(x: np.ndarray, rows: int = PROXY_ROWS) -> np.ndarray:
    """At most ``rows`` evenly spaced rows of ``x: [T, K]``, float32 (the proxy's error ratios need few)."""
    if len(x) > rows:
        x = x[np.linspace(0, len(x) - 1, rows).astype(np.int64)]
    return np.ascontiguousarray(x, dtype=np.float32)


def _output_error(group, dequantized: list[np.ndarray], x: dict[str, np.ndarray]) -> float:
    """``sum_i ||X_i (W_i - Q(W_i))||_F^2`` over the group's sites (``X_i``: the site's input rows).

    ``dequantized`` (``Q(W_i)``, ``[K, N]`` float32 each) is overwritten with ``W_i - Q(W_i)``: no
    temporary as large as the weight.
    """
    total = 0.0
    for site, q in zip(group, dequantized):
        difference = np.subtract(site.weight(), q, out=q)
        total += float(np.sum((x[site.activation.name] @ difference) ** 2, dtype=np.float64))
    return total
