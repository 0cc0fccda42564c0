"""KVCommConfig: every knob of the engine in one declarative table.

Each field carries its type, default, ``KVCOMM_<NAME>`` environment variable and a description;
the CLI's ``--help`` and the README read the same table (:func:`config_table`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcomm.errors import ConfigError
from kvcomm.policies import BOUNDARY_CHOICES, BOUNDARY_PIECES, FIDELITY_LEVELS
from kvcomm.policies import POLICIES as _POLICY_TABLE

POLICIES = tuple(_POLICY_TABLE)  # names, in the table's order
KV_CODECS = ("raw", "int8")
ANSWER_BASES = ("producer", "prefill")


def _field(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True, kw_only=True)
class KVCommConfig:
    """Configuration of a :class:`~kvcomm.KVCommEngine` (keyword-only, immutable)."""

    policy: str = _field("kvcomm", f"reuse policy, one of {', '.join(POLICIES)}")
    gamma: float = _field(0.3, "entropy threshold of the shareability test (H > gamma*log2(n) -> new anchor)")
    max_anchors: int = _field(20, "anchors kept per slot (V); eviction beyond it")
    eviction_window: int = _field(5, "eviction picks the least-used among this many oldest anchors")
    min_anchors: int = _field(2, "a slot needs at least this many length-compatible anchors to reuse")
    top_p: float = _field(0.9, "anchors in the top-p mass of the weights get a use count (LFU)")
    tau: float = _field(1.0, "softmax temperature of the anchor weights")
    rerotate_key_deltas: bool = _field(
        True, "rotate anchors' key deltas to the current position (the reference code adds them unrotated)"
    )
    correct_first_layer: bool = _field(False, "also correct layer 0 (the reference leaves it uncorrected)")
    correct_answer_slots: bool = _field(
        True, "correct agent-answer slots from other anchors' placeholder deltas (an exact anchor is always used)"
    )
    min_anchor_coverage: float = _field(
        1.0, "anchors at least this fraction of a content's length are its candidates (the reference: 1.0); "
        "below 1, tokens past a shorter anchor's end get no correction from it"
    )
    answer_base: str = _field(
        "producer", "an agent answer's base KV: 'producer' (its KV in the producer's context, free) or "
        "'prefill' (prefilled alone like user input, one extra prefill of the answer)"
    )
    correction_top_p: float = _field(
        1.0, "the correction reads only the anchors inside this mass of the weights (their weights "
        "renormalised); 1: every anchor (CPU path; the Triton kernels read every anchor)"
    )
    correction_top_k: int = _field(0, "and at most this many anchors per piece; 0: no limit")
    correction_scale: float = _field(
        0.75, "the anchors' estimated deviation is added times this: 1, as estimated (the paper's); below 1, "
        "shrunk toward the moved KV (an average of other contents' deviations overshoots the content's own; "
        "benchmarks/recompute_choice.py prints the scale that would have fit best)"
    )
    delta_dtype: str = _field(
        "model", "precision anchors' deltas are stored and read in: 'model' (the KV's dtype) or 'bfloat16' "
        "(half the bytes of float32; the correction accumulates in float32)"
    )
    cacheblend_ratio: float = _field(0.15, "cacheblend: fraction of reused tokens recomputed")
    fidelity: int = _field(
        2, "kvcomm's quality knob, 0-4: what a reuse call recomputes after the correction (0: the last "
        "token, the paper's method; 1: + the query, the template's last segment; 2: + 4 tokens per moved piece, "
        "its first 4 by default (recompute_boundary_by); 3: level 2, and a call whose first token is a near-tie, within 0.5 nats of the "
        "runner-up, prefilled in full; 4: the same within 1 nat); higher agrees with a full prefill more "
        "often, at a slower first token (1-2) or fewer reused calls (3-4)"
    )
    recompute_ratio: float = _field(
        0.0, "kvcomm: also recompute this fraction of the corrected tokens, those whose layer-1 values "
        "deviate most (CacheBlend's selection, one 2-layer pass over the prompt); 0: only the last token"
    )
    recompute_boundary: int = _field(
        0, "kvcomm: also recompute this many tokens per moved piece (EPIC's boundary recompute; which ones: "
        "recompute_boundary_by)"
    )
    recompute_boundary_at: str = _field(
        "all", "which moved pieces the boundary recompute (fidelity 2-4, recompute_boundary) covers: 'all', "
        "'segments' (the template text after each slot) or 'contents' (the slot contents)"
    )
    recompute_boundary_by: str = _field(
        "first", "how kvcomm's boundary recompute (fidelity 2-4, recompute_boundary=k) chooses its k tokens per "
        "moved piece: 'deviation' (k x pieces tokens where the anchors' correction moved the keys most, "
        "anywhere in the pieces) or 'first' (the first k tokens of every piece, EPIC's rule)"
    )
    recompute_boundary_keep_first: int = _field(
        1, "with recompute_boundary_by='deviation': each moved piece's first this-many tokens are recomputed "
        "whatever their correction, the rest of its k by deviation"
    )
    recompute_query: bool = _field(
        False, "kvcomm: also recompute the template's last text segment (the instruction before the answer)"
    )
    recompute_query_tokens: int = _field(
        16, "kvcomm: the query recompute (fidelity 1-4, recompute_query) covers at least this many of the "
        "prompt's last tokens, reaching back into the last slot content where the template's tail is shorter "
        "(a message-list prompt's tail is only the generation prompt)"
    )
    epic_tokens: int = _field(16, "epic: tokens recomputed at the start of every moved piece (EPIC's k)")
    fallback_margin: float = _field(
        0.0, "a reuse call whose first token leads the runner-up by less than this log-probability (nats) "
        "under the reused KV is prefilled in full instead (its answer is then a full prefill's); 0: never "
        "(fidelity 3 sets 0.5 for kvcomm, 4 sets 1.0; the larger applies)"
    )
    exact_prefix: bool = _field(
        True, "a call planned as a prefill (new anchors measured, a fallback) starts it after the agent's "
        "fixed prefix, whose KV is the registered template's, reused exactly (mode 'prefix'); False: such "
        "calls prefill the whole prompt (mode 'dense'). Policy 'dense' never reuses it"
    )
    partial_reuse: bool = _field(
        False, "kvcomm: a call with a slot that has no anchor (or must be measured) reuses the slots before "
        "it and prefills the rest of the prompt over them (mode 'partial', its deltas recorded from that "
        "prefill); False: the whole call is prefilled (the paper's method)"
    )
    sink_text: str = _field(
        "chat", "prefix prefilled before a user input and dropped from its base KV; 'chat': the chat "
        "template's text before a user message (after a generic system prompt); 'context': that plus the "
        "text every registered agent puts right before the slot (its real left context); else the text itself"
    )
    max_new_tokens: int = _field(64, "default number of generated tokens per call")
    device: str = _field("auto", "torch device for the engine ('auto' = cuda when available)")
    kernels: str = _field("auto", "kernel backend: auto (triton on CUDA), triton or torch")
    fast_path: bool = _field(True, "static KV buffer (+ CUDA graph on CUDA) for the first-token forward")
    correction_graphs: int = _field(
        8, "prompt layouts (agent x content lengths x anchors) whose shift+correction is kept as a CUDA "
        "graph (fast path on CUDA, captured when a layout repeats; each holds a copy of its contents' KV), "
        "LRU; 0: always eager"
    )
    anchor_cache_bytes: int = _field(
        2 << 30, "bytes of anchor KV kept stacked for the kernels across calls, LRU (0: stack every call)"
    )

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ConfigError(f"policy={self.policy!r} is not one of {', '.join(POLICIES)}")
        if self.gamma < 0:
            raise ConfigError(f"gamma={self.gamma} must be >= 0")
        if self.max_anchors < 2:
            raise ConfigError(f"max_anchors={self.max_anchors} must be >= 2")
        if not 1 <= self.eviction_window <= self.max_anchors:
            raise ConfigError(f"eviction_window={self.eviction_window} must be in [1, max_anchors]")
        if self.min_anchors < 1:
            raise ConfigError(f"min_anchors={self.min_anchors} must be >= 1")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.tau <= 0:
            raise ConfigError(f"tau={self.tau} must be > 0")
        if not 0 < self.correction_top_p <= 1:
            raise ConfigError(f"correction_top_p={self.correction_top_p} must be in (0, 1]")
        if self.correction_top_k < 0:
            raise ConfigError(f"correction_top_k={self.correction_top_k} must be >= 0")
        if not 0 <= self.correction_scale <= 2:
            raise ConfigError(f"correction_scale={self.correction_scale} must be in [0, 2]")
        if not 0 <= self.cacheblend_ratio <= 1:
            raise ConfigError(f"cacheblend_ratio={self.cacheblend_ratio} must be in [0, 1]")
        if not 0 <= self.recompute_ratio <= 1:
            raise ConfigError(f"recompute_ratio={self.recompute_ratio} must be in [0, 1]")
        if self.fidelity not in FIDELITY_LEVELS:
            raise ConfigError(f"fidelity={self.fidelity} must be one of {', '.join(map(str, FIDELITY_LEVELS))}")
        if self.recompute_boundary < 0:
            raise ConfigError(f"recompute_boundary={self.recompute_boundary} must be >= 0")
        if self.recompute_query_tokens < 0:
            raise ConfigError(f"recompute_query_tokens={self.recompute_query_tokens} must be >= 0")
        if self.recompute_boundary_keep_first < 0:
            raise ConfigError(f"recompute_boundary_keep_first={self.recompute_boundary_keep_first} must be >= 0")
        if self.recompute_boundary_by not in BOUNDARY_CHOICES:
            raise ConfigError(f"recompute_boundary_by={self.recompute_boundary_by!r} must be one of "
                              f"{', '.join(BOUNDARY_CHOICES)}")
        if self.recompute_boundary_at not in BOUNDARY_PIECES:
            raise ConfigError(f"recompute_boundary_at={self.recompute_boundary_at!r} must be one of "
                              f"{', '.join(BOUNDARY_PIECES)}")
        if self.fallback_margin < 0:
            raise ConfigError(f"fallback_margin={self.fallback_margin} must be >= 0")
        if self.epic_tokens < 0:
            raise ConfigError(f"epic_tokens={self.epic_tokens} must be >= 0")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.correction_graphs < 0:
            raise ConfigError(f"correction_graphs={self.correction_graphs} must be >= 0")
        if self.anchor_cache_bytes < 0:
            raise ConfigError(f"anchor_cache_bytes={self.anchor_cache_bytes} must be >= 0")
        if not 0 < self.min_anchor_coverage <= 1:
            raise ConfigError(f"min_anchor_coverage={self.min_anchor_coverage} must be in (0, 1]")
        if self.answer_base not in ANSWER_BASES:
            raise ConfigError(f"answer_base={self.answer_base!r} must be one of {', '.join(ANSWER_BASES)}")
        if self.delta_dtype not in ("model", "bfloat16"):
            raise ConfigError(f"delta_dtype={self.delta_dtype!r} must be 'model' or 'bfloat16'")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ConfigError(f"kernels={self.kernels!r} must be auto, triton or torch")

    def replace(self, **changes: Any) -> KVCommConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def variant(self, text: str) -> KVCommConfig:
        """A copy with ``FIELD=VALUE[,FIELD=VALUE...]`` applied, values read as the environment's are
        (what ``kvcomm eval --variant`` and ``kvcomm bench --variant`` take).

        Raises:
            ConfigError: not of that form, an unknown field or a bad value.
        """
        pairs = [part.partition("=") for part in text.split(",") if part.strip()]
        if not pairs or any(not eq or not name.strip() for name, eq, _ in pairs):
            raise ConfigError(f"{text!r}: expected FIELD=VALUE[,FIELD=VALUE]")
        return KVCommConfig.from_dict({**self.to_dict(), **{name.strip(): value.strip() for name, _, value in pairs}})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KVCommConfig:
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(data) - set(names)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**{k: _coerce(names[k], v) for k, v in data.items()})

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: Any) -> KVCommConfig:
        """Fields from ``KVCOMM_<FIELD>`` environment variables, then ``overrides``."""
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            var = env_var(f.name)
            if var in env:
                data[f.name] = env[var]
        data.update(overrides)
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> KVCommConfig:
        """Fields from a TOML or JSON file (a ``[kvcomm]`` table in TOML is also accepted)."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
        try:
            data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
        except (ValueError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {p} is not valid {p.suffix or 'TOML'}: {exc}") from None
        if isinstance(data.get("kvcomm"), dict):
            data = data["kvcomm"]
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def env_var(name: str) -> str:
    return f"KVCOMM_{name.upper()}"


def _coerce(f: dataclasses.Field[Any], value: Any) -> Any:
    """Convert strings (environment, CLI) to the field's type; other values pass through."""
    if not isinstance(value, str) or f.type in ("str", str):
        return value
    try:
        if f.type in ("bool", bool):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if f.type in ("int", int):
            return int(value)
        if f.type in ("float", float):
            return float(value)
    except ValueError:
        raise ConfigError(f"{f.name}={value!r} is not a valid {f.type}") from None
    return value


def config_table() -> list[tuple[str, str, str, str]]:
    """(field, default, environment variable, description) for every config field."""
    return [
        (f.name, repr(f.default), env_var(f.name), f.metadata["doc"]) for f in dataclasses.fields(KVCommConfig)
    ]
