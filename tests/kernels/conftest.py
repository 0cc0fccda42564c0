"""Kernel tests run the Triton kernels on CPU through the interpreter.

TRITON_INTERPRET must be set before triton and kvcomm.kernels are imported: triton.jit picks the
interpreter when a kernel is decorated. ``make test`` exports it too; setting it here makes
``pytest tests/kernels`` work on its own. Shared helpers live in kernel_helpers.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _kernel_seed() -> None:
    torch.manual_seed(1234)
