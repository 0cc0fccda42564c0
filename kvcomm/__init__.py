"""kvcomm: cross-agent KV-cache reuse for LLM multi-agent systems (the KVCOMM method)."""

from __future__ import annotations

from kvcomm.config import KVCommConfig
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

__version__ = "0.1.0"

__all__ = [
    "AgentError",
    "ConfigError",
    "ContextLengthError",
    "FingerprintMismatchError",
    "KVCommConfig",
    "KVCommError",
    "KernelError",
    "LoadedModel",
    "ModelLoadError",
    "SlotError",
    "StoreError",
    "StoreFaultWarning",
    "StoreFormatError",
    "TemplateError",
    "__version__",
    "load_model",
    "model_fingerprint",
]
