"""kvcomm: cross-agent KV-cache reuse for LLM multi-agent systems (the KVCOMM method).

The public API is re-exported here. Heavy parts (the engine, which imports transformers) load
lazily on first attribute access, so ``import kvcomm.kernels`` or ``import kvcomm.store`` pulls
in only torch (and triton / redis where used).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from kvcomm.engine import Content, KVCommEngine, Result
    from kvcomm.models import LoadedModel, load_model, model_fingerprint
    from kvcomm.template import Template

__version__ = "0.1.0"

_LAZY = {
    "Content": "kvcomm.engine",
    "KVCommEngine": "kvcomm.engine",
    "Result": "kvcomm.engine",
    "LoadedModel": "kvcomm.models",
    "load_model": "kvcomm.models",
    "model_fingerprint": "kvcomm.models",
    "Template": "kvcomm.template",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcomm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


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
