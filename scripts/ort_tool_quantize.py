"""Quantize a model with onnxruntime's own tool (``MatMulNBitsQuantizer``), for comparison with onnxq.

Writes an output folder that ``python -m onnxq eval FLOAT OUT`` accepts: the quantized model under
the input model's file name (external data ``<name>.data`` beside it when the input had external
data or is over 1.5 GB) and, for a folder input, every other file of the folder (genai_config.json,
tokenizer.json, ...) copied. Prints one JSON line: algorithm and settings, wall time, peak RSS of
this process (``resource.getrusage``), output size, and ``error`` (the exception, one line) when
onnxruntime's tool crashed: crashes are reported, never hidden (exit code 1).

Modes (``--algo``), all through ``onnxruntime.quantization.matmul_nbits_quantizer``:

* ``default``: ``DefaultWeightOnlyQuantConfig`` (MLAS' RTN packer), ``--bits``, ``--block-size``, ``--asym``.
* ``k_quant``: ``KQuantWeightOnlyQuantConfig`` (Neural Compressor's ``rtn_quantize(algorithm="k_quant")``).
  onnxruntime 1.32's k_quant always writes zero points: it is asymmetric whatever ``--asym`` says
  (the JSON line says so), and it takes 4 or 8 bits (``--bits`` is passed per node through
  ``customized_weight_config``; the quantizer itself writes 4 for every node). It crashes when
  ``K / block_size`` rounds up to an odd number of blocks (its 4-bit zero-point packing reshapes
  ``[N * k_blocks / 2]`` bytes to ``[N, -1]``, e.g. SmolLM2's K=576 at block 128: 5 blocks).
  ``--fix-zp-packing`` replaces only that packing step by a correct row-wise one (codes, scales and
  zero points untouched) so that its numbers can be measured anyway; the JSON line records it.
* ``hqq``: ``HQQWeightOnlyQuantConfig`` (asymmetric; needs torch: run with ``.venv-export/bin/python``).
* ``gptq``: ``GPTQWeightOnlyQuantConfig`` with ``--calib-data TEXT --samples N --seq-len L``: windows
  of the text tokenized with the folder's ``tokenizer.json`` (``--tokenizer`` otherwise), the model's
  other inputs (attention mask, positions, an empty KV cache ``[1, kv_heads, 0, head_dim]``) filled
  as onnxq fills them (:class:`onnxq.calibration.TextReader`). 4 bits only (onnxruntime's quantizer
  writes 4 for every node).

Only ``MatMul`` nodes are quantized (onnxruntime's default ``op_types_to_quantize``); ``--exclude``
names nodes to leave in float (e.g. ``/lm_head/MatMul``).

onnxq itself is imported from this checkout (the folder above ``scripts/`` is put on ``sys.path``),
so the script runs with any Python that has onnx, onnx_ir, onnxruntime and tokenizers, e.g.
``.venv-export/bin/python`` (which also has torch, for ``--algo hqq``), without installing onnxq.

Example::

    .venv/bin/python scripts/ort_tool_quantize.py models/real/smollm2_kv/genai-fp32 OUT --algo k_quant \\
        --block-size 32
    .venv/bin/python -m onnxq eval models/real/smollm2_kv/genai-fp32 OUT --data eval.txt --json R.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq.model_folder import open_model_folder  # noqa: E402  (after the sys.path line)

ALGOS = ("default", "k_quant", "hqq", "gptq")
LARGE_BYTES = 1536 * 1024 * 1024


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("input", type=Path, help="float model (.onnx) or a model folder")
    parser.add_argument("output", type=Path, help="output folder (must not exist)")
    parser.add_argument("--algo", choices=ALGOS, default="default")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--asym", action="store_true", help="asymmetric (default: symmetric; k_quant/hqq: always asym)")
    parser.add_argument("--accuracy-level", type=int, default=None, help="MatMulNBits accuracy_level (default: unset = 0)")
    parser.add_argument("--exclude", action="append", default=[], metavar="NODE", help="node name to keep in float")
    parser.add_argument("--fix-zp-packing", action="store_true",
                        help="k_quant/gptq: pack 4-bit zero points row by row (works around the odd-block crash)")
    parser.add_argument("--calib-data", type=Path, help="gptq: calibration text")
    parser.add_argument("--tokenizer", type=Path, help="gptq: tokenizer.json (default: the one beside the model)")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    return parser.parse_args(argv)


def model_paths(path: Path) -> tuple[Path, Path | None]:
    """``(model file, its folder or None)``."""
    if path.is_dir():
        return open_model_folder(path).model_file, path
    return path, None


def external_data_names(model_file: Path) -> set[str]:
    """File names the model's initializers read their data from."""
    header = onnx.load(str(model_file), load_external_data=False)
    names = set()
    for tensor in header.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            names.update(e.value for e in tensor.external_data if e.key == "location")
    return names


def calibration_reader(args: argparse.Namespace, model_file: Path, folder: Path | None):
    """An onnxruntime ``CalibrationDataReader`` over onnxq's text windows (materialized: ORT deep-copies it)."""
    from onnxruntime.quantization import CalibrationDataReader

    from onnxq.calibration import TextReader

    tokenizer = args.tokenizer or (folder or model_file.parent) / "tokenizer.json"
    reader = TextReader(args.calib_data, onnx.load(str(model_file), load_external_data=False), tokenizer=tokenizer,
                        seq_len=args.seq_len, samples=args.samples)
    feeds = [reader.get_next() for _ in range(len(reader))]

    class Feeds(CalibrationDataReader):
        def __init__(self, items):
            self.items = items
            self.index = 0

        def get_next(self):
            if self.index >= len(self.items):
                return None
            self.index += 1
            return self.items[self.index - 1]

        def rewind(self):
            self.index = 0

    return Feeds(feeds)


def fix_zero_point_packing() -> None:
    """Make Neural Compressor's MatMulNBits builder pack 4-bit zero points per row, ``[N, ceil(k_blocks / 2)]``.

    Its own packing runs over the flattened ``[N * k_blocks]`` zero points and reshapes the bytes to
    ``[N, -1]``: right for an even number of blocks, a crash for an odd one. Only that is replaced.
    """
    from onnxruntime.quantization.neural_compressor import weight_only

    original = weight_only.make_matmul_weight_only_node

    def make_node(node, weight_shape, num_bits, group_size, k_blocks, q_weight, scale, zero_point,
                  accuracy_level=0):
        if zero_point is None or num_bits != 4 or k_blocks % 2 == 0:
            return original(node, weight_shape, num_bits, group_size, k_blocks, q_weight, scale, zero_point,
                            accuracy_level)
        new_node, inits = original(node, weight_shape, num_bits, group_size, k_blocks, q_weight, scale, None,
                                   accuracy_level)
        zp = np.asarray(zero_point, dtype=np.uint8).reshape(weight_shape[1], k_blocks)
        zp = np.pad(zp, ((0, 0), (0, 1)), constant_values=8)
        packed = (zp[:, 0::2] & 0x0F) | ((zp[:, 1::2] & 0x0F) << 4)
        tensor = onnx.numpy_helper.from_array(packed.astype(np.uint8), node.input[1] + "_zp")
        new_node.input.append(tensor.name)
        return new_node, [*inits, tensor]

    weight_only.make_matmul_weight_only_node = make_node


def quantizer_config(args: argparse.Namespace, model: onnx.ModelProto, model_file: Path, folder: Path | None):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    if args.algo == "default":
        return mnq.DefaultWeightOnlyQuantConfig(block_size=args.block_size, is_symmetric=not args.asym,
                                                accuracy_level=args.accuracy_level, bits=args.bits)
    if args.algo == "hqq":
        return mnq.HQQWeightOnlyQuantConfig(block_size=args.block_size, bits=args.bits)
    if args.algo == "k_quant":
        per_node = {n.name: {"bits": args.bits} for n in model.graph.node if n.op_type == "MatMul"}
        return mnq.KQuantWeightOnlyQuantConfig(customized_weight_config=per_node)
    if args.calib_data is None:
        raise SystemExit("--algo gptq needs --calib-data")
    return mnq.GPTQWeightOnlyQuantConfig(calibration_data_reader=calibration_reader(args, model_file, folder))


def quantize(args: argparse.Namespace, model_file: Path, folder: Path | None, target: Path, cwd: Path) -> int:
    """Run onnxruntime's quantizer (in ``cwd``) and save to ``target`` (from the caller's cwd: run from the
    input's folder, onnx's save finds the input's ``model.onnx.data`` and refuses with "External data file
    exists"); returns how many initializers it left as references to the input's external data (Neural
    Compressor's k_quant/gptq load the model without its data: saved as they are, those would point into
    the new data file at the input's offsets)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    if args.fix_zp_packing:
        fix_zero_point_packing()
    model = onnx.load(str(model_file))
    config = quantizer_config(args, model, model_file, folder)
    quantizer = MatMulNBitsQuantizer(model if args.algo == "default" or args.algo == "hqq" else str(model_file),
                                     bits=args.bits, block_size=args.block_size, is_symmetric=not args.asym,
                                     accuracy_level=args.accuracy_level, nodes_to_exclude=args.exclude,
                                     algo_config=config)
    del model
    with contextlib.chdir(cwd):
        quantizer.process()
    proto = quantizer.model.model
    stale = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if stale:  # tensors it left untouched still point into the input's data file: read them in
        onnx.external_data_helper.load_external_data_for_model(proto, str(model_file.parent))
    external = bool(external_data_names(model_file)) or proto.ByteSize() > LARGE_BYTES
    quantizer.model.save_model_to_file(str(target), external)
    return len(stale)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("input", "output", "calib_data", "tokenizer"):  # absolute: gptq runs in the model's folder
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    model_file, folder = model_paths(args.input)
    if args.output.exists():
        raise SystemExit(f"{args.output} exists; choose a new output folder")
    record = {"tool": "onnxruntime MatMulNBitsQuantizer", "algo": args.algo, "bits": args.bits,
              "block_size": args.block_size, "symmetric": not args.asym and args.algo not in ("k_quant", "hqq"),
              "accuracy_level": args.accuracy_level, "exclude": args.exclude, "fix_zp_packing": args.fix_zp_packing,
              "input": str(args.input), "output": str(args.output)}
    if args.algo in ("k_quant", "hqq") and not args.asym:
        record["note"] = f"onnxruntime's {args.algo} is asymmetric only (zero points are always written)"
    if args.algo == "gptq":
        record.update(calib_data=str(args.calib_data), samples=args.samples, seq_len=args.seq_len,
                      note="run from the model's folder (onnxruntime resolves its external data against the cwd)")
    work = args.output.with_name(args.output.name + ".tmp")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    code = 0
    try:
        cwd = model_file.parent if args.algo == "gptq" else Path.cwd()
        with contextlib.redirect_stdout(sys.stderr):  # NC prints its progress to stdout
            record["stale_external_refs"] = quantize(args, model_file, folder, work / model_file.name, cwd)
    except Exception as exc:  # noqa: BLE001  (the point: report what onnxruntime's tool does, crashes included)
        record["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        code = 1
    record["wall_s"] = round(time.perf_counter() - start, 1)
    record["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if code == 0:
        if folder is not None:
            skip = {model_file.name, *external_data_names(model_file)}
            for item in sorted(folder.iterdir()):
                if item.is_file() and item.name not in skip:
                    shutil.copy2(item, work / item.name)
        work.rename(args.output)
        model_bytes = sum(p.stat().st_size for p in args.output.iterdir()
                          if p.name == model_file.name or p.name.startswith(model_file.name + "."))
        record["output_mib"] = round(model_bytes / 2**20, 1)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main())
