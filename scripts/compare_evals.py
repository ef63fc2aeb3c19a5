"""Paired comparison of two quantized models' `onnxq eval --json` results on the same windows.

    python scripts/compare_evals.py RTN.json BASE.json NEW.json

Each file is what ``python -m onnxq eval FLOAT QUANT --data TEXT --json F`` wrote for the same float
model, text, context and window count (their per-window sums must match). Prints, for BASE and NEW,
the perplexity, the share of RTN's perplexity gap to the float model that each recovers with its
95% paired bootstrap interval (RTN, the row and the float model on the same resampled windows), KL
and top-1; then NEW - BASE in perplexity and NEW / BASE in KL, each with its paired interval.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from onnxq.eval.metrics import gap_recovered_interval, percentile_interval, resampled_sums  # noqa: E402

_SUMS = ("window_tokens", "window_nll_float", "window_nll_quant", "window_kl")


def _load(path: Path) -> dict:
    result = json.loads(path.read_text())
    missing = [key for key in _SUMS if key not in result]
    if missing:
        raise SystemExit(f"{path}: no per-window sums ({', '.join(missing)}); re-run `onnxq eval --json` with this version")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rtn", type=Path, help="eval JSON of the round-to-nearest model (the gap's reference)")
    parser.add_argument("base", type=Path, help="eval JSON of the model compared against")
    parser.add_argument("new", type=Path, help="eval JSON of the model compared")
    args = parser.parse_args(argv)
    rtn, base, new = (_load(path) for path in (args.rtn, args.base, args.new))
    for other, path in ((base, args.base), (new, args.new)):
        if other["window_tokens"] != rtn["window_tokens"] or other["window_nll_float"] != rtn["window_nll_float"]:
            raise SystemExit(f"{path}: not the same windows (or float model) as {args.rtn}")
    tokens = resampled_sums(rtn["window_tokens"])

    def ppl(result: dict) -> np.ndarray:
        return np.exp(resampled_sums(result["window_nll_quant"]) / tokens)

    gap = rtn["ppl_quant"] - rtn["ppl_float"]
    print(f"{len(rtn['window_tokens'])} windows, {sum(rtn['window_tokens'])} tokens; float {rtn['ppl_float']:.3f}, "
          f"rtn {rtn['ppl_quant']:.3f}")
    for label, result in (("base", base), ("new", new)):
        low, high = gap_recovered_interval(rtn["window_tokens"], rtn["window_nll_float"], rtn["window_nll_quant"],
                                           result["window_nll_quant"])
        print(f"{label:4s} ppl {result['ppl_quant']:.3f}  gap recovered {100 * (rtn['ppl_quant'] - result['ppl_quant']) / gap:.0f}% "
              f"({100 * low:.0f}..{100 * high:.0f}%)  KL {result['kl_mean']:.4f}  top-1 {100 * result['top1_agreement']:.1f}%")
    low, high = percentile_interval(ppl(new) - ppl(base))
    print(f"new - base perplexity {new['ppl_quant'] - base['ppl_quant']:+.3f} ({low:+.2f}..{high:+.2f})")
    low, high = percentile_interval(resampled_sums(new["window_kl"]) / resampled_sums(base["window_kl"]))
    print(f"new / base KL {new['kl_mean'] / base['kl_mean']:.3f} ({low:.3f}..{high:.3f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
