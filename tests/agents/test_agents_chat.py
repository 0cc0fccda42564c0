"""KVCommChat: a LangChain chat model over the engine, on the real SmolLM2."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

import kvcomm.agents
from kvcomm import SlotError, Template, TemplateError
from kvcomm.agents import KVCommChat

SOLVER = Template.from_system_user(
    "You are a precise solver.", "Question:\n{input}\nHint:\n{hint}\nAnswer briefly."
)


def test_message_mode_reports_cache_read_on_the_second_call(make_engine):
    engine = make_engine("kvcomm")
    chat = KVCommChat(engine=engine)
    msgs = [SystemMessage("You are terse. {Braces} are literal."), HumanMessage("What is the capital of Spain?")]
    first = chat.invoke(msgs)
    usage = first.usage_metadata
    assert isinstance(first, AIMessage) and first.content and first.id.startswith("kvcomm-")
    assert usage["input_tokens"] == len(engine.last_prompt_ids) == engine.records[-1].prompt_tokens
    assert usage["output_tokens"] == engine.records[-1].new_tokens > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    # the first sight of the message: prefilled after the system prompt, whose KV was registered with the agent
    assert first.response_metadata["mode"] == "prefix"
    assert 0 < usage["input_token_details"]["cache_read"] == engine.records[-1].reused_tokens < usage["input_tokens"]

    second = chat.invoke(msgs)  # the same conversation again: the first call's KV, exactly
    cached = second.usage_metadata["input_token_details"]["cache_read"]
    assert second.response_metadata["mode"] == "prefix" and second.content == first.content
    assert 0 < cached == engine.records[-1].reused_tokens == second.usage_metadata["input_tokens"] - 1
    assert first.response_metadata["agent"] == second.response_metadata["agent"]  # one agent per system prompt


def test_agent_mode_with_fills_and_async(make_engine):
    engine = make_engine("dense")
    chat = KVCommChat(engine=engine, agent="solver", template=SOLVER, max_new_tokens=4)
    out = asyncio.run(chat.bind(fills={"hint": "Think of Europe."}).ainvoke("Where is Paris?"))
    assert out.response_metadata["agent"] == "solver"
    assert out.usage_metadata["output_tokens"] == engine.records[-1].new_tokens <= 4
    prompt = engine.tokenizer.decode(engine.last_prompt_ids)
    assert "Where is Paris?" in prompt and "Think of Europe." in prompt
    assert out.usage_metadata["input_token_details"]["cache_read"] == 0  # dense reuses nothing


def test_errors_and_stop(make_engine):
    engine = make_engine("dense")
    with pytest.raises(SlotError, match="needs a human message"):
        KVCommChat(engine=engine, agent="solver", template=SOLVER).invoke([AIMessage("hello")], fills={"hint": "x"})
    with pytest.raises(TemplateError, match="empty message list"):
        KVCommChat(engine=engine).invoke([SystemMessage("You are terse.")])
    out = KVCommChat(engine=engine, max_new_tokens=6).invoke("Count: one, two, three,", stop=[","])
    assert "," not in out.content
    out = KVCommChat(engine=engine, max_tokens=6, stop=[","]).invoke("Count: one, two, three,")
    assert "," not in out.content


def test_exports_are_sorted_and_lazy(repo_root):
    assert kvcomm.agents.__all__ == sorted(kvcomm.agents.__all__)
    for name in kvcomm.agents.__all__:
        assert getattr(kvcomm.agents, name) is not None
    code = ("import sys, kvcomm.agents; "
            "assert 'langchain_core' not in sys.modules and 'langgraph' not in sys.modules, 'eager import'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)
