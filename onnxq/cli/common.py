"""What the subcommands share: the parser class, quantization settings, calibration readers, progress bars.

Like every module of :mod:`onnxq.cli`, this one is imported to build the parser, so
at module level it imports only what ``import onnxq`` loads anyway; tqdm is
imported when a progress bar is made.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import onnx_ir as ir

from onnxq.calibration import NpzReader, TextReader
from onnxq.calibration.tokenizer import TOKENIZER_JSON
from onnxq.config import BNB4_TYPES, FORMATS, QuantConfig
from onnxq.errors import OnnxqError
from onnxq.model_folder import ModelFolder, open_model_folder

__all__ = [
    "EXIT_USAGE",
    "Parser",
    "add_settings",
    "calibration_reader",
    "check_output",
    "config_from",
    "generation_start",
    "progress_bar",
    "same_file",
]

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse, but with our one-line error format (argparse already exits 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"onnxq: error: {message}\n")


def add_settings(parser: argparse.ArgumentParser) -> None:
    """Quantization settings shared by ``quantize`` and ``inspect`` (None = not given)."""
    group = parser.add_argument_group("quantization settings (override --config)")
    group.add_argument("--config", type=Path, help="JSON file with QuantConfig fields (bits, block_size, overrides, ...)")
    group.add_argument("--bits", type=int, help="2..8 as the format allows: MatMulNBits 2, 4 or 8 (default 4)")
    group.add_argument("--block-size", type=int, help="elements of K per scale as the format allows (MatMulNBits: a "
                                                      "power of two >= 16), or -1 for per-channel (default 32)")
    scheme = group.add_mutually_exclusive_group()
    scheme.add_argument("--asym", dest="symmetric", action="store_false", default=None, help="asymmetric (zero points)")
    scheme.add_argument("--sym", dest="symmetric", action="store_true", help="symmetric, full range (default)")
    group.add_argument("--accuracy-level", type=int, help="MatMulNBits accuracy_level 0-4 (default 0; 4 = int8 activations)")
    group.add_argument("--mse-clip", action="store_true", default=None, help="per-block clip-ratio search on weight MSE (can hurt LLM perplexity: see README)")
    group.add_argument("--format", choices=FORMATS,
                       help="nbits (MatMulNBits, default), qdq (opset-21 DequantizeLinear), bnb4 (MatMulBnb4), "
                            "fpq4 (legacy MatMulFpQ4, AVX-512 hosts only)")
    group.add_argument("--quant-type", choices=BNB4_TYPES, help="bnb4 data type (default nf4)")
    group.add_argument("--quantize-embeddings", action=argparse.BooleanOptionalAction, default=None,
                       help="quantize every Gather embedding table at the node settings (a tied lm_head "
                            "shares the packed weight: what the GenAI model builder writes); "
                            "--no-quantize-embeddings keeps tables and the MatMuls tied to them in float; "
                            "default otherwise: a tied table is packed once at --tied-embedding-bits, "
                            "untied tables stay in float")
    group.add_argument("--tied-embedding-bits", type=int, choices=(2, 4, 8), default=None,
                       help="bits of a tied embedding table shared with its lm_head (default 8)")
    group.add_argument("--include", action="append", metavar="REGEX", help="quantize only nodes matching (repeatable)")
    group.add_argument("--exclude", action="append", metavar="REGEX", help="leave matching nodes in float (repeatable)")


def config_from(args: argparse.Namespace, defaults: Mapping[str, Any] | None = None) -> QuantConfig:
    """The QuantConfig of ``defaults``, then ``--config``, then the flags given on the command line on top.

    Reads the flags of :func:`add_settings` and, where the command has them, those of
    ``quantize``'s calibrated algorithms (``--algo``, ``--samples``, ``--percdamp``, ...).
    ``defaults``: settings that differ from :class:`QuantConfig`'s for this input (a GenAI folder).
    """
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
    base = {**(defaults or {}), **base}
    given = {
        "bits": args.bits, "block_size": args.block_size, "symmetric": args.symmetric,
        "accuracy_level": args.accuracy_level, "mse_clip": args.mse_clip,
        "include": args.include, "exclude": args.exclude,
        "format": args.format, "quant_type": args.quant_type, "quantize_embeddings": args.quantize_embeddings,
        "tied_embedding_bits": args.tied_embedding_bits,
    }
    base.update({k: v for k, v in given.items() if v is not None})
    nested = {
        "gptq": {"act_order": getattr(args, "act_order", None), "percdamp": getattr(args, "percdamp", None),
                 "hessian_shrink": getattr(args, "hessian_shrink", None),
                 "float32_factor": getattr(args, "float32_factor", None),
                 "clip_search": getattr(args, "gptq_clip", None),
                 "refine": getattr(args, "gptq_refine", None),
                 "float_target": getattr(args, "float_target", None)},
        "awq": {"grid": getattr(args, "awq_grid", None), "float_target": getattr(args, "float_target", None),
                "clip": False if getattr(args, "no_awq_clip", None) else None},
        "hqq": {"zero_point": getattr(args, "hqq_zero_point", None)},
        "teq": {"steps": getattr(args, "steps", None)} if getattr(args, "algo", None) == "teq" else {},
        "autoround": {"steps": getattr(args, "steps", None)} if getattr(args, "algo", None) == "autoround" else {},
        "calibration": {"samples": getattr(args, "samples", None),
                        "sequential": False if getattr(args, "one_pass", None) else None,
                        "outlier_token_ratio": getattr(args, "outlier_tokens", None)},
    }
    for key, values in nested.items():
        values = {k: v for k, v in values.items() if v is not None}
        if values:
            base[key] = {**base.get(key, {}), **values}
    if getattr(args, "algo", None) not in (None, "smoothquant"):
        base["algorithm"] = args.algo
    return QuantConfig.from_dict(base, where=str(args.config or "settings"))


def calibration_reader(args: argparse.Namespace, config: QuantConfig, model: ir.Model,
                       model_file: Path | None = None) -> NpzReader | TextReader | None:
    """The reader for ``--calib-data`` (None when not given): .npz inputs, .npy token ids, or text + ``--tokenizer``;
    with ``--generate-calib``, text that the float model at ``model_file`` samples itself."""
    path = args.calib_data
    if getattr(args, "generate_calib", False):
        if path is not None:
            raise OnnxqError("give --calib-data or --generate-calib, not both")
        return _generated_reader(args, config, model, model_file or args.input)
    if path is None:
        return None
    if not path.is_file():
        raise OnnxqError(f"calibration file not found: {path}")
    if path.suffix == ".npz":
        return NpzReader(path)
    samples = config.calibration.samples
    bos = bos_option(getattr(args, "bos", "auto"))
    if path.suffix == ".npy":
        return TextReader(None, model, token_ids=path, seq_len=args.seq_len, samples=samples,
                          bos=None if bos == "auto" else bos)
    tokenizer = tokenizer_for(args.tokenizer, args.input, path)
    return TextReader(path, model, tokenizer=tokenizer, seq_len=args.seq_len, samples=samples, bos=bos)


def _generated_reader(args: argparse.Namespace, config: QuantConfig, model: ir.Model, model_file: Path) -> TextReader:
    """``--generate-calib``: ``--samples`` sequences of ``--seq-len`` tokens sampled by the float model, each
    starting with ``--bos`` (auto: the model's BOS, :func:`~onnxq.calibration.generate.start_token`)."""
    from onnxq.calibration.generate import generate_token_ids

    samples, seq_len = config.calibration.samples, args.seq_len
    ids = generate_token_ids(model_file, samples=samples, seq_len=seq_len,
                             start=generation_start(getattr(args, "bos", "auto"), model_file),
                             progress=progress_bar(getattr(args, "quiet", False)))
    return TextReader(None, model, token_ids=ids.reshape(-1), seq_len=seq_len, samples=samples, bos=None)


def generation_start(text: str, model_file: Path) -> int | None:
    """``--bos`` for generated calibration text: auto is the model's BOS
    (:func:`~onnxq.calibration.generate.start_token`), none a random start token, else the id.

    Raises:
        OnnxqError: a bad ``--bos``, or auto for a model that names no BOS.
    """
    from onnxq.calibration.generate import start_token

    bos = bos_option(text)
    if bos != "auto":
        return bos
    found = start_token(model_file)
    if found is None:
        raise OnnxqError(f"no BOS token id found beside {model_file} (tokenizer.json, genai_config.json, "
                         "config.json); give --bos ID, or --bos none for random start tokens")
    return found


BOS_HELP = ("the token id each window starts with: auto (the default: the tokenizer's BOS when its tokenizer.json "
            "adds one before every text, e.g. Gemma's <bos>; none for .npy token ids), none, or an id")


def bos_option(text: str) -> int | str | None:
    """``--bos``: ``"auto"``, None for ``none``, or the id.

    Raises:
        OnnxqError: anything else.
    """
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        value = int(text)
    except ValueError:
        raise OnnxqError(f"--bos expects auto, none or a token id, got {text!r}") from None
    if value < 0:
        raise OnnxqError(f"--bos expects a token id >= 0, got {value}")
    return value


def tokenizer_for(given: Path | None, model_path: Path, data: Path) -> Path:
    """``--tokenizer`` when given, else the ``tokenizer.json`` beside the model (or in the model folder)."""
    if given is not None:
        return given
    folder = model_path if model_path.is_dir() else model_path.parent
    if (folder / TOKENIZER_JSON).is_file():
        return folder / TOKENIZER_JSON
    raise OnnxqError(f"{data} is read as text and {folder} has no {TOKENIZER_JSON}: give --tokenizer "
                     "(a tokenizer.json, a folder holding one, or an ONNX tokenizer), or token ids as .npy")


GENAI_DEFAULTS = {"accuracy_level": 4}  # the tied table: the general default (8 bits, shared with the lm_head)
"""The ONNX Runtime GenAI model builder's CPU int4 defaults, taken for a GenAI folder unless set."""


def model_input(path: Path) -> tuple[Path, ModelFolder | None, dict[str, Any] | None]:
    """``(model file, its folder or None, the settings defaults for it)`` for a model path or a model folder."""
    if not path.is_dir():
        return path, None, None
    folder = open_model_folder(path)
    return folder.model_file, folder, GENAI_DEFAULTS if folder.kind == "genai" else None


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name the same file (False when that cannot be told)."""
    try:
        return a.resolve() == b.resolve() or (b.exists() and a.samefile(b))
    except OSError:
        return False


def check_output(input_path: Path, output_path: Path, input_data: Sequence[Path]) -> None:
    """Refuse to write over the input model or any file it reads (``input_data``: the loaded input's
    ``onnxq.io.external_data_files``), by real path.

    The output's own data file (``OUT.data``) is checked too: writing it would destroy an input
    whose weights live there.
    """
    if same_file(input_path, output_path):
        raise OnnxqError(f"output path is the input model ({output_path}); choose another output file")
    for written in (output_path, output_path.with_name(output_path.name + ".data")):
        for data in input_data:
            if same_file(data, written):
                raise OnnxqError(f"{written} is the input's external data file ({data}); choose another output")


def progress_bar(quiet: bool) -> Callable[..., Iterable[Any]]:
    """A ``progress(items, desc, unit, total)`` for the library's ``progress=`` hooks: tqdm on stderr, off when quiet."""
    from tqdm import tqdm

    def progress(items: Iterable[Any], desc: str = "quantizing", unit: str = "node",
                 total: int | None = None) -> Iterable[Any]:
        return tqdm(items, desc=desc, unit=unit, total=total, disable=quiet, file=sys.stderr)

    return progress
