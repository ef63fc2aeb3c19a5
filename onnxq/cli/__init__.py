"""``python -m onnxq``: the command-line converter.

Every user error (bad file, bad setting, nothing to quantize) is printed as one
line ``onnxq: error: ...`` on stderr with exit code 2; nothing is written then.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from onnxq.api import inspect_model, quantize, records_of, save
from onnxq.calibration import NpzReader, TextReader
from onnxq.config import ALGORITHMS, BNB4_TYPES, FORMATS, QuantConfig
from onnxq.recipes.mixed_precision import DEFAULT_CANDIDATES, search_mixed_precision
from onnxq.passes.convert import convert_model
from onnxq.passes.unpack import unpack_model
from onnxq.io import load_model
from onnxq.errors import OnnxqError
from onnxq.cli.eval import add_eval_parser, run_eval
from onnxq.summary import print_quant_summary
from onnxq.report import format_records, format_skipped, format_table, summary_line

__all__ = ["main", "build_parser"]

logger = logging.getLogger("onnxq")

_EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but with our one-line error format (argparse already exits 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(_EXIT_USAGE, f"onnxq: error: {message}\n")


def _add_settings(parser: argparse.ArgumentParser) -> None:
    """Quantization settings shared by ``quantize`` and ``inspect`` (None = not given)."""
    group = parser.add_argument_group("quantization settings (override --config)")
    group.add_argument("--config", type=Path, help="JSON file with QuantConfig fields (bits, block_size, overrides, ...)")
    group.add_argument("--bits", type=int, help="2, 4 or 8 (default 4)")
    group.add_argument("--block-size", type=int, help="power of two >= 16, or -1 for per-channel (default 32)")
    scheme = group.add_mutually_exclusive_group()
    scheme.add_argument("--asym", dest="symmetric", action="store_false", default=None, help="asymmetric (zero points)")
    scheme.add_argument("--sym", dest="symmetric", action="store_true", help="symmetric, full range (default)")
    group.add_argument("--accuracy-level", type=int, help="MatMulNBits accuracy_level 0-4 (default 0; 4 = int8 activations)")
    group.add_argument("--mse-clip", action="store_true", default=None, help="per-block clip-ratio search on weight MSE (can hurt LLM perplexity: see README)")
    group.add_argument("--format", choices=FORMATS,
                       help="nbits (MatMulNBits, default), qdq (opset-21 DequantizeLinear), bnb4 (MatMulBnb4), "
                            "fpq4 (legacy MatMulFpQ4, AVX-512 hosts only)")
    group.add_argument("--quant-type", choices=BNB4_TYPES, help="bnb4 data type (default nf4)")
    group.add_argument("--quantize-embeddings", action="store_true", default=None,
                       help="also quantize Gather embeddings (a tied lm_head shares the packed weight)")
    group.add_argument("--include", action="append", metavar="REGEX", help="quantize only nodes matching (repeatable)")
    group.add_argument("--exclude", action="append", metavar="REGEX", help="leave matching nodes in float (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m onnxq", description="Weight-only quantization of ONNX models for ONNX Runtime.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    q = commands.add_parser("quantize", help="quantize MatMul/Gemm weights to MatMulNBits")
    q.add_argument("input", type=Path, help="float model (.onnx; external data is read memory-mapped)")
    q.add_argument("output", type=Path, help="where to write the quantized model")
    _add_settings(q)
    q.add_argument(
        "--external-data", choices=("auto", "always", "never"), default="auto",
        help="write weights to OUTPUT.data (auto: when the weights exceed 1.5 GB)",
    )
    q.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    calib = q.add_argument_group("calibrated algorithms (--algo gptq|awq)")
    calib.add_argument("--algo", choices=(*ALGORITHMS, "smoothquant"),
                       help="rtn (default), hqq (no data needed), gptq, awq, teq or autoround (need --calib-data); "
                            "smoothquant: W8A8 (int8 weights and activations, QDQ) with SmoothQuant")
    calib.add_argument("--sq-alpha", default="auto",
                       help="SmoothQuant migration strength in [0, 1], or 'auto' (default: searched per input group)")
    calib.add_argument("--weight-range", choices=("auto", "7bit", "8bit"), default="auto",
                       help="W8A8 weights: 7-bit avoids int16 saturation in ORT's u8xs8 kernels on x86 CPUs "
                            "without VNNI (auto: 8-bit only when /proc/cpuinfo lists a VNNI flag)")
    calib.add_argument("--no-smooth", action="store_true", help="with --algo smoothquant: plain static W8A8")
    calib.add_argument("--calib-data", type=Path, metavar="FILE",
                       help=".npz of model inputs (NpzReader layouts), .npy of token ids, or a text file (+ --tokenizer)")
    calib.add_argument("--tokenizer", type=Path, help="ONNX tokenizer model (onnxruntime-extensions) for a text --calib-data")
    calib.add_argument("--samples", type=int, help="calibration samples (default 128)")
    calib.add_argument("--seq-len", type=int, default=512, help="tokens per sample for text/token-id data (default 512)")
    calib.add_argument("--one-pass", action="store_true", default=None,
                       help="calibrate every layer on the float model in one pass (faster) instead of block by block")
    calib.add_argument("--act-order", action="store_true", default=None, help="GPTQ: descending diag(H) order")
    calib.add_argument("--percdamp", type=float, help="GPTQ damping, fraction of mean(diag H) (default 0.01)")
    calib.add_argument("--awq-grid", type=int, help="AWQ: alphas tried in [0, 1] (default 20)")
    calib.add_argument("--no-awq-clip", action="store_true", default=None, help="AWQ: skip the clip search")
    calib.add_argument("--steps", type=int, help="TEQ / AutoRound: optimisation steps per layer (default 200)")
    calib.add_argument("--hqq-zero-point", choices=("int", "float"),
                       help="HQQ: uint8 zero points (default) or float zero points (asym only)")
    mixed = q.add_argument_group("mixed precision (needs --calib-data)")
    mixed.add_argument("--effective-bits", type=float,
                       help="search a format per node for this average of stored bits per weight (e.g. 4.8)")
    mixed.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                       help=f"formats to choose from (default {DEFAULT_CANDIDATES}; 'float' keeps a node in float)")
    mixed.add_argument("--mp-samples", type=int, default=4, help="calibration samples for the sensitivity search")
    mixed.add_argument("--plan-out", type=Path, help="where to save the plan (default OUTPUT.plan.json)")

    c = commands.add_parser("convert", help="convert between MatMulNBits and QDQ (bit-exact)")
    c.add_argument("input", type=Path)
    c.add_argument("output", type=Path)
    c.add_argument("--to", choices=("qdq", "nbits"), required=True)
    c.add_argument("--accuracy-level", type=int, default=0, help="for --to nbits (default 0)")

    add_eval_parser(commands)

    sm = commands.add_parser("summary", help="list the quantized nodes of a model and their formats")
    sm.add_argument("model", type=Path)

    u = commands.add_parser("unpack", help="dequantize quantized weights back to float MatMul/Gather")
    u.add_argument("input", type=Path)
    u.add_argument("output", type=Path)

    i = commands.add_parser("inspect", help="show what would be quantized and why nodes would be skipped")
    i.add_argument("model", type=Path)
    _add_settings(i)
    return parser


def _config_from(args: argparse.Namespace) -> QuantConfig:
    base: dict = {}
    if args.config is not None:
        try:
            base = json.loads(args.config.read_text())
        except FileNotFoundError:
            raise OnnxqError(f"config file not found: {args.config}") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise OnnxqError(f"cannot read config file {args.config}: {exc}") from None
        if not isinstance(base, dict):
            raise OnnxqError(f"config file {args.config} must hold a JSON object, found {type(base).__name__}")
    given = {
        "bits": args.bits, "block_size": args.block_size, "symmetric": args.symmetric,
        "accuracy_level": args.accuracy_level, "mse_clip": args.mse_clip,
        "include": args.include, "exclude": args.exclude,
        "format": args.format, "quant_type": args.quant_type, "quantize_embeddings": args.quantize_embeddings,
    }
    base.update({k: v for k, v in given.items() if v is not None})
    nested = {
        "gptq": {"act_order": getattr(args, "act_order", None), "percdamp": getattr(args, "percdamp", None)},
        "awq": {"grid": getattr(args, "awq_grid", None),
                "clip": False if getattr(args, "no_awq_clip", None) else None},
        "hqq": {"zero_point": getattr(args, "hqq_zero_point", None)},
        "teq": {"steps": getattr(args, "steps", None)} if getattr(args, "algo", None) == "teq" else {},
        "autoround": {"steps": getattr(args, "steps", None)} if getattr(args, "algo", None) == "autoround" else {},
        "calibration": {"samples": getattr(args, "samples", None),
                        "sequential": False if getattr(args, "one_pass", None) else None},
    }
    for key, values in nested.items():
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            base[key] = {**base.get(key, {}), **values}
    if getattr(args, "algo", None) not in (None, "smoothquant"):
        base["algorithm"] = args.algo
    return QuantConfig.from_dict(base, where=str(args.config or "settings"))


def _calibration_reader(args: argparse.Namespace, config: QuantConfig, model):
    """The reader for ``--calib-data`` (None when not given)."""
    path = args.calib_data
    if path is None:
        return None
    if not path.is_file():
        raise OnnxqError(f"calibration file not found: {path}")
    if path.suffix == ".npz":
        return NpzReader(path)
    samples = config.calibration.samples
    if path.suffix == ".npy":
        return TextReader(None, model, token_ids=path, seq_len=args.seq_len, samples=samples)
    if args.tokenizer is None:
        raise OnnxqError(f"{path} is read as text: give --tokenizer TOKENIZER.onnx (or pass token ids as .npy)")
    return TextReader(path, model, tokenizer=args.tokenizer, seq_len=args.seq_len, samples=samples)


def _describe(config: QuantConfig) -> str:
    block = "per-channel" if config.block_size == -1 else f"block {config.block_size}"
    scheme = "sym" if config.symmetric else "asym"
    extras = f", {len(config.overrides)} overrides" if config.overrides else ""
    if config.needs_calibration:
        mode = "sequential" if config.calibration.sequential else "one pass"
        extras += f", {config.calibration.samples} calibration samples ({mode})"
    return (f"{config.algorithm} int{config.bits} {block} {scheme}, accuracy_level {config.accuracy_level}"
            f"{', mse clip' if config.mse_clip else ''}{extras}")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    except OSError:
        return False


def _quantize(args: argparse.Namespace) -> int:
    config = _config_from(args)
    if _same_file(args.input, args.output):
        raise OnnxqError(f"output path is the input model ({args.output}); choose another output file")
    if not args.quiet:
        print(f"onnxq: {_describe(config)}", file=sys.stderr)
    start = time.perf_counter()

    def progress(items, desc: str = "quantizing", unit: str = "node"):
        return tqdm(items, desc=desc, unit=unit, disable=args.quiet, file=sys.stderr)

    model = load_model(args.input)
    reader = _calibration_reader(args, config, model)
    if args.algo == "smoothquant":
        return _smoothquant(args, config, model, reader)
    if args.effective_bits is not None:
        config = _mixed_precision_plan(args, config, model, reader, progress)
        if hasattr(reader, "rewind"):
            reader.rewind()
    model = quantize(model, config, reader, progress=progress)
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    save(model, args.output, external_data=external)
    records, skipped = records_of(model)
    if not args.quiet:
        print(format_records(records))
        if skipped:
            print()
            print(format_skipped(skipped))
        print()
        print(summary_line(records, skipped))
        print(f"wrote {args.output} in {time.perf_counter() - start:.1f} s")
    return 0


def _smoothquant(args: argparse.Namespace, config: QuantConfig, model, reader) -> int:
    from onnxq.recipes.smoothquant import quantize_w8a8  # imports onnxruntime.quantization: only when asked for

    if reader is None:
        raise OnnxqError("--algo smoothquant needs calibration data (--calib-data)")
    alpha = args.sq_alpha if args.sq_alpha == "auto" else _float(args.sq_alpha, "--sq-alpha")
    start = time.perf_counter()
    reduce_range = args.weight_range == "7bit" or (args.weight_range == "auto" and not _has_vnni())
    quantize_w8a8(model, reader, args.output, smooth=not args.no_smooth, alpha=alpha,
                  samples=config.calibration.samples, reduce_range=reduce_range,
                  external_data={"auto": None, "always": True, "never": False}[args.external_data])
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


def _mixed_precision_plan(args, config: QuantConfig, model, reader, progress) -> QuantConfig:
    if reader is None:
        raise OnnxqError("--effective-bits needs calibration data (--calib-data) to measure sensitivities")
    plan = search_mixed_precision(model, config, reader, args.effective_bits, args.candidates,
                                  samples=args.mp_samples, progress=progress)
    plan_path = args.plan_out or args.output.with_name(args.output.name + ".plan.json")
    plan.save(plan_path, config)
    if not args.quiet:
        print(format_table(("nodes (one format per group)", "format", f"{plan.loss} when alone"), plan.summary_rows()))
        print(f"plan: {plan.effective_bits:.3f} bits per weight (budget {plan.target_bits}); saved to {plan_path}")
        print()
    return plan.to_config(config)


def _convert(args: argparse.Namespace) -> int:
    if _same_file(args.input, args.output):
        raise OnnxqError(f"output path is the input model ({args.output}); choose another output file")
    model = convert_model(load_model(args.input), args.to, accuracy_level=args.accuracy_level)
    save(model, args.output)
    print(f"wrote {args.output}")
    return 0


def _unpack(args: argparse.Namespace) -> int:
    if _same_file(args.input, args.output):
        raise OnnxqError(f"output path is the input model ({args.output}); choose another output file")
    model = unpack_model(load_model(args.input))
    save(model, args.output)
    print(f"wrote {args.output}")
    return 0


def _summary(args: argparse.Namespace) -> int:
    print_quant_summary(args.model)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    config = _config_from(args)
    planned, skipped = inspect_model(args.model, config)
    print(format_table(("node", "op", "K", "N", "would become"), planned) if planned else "nothing would be quantized")
    if skipped:
        print()
        print(format_skipped(skipped))
    print()
    print(f"{len(planned)} nodes would be quantized, {len(skipped)} left in float (accuracy_level {config.accuracy_level})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed as one line
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    handlers = {"quantize": _quantize, "inspect": _inspect, "convert": _convert, "unpack": _unpack,
                "summary": _summary, "eval": run_eval}
    try:
        return handlers[args.command](args)
    except OnnxqError as exc:
        print(f"onnxq: error: {exc}", file=sys.stderr)
        return _EXIT_USAGE
    except KeyboardInterrupt:
        print("onnxq: interrupted; nothing was written", file=sys.stderr)
        return 130
