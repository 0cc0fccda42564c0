"""The converted-model cache: a GGUF load is converted once, later loads read plain HF files.

The real SmolLM2 GGUF file is converted twice in this module (about 18 s each on 2 idle cores):
by the module fixture (the cold load that fills the cache) and after a truncated entry. The other
cases that need a conversion get the fixture's converted model from a fake one. Every entry
written here is deleted after its test (each is 538 MB).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kvcomm.models import cache as model_cache
from kvcomm.models import load_model, model_fingerprint, packaged_model_path

GGUF = packaged_model_path("smollm2-135m")
PROMPT = "The capital of France is Paris. The capital of Italy is"
TEXTS = ["Hello world", "  leading spaces", "<|im_start|>user\nhi<|im_end|>", "émoji 🎉 中文 \t\n x", ""]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "What is 2+2?"},
]


def spy_conversion(mp: pytest.MonkeyPatch, fake: SimpleNamespace | None = None) -> list[str]:
    """Record transformers' GGUF loads (model and tokenizer); ``fake`` returns its model/tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls: list[str] = []
    for cls, what in ((AutoModelForCausalLM, "model"), (AutoTokenizer, "tokenizer")):

        def spy(*args, _orig=cls.from_pretrained, _what=what, **kwargs):
            if "gguf_file" in kwargs:
                calls.append(_what)
                if fake is not None:
                    return getattr(fake, _what)
            return _orig(*args, **kwargs)

        mp.setattr(cls, "from_pretrained", spy)
    return calls


def use_cache_dir(mp: pytest.MonkeyPatch, root: Path) -> None:
    mp.setenv("KVCOMM_CACHE_DIR", str(root))
    mp.delenv("KVCOMM_MODEL_CACHE", raising=False)


def entries(root: Path) -> list[Path]:
    models = root / "models"
    return sorted(models.iterdir()) if models.is_dir() else []


def link_entry(entry: Path, root: Path, name: str | None = None) -> Path:
    """A copy of ``entry`` under ``root`` made of hard links (replace its files, never edit them)."""
    dst = root / "models" / (name or entry.name)
    shutil.copytree(entry, dst, copy_function=os.link)
    return dst


def replace_file(path: Path, data: bytes) -> None:
    path.unlink()  # break the hard link: the fixture's entry stays intact
    path.write_bytes(data)


def logits(loaded) -> torch.Tensor:
    ids = loaded.tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return loaded.model(ids).logits


@pytest.fixture(autouse=True)
def _delete_entries(tmp_path):
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """The first load of the GGUF file into an empty cache: a real conversion, then the write."""
    root = tmp_path_factory.mktemp("model-cache")
    with pytest.MonkeyPatch.context() as mp:
        use_cache_dir(mp, root)
        calls = spy_conversion(mp)
        loaded = load_model("smollm2-135m", progress=False)
        expected = model_cache.entry_path(GGUF, torch.float32)
    assert sorted(calls) == ["model", "tokenizer"]
    assert entries(root) == [expected]
    yield SimpleNamespace(root=root, entry=expected, loaded=loaded, model=loaded.model,
                          tokenizer=loaded.tokenizer, logits=logits(loaded))
    shutil.rmtree(root, ignore_errors=True)


def test_entry_is_plain_hf_files(cold):
    names = {p.name for p in cold.entry.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", model_cache.META} <= names
    config = json.loads((cold.entry / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config  # a plain checkpoint: no GGUF quantizer on reload
    from safetensors import safe_open

    with safe_open(str(cold.entry / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once


def test_cached_load_equals_gguf_load(cold, monkeypatch):
    use_cache_dir(monkeypatch, cold.root)
    calls = spy_conversion(monkeypatch)
    warm = load_model("smollm2-135m", progress=False)
    assert calls == []  # neither the model nor the tokenizer was converted again

    assert type(warm.model) is type(cold.model)
    assert warm.fingerprint == cold.loaded.fingerprint == model_fingerprint(cold.model)
    cold_state, warm_state = cold.model.state_dict(), warm.model.state_dict()
    assert list(warm_state) == list(cold_state)
    assert all(torch.equal(warm_state[k], cold_state[k]) and warm_state[k].dtype == cold_state[k].dtype
               for k in cold_state)
    assert warm.model.lm_head.weight.data_ptr() == warm.model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(warm), cold.logits)

    drop = {"_name_or_path"}
    assert ({k: v for k, v in warm.model.config.to_dict().items() if k not in drop}
            == {k: v for k, v in cold.model.config.to_dict().items() if k not in drop})
    assert warm.model.generation_config.to_dict() == cold.model.generation_config.to_dict()

    a, b = cold.tokenizer, warm.tokenizer
    assert type(a) is type(b)
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id", "unk_token_id", "all_special_ids",
                 "all_special_tokens", "chat_template", "model_max_length", "padding_side"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert len(a) == len(b) and a.get_vocab() == b.get_vocab()
    for text in TEXTS:
        ids_a = a(text)["input_ids"]
        assert ids_a == b(text)["input_ids"], text
        assert a.decode(ids_a) == b.decode(ids_a)
        assert a.decode(ids_a, skip_special_tokens=True) == b.decode(ids_a, skip_special_tokens=True)
    for gen in (True, False):
        assert (a.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen)
                == b.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=gen))
        assert (a.apply_chat_template(MESSAGES, add_generation_prompt=gen)["input_ids"]
                == b.apply_chat_template(MESSAGES, add_generation_prompt=gen)["input_ids"])


def test_truncated_entry_warns_and_reconverts(cold, tmp_path, monkeypatch, caplog):
    entry = link_entry(cold.entry, tmp_path)
    weights = entry / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "rb") as f:
        replace_file(weights, f.read(size // 2))
    use_cache_dir(monkeypatch, tmp_path)
    calls = spy_conversion(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="kvcomm.models.cache"):
        loaded = load_model("smollm2-135m", progress=False)
    assert sorted(calls) == ["model", "tokenizer"]  # converted from the GGUF file again
    assert loaded.model is not cold.model
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert loaded.fingerprint == cold.loaded.fingerprint
    assert torch.equal(logits(loaded), cold.logits)
    assert entries(tmp_path) == [entry] and weights.stat().st_size == size  # rewritten whole
    assert model_cache.load(GGUF, torch.float32, quiet=True) is not None


@pytest.mark.parametrize("damage", ["missing tokenizer.json", "other fingerprint", "other source"])
def test_damaged_entry_is_never_used(cold, tmp_path, monkeypatch, caplog, damage):
    entry = link_entry(cold.entry, tmp_path)
    meta = json.loads((entry / model_cache.META).read_text())
    if damage == "missing tokenizer.json":
        (entry / "tokenizer.json").unlink()
    elif damage == "other fingerprint":
        meta["fingerprint"] = "0" * len(meta["fingerprint"])
    else:
        meta["source"]["size"] += 1
    replace_file(entry / model_cache.META, json.dumps(meta).encode())
    use_cache_dir(monkeypatch, tmp_path)
    calls = spy_conversion(monkeypatch, fake=cold)
    with caplog.at_level(logging.WARNING, logger="kvcomm.models.cache"):
        loaded = load_model("smollm2-135m", progress=False)
    assert sorted(calls) == ["model", "tokenizer"]
    assert loaded.model is cold.model
    assert any("unusable" in r.getMessage() for r in caplog.records)
    assert entries(tmp_path) == [entry] and (entry / "tokenizer.json").is_file()  # written anew
    assert json.loads((entry / model_cache.META).read_text())["fingerprint"] == cold.loaded.fingerprint


@pytest.mark.parametrize("switch", ["env", "argument"])
def test_disabled_cache_reads_and_writes_nothing(cold, tmp_path, monkeypatch, switch):
    empty, full = tmp_path / "empty", tmp_path / "full"
    empty.mkdir()
    link_entry(cold.entry, full)
    before = sorted(p.relative_to(full) for p in full.rglob("*"))
    calls = spy_conversion(monkeypatch, fake=cold)
    for root in (empty, full):
        use_cache_dir(monkeypatch, root)
        if switch == "env":
            monkeypatch.setenv("KVCOMM_MODEL_CACHE", "0")
        load_model("smollm2-135m", progress=False, cache=switch != "argument")
    assert calls == ["tokenizer", "model"] * 2  # the valid entry in `full` was not read either
    assert list(empty.iterdir()) == []
    assert sorted(p.relative_to(full) for p in full.rglob("*")) == before


def test_directories_are_not_cached(cold, tmp_path, monkeypatch):
    use_cache_dir(monkeypatch, tmp_path)
    loaded = load_model(cold.entry, progress=False)  # the entry is an ordinary HF directory
    assert torch.equal(logits(loaded), cold.logits)
    assert list(tmp_path.iterdir()) == []


def test_store_keeps_an_entry_published_first(cold, tmp_path, monkeypatch):
    use_cache_dir(monkeypatch, tmp_path)
    theirs = link_entry(cold.entry, tmp_path)
    inode = (theirs / "model.safetensors").stat().st_ino
    assert model_cache.store(GGUF, torch.float32, cold.model, cold.tokenizer) == theirs
    assert (theirs / "model.safetensors").stat().st_ino == inode
    assert entries(tmp_path) == [theirs]  # and no temporary directory left behind


def test_store_removes_outdated_entries_of_the_same_file(cold, tmp_path, monkeypatch):
    use_cache_dir(monkeypatch, tmp_path)
    changes = {"old-mtime": ("mtime_ns", 1), "old-transformers": ("transformers", "4.0.0"),
               "bfloat16": ("dtype", "torch.bfloat16"), "other-file": ("path", "/elsewhere/m.gguf")}
    for name, (key, value) in changes.items():
        entry = link_entry(cold.entry, tmp_path, name)
        meta = json.loads((entry / model_cache.META).read_text())
        meta["source"][key] = meta["source"][key] + value if key == "mtime_ns" else value
        replace_file(entry / model_cache.META, json.dumps(meta).encode())
    new = model_cache.store(GGUF, torch.float32, cold.model, cold.tokenizer)
    assert new == tmp_path / "models" / cold.entry.name
    assert sorted(p.name for p in entries(tmp_path)) == sorted([new.name, "bfloat16", "other-file"])


def test_file_changed_during_conversion_is_not_cached(cold, tmp_path, monkeypatch):
    use_cache_dir(monkeypatch, tmp_path)
    before = json.loads((cold.entry / model_cache.META).read_text())["source"]
    before["mtime_ns"] -= 1  # as if the file had been replaced while it was converted
    assert model_cache.store(GGUF, torch.float32, cold.model, cold.tokenizer, source=before) is None
    assert entries(tmp_path) == []


def test_unwritable_cache_warns_and_loads(cold, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    use_cache_dir(monkeypatch, blocker)
    spy_conversion(monkeypatch, fake=cold)
    with caplog.at_level(logging.WARNING, logger="kvcomm.models.cache"):
        loaded = load_model("smollm2-135m", progress=False)
    assert loaded.model is cold.model
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_entry_key_and_location(tmp_path, monkeypatch):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.delenv("KVCOMM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache.cache_root() == tmp_path / "xdg" / "kvcomm" / "models"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache.cache_root() == tmp_path / "home" / ".cache" / "kvcomm" / "models"
    monkeypatch.setenv("KVCOMM_CACHE_DIR", str(tmp_path / "kv"))
    assert model_cache.cache_root() == tmp_path / "kv" / "models"

    key = model_cache.entry_path(fake, torch.float32)
    assert key.parent == tmp_path / "kv" / "models" and key.name.startswith("m-float32-")
    assert model_cache.entry_path(fake, torch.float32) == key
    assert model_cache.entry_path(fake, torch.bfloat16) != key
    st = fake.stat()
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert model_cache.entry_path(fake, torch.float32) != key
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_cache.entry_path(fake, torch.float32) == key
    fake.write_bytes(b"GGUF" + bytes(61))
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_cache.entry_path(fake, torch.float32) != key
    import transformers

    monkeypatch.setattr(transformers, "__version__", "0.0.0")
    fake.write_bytes(b"GGUF" + bytes(60))
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert model_cache.entry_path(fake, torch.float32) != key


@pytest.mark.parametrize("value, expected", [("0", False), ("false", False), ("off", False), ("1", True), ("", True)])
def test_env_switch(monkeypatch, value, expected):
    monkeypatch.setenv("KVCOMM_MODEL_CACHE", value)
    assert model_cache.enabled() is expected
    assert model_cache.enabled(cache=False) is False
