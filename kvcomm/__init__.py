"""kvcomm: cross-agent KV-cache reuse for LLM multi-agent systems (the KVCOMM method).

The public API is re-exported here. Heavy parts (the engine, which imports transformers) load
lazily on first attribute access, so ``import kvcomm.kernels`` or ``import kvcomm.store`` pulls
in only torch (and triton / redis where used).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvcomm._lazy import lazy_exports
from kvcomm.config import KVCommConfig
from kvcomm.errors import (
    AgentError,
    ConfigError,
    ContextLengthError,
    DependencyError,
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
    from kvcomm.engine import KVCommEngine, Result
    from kvcomm.models import LoadedModel, load_model, model_fingerprint
    from kvcomm.prompt import Content
    from kvcomm.template import Template

__version__ = "0.1.0"

_LAZY = {
    "Content": "kvcomm.prompt",
    "KVCommEngine": "kvcomm.engine",
    "Result": "kvcomm.engine",
    "LoadedModel": "kvcomm.models",
    "load_model": "kvcomm.models",
    "model_fingerprint": "kvcomm.models",
    "Template": "kvcomm.template",
}


__getattr__, __dir__ = lazy_exports("kvcomm", _LAZY, globals())


__all__ = [
    "AgentError",
    "ConfigError",
    "Content",
    "ContextLengthError",
    "DependencyError",
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
