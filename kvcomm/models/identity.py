"""What identifies a loaded model (its fingerprint), and quieting transformers' console output.

The lowest module of :mod:`kvcomm.models`: the loader and the disk cache both import it, and it
imports neither, so the package has no import circle.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from typing import Any

import torch


def quiet_stderr(quiet: bool) -> contextlib.AbstractContextManager[Any]:
    """Swallow stderr while ``quiet`` (transformers' GGUF conversion draws a progress bar there)."""
    return contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()


def model_fingerprint(model: Any) -> str:
    """A stable id of (architecture config, weights, dtype): stored KV is only valid for it.

    The config is hashed whole; each weight contributes its name, shape, dtype and an evenly
    strided sample of at most 2**16 values, so an 8B model is fingerprinted in milliseconds.
    """
    h = hashlib.blake2b(digest_size=12)
    cfg = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash"):
        cfg.pop(volatile, None)
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for pname, p in model.state_dict().items():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 65536)
            sample = flat[::step].contiguous().cpu()
            h.update(f"{pname}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
