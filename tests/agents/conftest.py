"""Agents-adapter fixtures: engines over the session's real SmolLM2, small answers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from kvcomm import KVCommConfig, KVCommEngine
from kvcomm.store import MemoryStore

MAX_NEW = 8


@pytest.fixture
def make_engine(smollm2) -> Callable[..., KVCommEngine]:
    def make(policy: str = "kvcomm", store: Any = None, **cfg: Any) -> KVCommEngine:
        # fidelity 0: the paper's one-token reuse path, whose token counts these tests check
        config = KVCommConfig(policy=policy, device="cpu", **{"max_new_tokens": MAX_NEW, "fidelity": 0, **cfg})
        return KVCommEngine(smollm2.model, smollm2.tokenizer, store=store or MemoryStore(), config=config,
                            fingerprint=smollm2.fingerprint)

    return make

