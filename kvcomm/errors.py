"""Exceptions raised by kvcomm.

Hierarchy::

    KVCommError                      root: catch this to catch everything kvcomm raises
    ├── ConfigError                  a bad configuration field or value
    ├── ModelLoadError               a model path/name that cannot be loaded
    ├── TemplateError                a template without slots, a bad slot name
    ├── AgentError                   unknown agent, agent registered twice
    ├── AgentConfigError             a misconfigured LangGraph node (@share_context)
    ├── SlotError                    unknown slot, fills missing a slot
    ├── ContextLengthError           a prompt longer than the model's context
    ├── FingerprintMismatchError     a KV entry computed by a different model
    ├── StoreError                   a store that cannot be reached or configured
    │   ├── StoreFormatError         an entry that fails to decode (corrupt, truncated, ...)
    │   │   └── EntryFormatError     ... with the fault kind it is counted as (``.kind``)
    │   └── KeyFormatError           a store key kvcomm does not write (:mod:`kvcomm.keys`)
    ├── KernelError                  a kernel called with bad shapes or dtypes
    ├── DependencyError              an installed package older than kvcomm supports
    └── ReportError                  ``kvcomm report`` found no call records, or cannot read a source

    StoreFaultWarning (RuntimeWarning)
        a store fault that degraded to recomputation: the run goes on, the result is the
        one a run without the store would give.
"""

from __future__ import annotations


class KVCommError(Exception):
    """Root of every error raised by kvcomm."""


class ConfigError(KVCommError, ValueError):
    """A configuration field has a bad value."""


class ModelLoadError(KVCommError):
    """A model name or path could not be loaded."""


class TemplateError(KVCommError, ValueError):
    """A prompt template is malformed."""


class AgentError(KVCommError, KeyError):
    """An agent is unknown or registered twice."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SlotError(KVCommError, KeyError):
    """A slot is unknown or a request does not fill every slot."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ContextLengthError(KVCommError, ValueError):
    """A prompt does not fit the model's context window."""


class FingerprintMismatchError(KVCommError):
    """A KV entry was computed by a different model (or dtype) than the engine's."""


class StoreError(KVCommError):
    """A store cannot be configured or reached."""


class StoreFormatError(StoreError):
    """A stored entry cannot be decoded: corrupt, truncated, wrong version, shape or model."""


class EntryFormatError(StoreFormatError):
    """A stored value that cannot be decoded; ``kind`` is the fault kind it is counted as."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class KeyFormatError(StoreError, ValueError):
    """A string that is not one of the store keys kvcomm builds (see :mod:`kvcomm.keys`)."""


class AgentConfigError(KVCommError, ValueError):
    """A ``@share_context`` node is misconfigured (bad template, missing state key, no engine)."""


class KernelError(KVCommError, ValueError):
    """A kernel was called with bad shapes, dtypes or devices."""


class DependencyError(KVCommError, ImportError):
    """An installed package kvcomm depends on is older than the oldest it supports."""


class ReportError(KVCommError):
    """No call records where a report was asked to look, or a source that cannot be read."""


class StoreFaultWarning(RuntimeWarning):
    """A store fault degraded to recomputation (the result is unaffected)."""
