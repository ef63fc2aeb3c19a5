"""SmoothQuant W8A8 (Xiao et al., arXiv 2211.10438) through ONNX Runtime.

Two steps, each usable alone:

1. :func:`smooth_model` (float in, float out, same outputs): run the float model
   through onnxruntime on calibration data and record ``max|x|`` per input channel of
   every *input group* (the MatMul/Gemm weight sites reading one activation, e.g.
   q/k/v); compute SmoothQuant's scales ``s`` (:mod:`onnxq.algorithms.smoothquant`;
   ``alpha`` fixed or searched per group); divide the activation by ``s`` where it is
   free (:func:`~onnxq.graph.scale_folding.fold_input_scale`: into the producing
   norm / Mul / Add / MatMul constants, else an inserted ``Mul``) and multiply the
   siblings' weight rows by ``s``. Scaled weights are new initializers: a weight also
   read elsewhere keeps its old value there. A tied ``Transpose -> MatMul`` weight
   becomes an untied ``[K, N]`` initializer.
2. :func:`quantize_w8a8`: (optionally) smooth, then ONNX Runtime's own static
   quantizer (``onnxruntime.quantization.quantize_static``): QDQ format, int8 weights
   (per output channel by default), uint8 or int8 activations with per-tensor MinMax
   ranges from the same calibration data; only MatMul/Gemm nodes. ``smooth=False`` is
   plain static W8A8, the baseline SmoothQuant improves on.

Groups are smoothed in reverse topological order and each reads its weights from the
graph as it is then, so a scale folded into a producing MatMul's columns is kept when
that MatMul's own rows are scaled. Weight sites inside subgraphs are left alone.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.quantization import CalibrationDataReader as OrtCalibrationDataReader
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

from onnxq.algorithms.smoothquant import (
    SMOOTHQUANT_ALPHAS,
    smooth_scales,
    smoothquant_search_alpha,
    weight_row_absmax,
)
from onnxq.calibration import AbsMaxAccumulator, ActivationProbe, ListReader, RowSampler, materialize
from onnxq.errors import OnnxqError
from onnxq.atomic import commit, output_lock, temp_folder, write_error
from onnxq.io import check_output_path, load_model, save_model, wants_external_data
from onnxq.graph.constants import add_initializer
from onnxq.graph.scale_folding import fold_input_scale
from onnxq.graph.sites import WeightSite, find_weight_sites

__all__ = [
    "ACTIVATION_TYPES",
    "FeedListReader",
    "SMOOTH_REPORT_KEY",
    "SmoothedGroup",
    "quantize_w8a8",
    "smooth_model",
]

logger = logging.getLogger(__name__)

SMOOTH_REPORT_KEY = "onnxq.recipes.smoothquant"
"""``model.meta[SMOOTH_REPORT_KEY]``: the :class:`SmoothedGroup` list of the last :func:`smooth_model`."""

ACTIVATION_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class SmoothedGroup:
    """What :func:`smooth_model` did for one input group.

    Attributes:
        activation: name of the activation the group reads.
        sites: the weight sites (node names) whose rows were scaled.
        alpha: the exponent used.
        loss: W8A8 fake-quant output error on the row sample with this alpha
            (``alpha="auto"`` only, else None).
        loss_plain: the same error without smoothing (``alpha="auto"`` only).
        where: where ``1 / s`` went (``"folded into ..."`` or ``"Mul node ... inserted"``).
    """

    activation: str
    sites: tuple[str, ...]
    alpha: float
    loss: float | None
    loss_plain: float | None
    where: str


class FeedListReader(ListReader, OrtCalibrationDataReader):
    """onnxq's :class:`~onnxq.calibration.ListReader` as ONNX Runtime's ``CalibrationDataReader``."""


def _check_alpha(alpha: float | str) -> float | str:
    if isinstance(alpha, str):
        if alpha != "auto":
            raise OnnxqError(f"SmoothQuant alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
        return alpha
    if not (isinstance(alpha, (int, float)) and 0.0 <= float(alpha) <= 1.0):
        raise OnnxqError(f"SmoothQuant alpha must be a number in [0, 1] or 'auto', got {alpha!r}")
    return float(alpha)


def _input_groups(model: ir.Model, exclude: Collection[str]) -> dict[str, list[ir.Node]]:
    """Activation name -> the main-graph weight-site nodes reading it (graph order)."""
    sites, _ = find_weight_sites(model)
    groups: dict[str, list[ir.Node]] = {}
    for site in sites:
        if site.node.graph is model.graph and site.name not in exclude:
            groups.setdefault(site.activation.name, []).append(site.node)
    return groups


def _collect(model: ir.Model, names: list[str], feeds: list[Feed], rows: int | None, providers) -> dict:
    """Per activation: ``[AbsMaxAccumulator]`` (+ a ``RowSampler`` of ``rows`` rows when given)."""
    probe = ActivationProbe(model, names, providers=providers)
    stats: dict[str, list] = {}
    for feed in feeds:
        activations = probe.run(feed)
        mask = feed.get("attention_mask")
        for index, name in enumerate(names):
            x = activations[name]
            if name not in stats:
                stats[name] = [AbsMaxAccumulator(x.shape[-1])]
                if rows is not None:
                    stats[name].append(RowSampler(rows, seed=index, k=x.shape[-1]))
            row_mask = mask if mask is not None and mask.size * x.shape[-1] == x.size else None
            for accumulator in stats[name]:
                accumulator.update(x, row_mask)
        del activations
    return stats


def _scale_weight_rows(graph: ir.Graph, site: WeightSite, s: np.ndarray) -> None:
    """Replace the site's weight ``W: [K, N]`` by ``s[:, None] * W`` (a new initializer, the site's dtype)."""
    stored = np.asarray(site.tensor.numpy(), dtype=np.float32)
    if site.kind == "Transpose+MatMul":
        scaled = stored.T * s[:, None]  # materialized [K, N]: the Transpose may be shared (tied embedding)
    elif site.transpose:  # Gemm transB=1: B is [N, K]
        scaled = stored * s[None, :]
    else:  # MatMul [.., K, N] or Gemm [K, N]
        scaled = stored * s[:, None]
    value = add_initializer(graph, scaled.astype(site.dtype.numpy()), f"{site.source.name}_smooth",
                            set(graph.initializers), site.dtype)
    site.node.replace_input_with(1, value)
    transpose = site.transpose_node
    if transpose is not None and not transpose.outputs[0].uses() and not transpose.outputs[0].is_graph_output():
        graph.remove(transpose, safe=True)


def _drop_orphans(graph: ir.Graph, names: list[str]) -> None:
    """Unregister the initializers among ``names`` that smoothing left without readers."""
    inputs = {id(v) for v in graph.inputs}
    for name in names:
        value = graph.initializers[name]
        if not value.uses() and not value.is_graph_output() and id(value) not in inputs:
            del graph.initializers[name]


def smooth_model(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    calibration_data,
    *,
    alpha: float | str = 0.5,
    samples: int | None = None,
    sample_rows: int = 512,
    alphas: Sequence[float] = SMOOTHQUANT_ALPHAS,
    nodes_to_exclude: Collection[str] = (),
    providers: list[str] | None = None,
) -> ir.Model:
    """Apply SmoothQuant's per-channel scaling to every MatMul/Gemm input group (arXiv 2211.10438).

    The float model computes the same outputs afterwards (up to float rounding); its
    activations entering the weight sites have their outlier channels divided down and
    the weights' rows multiplied up, so per-tensor int8 activations lose less.

    Args:
        model: a path, an ``onnx.ModelProto`` (not modified) or an ``ir.Model`` (modified
            in place and returned).
        calibration_data: a ``CalibrationDataReader`` (ORT's protocol), a list of feeds,
            an iterable of feeds or an ``.npz`` path (see :mod:`onnxq.calibration`).
        alpha: migration strength in ``[0, 1]`` (0.5 in the paper for most models), or
            ``"auto"``: per group, the value of ``alphas`` minimising the W8A8 fake-quant
            output error on ``sample_rows`` sampled activation rows
            (:func:`~onnxq.algorithms.smoothquant.smoothquant_search_alpha`).
        samples: use at most this many calibration samples (all when None).
        sample_rows: rows sampled per group for ``alpha="auto"``.
        alphas: the grid for ``"auto"`` (default 0.30, 0.35, ..., 0.70).
        nodes_to_exclude: weight-site node names to leave untouched.
        providers: onnxruntime execution providers for calibration (default CPU).

    Returns:
        The smoothed ``ir.Model``; ``model.meta[SMOOTH_REPORT_KEY]`` lists a
        :class:`SmoothedGroup` per group.

    Raises:
        OnnxqError: bad ``alpha``, no weight site, calibration data not matching the
            model's inputs, NaN/Inf activations.
    """
    alpha = _check_alpha(alpha)
    if sample_rows < 1:
        raise OnnxqError(f"sample_rows must be >= 1, got {sample_rows}")
    start = time.perf_counter()
    model = load_model(model)
    groups = _input_groups(model, set(nodes_to_exclude))
    if not groups:
        raise OnnxqError("no MatMul/Gemm node with a constant weight to smooth")
    feeds = materialize(calibration_data, samples, model_inputs=model)
    stats = _collect(model, list(groups), feeds, sample_rows if alpha == "auto" else None, providers)
    used_before = [name for name, value in model.graph.initializers.items() if value.uses()]
    report: list[SmoothedGroup] = []
    for name in reversed(list(groups)):  # see the module docstring for why backwards
        nodes = groups[name]
        node_ids = {id(n) for n in nodes}
        sites = [s for s in find_weight_sites(model)[0] if id(s.node) in node_ids]
        weights = [s.weight() for s in sites]
        for site, w in zip(sites, weights):
            if not np.isfinite(w).all():
                raise OnnxqError(f"weight {site.source.name!r} of node {site.name!r} has NaN/Inf values")
        act_absmax = stats[name][0].value()
        loss = loss_plain = None
        if alpha == "auto":
            search = smoothquant_search_alpha(stats[name][1].rows(), weights, act_absmax, alphas)
            s, chosen = search.scales, search.alpha
            loss, loss_plain = float(search.loss_by_alpha.min()), search.loss_plain
        else:
            s, chosen = smooth_scales(act_absmax, weight_row_absmax(weights), alpha), alpha
        where = fold_input_scale(model.graph, sites[0].activation, [site.node for site in sites], s,
                                 dtype=sites[0].dtype)
        for site in sites:
            _scale_weight_rows(model.graph, site, s)
        report.append(SmoothedGroup(name, tuple(site.name for site in sites), chosen, loss, loss_plain, where))
        logger.debug("smoothquant %s (%s): alpha %.2f, %s", name, ", ".join(site.name for site in sites), chosen, where)
    report.reverse()
    _drop_orphans(model.graph, used_before)
    model.meta[SMOOTH_REPORT_KEY] = report
    folded = sum(g.where.startswith("folded") for g in report)
    logger.info("smoothquant: %d input groups (%d folded, %d with an inserted Mul), alpha %s, %d samples, %.1f s",
                len(report), folded, len(report) - folded,
                alpha if alpha != "auto" else "auto (mean %.2f)" % np.mean([g.alpha for g in report]),
                len(feeds), time.perf_counter() - start)
    return model


def _weight_site_names(model: ir.Model, exclude: Collection[str]) -> list[str]:
    """Names of the main-graph weight sites not in ``exclude`` (unnamed ones get their onnxq display name)."""
    names = []
    for site in find_weight_sites(model)[0]:
        if site.node.graph is model.graph and site.name not in exclude:
            site.node.name = site.name
            names.append(site.name)
    return names


def quantize_w8a8(
    model: str | os.PathLike | ir.Model | onnx.ModelProto,
    calibration_data,
    output: str | os.PathLike | None = None,
    *,
    smooth: bool = True,
    alpha: float | str = 0.5,
    per_channel: bool = True,
    reduce_range: bool = False,
    activation_type: str = "uint8",
    samples: int | None = None,
    sample_rows: int = 512,
    nodes_to_exclude: Collection[str] = (),
    const_weights_only: bool = True,
    external_data: bool | None = None,
    providers: list[str] | None = None,
    extra_options: Mapping | None = None,
) -> Path | onnx.ModelProto:
    """W8A8 static quantization of MatMul/Gemm as QDQ, with SmoothQuant first (arXiv 2211.10438).

    Args:
        model: a path, an ``onnx.ModelProto`` (not modified) or an ``ir.Model`` (smoothed
            in place when ``smooth``).
        calibration_data: as for :func:`smooth_model`; the same samples set SmoothQuant's
            statistics and the activations' int8 ranges (MinMax).
        output: where to write the quantized model (atomically; weights go to
            ``<name>.data`` when ``external_data``). When None the model is returned as an
            ``onnx.ModelProto`` with its weights loaded.
        smooth: apply :func:`smooth_model` first; ``False`` gives plain static W8A8.
        alpha, sample_rows, nodes_to_exclude, providers: as for :func:`smooth_model`
            (``nodes_to_exclude`` are also left in float by the quantizer).
        per_channel: int8 weights with one scale per output channel (else per tensor).
        reduce_range: 7-bit weights (ORT's advice for x86 CPUs without VNNI, whose u8 x s8
            kernels add pairs of products in saturating int16).
        activation_type: ``"uint8"`` (asymmetric, ORT's CPU default) or ``"int8"``.
        samples: calibration samples to use (all when None).
        const_weights_only: quantize only the weight sites (MatMul/Gemm with a constant
            weight: the linear layers; unnamed ones are given their onnxq display name),
            not activation x activation MatMuls such as attention scores. The outputs of
            quantized nodes stay float (int8 GEMM, float result, as in the paper).
        external_data: weights in external data for the intermediate and output files;
            None: as :func:`onnxq.io.wants_external_data` (an input in external data, or above 256 MiB).
        extra_options: more ``quantize_static`` ``extra_options`` (they win over ours).

    Returns:
        ``Path(output)``, or the quantized ``onnx.ModelProto`` when ``output`` is None.

    Raises:
        OnnxqError: bad settings or calibration data, or ONNX Runtime's quantizer failed.
    """
    if activation_type not in ACTIVATION_TYPES:
        raise OnnxqError(f"activation_type must be one of {', '.join(ACTIVATION_TYPES)}, got {activation_type!r}")
    alpha = _check_alpha(alpha)
    start = time.perf_counter()
    ir_model = load_model(model)
    feeds = materialize(calibration_data, samples, model_inputs=ir_model)
    if smooth:
        ir_model = smooth_model(ir_model, feeds, alpha=alpha, sample_rows=sample_rows,
                                nodes_to_exclude=nodes_to_exclude, providers=providers)
        groups = ir_model.meta[SMOOTH_REPORT_KEY]
        ir_model.metadata_props[SMOOTH_REPORT_KEY] = json.dumps(
            {"alpha": alpha, "groups": {g.activation: round(g.alpha, 2) for g in groups}})
    if external_data is None:
        external_data = wants_external_data(ir_model)
    # int8 x int8 products with float outputs (SmoothQuant's W8A8 GEMM): no QDQ on the outputs
    options = {"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"], **(extra_options or {})}
    nodes_to_quantize = None
    if const_weights_only:
        nodes_to_quantize = _weight_site_names(ir_model, set(nodes_to_exclude))
        if not nodes_to_quantize:
            raise OnnxqError("no MatMul/Gemm node with a constant weight to quantize")
    out_path = None if output is None else Path(output)
    if out_path is not None:
        check_output_path(out_path)
    with ExitStack() as stack:
        if out_path is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="onnxq-w8a8-")))
        else:
            stack.enter_context(output_lock(out_path))
            tmp = stack.enter_context(temp_folder(out_path))
        return _quantize_static(ir_model, feeds, tmp, out_path, external_data, per_channel=per_channel,
                                reduce_range=reduce_range, activation_type=activation_type,
                                nodes_to_quantize=nodes_to_quantize, nodes_to_exclude=nodes_to_exclude,
                                providers=providers, options=options, smooth=smooth, start=start)


def _quantize_static(ir_model: ir.Model, feeds: list, tmp: Path, out_path: Path | None, external_data: bool, *,
                     per_channel: bool, reduce_range: bool, activation_type: str,
                     nodes_to_quantize: list[str] | None, nodes_to_exclude: Collection[str], providers,
                     options: dict, smooth: bool, start: float) -> Path | onnx.ModelProto:
    """ORT's ``quantize_static`` on ``ir_model`` saved in ``tmp``; the result committed to ``out_path``
    (or returned as a ModelProto when None)."""
    out_name = "model.onnx" if out_path is None else out_path.name
    float_path = tmp / "float" / "model.onnx"
    float_path.parent.mkdir()
    save_model(ir_model, float_path, external_data=external_data)
    quant_path = tmp / out_name
    try:
        with _ort_warnings_as_debug():
            quantize_static(
                float_path, quant_path, FeedListReader(feeds),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm"],
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=ACTIVATION_TYPES[activation_type],
                weight_type=QuantType.QInt8,
                nodes_to_quantize=nodes_to_quantize,
                nodes_to_exclude=list(nodes_to_exclude),
                use_external_data_format=external_data,
                calibrate_method=CalibrationMethod.MinMax,
                calibration_providers=providers,
                extra_options=options,
            )
    except Exception as exc:  # onnxruntime raises many types
        raise OnnxqError(f"onnxruntime's static quantizer failed: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    logger.info("w8a8%s: quantized in %.1f s", " + smoothquant" if smooth else "", time.perf_counter() - start)
    if out_path is None:
        return onnx.load(quant_path, load_external_data=True)
    folder = out_path.parent if str(out_path.parent) else Path(".")
    data_name = f"{out_name}.data"
    written_data = external_data and (tmp / data_name).exists()
    try:
        commit([*([(tmp / data_name, folder / data_name)] if written_data else []), (quant_path, out_path)],
               remove=[] if written_data else [folder / data_name])
    except OSError as exc:
        raise write_error(out_path, exc) from None
    return out_path


class _DebugFilter(logging.Filter):
    """Drops records below ERROR that are logged on the root logger, re-logging them on ours at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        logger.debug("onnxruntime: %s", record.getMessage())
        return False


@contextmanager
def _ort_warnings_as_debug() -> Iterator[None]:
    """onnxruntime.quantization warns on the root logger (``Please consider to run pre-processing ... <URL>``,
    tensors whose type it cannot infer): advice for its own users, noise for ours (shown with ``-v``)."""
    root = logging.getLogger()
    quiet = _DebugFilter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)
