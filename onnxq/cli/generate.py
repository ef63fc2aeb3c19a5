"""``python -m onnxq generate FLOAT.onnx OUT.npy``: calibration token ids sampled by the model itself.

The ids are saved as one ``.npy`` stream of ``--samples`` x ``--seq-len`` tokens, so that
``quantize --calib-data OUT.npy --seq-len N`` calibrates on exactly these sequences (one window each)
and several runs can share one generation (``quantize --generate-calib`` generates anew each run).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from onnxq.atomic import commit, temp_folder
from onnxq.cli.common import generation_start, model_input, progress_bar, same_file
from onnxq.errors import OnnxqError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``generate`` command to ``subparsers``; returns its parser."""
    g = subparsers.add_parser("generate", help="sample calibration token ids from the float model itself (.npy)")
    g.add_argument("model", type=Path, help="float causal LM (.onnx, or a GenAI / Optimum model folder)")
    g.add_argument("output", type=Path, help="the .npy file to write (token ids, one stream)")
    g.add_argument("--samples", type=int, default=128, help="sequences (default 128)")
    g.add_argument("--seq-len", type=int, default=512,
                   help="tokens per sequence, the start token included (default 512)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1: the model's own "
                                                                  "distribution)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--batch", type=int, default=8, help="sequences generated together (default 8)")
    g.add_argument("--bos", default="auto", help="the start token: auto (the default: the model's BOS, from its "
                                                 "tokenizer.json, genai_config.json or config.json), none (a random "
                                                 "token per sequence) or an id")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    return g


def run(args: argparse.Namespace) -> int:
    """Generate ``args.samples`` sequences with ``args.model`` and save them to ``args.output`` whole or not at all."""
    import numpy as np

    from onnxq.calibration.generate import generate_token_ids

    begin = time.perf_counter()
    model_file, _, _ = model_input(args.model)
    if not model_file.is_file():
        raise OnnxqError(f"model file not found: {model_file}")
    if args.output.suffix != ".npy":
        raise OnnxqError(f"the output must be a .npy file (token ids), got {args.output}")
    if same_file(model_file, args.output):
        raise OnnxqError(f"output path is the input model ({args.output}); choose another output file")
    if not args.output.parent.is_dir():
        raise OnnxqError(f"the output's folder does not exist: {args.output.parent}")
    ids = generate_token_ids(model_file, samples=args.samples, seq_len=args.seq_len,
                             start=generation_start(args.bos, model_file), temperature=args.temperature,
                             seed=args.seed, batch=args.batch, progress=progress_bar(args.quiet))
    with temp_folder(args.output) as tmp:
        written = tmp / args.output.name
        np.save(written, ids.reshape(-1))
        commit([(written, args.output)])
    print(f"wrote {args.output}: {args.samples} x {args.seq_len} token ids in {time.perf_counter() - begin:.1f} s "
          f"(use: quantize --calib-data {args.output} --seq-len {args.seq_len})", file=sys.stderr)
    return 0
