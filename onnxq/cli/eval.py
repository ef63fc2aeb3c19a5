"""``python -m onnxq eval FLOAT.onnx QUANT.onnx --data ...``: accuracy of a quantized model.

Two kinds of evaluation (:mod:`onnxq.eval.metrics`):

* ``lm``: causal LMs (``input_ids -> logits``): perplexity of both models, mean
  ``KL(p_float || p_quant)`` per token and top-1 agreement, on windows of
  ``--context`` tokens of ``--data`` (a ``.npy`` of token ids, or a text file
  tokenized by ``--tokenizer``). With two or more windows the quantized perplexity's
  increase gets a 95% paired bootstrap interval over the windows, and ``--json`` holds
  the per-window sums (``window_*``) for intervals of other statistics.
* ``embedding``: encoders: cosine similarity of ``--output`` (default
  ``sentence_embedding``) per vector. ``--data`` is a text file (one sample per
  non-empty line, tokenized by ``--tokenizer``, at most ``--max-tokens`` ids each)
  or a ``.npy`` of token ids (windows of ``--context`` tokens).

``--kind auto`` (the default) picks ``lm`` when the float model has an output named
``logits`` and ``embedding`` when it has ``--output``. Bad input (missing files, a
model without ``input_ids``, too few tokens) is one line ``onnxq: error: ...`` on
stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from onnxq.calibration import InputFiller, ListReader, TextReader, specs_of_session, tokenize
from onnxq.calibration.text import read_text
from onnxq.calibration.tokenizer import bos_token
from onnxq.cli.common import BOS_HELP, bos_option, model_input, progress_bar, tokenizer_for
from onnxq.errors import OnnxqError
from onnxq.io import load_model

__all__ = ["add_parser", "run"]

_DECODE_STEPS = 16  # tokens decoded one at a time by the KV-cache check (after a prefill of the rest)
_LEVEL = 0.95  # of the perplexity increase's bootstrap interval over windows
_MIN_WINDOWS_FOR_INTERVAL = 2  # one window has nothing to resample


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``eval`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``); returns its parser."""
    e = subparsers.add_parser("eval", help="compare a quantized model with its float original (perplexity, KL, cosine)",
                              description=__doc__.splitlines()[0])
    e.add_argument("float_model", type=Path, metavar="FLOAT.onnx", help="the float model")
    e.add_argument("quant_model", type=Path, metavar="QUANT.onnx", help="the quantized model")
    e.add_argument("--data", type=Path, required=True, metavar="FILE",
                   help=".npy of token ids, or a text file (with --tokenizer)")
    e.add_argument("--tokenizer", type=Path, help="tokenizer.json, a folder holding one, or an ONNX tokenizer, for a "
                                                  "text --data (default: the tokenizer.json beside the float model)")
    e.add_argument("--kind", choices=("auto", "lm", "embedding"), default="auto",
                   help="lm: perplexity/KL/top-1; embedding: cosine (auto: from the model's outputs)")
    e.add_argument("--context", type=int, default=256, help="tokens per window (default 256)")
    e.add_argument("--stride", type=int, help="lm: tokens between window starts (default: --context, no overlap)")
    e.add_argument("--max-windows", type=int, help="use at most N windows, evenly spaced over the data")
    e.add_argument("--bos", default="auto", help="lm: " + BOS_HELP)
    e.add_argument("--batch", type=int, default=1, help="lm: windows per onnxruntime run (default 1)")
    e.add_argument("--output", default="sentence_embedding", help="embedding: the output compared (default sentence_embedding)")
    e.add_argument("--max-tokens", type=int, default=128, help="embedding: ids kept per text line (default 128)")
    e.add_argument("--json", type=Path, metavar="OUT.json", help="also write the results as JSON")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    return e


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise OnnxqError(f"{what} not found: {path}")


def _model_file(path: Path, what: str) -> Path:
    """The model file of ``path``: itself, or the model of a model folder (GenAI, Optimum)."""
    model_file = model_input(path)[0]
    _check_file(model_file, what)
    return model_file


def _kind(args: argparse.Namespace, outputs: list[str]) -> str:
    if args.kind != "auto":
        return args.kind
    if "logits" in outputs:
        return "lm"
    if args.output in outputs:
        return "embedding"
    raise OnnxqError(f"cannot tell the kind of model from its outputs ({', '.join(outputs)}); give --kind lm|embedding")


def _token_ids(args: argparse.Namespace) -> np.ndarray:
    if args.data.suffix == ".npy":
        try:
            ids = np.load(args.data, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise OnnxqError(f"cannot read token ids from {args.data} as .npy ({exc})") from None
        return ids
    return tokenize(read_text(args.data), tokenizer_for(args.tokenizer, args.float_model, args.data))


def _bos(args: argparse.Namespace) -> int | None:
    """``--bos`` resolved: auto is the tokenizer's BOS for text data (none for .npy token ids)."""
    bos = bos_option(args.bos)
    if bos != "auto":
        return bos
    if args.data.suffix == ".npy":
        return None
    return bos_token(tokenizer_for(args.tokenizer, args.float_model, args.data))


def _embedding_feeds(args: argparse.Namespace, session):
    if args.data.suffix == ".npy":
        ids = _token_ids(args)
        windows = len(ids) // args.context if np.ndim(ids) == 1 else 0
        samples = min(windows, args.max_windows) if args.max_windows else max(windows, 1)
        return TextReader(None, specs_of_session(session), token_ids=ids, seq_len=args.context, samples=samples)
    tokenizer = tokenizer_for(args.tokenizer, args.float_model, args.data)
    lines = [line for line in read_text(args.data).splitlines() if line.strip()]
    if args.max_windows:
        lines = [lines[i] for i in np.unique(np.linspace(0, len(lines) - 1, args.max_windows).round().astype(int))]
    filler = InputFiller(specs_of_session(session), "the float model")
    feeds = [filler.feed(tokenize(line, tokenizer)[:args.max_tokens][None, :]) for line in lines]
    if not feeds:
        raise OnnxqError(f"{args.data} has no non-empty line to evaluate")
    return ListReader(feeds)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _evaluate(args: argparse.Namespace) -> dict:
    from onnxq.eval.metrics import (  # onnxruntime: on run
        compare_embeddings, compare_lm, decode_check, make_session, perplexity_increase_interval)

    float_model = _model_file(args.float_model, "float model")
    quant_model = _model_file(args.quant_model, "quantized model")
    _check_file(args.data, "evaluation data")
    progress = progress_bar(args.quiet)
    graph = load_model(float_model).graph  # external data stays on disk: names only
    kind = _kind(args, [v.name for v in graph.outputs])
    start = time.perf_counter()
    if kind == "lm":
        ids = _token_ids(args)
        bos = _bos(args)
        if bos is not None and len(ids) and ids[0] == bos:  # the tokenizer's own, at the text's start
            ids = ids[1:]
        result = compare_lm(float_model, quant_model, ids, context=args.context, stride=args.stride,
                            max_windows=args.max_windows, batch=args.batch, progress=progress, bos=bos)
        values = {"kind": kind, **vars(result), "bos": bos}
        if result.windows >= _MIN_WINDOWS_FOR_INTERVAL:
            values["ppl_increase_interval"] = perplexity_increase_interval(result, _LEVEL)
        if any(v.name.startswith("past_key_values.") for v in graph.inputs):
            window = np.asarray(ids).reshape(-1)[:args.context]  # prefill + decode through the KV cache
            steps = min(_DECODE_STEPS, len(window) - 1)
            for name, model in (("float", float_model), ("quant", quant_model)):
                try:
                    values[f"decode_{name}"] = vars(decode_check(model, window, steps=steps))
                except OnnxqError as exc:  # e.g. an onnxruntime kernel that cannot decode this graph
                    values[f"decode_{name}"] = {"error": str(exc)}
    else:
        float_session = make_session(float_model)
        result = compare_embeddings(float_session, quant_model, _embedding_feeds(args, float_session),
                                    output=args.output, progress=progress)
        values = {"kind": kind, "output": args.output, **vars(result)}
    values |= {"float_model": str(args.float_model), "quant_model": str(args.quant_model), "data": str(args.data),
               "context": args.context, "seconds": time.perf_counter() - start}
    return values


def _format(values: dict) -> str:
    if values["kind"] == "lm":
        rows = [("perplexity, float", f"{values['ppl_float']:.4f}"),
                ("perplexity, quantized", f"{values['ppl_quant']:.4f} "
                                          f"({100 * (values['ppl_quant'] / values['ppl_float'] - 1):+.2f}%"
                                          + _interval(values) + ")"),
                ("KL(float || quant), nats/token", f"{values['kl_mean']:.5f}"),
                ("top-1 agreement", f"{100 * values['top1_agreement']:.2f}%"),
                ("scored tokens", f"{values['tokens']} in {values['windows']} windows of {values['context']}"
                                  + ("" if values.get("bos") is None else f", each starting with BOS id {values['bos']}"))]
        for name in ("float", "quant"):
            check = values.get(f"decode_{name}")
            if check is not None and "error" in check:
                said = check["error"] if check["error"].startswith("not checked") else f"failed: {check['error']}"
                rows.append((f"KV-cache decode vs full forward, {name}", said))
            elif check is not None:
                rows.append((f"KV-cache decode vs full forward, {name}",
                             f"max |dlogit| {check['max_abs_diff']:.2e} (rel {check['relative_diff']:.1e}), top-1 "
                             f"{100 * check['top1_agreement']:.1f}%, {check['steps']} steps after {check['prefill']}"))
    else:
        rows = [(f"cosine ({values['output']}), mean", f"{values['cosine_mean']:.6f}"),
                (f"cosine ({values['output']}), min", f"{values['cosine_min']:.6f}"),
                ("vectors", str(values["vectors"]))]
    rows.append(("time", f"{values['seconds']:.1f} s"))
    return _table(rows)


def _interval(values: dict) -> str:
    if "ppl_increase_interval" not in values:
        return ""
    low, high = values["ppl_increase_interval"]
    return f"; {100 * _LEVEL:.0f}% interval over windows {100 * low:+.2f}% .. {100 * high:+.2f}%"


def run(args: argparse.Namespace) -> int:
    """Run the ``eval`` command parsed by :func:`add_parser`: print the table (and write ``--json``); returns 0.

    Bad input raises :class:`OnnxqError` (or ``OSError``), which :func:`onnxq.cli.main` reports.
    """
    values = _evaluate(args)
    if args.json is not None:
        args.json.write_text(json.dumps(values, indent=2) + "\n")
    print(_format(values))
    return 0
