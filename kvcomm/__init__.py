"""kvcomm: cross-agent KV-cache reuse for LLM multi-agent systems (the KVCOMM method)."""

from __future__ import annotations

from kvcomm.config import KVCommConfig
from kvcomm.engine import Content, KVCommEngine, Result
from kvcomm.errors import (
    AgentError,
    ConfigError,
    ContextLengthError,
    FingerprintMismatchError,
    KernelError,
    KVCommError,
    ModelLoadError,
    SlotError,
    StoreError,
    StoreFaultWarning,
    StoreFormatError,
    TemplateError,
)
from kvcomm.models import LoadedModel, load_model, model_fingerprint
from kvcomm.template import Template

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "ConfigError",
    "Content",
    "ContextLengthError",
    "FingerprintMismatchError",
    "KVCommConfig",
    "KVCommEngine",
    "KVCommError",
    "KernelError",
    "LoadedModel",
    "ModelLoadError",
    "Result",
    "SlotError",
    "StoreError",
    "StoreFaultWarning",
    "StoreFormatError",
    "Template",
    "TemplateError",
    "__version__",
    "load_model",
    "model_fingerprint",
]
