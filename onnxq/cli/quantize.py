"""``python -m onnxq quantize FLOAT.onnx OUT.onnx``: weight-only quantization, SmoothQuant W8A8, mixed precision."""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import onnx_ir as ir

from onnxq.algorithms import get_algorithm
from onnxq.api import quantize_with_report, save
from onnxq.cli.common import (BOS_HELP, add_settings, calibration_reader, check_output, config_from, model_input,
                              progress_bar)
from onnxq.config import ALGORITHMS, QuantConfig
from onnxq.errors import OnnxqError
from onnxq.atomic import output_lock
from onnxq.io import StreamedSave, check_output_path, external_data_files, load_model, streams_external_data
from onnxq.model_folder import ModelFolder, write_model_folder
from onnxq.recipes.mixed_precision import DEFAULT_CANDIDATES, MEASURES, search_mixed_precision
from onnxq.recipes.presets import preset_overrides
from onnxq.report import format_records, format_skipped, format_table, model_weight_bytes, summary_line

__all__ = ["add_parser", "run"]

_EXTERNAL_DATA = {"auto": None, "always": True, "never": False}  # --external-data -> save(external_data=...)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``quantize`` command to ``subparsers``; returns its parser."""
    q = subparsers.add_parser("quantize", help="quantize MatMul/Gemm weights to MatMulNBits")
    q.add_argument("input", type=Path, help="float model (.onnx; external data is read memory-mapped), or a model "
                                            "folder (ONNX Runtime GenAI, Optimum: every other file is copied)")
    q.add_argument("output", type=Path, help="where to write the quantized model (a new folder for a folder input)")
    add_settings(q)
    q.add_argument(
        "--external-data", choices=tuple(_EXTERNAL_DATA), default="auto",
        help="write weights to OUTPUT.data (auto, the default: when the input has external data or the "
             "output's weights exceed 256 MiB, so weights are written one at a time)",
    )
    q.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    calib = q.add_argument_group("calibrated algorithms (--algo gptq|awq|..., optional for k_quant)")
    calib.add_argument("--algo", choices=(*ALGORITHMS, "smoothquant"),
                       help="rtn (default), hqq (no data needed), k_quant (llama.cpp's weighted scale search; "
                            "--calib-data optional), gptq, awq, awq+gptq, awq+k_quant, teq or autoround (need "
                            "--calib-data or --generate-calib); "
                            "smoothquant: W8A8 (int8 weights and activations, QDQ) with SmoothQuant")
    calib.add_argument("--sq-alpha", default="auto",
                       help="SmoothQuant migration strength in [0, 1], or 'auto' (default: searched per input group)")
    calib.add_argument("--weight-range", choices=("auto", "7bit", "8bit"), default="auto",
                       help="W8A8 weights: 7-bit avoids int16 saturation in ORT's u8xs8 kernels on x86 CPUs "
                            "without VNNI (auto: 8-bit only when /proc/cpuinfo lists a VNNI flag)")
    calib.add_argument("--no-smooth", action="store_true", help="with --algo smoothquant: plain static W8A8")
    calib.add_argument("--calib-data", type=Path, metavar="FILE",
                       help=".npz of model inputs (NpzReader layouts), .npy of token ids, or a text file (+ --tokenizer)")
    calib.add_argument("--generate-calib", action="store_true",
                       help="calibrate on text the float model samples itself (--samples sequences of --seq-len tokens "
                            "from its BOS, temperature 1; arXiv 2410.17170): no data needed, no domain fitted")
    calib.add_argument("--tokenizer", type=Path, help="tokenizer.json, a folder holding one, or an ONNX tokenizer, for a "
                                                      "text --calib-data (default: the tokenizer.json beside the model)")
    calib.add_argument("--samples", type=int, help="calibration samples (default 128)")
    calib.add_argument("--seq-len", type=int, default=512, help="tokens per sample for text/token-id data (default 512)")
    calib.add_argument("--bos", default="auto", help=BOS_HELP)
    calib.add_argument("--one-pass", action="store_true", default=None,
                       help="calibrate every layer on the float model in one pass (faster) instead of block by block")
    calib.add_argument("--executor", default="local", metavar="local|ray|ray://HOST:PORT",
                       help="where calibration runs: this process (default), a local Ray instance started on "
                            "demand (pip install 'onnxq[ray]'), or a Ray cluster; the result is the same")
    calib.add_argument("--workers", type=int, help="--executor ray: worker processes (default: the cluster's CPUs)")
    calib.add_argument("--checkpoint", type=Path, metavar="DIR",
                       help="save each finished calibration block in DIR; the same command resumes there after "
                            "an interruption")
    calib.add_argument("--outlier-tokens", type=float, metavar="RATIO",
                       help="GPTQ: cap each calibration token's activation at RATIO times its sample's median "
                            "squared norm in the Hessian (the massive first-token activations; default 100; 0: off)")
    calib.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                       help="GPTQ: quantize rows in descending diag(H) order (default on; blocks stay contiguous)")
    calib.add_argument("--percdamp", type=float, help="GPTQ damping, fraction of mean(diag H) (default 0.01)")
    calib.add_argument("--hessian-shrink", type=float, metavar="LAMBDA",
                       help="GPTQ: use (1 - LAMBDA) H + LAMBDA diag(H), LAMBDA in [0, 1] (default 0.5: lower "
                            "perplexity on both real LMs and text domains; 0 = the paper)")
    calib.add_argument("--float32-factor", action="store_true", default=None,
                       help="GPTQ: Cholesky factor in float32 (needs --hessian-shrink >= 0.25): 1.3-1.7x faster "
                            "solves on large K, perplexity 0.1-1%% higher on the LMs measured")
    calib.add_argument("--gptq-clip", action="store_true", default=None,
                       help="GPTQ: each block's clip ratio chosen on its output error through the Hessian before "
                            "the solve (AWQ's clip search; off by default: it lowered SmolLM2's KL by 15%% but raised "
                            "Gemma 3's perplexity, docs/INT4_RESULTS.md)")
    calib.add_argument("--gptq-refine", type=int, metavar="PASSES",
                       help="GPTQ, awq+gptq: passes of coordinate descent on GPTQ's objective after the solve, each "
                            "with a least-squares refit of the block scales (QuantEase; default 2: lower perplexity "
                            "and KL on both real LMs, docs/INT4_RESULTS.md; 0: GPTQ alone)")
    calib.add_argument("--float-target", action="store_true", default=None,
                       help="GPTQ, AWQ, awq+gptq: fit the weights that read a norm (q/k/v, up/gate) to the float "
                            "model's outputs, not to their own on the quantized model's inputs (GPTAQ's asymmetric "
                            "calibration; sequential only; a float path run beside the quantized one). Off by default: it "
                            "lowered the KL by 20%% on both real LMs, perplexity moved both ways (docs/INT4_RESULTS.md)")
    calib.add_argument("--awq-grid", type=int, help="AWQ: alphas tried in [0, 1] (default 20)")
    calib.add_argument("--no-awq-clip", action="store_true", default=None, help="AWQ: skip the clip search")
    calib.add_argument("--steps", type=int, help="TEQ / AutoRound: optimisation steps per layer (default 200)")
    calib.add_argument("--hqq-zero-point", choices=("int", "float"),
                       help="HQQ: uint8 zero points (default) or float zero points (asym only)")
    mixed = q.add_argument_group("mixed precision (the searches need --calib-data; presets do not)")
    budget = mixed.add_mutually_exclusive_group()
    budget.add_argument("--effective-bits", type=float,
                        help="search a format per node for this average of weight bits, counted as ModelOpt's "
                             "auto_quantize counts them: int4 = 4 whatever the block, int8 = 8, float = 16 (e.g. 4.8)")
    budget.add_argument("--stored-bits", type=float,
                        help="the same search for this average of stored bits per weight: codes, padding, scales "
                             "and zero points as the format stores them (int4 block 128 fp32 scales = 4.25)")
    budget.add_argument("--mixed-preset", metavar="NAME[,NAME]",
                        help="fixed 8-bit upgrades, no data needed: lm_head8 (the last MatMul), mixed_layers8 "
                             "(qkv/v/down_proj of the first and last eighth of the layers and every third: the "
                             "GenAI builder's mixed_layers, ModelOpt's layers_8bit)")
    mixed.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                       help=f"formats to choose from (default {DEFAULT_CANDIDATES} at --block-size; e.g. "
                            "int4_b128,int8_b128; 'float' keeps a node in float)")
    mixed.add_argument("--mp-samples", type=int, default=4, help="calibration samples for the sensitivity search")
    mixed.add_argument("--mp-measure", choices=MEASURES, default="proxy",
                       help="proxy (default): one model run per node group, the other candidates scaled by the "
                            "group's own output error; all: one run per group and candidate")
    mixed.add_argument("--plan-out", type=Path, help="where to save the plan (default OUTPUT.plan.json)")
    return q


def run(args: argparse.Namespace) -> int:
    """Quantize ``args.input`` (a model, or a model folder) into ``args.output``; prints the per-node table
    unless ``--quiet``. The output is locked for the whole run: a second writer fails at once."""
    with output_lock(args.output):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    model_file, folder, defaults = model_input(args.input)
    config = config_from(args, defaults)
    given = args.calib_data is not None or args.generate_calib
    calibrated = config.needs_calibration or (given and config.uses_calibration)
    model = load_model(model_file)  # weights in external data stay on disk until quantized
    weights_before = model_weight_bytes(model)
    input_data = external_data_files(model)
    check_output(args.input, args.output, input_data)
    if folder is None:
        check_output_path(args.output)
    reader = calibration_reader(args, config, model, model_file)
    samples = None if reader is None else min(config.calibration.samples, len(reader))  # what the file holds
    if not args.quiet:
        smoothquant = args.algo == "smoothquant"
        print(f"onnxq: {_describe_w8a8(args, samples) if smoothquant else _describe(config, calibrated, samples)}",
              file=sys.stderr)
        hint = None if smoothquant else _speed_hint(folder, config)
        if hint:
            print(f"onnxq: {hint}", file=sys.stderr)
    if args.algo == "smoothquant":
        return _smoothquant(args, config, model, reader)
    progress = progress_bar(args.quiet)
    if args.mixed_preset:
        presets = [p.strip() for p in args.mixed_preset.split(",") if p.strip()]
        config = config.with_updates(overrides={**preset_overrides(model, config, presets), **dict(config.overrides)})
    if args.effective_bits is not None or args.stored_bits is not None:
        config = _mixed_precision_plan(args, config, model, reader, progress)
        if hasattr(reader, "rewind"):
            reader.rewind()
    external_data = _EXTERNAL_DATA[args.external_data]
    # calibration-free, one .onnx with external data: each packed weight is written (and freed) as it is made
    stream = (StreamedSave(args.output) if folder is None and not calibrated
              and streams_external_data(model, external_data) else None)
    with stream or nullcontext():
        executor = _executor(args) if calibrated else None
        try:
            result = quantize_with_report(model, config, reader, progress=progress, executor=executor,
                                          checkpoint=args.checkpoint, sink=None if stream is None else stream.write)
        finally:
            if executor is not None:
                executor.close()
        clamped = _clamped_blocks(config, result.records)
        if clamped:
            print(f"onnxq: {clamped}", file=sys.stderr)
        if folder is not None:
            written = write_model_folder(result.model, folder, args.output, input_data)
        elif stream is not None:
            stream.save(result.model)
            written = args.output
        else:
            save(result.model, args.output, external_data=external_data)
            written = args.output
    records, skipped = result.records, result.skipped
    if not args.quiet:
        print(format_records(records))
        if skipped:
            print()
            print(format_skipped(skipped))
        print()
        print(summary_line(records, skipped, (weights_before, model_weight_bytes(result.model))))
        padded = _padded_blocks(config, records)
        if padded:
            print(padded)
        print(f"wrote {written} in {time.perf_counter() - start:.1f} s")
    return 0


def _executor(args: argparse.Namespace):
    """``--executor`` / ``--workers`` as the API's ``executor`` argument (Ray is imported only when asked for)."""
    if args.workers is not None and args.executor == "local":
        raise OnnxqError("--workers needs --executor ray or ray://HOST:PORT")
    if args.executor == "local":
        return None
    from onnxq.calibration.executor import make_executor

    return make_executor(args.executor, workers=args.workers)


def _speed_hint(folder: ModelFolder | None, config: QuantConfig) -> str | None:
    """One line on the accuracy level: what a GenAI folder got by default, or what a plain model could use."""
    if folder is not None and folder.kind == "genai":
        return (f"ONNX Runtime GenAI folder ({folder.model_file.name}): the model builder's CPU defaults unless set "
                f"(accuracy_level {config.accuracy_level}, {config.describe_embeddings()})")
    if config.format == "nbits" and config.accuracy_level == 0:
        return ("hint: --accuracy-level 4 (int8 activations) runs MatMulNBits about 3x faster on CPU "
                "for a small accuracy cost")
    return None


def _describe(config: QuantConfig, calibrated: bool, samples: int | None) -> str:
    block = "per-channel" if config.block_size == -1 else f"block {config.block_size}"
    scheme = "sym" if config.symmetric else "asym"
    extras = f", {len(config.overrides)} overrides" if config.overrides else ""
    if calibrated:
        mode = "sequential" if config.calibration.sequential else "one pass"
        extras += f", {config.calibration.samples if samples is None else samples} calibration samples ({mode})"
        if "gptq" in config.algorithm and config.gptq.float32_factor:
            extras += ", GPTQ float32 factor"
        if "gptq" in config.algorithm and config.gptq.clip_search:
            extras += ", GPTQ clip search"
        if "gptq" in config.algorithm and config.gptq.refine:
            extras += f", GPTQ refine {config.gptq.refine}"
        algorithm = get_algorithm(config.algorithm)
        if algorithm.float_target(algorithm.options_of(config)):
            extras += ", float target"
    return (f"{config.algorithm} int{config.bits} {block} {scheme}, accuracy_level {config.accuracy_level}"
            f"{', mse clip' if config.mse_clip else ''}{extras}; {config.describe_embeddings()}")


def _describe_w8a8(args: argparse.Namespace, samples: int | None) -> str:
    """The settings line of ``--algo smoothquant`` (W8A8: none of the weight-only settings apply)."""
    smooth = "static, no SmoothQuant" if args.no_smooth else f"SmoothQuant alpha {args.sq_alpha}"
    data = "" if samples is None else f", {samples} calibration samples"
    return f"smoothquant W8A8 (QDQ int8 weights and activations, {_w8a8_weight_bits(args)}-bit weights), {smooth}{data}"


def _w8a8_weight_bits(args: argparse.Namespace) -> int:
    """7 (``--weight-range 7bit``, or auto on a CPU without VNNI) or 8."""
    return 7 if args.weight_range == "7bit" or (args.weight_range == "auto" and not _has_vnni()) else 8


def _clamped_blocks(config: QuantConfig, records) -> str | None:
    """One line when some nodes were written with a smaller block than asked: a block larger than K
    only adds padding (MatMulNBits pads K to the block), so the format uses one block over K."""
    clamped = [r for r in records if (asked := config.settings_for(r.name)) is not None
               and asked.block_size != -1 and r.block_size < asked.block_size]
    if not clamped:
        return None
    asked = sorted({config.settings_for(r.name).block_size for r in clamped})
    written = sorted({r.block_size for r in clamped})
    return (f"block_size {'/'.join(map(str, asked))} is larger than K on {len(clamped)} of {len(records)} nodes: "
            f"those use one block over K (block {'/'.join(map(str, written))}: the same values, without padding)")


def _padded_blocks(config: QuantConfig, records) -> str | None:
    """One line when MatMulNBits pads K up to a multiple of the block (``ceil(K / block)`` blocks are
    stored, the last one partly zeros): the share of stored codes that are padding, and the largest
    block that divides every such K (no padding; e.g. K = 576 at block 128 stores 640 codes per column,
    11% padding, and block 64 both divides it and stores fewer bytes with int4 and float scales)."""
    if config.format != "nbits":
        return None
    padded = [r for r in records if r.shared_with is None and r.k % r.block_size]
    if not padded:
        return None
    stored = sum(-(-r.k // r.block_size) * r.block_size * r.n for r in padded)
    padding = stored - sum(r.k * r.n for r in padded)
    ks = sorted({r.k for r in padded})
    fits = min(min(r.k & -r.k, r.block_size) for r in padded)  # the largest power of two dividing each K
    advice = f"; block {fits} divides K" if fits >= 16 else ""
    return (f"note: the block does not divide K = {', '.join(map(str, ks))} on {len(padded)} of {len(records)} "
            f"nodes: {padding / stored:.1%} of their stored codes are zero padding{advice}")


def _smoothquant(args: argparse.Namespace, config: QuantConfig, model: ir.Model, reader) -> int:
    from onnxq.recipes.smoothquant import quantize_w8a8  # imports onnxruntime.quantization: only when asked for

    if reader is None:
        raise OnnxqError("--algo smoothquant needs calibration data (--calib-data or --generate-calib)")
    alpha = args.sq_alpha if args.sq_alpha == "auto" else _float(args.sq_alpha, "--sq-alpha")
    start = time.perf_counter()
    reduce_range = _w8a8_weight_bits(args) == 7
    quantize_w8a8(model, reader, args.output, smooth=not args.no_smooth, alpha=alpha,
                  samples=config.calibration.samples, reduce_range=reduce_range,
                  external_data=_EXTERNAL_DATA[args.external_data])
    if not args.quiet:
        print(f"wrote {args.output} (W8A8 QDQ, {'7' if reduce_range else '8'}-bit weights"
              f"{'' if args.no_smooth else ', SmoothQuant alpha ' + str(alpha)}) "
              f"in {time.perf_counter() - start:.1f} s")
    return 0


def _has_vnni() -> bool:
    """Whether the CPU has VNNI (ORT's int8 kernels then accumulate without int16 saturation)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "vnni" in flags


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise OnnxqError(f"{flag} expects a number or 'auto', got {text!r}") from None


def _mixed_precision_plan(args: argparse.Namespace, config: QuantConfig, model: ir.Model, reader,
                          progress) -> QuantConfig:
    flag, bits, counting = (("--effective-bits", args.effective_bits, "nominal") if args.effective_bits is not None
                            else ("--stored-bits", args.stored_bits, "stored"))
    if reader is None:
        raise OnnxqError(f"{flag} needs calibration data (--calib-data or --generate-calib) to measure sensitivities "
                         "(--mixed-preset needs none)")
    plan = search_mixed_precision(model, config, reader, bits, args.candidates, samples=args.mp_samples,
                                  counting=counting, measure=args.mp_measure, progress=progress)
    plan_path = args.plan_out or args.output.with_name(args.output.name + ".plan.json")
    plan.save(plan_path, config)
    if not args.quiet:
        print(format_table(("nodes (one format per group)", "format", f"{plan.loss} when alone"), plan.summary_rows()))
        print(f"plan: {plan.effective_bits:.3f} {counting} bits per weight (budget {plan.target_bits}"
              f"{plan.other_countings()}); "
              f"saved to {plan_path}")
        print()
    return plan.to_config(config)
