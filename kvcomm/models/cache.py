"""A disk cache of GGUF models converted to plain Hugging Face files.

transformers converts (dequantises) a GGUF file on every ``from_pretrained(..., gguf_file=...)``:
about 19 s for SmolLM2-135M on 2 CPU cores. After a conversion, :func:`store` writes the converted
model as an ordinary HF directory (``model.safetensors``, ``config.json``, ``generation_config.json``,
tokenizer files) plus ``kvcomm-entry.json``; :func:`load` reads it back with a plain
``from_pretrained(dir)`` in about a second.

An entry is keyed on the GGUF file's resolved path, size and mtime, the dtype and the
transformers and gguf versions; writing one removes the entries of the same path that no load
can hit any more (the file or a version changed). It is written into a temporary directory and
renamed into place, so a concurrent reader sees all of it or nothing. An entry that does not
load, or loads into anything but the converted model (file sizes, class, fingerprint and a
tokenizer probe are checked), is logged, removed and converted again.

Location: ``$KVCOMM_CACHE_DIR/models``, else ``$XDG_CACHE_HOME/kvcomm/models``, else
``~/.cache/kvcomm/models``. ``KVCOMM_MODEL_CACHE=0`` turns it off; deleting it is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvcomm.models.identity import model_fingerprint, quiet_stderr

logger = logging.getLogger(__name__)

FORMAT = 1
META = "kvcomm-entry.json"
WEIGHTS = "model.safetensors"
_PROBE = "<|im_start|>user\nHello, wörld! 123 🎉<|im_end|>\n"
_STALE_TMP_S = 3600


def enabled(cache: bool = True) -> bool:
    """``cache`` unless the environment says ``KVCOMM_MODEL_CACHE=0`` (or false/no/off)."""
    return cache and os.environ.get("KVCOMM_MODEL_CACHE", "1").strip().lower() not in {"0", "false", "no", "off"}


def cache_root() -> Path:
    if os.environ.get("KVCOMM_CACHE_DIR"):
        return Path(os.environ["KVCOMM_CACHE_DIR"]).expanduser() / "models"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kvcomm" / "models"


def _source_id(gguf: Path, dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    st = gguf.stat()
    try:
        gguf_version = importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:
        gguf_version = None
    return {
        "format": FORMAT, "path": str(gguf.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
        "dtype": str(dtype), "transformers": transformers.__version__, "gguf": gguf_version,
    }


def entry_path(gguf: Path, dtype: torch.dtype, source: dict[str, Any] | None = None) -> Path:
    """Where the converted ``gguf`` (in ``dtype``) is cached (whether or not it is there)."""
    source = source or _source_id(gguf, dtype)
    digest = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:24]
    return cache_root() / f"{gguf.stem}-{str(dtype).removeprefix('torch.')}-{digest}"


def load_or_convert(
    gguf: Path, dtype: torch.dtype, convert: Callable[[], tuple[Any, Any]], *, quiet: bool = False
) -> tuple[Any, Any]:
    """(model, tokenizer) of ``gguf`` from the cache, else from ``convert()`` (then cached)."""
    source = _source_id(gguf, dtype)  # taken before converting: a file changed meanwhile is not cached
    cached = load(gguf, dtype, quiet=quiet, source=source)
    if cached is not None:
        return cached
    model, tokenizer = convert()
    store(gguf, dtype, model, tokenizer, source=source)
    return model, tokenizer


def load(
    gguf: Path, dtype: torch.dtype, *, quiet: bool = False, source: dict[str, Any] | None = None
) -> tuple[Any, Any] | None:
    """The cached (model, tokenizer) of ``gguf`` on the CPU, or None (absent, or unusable: removed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    source = source or _source_id(gguf, dtype)
    entry = entry_path(gguf, dtype, source)
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / META).read_text())
        if meta.get("source") != source:
            raise ValueError("its kvcomm-entry.json names another source")
        for name, size in meta["files"].items():
            if (entry / name).stat().st_size != size:
                raise ValueError(f"{name} has {(entry / name).stat().st_size} bytes, not {size}")
        with quiet_stderr(quiet):
            tokenizer = AutoTokenizer.from_pretrained(entry, local_files_only=True)
            model, info = AutoModelForCausalLM.from_pretrained(
                entry, local_files_only=True, dtype=dtype, output_loading_info=True
            )
        if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")):
            raise ValueError(f"its weights do not fit the model: {info}")
        if meta["quantization_config"] is not None:  # kept out of config.json: restore it (it is fingerprinted)
            from transformers.quantizers.auto import AutoQuantizationConfig

            model.config.quantization_config = AutoQuantizationConfig.from_dict(meta["quantization_config"])
        if type(model).__name__ != meta["class"]:
            raise ValueError(f"it loads as {type(model).__name__}, not {meta['class']}")
        if model_fingerprint(model) != meta["fingerprint"]:
            raise ValueError("its model fingerprint differs from the converted model's")
        if tokenizer(_PROBE)["input_ids"] != meta["tokenizer_probe"]:
            raise ValueError("its tokenizer encodes differently from the converted one")
    except Exception as exc:  # any failure means: never use it, convert again
        logger.warning("model cache entry %s is unusable (%s); removing it and converting %s again", entry, exc, gguf)
        _remove(entry)
        return None
    logger.debug("loaded %s from the model cache %s", gguf, entry)
    return model.eval(), tokenizer


def store(
    gguf: Path, dtype: torch.dtype, model: Any, tokenizer: Any, *, source: dict[str, Any] | None = None
) -> Path | None:
    """Write the converted ``model``/``tokenizer`` of ``gguf`` into the cache (atomically).

    ``source``: the file's identity taken before the conversion (default: now). Returns the entry,
    or None where nothing was written: a file that changed since ``source``, weights that are not
    plain ``dtype`` tensors (e.g. kept as GGUF blocks); a write that fails only logs a warning.
    """
    from safetensors.torch import save_file


    source = source or _source_id(gguf, dtype)
    if _source_id(gguf, dtype) != source:
        logger.info("not caching %s: the file changed while it was converted", gguf)
        return None
    state = model.state_dict()
    if any(t.is_meta or t.dtype != dtype for t in state.values()):
        logger.info("not caching %s: its converted weights are not all plain %s tensors", gguf, dtype)
        return None
    entry = entry_path(gguf, dtype, source)
    tmp: Path | None = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(entry.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
        tensors, seen = {}, set()
        for name, t in state.items():  # tied weights (lm_head = embed_tokens) are stored once
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
            if key not in seen:
                seen.add(key)
                tensors[name] = t.detach().to("cpu").contiguous()
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = json.loads(model.config.to_json_string(use_diff=False))
        quantization_config = config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        meta = {
            "source": source, "class": type(model).__name__, "fingerprint": model_fingerprint(model),
            "quantization_config": quantization_config, "tokenizer_probe": tokenizer(_PROBE)["input_ids"],
            "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / META).is_file():
                raise
            return entry  # another process published the same entry first: keep theirs
        logger.info("cached the converted %s in %s", gguf, entry)
        _remove_outdated(entry.parent, source)
        return entry
    except Exception as exc:  # the model is loaded; a cache that cannot be written only costs time
        logger.warning("could not write the model cache entry %s: %s", entry, exc)
        return None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(entry: Path) -> None:
    """Move ``entry`` aside first, so that no other process sees it half deleted."""
    trash = entry.with_name(f".tmp-trash-{entry.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(entry, trash)
    except OSError:
        return  # gone already (another process removed it)
    shutil.rmtree(trash, ignore_errors=True)


def _remove_outdated(root: Path, source: dict[str, Any]) -> None:
    """Entries of the same file path that no load can hit again (the file or a version changed)."""
    current = {k: v for k, v in source.items() if k != "dtype"}
    for meta_file in root.glob(f"*/{META}"):
        with contextlib.suppress(Exception):
            other = json.loads(meta_file.read_text())["source"]
            if other["path"] == source["path"] and {k: v for k, v in other.items() if k != "dtype"} != current:
                logger.info("removing the outdated model cache entry %s", meta_file.parent)
                _remove(meta_file.parent)


def _remove_stale_tmp(root: Path) -> None:
    """Temporary directories left behind by killed processes."""
    for p in root.glob(".tmp-*"):
        with contextlib.suppress(OSError):
            if time.time() - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
