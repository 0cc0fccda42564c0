"""Loading models: a Hugging Face causal LM (directory, GGUF file or short name), its fingerprint,
and the disk cache of converted GGUF files.

``loading`` (load_model) → ``cache`` (converted-model cache) → ``identity`` (fingerprint): one
direction, no circle. The method (:mod:`kvcomm.engine`) needs only :func:`model_fingerprint` and
:func:`resolve_device`.
"""

from __future__ import annotations

from kvcomm.models.identity import model_fingerprint, quiet_stderr
from kvcomm.models.loading import (
    SHORT_NAMES,
    LoadedModel,
    load_model,
    packaged_model_path,
    resolve_device,
    resolve_dtype,
    tiny_random_model,
)

__all__ = [
    "SHORT_NAMES",
    "LoadedModel",
    "load_model",
    "model_fingerprint",
    "packaged_model_path",
    "quiet_stderr",
    "resolve_device",
    "resolve_dtype",
    "tiny_random_model",
]
