"""Every key kvcomm writes to a store: frozen key types with a string round trip.

This module is the one answer to "what is in Redis". A store holds, per namespace, keys of the
form ``kvcomm:<namespace>:<relative key>``; the store adds the ``kvcomm:<namespace>:`` part
(:func:`namespace_prefix`) and the engine only ever sees relative keys, which all start with
the model's id (the first 16 hex digits of its fingerprint), so two models sharing one
namespace never read each other's KV::

    <model>:content:<hash>              ContentKey   a slot content's base KV (positions 0..T-1)
    <model>:delta:<hash>:<agent>        DeltaKey     one agent's deviations of an anchor (ph, pf)
    <model>:tmpl:<agent>:<hash>         TemplateKey  an agent's template prefilled once
    <model>:pool:{<model>:<slot>}       PoolKey      anchor pool members: hash -> "length,seq"
    <model>:uses:{<model>:<slot>}       PoolKey      anchor use counts (the LFU statistic)
    <model>:poolseq:{<model>:<slot>}    PoolKey      the pool's creation counter
    <model>:metrics                     MetricsKey   the engine's call records
    ~chunk:{<gen>.<i>}:<entry key>      ChunkKey     part i of an entry stored in chunks (store internal)

``<hash>`` is a content hash (:func:`kvcomm.engine` hashes token ids with the slot and the sink
that produced the base KV); slot and agent names may contain ``:`` (``agent:coder``).
Build keys with these types and :func:`parse_key`; never format or split key strings elsewhere.

Redis Cluster places a key by the hash of its first ``{...}`` part (its hash tag) when it has one.
The three maps of one anchor pool share the tag ``{<model>:<slot>}``, so they live on one shard and
a pool's state is read and changed there as a whole; entries (contents, deltas, templates, and the
chunks of large entries, each tagged by its own write and index) carry no common tag and spread over
the shards.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from kvcomm.errors import KeyFormatError

ROOT = "kvcomm"
#: characters of the fingerprint that name a model in keys
MODEL_ID_CHARS = 16

_HEX = re.compile(r"^[0-9a-f]+$")
_NAME = re.compile(r"^\S+$")

PoolPart = Literal["members", "uses", "seq"]
_POOL_KINDS: dict[str, PoolPart] = {"pool": "members", "uses": "uses", "poolseq": "seq"}
_POOL_TAGS: dict[PoolPart, str] = {v: k for k, v in _POOL_KINDS.items()}
#: how every chunk key starts (a relative key that no other key type can start with)
CHUNK_PREFIX = "~chunk:"
_CHUNK = re.compile(r"^~chunk:\{([0-9a-f]{8,64})\.(0|[1-9][0-9]{0,8})\}:(\S+)$")


def namespace_prefix(namespace: str) -> str:
    """What a store puts before every relative key: ``kvcomm:<namespace>:``."""
    return f"{ROOT}:{namespace}:"


def model_id(fingerprint: str) -> str:
    """The model part of every relative key (the fingerprint's first 16 characters)."""
    if len(fingerprint) < MODEL_ID_CHARS or not _HEX.match(fingerprint[:MODEL_ID_CHARS]):
        raise KeyFormatError(f"model fingerprint {fingerprint!r} is not at least {MODEL_ID_CHARS} hex digits")
    return fingerprint[:MODEL_ID_CHARS]


def _check(what: str, value: str, pattern: re.Pattern[str] = _NAME) -> str:
    if not isinstance(value, str) or not value or not pattern.match(value):
        raise KeyFormatError(f"bad {what} {value!r} in a store key")
    return value


@dataclass(frozen=True)
class ContentKey:
    """A slot content's base KV."""

    model: str
    hash: str
    kind: ClassVar[str] = "content"

    def __post_init__(self) -> None:
        _check("model id", self.model, _HEX)
        _check("content hash", self.hash, _HEX)

    def __str__(self) -> str:
        return f"{self.model}:content:{self.hash}"


@dataclass(frozen=True)
class DeltaKey:
    """One consumer agent's measured deviations (``ph``/``pf`` deltas) of one anchor."""

    model: str
    content_hash: str
    agent: str
    kind: ClassVar[str] = "delta"

    def __post_init__(self) -> None:
        _check("model id", self.model, _HEX)
        _check("content hash", self.content_hash, _HEX)
        _check("agent name", self.agent)

    def __str__(self) -> str:
        return f"{self.model}:delta:{self.content_hash}:{self.agent}"

    @staticmethod
    def anchor_prefix(model: str, content_hash: str) -> str:
        """The scan prefix of every agent's deltas of one anchor (to drop them on eviction)."""
        return f"{model}:delta:{content_hash}:"


@dataclass(frozen=True)
class TemplateKey:
    """An agent's template prefilled once with dummy slot text (``hash``: of its token ids)."""

    model: str
    agent: str
    hash: str
    kind: ClassVar[str] = "tmpl"

    def __post_init__(self) -> None:
        _check("model id", self.model, _HEX)
        _check("agent name", self.agent)
        _check("template hash", self.hash, _HEX)

    def __str__(self) -> str:
        return f"{self.model}:tmpl:{self.agent}:{self.hash}"


@dataclass(frozen=True)
class PoolKey:
    """One of the three small maps that hold a slot's anchor-pool state."""

    model: str
    slot: str
    part: PoolPart = "members"

    def __post_init__(self) -> None:
        _check("model id", self.model, _HEX)
        _check("slot name", self.slot)
        if self.part not in _POOL_TAGS:
            raise KeyFormatError(f"bad pool part {self.part!r}: one of {', '.join(_POOL_TAGS)}")

    @property
    def kind(self) -> str:
        return _POOL_TAGS[self.part]

    @property
    def hash_tag(self) -> str:
        """The Redis Cluster hash tag the three maps of this pool share (they live on one shard)."""
        return f"{{{self.model}:{self.slot}}}"

    def __str__(self) -> str:
        return f"{self.model}:{self.kind}:{self.hash_tag}"


@dataclass(frozen=True)
class MetricsKey:
    """The list of call records one model's engines append to."""

    model: str
    kind: ClassVar[str] = "metrics"

    def __post_init__(self) -> None:
        _check("model id", self.model, _HEX)

    def __str__(self) -> str:
        return f"{self.model}:metrics"


@dataclass(frozen=True)
class ChunkKey:
    """Part ``index`` of the entry under ``entry`` when a store writes it in chunks (store internal).

    ``generation`` names one write of the entry (hex), so chunks of two writes never mix; the hash
    tag ``{<generation>.<index>}`` spreads the chunks of one entry over a cluster's shards.
    """

    entry: str
    generation: str
    index: int
    kind: ClassVar[str] = "chunk"

    def __post_init__(self) -> None:
        _check("entry key", self.entry)
        if self.entry.startswith(CHUNK_PREFIX):
            raise KeyFormatError(f"bad entry key {self.entry!r} in a chunk key: it is a chunk key itself")
        if not (isinstance(self.generation, str) and 8 <= len(self.generation) <= 64 and _HEX.match(self.generation)):
            raise KeyFormatError(f"bad chunk generation {self.generation!r}: 8-64 hex digits")
        if not isinstance(self.index, int) or isinstance(self.index, bool) or not 0 <= self.index < 10**9:
            raise KeyFormatError(f"bad chunk index {self.index!r}")

    def __str__(self) -> str:
        return f"{CHUNK_PREFIX}{{{self.generation}.{self.index}}}:{self.entry}"


StoreKey = ContentKey | DeltaKey | TemplateKey | PoolKey | MetricsKey | ChunkKey


def parse_key(text: str) -> StoreKey:
    """The key type of a relative key string (the inverse of ``str(key)``).

    Raises:
        KeyFormatError: ``text`` is not a key kvcomm writes.
    """
    if text.startswith(CHUNK_PREFIX):
        m = _CHUNK.match(text)
        if not m:
            raise KeyFormatError(f"store key {text!r}: not a chunk key ~chunk:{{<gen>.<i>}}:<entry>")
        return ChunkKey(m.group(3), m.group(1), int(m.group(2)))
    model, sep, rest = text.partition(":")
    kind, sep2, tail = rest.partition(":")
    if not sep:
        raise KeyFormatError(f"store key {text!r} has no '<model>:' part")
    if kind == "metrics" and not sep2:
        return MetricsKey(model)
    if not sep2:
        raise KeyFormatError(f"store key {text!r}: no fields after its kind {kind!r}")
    if kind == "content":
        return ContentKey(model, tail)
    if kind == "delta":
        content_hash, _, agent = tail.partition(":")
        return DeltaKey(model, content_hash, agent)
    if kind == "tmpl":
        agent, _, digest = tail.rpartition(":")
        return TemplateKey(model, agent, digest)
    if kind in _POOL_KINDS:
        tag = f"{{{model}:"
        if not (tail.startswith(tag) and tail.endswith("}")) or len(tail) <= len(tag) + 1:
            raise KeyFormatError(f"store key {text!r}: a pool key ends in {{<model>:<slot>}}")
        return PoolKey(model, tail[len(tag) : -1], _POOL_KINDS[kind])
    raise KeyFormatError(f"store key {text!r}: unknown kind {kind!r}")


def is_chunk_key(text: str) -> bool:
    """Whether a relative key names a chunk of a larger entry (stores hide these from listings)."""
    return text.startswith(CHUNK_PREFIX)


def is_metrics_key(text: str) -> bool:
    """Whether a relative key names a metrics list (``kvcomm report`` finds records by it)."""
    try:
        return isinstance(parse_key(text), MetricsKey)
    except KeyFormatError:
        return False


__all__ = [
    "CHUNK_PREFIX",
    "ChunkKey",
    "ContentKey",
    "DeltaKey",
    "MetricsKey",
    "PoolKey",
    "StoreKey",
    "TemplateKey",
    "is_chunk_key",
    "is_metrics_key",
    "model_id",
    "namespace_prefix",
    "parse_key",
]
