"""Quantization settings: a frozen :class:`QuantConfig` plus per-node overrides.

Node selection (``include``/``exclude``) uses regular expressions searched in the
node name (``re.search``). Override keys are shell-style wildcards matched
against the whole node name (``fnmatch``), or regular expressions when written
``"re:<pattern>"``; the first matching override wins.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from onnxq.algorithms.autoround import TuningConfig
from onnxq.algorithms.awq import AWQConfig
from onnxq.algorithms.gptq import GPTQConfig
from onnxq.algorithms.hqq import HQQConfig
from onnxq.algorithms.kquant import KQuantConfig
from onnxq.algorithms.registry import algorithm_names, get_algorithm, registered_algorithms
from onnxq.errors import OnnxqError
from onnxq.formats.registry import get_format, weight_format_names

__all__ = ["QuantConfig", "NodeSettings", "GPTQConfig", "AWQConfig", "HQQConfig", "KQuantConfig", "TuningConfig",
           "CalibrationConfig",
           "ALGORITHMS", "FORMATS", "BNB4_TYPES"]

ALGORITHMS = algorithm_names()
FORMATS = weight_format_names()
BNB4_TYPES = ("nf4", "fp4")
_OVERRIDABLE = ("bits", "block_size", "symmetric", "accuracy_level", "mse_clip", "skip")


@dataclass(frozen=True)
class NodeSettings:
    """The effective settings for one weight site (after overrides), before its format resolves them.

    ``block_size`` may be -1 (one block over K): the format turns it into the block it writes
    for the concrete weight (:meth:`onnxq.formats.base.Format.resolve`).
    """

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int
    mse_clip: bool
    quant_type: str = "nf4"
    float_zero_points: bool = False


def _validate(bits: Any, block_size: Any, accuracy_level: Any, where: str) -> None:
    """The format-independent checks: what any weight quantization could store."""
    if not (isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 8):
        raise OnnxqError(f"{where}bits must be an integer in 2..8, got {bits!r}")
    if not (isinstance(block_size, int) and not isinstance(block_size, bool) and (block_size == -1 or block_size >= 1)):
        raise OnnxqError(f"{where}block_size must be a positive integer, or -1 for one block over K, "
                         f"got {block_size!r}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise OnnxqError(f"{where}accuracy_level must be in 0..4, got {accuracy_level!r}")


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration data is used by GPTQ/AWQ.

    Attributes:
        samples: at most this many feeds are taken from the reader.
        sequential: calibrate block by block on the outputs of the already quantized
            blocks (as the GPTQ and AWQ papers do); ``False`` takes every layer's input
            from the float model in one pass (faster, usually less accurate).
        outlier_token_ratio: for GPTQ's Hessian, a token whose activation's squared norm exceeds
            this multiple of its sample's median is scaled down to that cap (the massive
            first-token activations of LLMs; :func:`~onnxq.calibration.cap_outlier_tokens`);
            0 keeps every token as it is. AWQ's and k-quant's statistics are never capped.
    """

    samples: int = 128
    sequential: bool = True
    outlier_token_ratio: float = 100.0

    def __post_init__(self) -> None:
        if not (isinstance(self.samples, int) and self.samples >= 1):
            raise OnnxqError(f"calibration.samples must be a positive integer, got {self.samples!r}")
        ratio = self.outlier_token_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (ratio == 0 or ratio >= 1):
            raise OnnxqError(f"calibration.outlier_token_ratio must be 0 (off) or a number >= 1, got {ratio!r}")


_NESTED = {**{a.options_field: a.options_type for a in registered_algorithms() if a.options_field},
           "calibration": CalibrationConfig}
_TOP_LEVEL_KEYS = ("algorithm", "format", "quantize_embeddings", "tied_embedding_bits", "quant_type", "gptq", "awq", "hqq", "teq",
                   "autoround", "k_quant", "calibration")
_FORMAT_NAME = re.compile(r"^int(?P<bits>\d+)(?:_b(?P<block>-1|\d+))?(?:_(?P<scheme>sym|asym))?$")


def _settings_from_spec(pattern: str, value: Any) -> dict[str, Any]:
    """One wildcard entry (format name or settings dict) -> override settings."""
    if isinstance(value, str):
        if value == "float":
            return {"skip": True}
        match = _FORMAT_NAME.match(value)
        if match is None:
            raise OnnxqError(f"wildcard {pattern!r}: unknown format {value!r}; expected e.g. int4_b128, int8_b32_asym, float")
        settings: dict[str, Any] = {"bits": int(match["bits"])}
        if match["block"]:
            settings["block_size"] = int(match["block"])
        if match["scheme"]:
            settings["symmetric"] = match["scheme"] == "sym"
        return settings
    if isinstance(value, Mapping):
        settings = dict(value)
        enable = settings.pop("enable", True)
        if not enable:
            return {"skip": True}
        return settings
    raise OnnxqError(f"wildcard {pattern!r}: expected a format name or a dict of settings, got {type(value).__name__}")


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    Attributes:
        bits: 2, 4 or 8.
        block_size: elements of K per scale, or -1 for one block per output channel; the format
            says which sizes its kernel runs (MatMulNBits: a power of two >= 16, and -1 becomes
            the next power of two >= K).
        symmetric: full-range symmetric codes (no zero points stored) or asymmetric.
        accuracy_level: MatMulNBits compute mode (0 = the activation's own dtype;
            4 = int8 activations: faster, small extra error, known wrong-result reports
            on large-activation LLMs, so only on request).
        algorithm: "rtn" (round to nearest), "hqq" (calibration-free), "k_quant" (calibration
            optional), or "gptq", "awq", "teq", "autoround" (these need calibration data).
        mse_clip: per-block clip-ratio search minimising weight MSE.
        include: regexes; when given, only nodes whose name matches one are quantized.
        exclude: regexes; matching nodes are left in float.
        overrides: ``{wildcard: {setting: value}}`` per-node settings, e.g.
            ``{"*lm_head*": {"bits": 8}, "*.down_proj": {"skip": True}}``.
        format: the emitted op: ``"nbits"`` (com.microsoft MatMulNBits), ``"qdq"`` (opset-21
            blocked DequantizeLinear + MatMul), ``"bnb4"`` (MatMulBnb4, NF4/FP4, 4-bit RTN only),
            ``"fpq4"`` (legacy MatMulFpQ4: 4-bit, block 32, runs only on AVX-512 hosts).
        quantize_embeddings: Gather on constant tables (GatherBlockQuantized for nbits, a
            DequantizeLinear for qdq). ``None`` (default, "auto"): a tied table (an embedding
            whose table is also a quantized MatMul weight, e.g. the lm_head) is quantized once at
            ``tied_embedding_bits`` and shared by the Gather and the MatMul; other tables stay in
            float. ``True``: every table at the node settings (tied ones shared). ``False``: tables
            stay in float, and so do weights tied to one (no second, quantized copy).
        tied_embedding_bits: the bits of a tied table in the "auto" mode (8 by default: smaller
            than a float table beside a quantized lm_head copy, and as accurate as float); an
            override matching the MatMul's name wins.
        quant_type: ``"nf4"`` or ``"fp4"`` for ``format="bnb4"``.
        gptq, awq, hqq, teq, autoround, k_quant, calibration: options of the algorithms.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    accuracy_level: int = 0
    algorithm: str = "rtn"
    mse_clip: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    format: str = "nbits"
    quantize_embeddings: bool | None = None
    tied_embedding_bits: int = 8
    quant_type: str = "nf4"
    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    awq: AWQConfig = field(default_factory=AWQConfig)
    hqq: HQQConfig = field(default_factory=HQQConfig)
    teq: TuningConfig = field(default_factory=TuningConfig)
    autoround: TuningConfig = field(default_factory=TuningConfig)
    k_quant: KQuantConfig = field(default_factory=KQuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    @property
    def needs_calibration(self) -> bool:
        return get_algorithm(self.algorithm).calibrated

    @property
    def uses_calibration(self) -> bool:
        """The algorithm uses calibration data when some is given (it may not need it: k_quant)."""
        return get_algorithm(self.algorithm).uses_calibration

    def describe_embeddings(self) -> str:
        """How embedding tables are treated, in a few words (for the settings line)."""
        if self.quantize_embeddings is None:
            return f"tied embedding tables shared at int{self.tied_embedding_bits}, other tables in float"
        return "embeddings quantized, tied ones shared" if self.quantize_embeddings else "embeddings in float"

    @property
    def float_zero_points(self) -> bool:
        """The algorithm stores float zero points (HQQ with ``zero_point="float"``)."""
        algorithm = get_algorithm(self.algorithm)
        return algorithm.float_zero_points(algorithm.options_of(self))

    def __post_init__(self) -> None:
        _validate(self.bits, self.block_size, self.accuracy_level, "")
        if self.quantize_embeddings not in (None, True, False):
            raise OnnxqError(f"quantize_embeddings must be true, false or null (auto), got {self.quantize_embeddings!r}")
        _validate(self.tied_embedding_bits, self.block_size, self.accuracy_level, "tied_embedding_")
        get_algorithm(self.algorithm)  # raises for unknown names
        fmt = get_format(self.format)
        if fmt.sites != "matmul":
            raise OnnxqError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.quant_type not in BNB4_TYPES:
            raise OnnxqError(f"quant_type must be one of {BNB4_TYPES}, got {self.quant_type!r}")
        if self.float_zero_points and self.symmetric:
            raise OnnxqError(f"{self.algorithm}.zero_point 'float' needs asymmetric quantization (--asym)")
        if not fmt.int_codes and self.algorithm != "rtn":
            raise OnnxqError(f"format {self.format!r} supports only algorithm 'rtn', got {self.algorithm!r}")
        algorithm = get_algorithm(self.algorithm)
        if algorithm.float_target(algorithm.options_of(self)) and not self.calibration.sequential:
            raise OnnxqError(f"{algorithm.options_field or 'gptq'}.float_target needs sequential calibration: in one "
                             "pass the inputs are the float model's already")
        self._precheck(fmt, self._node_settings({}), "")
        for kind in ("include", "exclude"):
            for pattern in getattr(self, kind):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise OnnxqError(f"{kind} pattern {pattern!r} is not a valid regex: {exc}") from None
        for pattern, settings in self.overrides.items():
            unknown = set(settings) - set(_OVERRIDABLE)
            if unknown:
                raise OnnxqError(
                    f"override {pattern!r} has unknown settings {sorted(unknown)}; allowed: {list(_OVERRIDABLE)}"
                )
            merged = {f.name: getattr(self, f.name) for f in fields(self)} | dict(settings)
            where = f"override {pattern!r}: "
            _validate(merged["bits"], merged["block_size"], merged["accuracy_level"], where)
            if not settings.get("skip"):
                self._precheck(fmt, self._node_settings(settings), where)

    @staticmethod
    def _precheck(fmt, settings: "NodeSettings", where: str) -> None:
        """The format's checks that need no weight (bits, fixed block sizes): errors before a model is read."""
        reason = fmt.precheck(settings)
        if reason is not None:
            raise OnnxqError(f"{where}{reason}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "config") -> "QuantConfig":
        """Build from a JSON-like mapping (lists become tuples); unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if not k.startswith("_")}  # "_..." keys are notes (e.g. a search record)
        unknown = set(data) - known
        if unknown:
            raise OnnxqError(f"{where} has unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
        values = {k: tuple(v) if k in ("include", "exclude") else v for k, v in data.items()}
        for key, kind in _NESTED.items():
            if key in values and isinstance(values[key], Mapping):
                options = dict(values[key])
                if key == "gptq" and "blocksize" in options:  # the lazy batch's former name
                    options["lazy_batch"] = options.pop("blocksize")
                allowed = {f.name for f in fields(kind)}
                if set(options) - allowed:
                    raise OnnxqError(f"{where}: {key} has unknown keys {sorted(set(options) - allowed)}; "
                                     f"allowed: {sorted(allowed)}")
                values[key] = kind(**options)
        return cls(**values)

    @classmethod
    def from_wildcards(cls, spec: Mapping[str, Any]) -> "QuantConfig":
        """A ModelOpt-style mapping of node-name wildcards to formats.

        ``spec`` maps shell wildcards (``"*"``, ``"*lm_head*"``, or ``"re:<regex>"``) to a
        format name (``"int4_b128"``, ``"int8_b32_asym"``, ``"float"``) or a dict of settings
        (``bits``, ``block_size``, ``symmetric``, ``accuracy_level``, ``mse_clip``) with an
        optional ``"enable": False`` that leaves matching nodes in float. Later entries win
        over earlier ones for the nodes they match (put general patterns first). The
        non-pattern keys ``algorithm``, ``format``, ``quantize_embeddings``, ``gptq``, ``awq``
        and ``calibration`` set those fields, e.g.
        ``{"*": "int4_b128", "*lm_head*": {"enable": False}, "algorithm": "awq"}``.
        """
        fields_part = {k: v for k, v in spec.items() if k in _TOP_LEVEL_KEYS}
        patterns = [(k, v) for k, v in spec.items() if k not in _TOP_LEVEL_KEYS]
        overrides: dict[str, dict[str, Any]] = {}
        for pattern, value in reversed(patterns):  # our overrides are first-match-wins
            overrides[pattern] = _settings_from_spec(pattern, value)
        return cls.from_dict({**fields_part, "overrides": overrides}, where="wildcard config")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form; ``QuantConfig.from_dict(c.to_dict()) == c``."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        data["overrides"] = {k: dict(v) for k, v in self.overrides.items()}
        for key in _NESTED:
            data[key] = {f.name: getattr(getattr(self, key), f.name) for f in fields(getattr(self, key))}
        return data

    def with_updates(self, **changes: Any) -> "QuantConfig":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def override_for(self, node_name: str) -> tuple[str, Mapping[str, Any]] | None:
        """The first override whose pattern matches ``node_name``, as ``(pattern, settings)``, or None."""
        for pattern, settings in self.overrides.items():
            if _matches(pattern, node_name):
                return pattern, settings
        return None

    def skip_reason(self, node_name: str) -> str | None:
        """Why the settings leave ``node_name`` in float, or ``None`` when it is quantized."""
        if self.include and not any(re.search(p, node_name) for p in self.include):
            return "not matched by include"
        if any(re.search(p, node_name) for p in self.exclude):
            return "matched by exclude"
        override = self.override_for(node_name)
        if override is not None and override[1].get("skip"):
            return f"override {override[0]!r} says skip"
        return None

    def settings_for(self, node_name: str) -> NodeSettings | None:
        """Effective settings for ``node_name``, or ``None`` when it must stay in float."""
        if self.skip_reason(node_name) is not None:
            return None
        override = self.override_for(node_name)
        return self._node_settings({} if override is None else override[1])

    def _node_settings(self, override: Mapping[str, Any]) -> NodeSettings:
        values = {name: getattr(self, name) for name in ("bits", "block_size", "symmetric", "accuracy_level", "mse_clip")}
        values.update({k: v for k, v in override.items() if k != "skip"})
        return NodeSettings(**values, quant_type=self.quant_type,
                            float_zero_points=self.float_zero_points and not values["symmetric"])
