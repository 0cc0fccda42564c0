"""langchain-core's standard chat-model tests (``langchain-tests``) on KVCommChat, real SmolLM2.

Skipped where ``langchain-tests`` is not installed (``pip install langchain-tests``). The tests
that do not apply skip themselves from the properties below: tool calling, tool choice,
structured output and JSON mode (KVCommChat parses no tool calls), image / audio / video / PDF
inputs (text only), Anthropic-format inputs, model override (one engine, one model), and the
VCR-recorded timing tests (no HTTP to record).
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

pytest.importorskip("langchain_tests")

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from kvcomm import KVCommConfig, KVCommEngine  # noqa: E402
from kvcomm.agents import KVCommChat  # noqa: E402
from kvcomm.store import MemoryStore  # noqa: E402

pytestmark = pytest.mark.slow  # about 30 model calls: in `make test-all`, not the default suite


class _Params:
    engine: Any = None

    @pytest.fixture(autouse=True)
    def _engine(self, smollm2: Any) -> None:
        if _Params.engine is None:
            config = KVCommConfig(policy="kvcomm", max_new_tokens=8, device="cpu")
            _Params.engine = KVCommEngine(smollm2.model, smollm2.tokenizer, store=MemoryStore(), config=config,
                                          fingerprint=smollm2.fingerprint)

    @property
    def chat_model_class(self) -> type[KVCommChat]:
        return KVCommChat

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"engine": _Params.engine}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        return {"temperature": 0, "max_tokens": 8, "timeout": 60, "stop": [], "max_retries": 2}

    @property
    def supports_model_override(self) -> bool:
        return False

    @property
    def supported_usage_metadata_details(self) -> dict[str, list[Any]]:
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}

    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        """A conversation, then its continuation: the second call reads the first's KV."""
        model = KVCommChat(engine=_Params.engine, max_tokens=4)
        history = [SystemMessage("You are terse."), HumanMessage("Name a colour.")]
        first = model.invoke(history)
        history += [first, HumanMessage("Another one?")]
        if not stream:
            return model.invoke(history)
        full = None
        for chunk in model.stream(history):
            full = chunk if full is None else full + chunk
        assert isinstance(full, AIMessage)
        return full


def _mark_async_tests(base: type) -> None:
    """langchain-tests' async tests expect pytest-asyncio's auto mode (this project's pytest runs in
    strict mode): mark them for pytest-asyncio, which langchain-tests installs. The standard tests
    forbid overriding them, so the mark goes on the inherited functions themselves."""
    for name, fn in vars(base).items():
        marks = getattr(fn, "pytestmark", [])
        if name.startswith("test_") and inspect.iscoroutinefunction(fn) and not any(m.name == "asyncio" for m in marks):
            pytest.mark.asyncio(fn)


_mark_async_tests(ChatModelIntegrationTests)


class TestKVCommChatUnit(_Params, ChatModelUnitTests):
    pass


class TestKVCommChatIntegration(_Params, ChatModelIntegrationTests):
    pass
