"""Backend dispatch (per-call, set_backend, KVCOMM_KERNELS) and the package's public surface."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
import torch
from kernel_helpers import needs_triton, rope_inv_freq

import kvcomm.kernels
from kvcomm.errors import KernelError
from kvcomm.kernels import get_backend, rope_shift, set_backend
from kvcomm.kernels.dispatch import use_triton


@pytest.fixture(autouse=True)
def _clean_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("KVCOMM_KERNELS", raising=False)
    set_backend(None)
    yield
    set_backend(None)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every Triton launch of rope_shift (the kernel still runs)."""
    mod = importlib.import_module("kvcomm.kernels.rope_shift")  # the attribute is the function
    calls: list[str] = []
    real = mod.rope_shift_forward

    def spy(*args, **kwargs):
        calls.append("triton")
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "rope_shift_forward", spy)
    return calls


def test_exports_are_sorted_and_complete() -> None:
    names = kvcomm.kernels.__all__
    assert names == sorted(names)
    ops = ["apply_correction", "channel_weights", "decode_attention", "dequantize_kv", "quantize_kv", "rope_shift",
           "token_weights"]
    assert set(names) == {*ops, *(f"{op}_reference" for op in ops), "get_backend", "set_backend"}
    for name in names:
        assert callable(getattr(kvcomm.kernels, name))


def test_auto_uses_the_reference_on_cpu(launches: list[str]) -> None:
    k = torch.randn(2, 5, 64)
    assert get_backend() == "auto"
    rope_shift(k, 3, rope_inv_freq(64))
    assert launches == []
    assert use_triton("auto", k) is False


@needs_triton
def test_per_call_backend_beats_the_default(launches: list[str]) -> None:
    k, inv = torch.randn(2, 5, 64), rope_inv_freq(64)
    set_backend("torch")
    rope_shift(k, 3, inv)
    assert launches == []
    rope_shift(k, 3, inv, backend="triton")
    assert launches == ["triton"]


@needs_triton
def test_env_var_sets_the_default(monkeypatch: pytest.MonkeyPatch, launches: list[str]) -> None:
    k, inv = torch.randn(2, 5, 64), rope_inv_freq(64)
    monkeypatch.setenv("KVCOMM_KERNELS", "triton")
    assert get_backend() == "triton"
    rope_shift(k, 3, inv)
    assert launches == ["triton"]
    set_backend("torch")  # set_backend wins over the environment
    rope_shift(k, 3, inv)
    assert launches == ["triton"]


def test_bad_backend_names_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KernelError, match="backend must be one of"):
        set_backend("cuda")
    with pytest.raises(KernelError, match="backend must be one of"):
        rope_shift(torch.randn(2, 5, 64), 1, rope_inv_freq(64), backend="gpu")
    monkeypatch.setenv("KVCOMM_KERNELS", "fast")
    with pytest.raises(KernelError, match="KVCOMM_KERNELS"):
        get_backend()


def test_forced_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    dispatch = importlib.import_module("kvcomm.kernels.dispatch")
    monkeypatch.setattr(dispatch, "INTERPRET", False)
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    with pytest.raises(KernelError, match="TRITON_INTERPRET=1"):
        use_triton("triton", torch.zeros(1))
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with pytest.raises(KernelError, match="not installed"):
        use_triton("triton", torch.zeros(1))
    assert use_triton("auto", torch.zeros(1)) is False
