"""Accuracy of a quantized model against its float original, measured with onnxruntime.

* :func:`perplexity`: perplexity of a causal LM (``input_ids [batch, seq] -> logits
  [batch, seq, vocab]``) on a token stream.
* :func:`compare_lm` / :func:`compare_lms`: float and quantized LMs run on the same
  windows in one pass: both perplexities, the mean per-token KL divergence
  ``KL(p_float || p_quant)`` (nats) and the top-1 agreement of the next-token
  predictions. Windows are streamed: at most one batch of logits per model is held.
* :func:`compare_embeddings`: cosine similarity of an encoder's output vectors.
* :func:`resampled_sums`, :func:`percentile_interval`, :func:`perplexity_increase_interval`,
  :func:`gap_recovered_interval`:
  how sure a comparison is, by a paired bootstrap over its windows (the per-window sums that
  :class:`LMComparison` keeps).

Windows (:func:`lm_windows`): the stream of ``T`` tokens is cut into windows of
``context`` tokens starting every ``stride`` tokens (default ``stride = context``:
non-overlapping; the tail shorter than a window is dropped). The first window scores
every prediction it makes (targets ``1 .. context-1``); a later window scores only its
last ``stride`` targets (all ``context-1`` when ``stride = context``), the sliding-window
evaluation of Hugging Face's perplexity guide, so with ``stride < context`` every scored
token sees at least ``context - stride`` tokens of context. ``max_windows`` keeps that
many windows evenly spaced over the stream (always the same ones for the same
arguments), so a short run still samples the whole text. With ``bos`` (a model whose
tokenizer starts every text with a BOS token, e.g. Gemma) each window is that id and
``context - 1`` stream tokens, and every stream token of the window is scored (the first
one predicted from BOS alone).

Model inputs are filled by :class:`onnxq.calibration.inputs.InputFiller`: ``input_ids`` is
required; ``attention_mask`` (ones), ``position_ids`` (``0..seq-1``), ``token_type_ids``
(zeros) and an empty KV cache (``past_key_values.N.key/value``, KV-cache exports) when the
model has them, in the dtype it declares. The logits output is the one named
``logits``, else the model's first output. Log-softmax is computed in float64 after
subtracting the row maximum.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxq.calibration.readers import iter_feeds
from onnxq.calibration.lm_session import LMSession, make_session
from onnxq.errors import OnnxqError

__all__ = [
    "DecodeCheck",
    "EmbeddingComparison",
    "LMComparison",
    "PerplexityResult",
    "compare_embeddings",
    "compare_lm",
    "compare_lms",
    "decode_check",
    "lm_windows",
    "log_softmax",
    "make_session",
    "gap_recovered_interval",
    "percentile_interval",
    "perplexity",
    "perplexity_increase_interval",
    "resampled_sums",
]

logger = logging.getLogger(__name__)

ModelLike = str | os.PathLike | onnx.ModelProto | ort.InferenceSession
"""A model path (external data next to it), an ``onnx.ModelProto`` or an open session."""

Progress = Callable[..., Iterable]
"""Wraps an iterable to show progress; called with keywords ``desc``, ``unit`` and ``total`` (``tqdm.tqdm`` fits)."""



@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``; ``nll``: mean negative log-likelihood per scored token (nats)."""

    ppl: float
    nll: float
    tokens: int
    windows: int


@dataclass(frozen=True)
class LMComparison:
    """A quantized LM against its float original on the same scored tokens.

    Attributes:
        ppl_float, ppl_quant: perplexities; ``nll_float``/``nll_quant`` their logs (nats/token).
        kl_mean: mean over scored tokens of ``KL(p_float || p_quant)`` (nats).
        top1_agreement: fraction of scored tokens where both models' most likely next token agree.
        tokens, windows: scored tokens and windows.
        window_tokens, window_nll_float, window_nll_quant, window_kl: per window, in window order, its
            scored tokens and the sums over them of both models' NLL and of the KL (nats): what
            :func:`resampled_sums` draws from for an interval over windows.
    """

    ppl_float: float
    ppl_quant: float
    nll_float: float
    nll_quant: float
    kl_mean: float
    top1_agreement: float
    tokens: int
    windows: int
    window_tokens: tuple[int, ...] = ()
    window_nll_float: tuple[float, ...] = ()
    window_nll_quant: tuple[float, ...] = ()
    window_kl: tuple[float, ...] = ()


@dataclass(frozen=True)
class EmbeddingComparison:
    """Cosine similarity between float and quantized output vectors (one per row)."""

    cosine_mean: float
    cosine_min: float
    vectors: int


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """``log softmax`` over the last axis in float64: ``x - max - log(sum(exp(x - max)))``.

    logits: ``[..., vocab]`` (any float dtype; not modified) -> ``[..., vocab]`` float64.
    """
    shifted, _, lse = _shift(logits)
    return shifted - lse[..., None]


def _shift(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x - max, exp(x - max), lse)`` in float64 for logits ``[..., vocab]``, where
    ``lse = log(sum(exp(x - max)))`` so that ``log_softmax = (x - max) - lse``."""
    shifted = np.array(logits, dtype=np.float64)  # a copy: the caller's array is left alone
    shifted -= shifted.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return shifted, exp, np.log(exp.sum(axis=-1))


_CHUNK_LOGITS = 1 << 20
"""Logits per chunk of scored positions (two float64 temporaries of 8 MiB each): small enough that the
allocator reuses their memory. Whole windows of a 262k vocabulary made 537 MB temporaries per window,
and zeroing their fresh pages cost more than the model's forward (Gemma 3 270M, docs/SPEED.md)."""


def _chunks(positions: int, vocab: int) -> list[slice]:
    """Slices of ``range(positions)`` holding at most :data:`_CHUNK_LOGITS` logits each (at least one row)."""
    step = max(1, _CHUNK_LOGITS // vocab)
    return [slice(start, start + step) for start in range(0, positions, step)]


def _target_nll(shifted: np.ndarray, lse: np.ndarray, targets: np.ndarray) -> float:
    """``sum_t -log softmax[t, targets[t]]`` from :func:`_shift`'s ``x - max`` ``[n, vocab]`` and ``lse [n]``."""
    return float((lse - shifted[np.arange(len(targets)), targets]).sum())


def _nll_sum(rows: np.ndarray, targets: np.ndarray) -> float:
    """``sum_t -log softmax(rows[t])[targets[t]]`` for logits ``rows: [n, vocab]``, a chunk at a time."""
    total = 0.0
    for part in _chunks(len(targets), rows.shape[-1]):
        shifted, _, lse = _shift(rows[part])
        total += _target_nll(shifted, lse, targets[part])
    return total


def _compare_rows(tally: "_Tally", float_rows: np.ndarray, quant_rows: np.ndarray, targets: np.ndarray) -> float:
    """Add the quantized model's NLL, KL and top-1 agreement over ``[n, vocab]`` logits rows to ``tally``;
    returns the float model's NLL sum over the same rows. A chunk of positions at a time."""
    nll_float = 0.0
    for part in _chunks(len(targets), float_rows.shape[-1]):
        shifted, p, lse = _shift(float_rows[part])
        nll_float += _target_nll(shifted, lse, targets[part])
        p /= p.sum(axis=-1, keepdims=True)  # softmax
        p_sum = p.sum(axis=-1)
        # sum_v p log p, with log p = shifted - lse (no [n, vocab] temporary)
        p_log_p = np.einsum("ij,ij->i", p, shifted) - lse * p_sum
        top = shifted.argmax(axis=-1)
        shifted, _, lse = _shift(quant_rows[part])
        tally.nll += _target_nll(shifted, lse, targets[part])
        # KL(p || q) = sum p log p - sum p log q, log q = shifted - lse
        tally.kl += float((p_log_p - (np.einsum("ij,ij->i", p, shifted) - lse * p_sum)).sum())
        tally.agree += int((top == shifted.argmax(axis=-1)).sum())
    return nll_float


def lm_windows(
    num_tokens: int, context: int, stride: int | None = None, max_windows: int | None = None
) -> list[tuple[int, int]]:
    """The windows scored by :func:`perplexity` (see the module docstring).

    Returns ``[(start, first_target)]``: the window is ``tokens[start : start + context]``
    and targets ``first_target .. context - 1`` (positions inside the window) are scored.

    Raises:
        OnnxqError: bad ``context``/``stride``/``max_windows``, or fewer than ``context`` tokens.
    """
    stride = context if stride is None else stride
    if not (isinstance(context, int) and context >= 2):
        raise OnnxqError(f"context must be an integer >= 2, got {context!r}")
    if not (isinstance(stride, int) and 1 <= stride <= context):
        raise OnnxqError(f"stride must be an integer in 1..context ({context}), got {stride!r}")
    if max_windows is not None and not (isinstance(max_windows, int) and max_windows >= 1):
        raise OnnxqError(f"max_windows must be a positive integer, got {max_windows!r}")
    if num_tokens < context:
        raise OnnxqError(f"the evaluation text has {num_tokens} tokens, fewer than one window of context={context}; "
                         "give more text or a smaller context")
    count = (num_tokens - context) // stride + 1
    indices = np.arange(count)
    if max_windows is not None and max_windows < count:
        indices = np.unique(np.linspace(0, count - 1, max_windows).round().astype(np.int64))
    return [(int(i) * stride, 1 if i == 0 else max(1, context - stride)) for i in indices]


def _token_stream(token_ids) -> np.ndarray:
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise OnnxqError(f"token ids must be a 1-D integer array, found {ids.dtype} with shape {ids.shape}")
    return ids.astype(np.int64, copy=False)


def _batches(windows: list[tuple[int, int]], batch: int) -> list[list[tuple[int, int]]]:
    if not (isinstance(batch, int) and batch >= 1):
        raise OnnxqError(f"batch must be a positive integer, got {batch!r}")
    return [windows[i:i + batch] for i in range(0, len(windows), batch)]


def _bos_windows(num_tokens: int, context: int, stride: int | None, max_windows: int | None,
                 bos: int | None) -> list[tuple[int, int]]:
    """:func:`lm_windows`, or with ``bos`` the windows of ``context - 1`` stream tokens behind it:
    ``(start in the stream, first scored position in the window)``."""
    if bos is None:
        return lm_windows(num_tokens, context, stride, max_windows)
    body = context - 1
    stride = body if stride is None else min(stride, body)
    return [(start, 1 if start == 0 or stride == body else first + 1)
            for start, first in lm_windows(num_tokens, body, stride, max_windows)]


def _window_ids(ids: np.ndarray, group: list[tuple[int, int]], context: int, bos: int | None) -> np.ndarray:
    """``[batch, context]`` token ids of the windows in ``group``."""
    if bos is None:
        return np.stack([ids[start:start + context] for start, _ in group])
    return np.stack([np.concatenate([np.array([bos], ids.dtype), ids[start:start + context - 1]]) for start, _ in group])


def _scored(logits: np.ndarray, ids: np.ndarray, group: list[tuple[int, int]], context: int):
    """Per window of the batch: the logits rows that predict its scored targets ``[n, vocab]``
    and those targets ``[n]``."""
    for row, (_, first) in enumerate(group):
        yield logits[row, first - 1:context - 1], ids[row, first:context]


def _wrap(progress: Progress | None, items, desc: str, total: int):
    return progress(items, desc=desc, unit="window", total=total) if progress else items


def perplexity(
    model: ModelLike,
    token_ids: np.ndarray,
    *,
    context: int = 256,
    stride: int | None = None,
    max_windows: int | None = None,
    batch: int = 1,
    providers: list[str] | None = None,
    progress: Progress | None = None,
    bos: int | None = None,
) -> PerplexityResult:
    """Perplexity of a causal LM on ``token_ids [T]`` (windows: see the module docstring).

    ``nll = -mean_t log p(x_t | x_<t)`` over the scored tokens; ``ppl = exp(nll)``.

    Args:
        model: path, ``onnx.ModelProto`` or ``InferenceSession`` (``input_ids`` -> ``logits``).
        token_ids: ``[T]`` integer token ids.
        context, stride, max_windows: the windows (:func:`lm_windows`).
        batch: windows per session run.
        providers: onnxruntime execution providers (default CPU).
        progress: ``tqdm``-like wrapper, called with ``desc``, ``unit`` and ``total``.
        bos: the id each window starts with (see the module docstring), or None.

    Raises:
        OnnxqError: unloadable model, no ``input_ids`` input, too few tokens, bad settings.
    """
    ids = _token_stream(token_ids)
    windows = _bos_windows(len(ids), context, stride, max_windows, bos)
    lm = LMSession(model, providers, "evaluated")
    nll_sum, tokens = 0.0, 0
    for group in _wrap(progress, _batches(windows, batch), "perplexity", math.ceil(len(windows) / batch)):
        window_ids = _window_ids(ids, group, context, bos)
        for rows, targets in _scored(lm.logits(window_ids, reuse=True), window_ids, group, context):
            nll_sum += _nll_sum(rows, targets)
            tokens += len(targets)
    nll = nll_sum / tokens
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=len(windows))


def resampled_sums(per_window: Sequence[float], *, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """Sums of ``per_window [W]`` over bootstrap resamples of the windows -> ``[resamples]`` float64.

    Each resample draws ``W`` windows with replacement (the bootstrap: Efron, "Bootstrap methods: another
    look at the jackknife", 1979). The draws depend only on ``(W, resamples, seed)``: arrays over the same
    windows (token counts, two models' NLL sums) resampled with the same seed are resampled together, so a
    statistic computed from them is paired, window for window.

    Raises:
        OnnxqError: ``per_window`` empty or not 1-D, or ``resamples < 1``.
    """
    values = np.asarray(per_window, dtype=np.float64)
    if values.ndim != 1 or not len(values):
        raise OnnxqError(f"per-window values must be a non-empty 1-D sequence, got shape {values.shape}")
    if not (isinstance(resamples, int) and resamples >= 1):
        raise OnnxqError(f"resamples must be a positive integer, got {resamples!r}")
    draws = np.random.default_rng(seed).multinomial(len(values), np.full(len(values), 1 / len(values)),
                                                    size=resamples)
    return draws @ values


def percentile_interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap ``samples [R]``: their ``(1 - level) / 2`` and
    ``(1 + level) / 2`` quantiles (the percentile interval).

    Raises:
        OnnxqError: ``level`` outside ``(0, 1)``.
    """
    if not 0 < level < 1:
        raise OnnxqError(f"level must be in (0, 1), got {level!r}")
    low, high = np.quantile(np.asarray(samples, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def perplexity_increase_interval(result: LMComparison, level: float = 0.95, *, resamples: int = 2000,
                                 seed: int = 0) -> tuple[float, float]:
    """Interval over windows of ``ppl_quant / ppl_float - 1`` (paired bootstrap: both models' NLL on the same
    resampled windows, :func:`resampled_sums`).

    Raises:
        OnnxqError: ``result`` without per-window sums.
    """
    if not result.window_tokens:
        raise OnnxqError("this comparison has no per-window sums to resample")
    tokens = resampled_sums(result.window_tokens, resamples=resamples, seed=seed)
    nll_float = resampled_sums(result.window_nll_float, resamples=resamples, seed=seed)
    nll_quant = resampled_sums(result.window_nll_quant, resamples=resamples, seed=seed)
    return percentile_interval(np.expm1((nll_quant - nll_float) / tokens), level)


def gap_recovered_interval(window_tokens: Sequence[float], window_nll_float: Sequence[float],
                           window_nll_reference: Sequence[float], window_nll_quant: Sequence[float],
                           level: float = 0.95, *, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Interval over windows of the share of a reference model's perplexity gap to the float model that a
    quantized model recovers, ``(ppl_reference - ppl_quant) / (ppl_reference - ppl_float)``: the three
    perplexities on the same resampled windows (paired, :func:`resampled_sums`). Each argument is ``[W]``
    per-window sums (tokens, or one model's NLL) over the same windows, e.g. a reference RTN model's
    ``onnxq eval --json`` sums beside the row's.
    """
    tokens = resampled_sums(window_tokens, resamples=resamples, seed=seed)
    ppl_float, ppl_reference, ppl_quant = (
        np.exp(resampled_sums(nll, resamples=resamples, seed=seed) / tokens)
        for nll in (window_nll_float, window_nll_reference, window_nll_quant))
    return percentile_interval((ppl_reference - ppl_quant) / (ppl_reference - ppl_float), level)


class _Tally:
    """Sums for one quantized model: NLL and KL of the open window (``nll``, ``kl``), per closed window,
    and top-1 agreements over all."""

    def __init__(self) -> None:
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.window_nll: list[float] = []
        self.window_kl: list[float] = []

    def close_window(self) -> None:
        """Record the open window's sums and start the next window at zero."""
        self.window_nll.append(self.nll)
        self.window_kl.append(self.kl)
        self.nll = self.kl = 0.0

    def result(self, window_nll_float: list[float], window_tokens: list[int]) -> LMComparison:
        tokens = sum(window_tokens)
        nll_float, nll_quant = math.fsum(window_nll_float) / tokens, math.fsum(self.window_nll) / tokens
        return LMComparison(ppl_float=math.exp(nll_float), ppl_quant=math.exp(nll_quant), nll_float=nll_float,
                            nll_quant=nll_quant, kl_mean=math.fsum(self.window_kl) / tokens,
                            top1_agreement=self.agree / tokens, tokens=tokens, windows=len(window_tokens),
                            window_tokens=tuple(window_tokens), window_nll_float=tuple(window_nll_float),
                            window_nll_quant=tuple(self.window_nll), window_kl=tuple(self.window_kl))


def compare_lms(
    float_model: ModelLike,
    quant_models: Mapping[str, ModelLike],
    token_ids: np.ndarray,
    *,
    context: int = 256,
    stride: int | None = None,
    max_windows: int | None = None,
    batch: int = 1,
    providers: list[str] | None = None,
    progress: Progress | None = None,
    bos: int | None = None,
) -> dict[str, LMComparison]:
    """Compare several quantized LMs with one float LM, each window run once per model.

    For every scored token ``t`` with float next-token distribution ``p`` and quantized ``q``:
    ``KL(p || q) = sum_v p_v (log p_v - log q_v)``, averaged over tokens; top-1 agreement is
    ``mean[argmax p == argmax q]``. Arguments as in :func:`perplexity` (``bos``: the id each
    window starts with).

    Returns:
        ``{name: LMComparison}`` in the order of ``quant_models``.

    Raises:
        OnnxqError: as :func:`perplexity`, or models with different vocabularies.
    """
    if not quant_models:
        raise OnnxqError("compare_lms needs at least one quantized model")
    ids = _token_stream(token_ids)
    windows = _bos_windows(len(ids), context, stride, max_windows, bos)
    reference = LMSession(float_model, providers, "float")
    others = {name: LMSession(model, providers, f"quantized ({name})") for name, model in quant_models.items()}
    tallies = {name: _Tally() for name in others}
    window_nll_float: list[float] = []
    window_tokens: list[int] = []
    for group in _wrap(progress, _batches(windows, batch), "compare", math.ceil(len(windows) / batch)):
        window_ids = _window_ids(ids, group, context, bos)
        float_logits = reference.logits(window_ids, reuse=True)  # each session's array is written over per window
        vocab = float_logits.shape[-1]
        float_scored = list(_scored(float_logits, window_ids, group, context))
        # the float model's softmax is recomputed per chunk and per quantized model: kept whole in float64
        # it was twice the size of the logits
        for index, (name, lm) in enumerate(others.items()):
            logits = lm.logits(window_ids, reuse=True)
            if logits.shape[-1] != vocab:
                raise OnnxqError(f"the quantized model {name!r} has {logits.shape[-1]} logits per token, "
                                 f"the float model {vocab}")
            for (float_rows, targets), (quant_rows, _) in zip(float_scored, _scored(logits, window_ids, group,
                                                                                    context)):
                nll = _compare_rows(tallies[name], float_rows, quant_rows, targets)
                tallies[name].close_window()
                if index == 0:
                    window_nll_float.append(nll)
                    window_tokens.append(len(targets))
    return {name: tally.result(window_nll_float, window_tokens) for name, tally in tallies.items()}


def compare_lm(
    float_model: ModelLike,
    quant_model: ModelLike,
    token_ids: np.ndarray,
    *,
    context: int = 256,
    stride: int | None = None,
    max_windows: int | None = None,
    batch: int = 1,
    providers: list[str] | None = None,
    progress: Progress | None = None,
    bos: int | None = None,
) -> LMComparison:
    """Perplexities, mean ``KL(p_float || p_quant)`` and top-1 agreement on the same windows.

    One pass over the windows runs both models (see :func:`compare_lms`).
    """
    return compare_lms(float_model, {"quant": quant_model}, token_ids, context=context, stride=stride,
                       max_windows=max_windows, batch=batch, providers=providers, progress=progress,
                       bos=bos)["quant"]


@dataclass(frozen=True)
class DecodeCheck:
    """Cached decoding against the full-sequence forward of the same tokens (:func:`decode_check`).

    Attributes:
        prefill: tokens run first with an empty past.
        steps: tokens then decoded one at a time through the ``present.*`` outputs.
        max_abs_diff: max ``|logits_decode - logits_full|`` over the prefill's last position and
            every decoded one.
        relative_diff: ``max_abs_diff / max |logits_full|`` on those positions.
        top1_agreement: fraction of those positions whose argmax agrees.
    """

    prefill: int
    steps: int
    max_abs_diff: float
    relative_diff: float
    top1_agreement: float


def decode_check(model: ModelLike, token_ids: np.ndarray, *, prefill: int | None = None, steps: int = 16,
                 providers: list[str] | None = None) -> DecodeCheck:
    """Run ``token_ids`` as prefill + token-by-token decode through the KV cache; compare with one full forward.

    A model whose KV path is broken (a quantized attention projection that only the cached
    path uses, wrong ``present`` outputs) gives logits that differ from its own full-sequence
    logits; a sound one agrees to float rounding.

    Args:
        model: a KV-cache LM (inputs ``past_key_values.N.key/value``, outputs ``present.N.key/value``).
        token_ids: ``[seq]`` or ``[1, seq]`` ids; ``prefill + steps <= seq``.
        prefill: tokens of the first step (default: ``seq - steps``).
        steps: tokens decoded one at a time after it.

    Raises:
        OnnxqError: the model has no KV cache, or too few tokens.
    """
    lm = LMSession(model, providers, "checked", reuse_buffers=False)
    if not lm.filler.has_past:
        raise OnnxqError("the decode check needs a KV-cache model (inputs past_key_values.N.key/value)")
    if any(p.capacity for p in lm.filler.past):
        raise OnnxqError("not checked: the model has a sliding-window KV cache (GroupQueryAttention "
                         "sliding_window_cache), which this check does not drive")
    missing = [p.present for p in lm.filler.past if p.present not in lm.outputs]
    if missing:
        raise OnnxqError(f"the model has past inputs but no output {missing[0]!r} to continue decoding from")
    ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
    prefill = ids.shape[1] - steps if prefill is None else prefill
    if prefill < 1 or steps < 1 or prefill + steps > ids.shape[1]:
        raise OnnxqError(f"the decode check needs prefill >= 1 and steps >= 1 within {ids.shape[1]} tokens, "
                         f"got prefill={prefill}, steps={steps}")
    # the full forward's logits at the compared positions only, [steps + 1, vocab]: in float64 the whole
    # [seq, vocab] was 537 MB on a 262k vocabulary, and converting it took up to 3.5 s (Gemma 3, fresh pages)
    reference = lm.logits(ids[:, :prefill + steps])[0, prefill - 1:].astype(np.float64)
    names = [lm.output] + [p.present for p in lm.filler.past]
    try:
        result = lm.session.run(names, lm.filler.feed(ids[:, :prefill]))
        cached = [result[0][0, -1]]
        for t in range(prefill, prefill + steps):
            past = {p.name: value for p, value in zip(lm.filler.past, result[1:])}
            result = lm.session.run(names, lm.filler.feed(ids[:, t:t + 1], past))
            cached.append(result[0][0, -1])
    except Exception as exc:  # onnxruntime's own error types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxqError(f"onnxruntime failed decoding through the KV cache: {reason}") from None
    cached_logits = np.stack(cached).astype(np.float64)
    diff = float(np.abs(cached_logits - reference).max())
    return DecodeCheck(prefill, steps, diff, diff / max(float(np.abs(reference).max()), 1e-30),
                       float(np.mean(cached_logits.argmax(-1) == reference.argmax(-1))))


def _rows(output: np.ndarray, feed: Mapping[str, np.ndarray]) -> np.ndarray:
    """Output vectors ``[n, dim]``: a ``[..., dim]`` output flattened; for ``[batch, seq, dim]``
    with an ``attention_mask [batch, seq]`` in the feed, only the unmasked tokens."""
    mask = feed.get("attention_mask")
    if output.ndim == 3 and mask is not None and mask.shape == output.shape[:2]:
        return output[np.asarray(mask) != 0]
    return output.reshape(-1, output.shape[-1])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    both_zero = (np.linalg.norm(a, axis=-1) == 0) & (np.linalg.norm(b, axis=-1) == 0)
    cos = np.divide((a * b).sum(-1), norms, out=np.zeros(len(a)), where=norms > 0)
    return np.where(both_zero, 1.0, cos)


def compare_embeddings(
    float_model: ModelLike,
    quant_model: ModelLike,
    data,
    *,
    output: str = "sentence_embedding",
    max_samples: int | None = None,
    providers: list[str] | None = None,
    progress: Progress | None = None,
) -> EmbeddingComparison:
    """Cosine similarity of ``output`` between the float and the quantized model, per vector.

    Args:
        data: feeds ``{input name: array}``: a reader (e.g. :class:`~onnxq.calibration.TextReader`,
            :class:`~onnxq.calibration.NpzReader`), a list of feeds, or any iterable of them.
        output: the output compared. ``[batch, dim]`` gives one vector per row;
            ``[batch, seq, dim]`` one per token (tokens with ``attention_mask == 0`` are left out).
        max_samples: at most this many feeds.

    Raises:
        OnnxqError: unloadable model, missing output, feeds not matching the model, no feeds.
    """
    sessions = [make_session(float_model, providers), make_session(quant_model, providers)]
    for session, what in zip(sessions, ("float", "quantized")):
        names = [o.name for o in session.get_outputs()]
        if output not in names:
            raise OnnxqError(f"the {what} model has no output {output!r} (outputs: {', '.join(names)})")
    inputs = {i.name for i in sessions[0].get_inputs()}
    cosines = []
    feeds = iter_feeds(data, max_samples)
    for feed in (progress(feeds, desc="compare", unit="sample") if progress else feeds):
        if set(feed) != inputs:
            raise OnnxqError(f"a sample has inputs {sorted(feed)}; the model takes {sorted(inputs)}")
        a, b = (session.run([output], feed)[0] for session in sessions)
        cosines.append(_cosines(_rows(a, feed), _rows(b, feed)))
    if not cosines:
        raise OnnxqError("the evaluation data gave no samples")
    values = np.concatenate(cosines)
    return EmbeddingComparison(cosine_mean=float(values.mean()), cosine_min=float(values.min()), vectors=len(values))
