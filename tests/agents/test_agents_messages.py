"""Message-segment mode (kvcomm.chat, engine.chat, KVCommChat's default) on the real SmolLM2."""

from __future__ import annotations

import asyncio
import operator
import warnings
from typing import Annotated, TypedDict

import pytest
import torch
from langchain_core.messages import AIMessage, FunctionMessage, HumanMessage, SystemMessage, ToolMessage
from langgraph.graph import END, START, MessagesState, StateGraph

from kvcomm import ContextLengthError, TemplateError
from kvcomm.agents import KVCommChat
from kvcomm.chat import session
from kvcomm.messages import MessageTemplate
from kvcomm.metrics import CONTINUATION_KEY
from kvcomm.rope import shift_keys
from kvcomm.streaming import TextStream

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from langgraph.prebuilt import create_react_agent

PLANNER = "You are the planner. Give a one-line plan."
CRITIC = "You are the critic. Point out one weakness."
WRITER = "You are the writer. Answer the user in one sentence."
TASKS = ["How do I bake bread at home?", "How do I learn to play chess?", "How do I fix a flat bike tyre?",
         "How do I plant roses in spring?"]


def _ids(tokenizer, system, messages):
    conv = ([{"role": "system", "content": system}] if system is not None else []) + messages
    return list(tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def _react(model, name, prompt):
    with warnings.catch_warnings():  # langgraph 1.x points to langchain.agents
        warnings.simplefilter("ignore", DeprecationWarning)
        return create_react_agent(model, tools=[], prompt=prompt, name=name)


@pytest.mark.parametrize("system", ["You are terse. {Braces} stay literal.", None])
def test_segments_concatenate_to_the_rendered_chat(make_engine, system):
    engine = make_engine("dense")
    messages = [{"role": "user", "content": "\n\nLeading newlines, trailing space "},
                {"role": "assistant", "content": " a reply\n"}, {"role": "tool", "content": "42 °C, ünïcode"},
                {"role": "system", "content": "A later system note."}, {"role": "user", "content": ""}]
    result = engine.chat(system, messages, max_new_tokens=2)
    assert engine.last_prompt_ids == _ids(engine.tokenizer, system, messages)
    assert result.record.prompt_tokens == len(engine.last_prompt_ids)


def test_a_message_base_kv_is_computed_behind_the_previous_message(make_engine, smollm2):
    """A whole message (role markers included) is prefilled behind a system message, where it sits in
    a conversation, not behind a user header: under the generic system prompt, the first message's
    base KV is exactly its KV in the full prompt."""
    from kvcomm.kv import block_from_cache, prefill
    from kvcomm.template import GENERIC_SYSTEM

    eng = make_engine()
    sink = smollm2.tokenizer.decode(eng._sink_ids("msg:user@0"))
    assert sink.rstrip().endswith("<|im_end|>") and "user" not in sink
    assert eng._sink_ids("question") != eng._sink_ids("msg:user@0")  # template slots keep the user header
    msgs = [{"role": "user", "content": TASKS[0]}]
    ids = _ids(smollm2.tokenizer, GENERIC_SYSTEM, msgs)
    head = len(eng._sink_ids("msg:user@0"))
    piece_len = len(ids) - head - len(smollm2.tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids)
    _, cache = prefill(smollm2.model, ids)
    real = block_from_cache(cache, head, head + piece_len)
    base = eng.publish("msg:user@0", ids=ids[head: head + piece_len]).kv
    assert torch.allclose(shift_keys(base.k, head, eng.inv_freq), real.k, atol=1e-4)
    assert torch.allclose(base.v, real.v, atol=1e-4)


def test_dense_gives_the_tokens_of_model_generate(make_engine, smollm2):
    engine = make_engine("dense")
    messages = [{"role": "user", "content": "Name a red fruit."}, {"role": "assistant", "content": "An apple."},
                {"role": "user", "content": "And a yellow one?"}]
    result = engine.chat(PLANNER, messages, max_new_tokens=10)
    ids = torch.tensor([_ids(engine.tokenizer, PLANNER, messages)])
    ref = smollm2.model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=sorted(engine.eos_ids))
    assert result.token_ids == ref[0, ids.shape[1]:].tolist()
    assert result.mode == "dense" and result.record.reused_tokens == 0


def test_react_graph_reuses_earlier_messages(make_engine):
    engine = make_engine("kvcomm", max_new_tokens=4)
    model = KVCommChat(engine=engine)
    graph = StateGraph(MessagesState)
    for name, prompt in (("planner", PLANNER), ("critic", CRITIC), ("writer", WRITER)):
        graph.add_node(name, _react(model, name, prompt))
    graph.add_edge(START, "planner")
    graph.add_edge("planner", "critic")
    graph.add_edge("critic", "writer")
    app = graph.compile()
    for task in TASKS:
        out = app.invoke({"messages": [HumanMessage(task)]})
    assert [m.name for m in out["messages"][1:]] == ["planner", "critic", "writer"]
    assert [r.agent for r in engine.records[:3]] == ["planner#1", "critic#2", "writer#3"]
    later = [r for r in engine.records if r.agent != "planner#1"]
    # the planner's message comes to the critic and writer with its producer's KV, in its own pool
    assert any("msg:ai.planner@1" in r.slots for r in later)
    reused = [r for r in later if r.mode == "reuse"]
    assert reused, [(r.agent, r.mode, r.slots) for r in engine.records]
    assert all(r.reused_tokens == r.prompt_tokens - 1 for r in reused)
    last = out["messages"][-1]
    assert last.usage_metadata["input_token_details"]["cache_read"] == engine.records[-1].reused_tokens
    assert last.response_metadata["mode"] == engine.records[-1].mode


def test_ai_message_carries_its_producer_kv(make_engine):
    engine = make_engine("kvcomm")
    first = engine.chat(PLANNER, [{"role": "user", "content": TASKS[0]}], agent="planner", message_id="m-1")
    answer = engine.latest["agent:planner#1"]
    history = [{"role": "user", "content": TASKS[0]}, {"role": "assistant", "content": first.text, "id": "m-1"}]
    engine.chat(CRITIC, history, agent="critic")
    assert engine.records[-1].slots.get("msg:ai.planner@1") is not None
    # the published segment: the assistant markers' base KV around the producer's answer KV
    pool = engine.planner.pool("msg:ai.planner@1").anchors()
    content = engine.planner.fetch(engine.planner.content_key(pool[0].content_hash))
    pre = len(session(engine)._frame[0])
    n = len(answer.ids)
    k = shift_keys(content.k[:, :, pre: pre + n], -pre, engine.inv_freq)
    assert (k - answer.kv.k).abs().max() < 1e-4 and torch.equal(content.v[:, :, pre: pre + n], answer.kv.v)
    # the end markers after it: computed over the markers and the answer (behind the sink every
    # message is published behind), as they follow it in a chat
    from kvcomm.kv import KVBlock, block_from_cache, cache_from_block, prefill

    post = session(engine)._frame[1]
    assert content.length == pre + n + len(post)
    sink = engine.sink_ids("msg:frame")
    _, cache = prefill(engine.model, sink)
    body = KVBlock(shift_keys(content.k[:, :, : pre + n], len(sink), engine.inv_freq), content.v[:, :, : pre + n])
    head = block_from_cache(cache)
    cache = cache_from_block(KVBlock(torch.cat([head.k, body.k], 2), torch.cat([head.v, body.v], 2)), engine.model.config)
    _, cache = prefill(engine.model, list(post), start=len(sink) + pre + n, cache=cache)
    ends = block_from_cache(cache, len(sink) + pre + n)
    assert torch.allclose(content.k[:, :, pre + n:], shift_keys(ends.k, -len(sink), engine.inv_freq), atol=1e-4)
    assert torch.allclose(content.v[:, :, pre + n:], ends.v, atol=1e-5)
    # an AI message nobody here produced is published like user input
    engine.chat(CRITIC, [{"role": "user", "content": TASKS[1]}, {"role": "assistant", "content": "Knead it."}])
    assert "msg:ai@1" in engine.records[-1].slots


def test_a_continuation_reuses_the_earlier_call_exactly(make_engine):
    engine = make_engine("kvcomm")
    history = [{"role": "user", "content": TASKS[2]}]
    first = engine.chat(PLANNER, history, agent="planner")
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Shorter, please."}]
    got = engine.chat(PLANNER, history, agent="planner", return_logits=True)
    assert got.mode == "prefix" and got.record.reused_tokens == first.record.prompt_tokens + len(first.token_ids)
    ref = make_engine("dense").chat(PLANNER, history, return_logits=True)
    assert got.token_ids == ref.token_ids
    assert (got.logits[0] - ref.logits[0]).abs().max() < 1e-3
    # the continuation's answer, too, reaches the next reader with its producer's KV
    engine.chat(CRITIC, [*history, {"role": "assistant", "content": got.text}], agent="critic")
    assert "msg:ai.planner@3" in engine.records[-1].slots
    # the dense policy never continues: it is the reference
    dense = make_engine("dense")
    dense.chat(PLANNER, history[:1], agent="planner")
    assert dense.chat(PLANNER, history, agent="planner").mode == "dense"


def test_a_forced_continuation_decodes_as_the_template_path(make_engine, smollm2):
    """The continuation path (only the generation prompt after the earlier call) decodes as
    KVCommEngine.generate does: a forced decode feeds every forced token (logits for each, equal to
    dense's), reports them to on_token up to the stop, and only the text is cut there."""
    tok = smollm2.tokenizer
    forced = list(tok("First, check the tyre. Then patch it.", add_special_tokens=False).input_ids)
    engine = make_engine("kvcomm")
    history = [{"role": "user", "content": TASKS[2]}]
    first = engine.chat(PLANNER, history, agent="planner")
    history = [*history, {"role": "assistant", "content": first.text}]
    seen: list[int] = []
    got = engine.chat(PLANNER, history, agent="planner", forced_ids=forced, max_new_tokens=len(forced),
                      stop=[","], on_token=seen.append, return_logits=True)
    assert CONTINUATION_KEY in got.record.slots and got.mode == "prefix"
    assert got.token_ids == forced and len(got.logits) == len(forced)
    assert got.text == "First" and tok.decode(seen).startswith("First,") and len(seen) < len(forced)
    ref = make_engine("dense").chat(PLANNER, history, forced_ids=forced, max_new_tokens=len(forced), stop=[","],
                                    return_logits=True)
    assert ref.token_ids == forced and ref.text == got.text
    assert max(float((a - b).abs().max()) for a, b in zip(got.logits, ref.logits, strict=True)) < 1e-3


def test_templates_stay_bounded_over_a_30_message_conversation(make_engine):
    engine = make_engine("kvcomm", max_new_tokens=1)
    sess = session(engine)
    sess.max_message_slots, sess.fold_block, sess.continuation = 6, 3, False
    # every length up to far past 30 messages maps to at most max_message_slots slots
    layouts = {n: sess.slot_layout(n) for n in range(1, 500)}
    assert {slots for _, slots in layouts.values()} == set(range(1, 7))
    assert layouts[29] == (24, 6) and layouts[30] == (27, 4)  # the fold moves 3 messages at a time
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"Step {i}: add {i % 5}."} for i in range(30)]
    for n in (1, 6, 7, 12, 29, 30):  # the conversation grows to 30 messages
        agent, prompt = ("planner", PLANNER) if n % 2 else ("critic", CRITIC)
        engine.chat(prompt, history[:n], agent=agent)
        assert engine.last_prompt_ids == _ids(engine.tokenizer, prompt, history[:n])  # folded or not
    names = sess.templates
    assert len(names) <= 2 * sess.max_message_slots
    assert {int(n.rpartition("#")[2]) for n in names} <= set(range(1, 7))
    assert all(isinstance(engine.agents[n].template, MessageTemplate) for n in names)
    assert "msg:history" in engine.records[-1].slots  # the oldest messages folded into one slot


def test_streaming_yields_the_text_of_invoke(make_engine):
    msgs = [SystemMessage("You are terse."), HumanMessage("Count: one, two, three,")]
    for policy in ("dense", "kvcomm"):  # kvcomm: invoke is dense, the stream continues it (prefix, decoded live)
        model = KVCommChat(engine=make_engine(policy), max_new_tokens=10)
        invoked = model.invoke(msgs)
        chunks = list(model.stream(msgs))
        assert "".join(c.content for c in chunks) == invoked.content
        assert chunks[-1].chunk_position == "last" and len(chunks) > 2
        usage = chunks[-1].usage_metadata
        assert usage["input_tokens"] == invoked.usage_metadata["input_tokens"] and "cache_read" in usage["input_token_details"]
        stopped = model.invoke(msgs, stop=[","])
        assert "," not in stopped.content
        assert "".join(c.content for c in model.stream(msgs, stop=[","])) == stopped.content
    assert chunks[-1].response_metadata["mode"] == "prefix"


def test_text_stream_holds_back_a_possible_stop(smollm2):
    tok = smollm2.tokenizer
    ids = tok("one, two, three", add_special_tokens=False).input_ids
    stream = TextStream(tok, {tok.eos_token_id}, stop=[", th"])
    sent = "".join(stream.push(t) for t in ids)
    assert sent + stream.finish("one, two") == "one, two"


def test_ainvoke_and_batch_under_a_langgraph_fan_out(make_engine):
    engine = make_engine("kvcomm", max_new_tokens=4)
    model = KVCommChat(engine=engine)

    class State(TypedDict):
        question: str
        answers: Annotated[list[str], operator.add]

    async def asker(state: State) -> dict[str, list[str]]:
        out = await model.ainvoke([SystemMessage(PLANNER), HumanMessage(state["question"])])
        return {"answers": [out.content]}

    def batcher(state: State) -> dict[str, list[str]]:
        outs = model.batch([[SystemMessage(CRITIC), HumanMessage(state["question"])], state["question"]])
        return {"answers": [o.content for o in outs]}

    graph = StateGraph(State)
    graph.add_node("asker", asker)
    graph.add_node("batcher", batcher)
    graph.add_edge(START, "asker")
    graph.add_edge(START, "batcher")
    graph.add_edge("asker", END)
    graph.add_edge("batcher", END)
    out = asyncio.run(graph.compile().ainvoke({"question": TASKS[3], "answers": []}))
    assert len(out["answers"]) == 3 and all(out["answers"])
    assert {r.agent.rpartition("#")[0] for r in engine.records} >= {"asker", "batcher"}


def test_bad_input_gets_one_clear_error(make_engine):
    engine = make_engine("dense")
    with pytest.raises(TemplateError, match="empty message list"):
        engine.chat(PLANNER, [])
    with pytest.raises(TemplateError, match="message 1 has role 'critic'"):
        engine.chat(PLANNER, [{"role": "user", "content": "hi"}, {"role": "critic", "content": "no"}])
    model = KVCommChat(engine=engine)
    with pytest.raises(TemplateError, match="message 2 is a FunctionMessage"):
        model.invoke([SystemMessage(PLANNER), HumanMessage("hi"), FunctionMessage(content="x", name="f")])
    with pytest.raises(TemplateError, match="'image' content block"):
        model.invoke([HumanMessage(content=[{"type": "image", "url": "https://example.com/a.png"}])])
    with pytest.raises(TemplateError, match="empty message list"):
        model.invoke([SystemMessage(PLANNER)])
    too_long = " ".join(["word"] * engine.max_positions)
    with pytest.raises(ContextLengthError, match="exceeds the model's context of 8192"):
        engine.chat(PLANNER, [{"role": "user", "content": too_long}])
    assert engine.records == []  # nothing ran
    # a tool message renders (as the chat template's "tool" role)
    out = model.invoke([HumanMessage("2+2?"), AIMessage(""), ToolMessage("4", tool_call_id="c1")], max_tokens=2)
    assert out.usage_metadata["output_tokens"] <= 2


def test_a_continued_call_reuses_the_messages_since_over_its_exact_prefix(make_engine):
    """The planner called again after the critic: its earlier call is the exact prefix, the
    critic's message (measured under the planner's template twice, then shareable) is reused."""
    engine, dense = make_engine("kvcomm", max_new_tokens=12), make_engine("dense", max_new_tokens=12)
    kls = []
    for task in TASKS:
        history = [{"role": "user", "content": task}]
        first = engine.chat(PLANNER, history, agent="planner")
        history.append({"role": "assistant", "content": first.text})
        history.append({"role": "assistant", "content": engine.chat(CRITIC, history, agent="critic").text})
        got = engine.chat(PLANNER, history, agent="planner", return_logits=True)
        served = first.record.prompt_tokens + len(first.token_ids)
        assert got.record.slots[CONTINUATION_KEY] == f"{served}/{got.record.prompt_tokens}"
        states = [state for slot, state in got.record.slots.items() if slot.startswith("msg:")]
        assert states[:2] == ["exact-prefix", "exact-prefix"] and states[2] != "exact-prefix"
        assert got.record.reused_tokens >= served
        ref = dense.chat(PLANNER, history, agent="planner", return_logits=True)
        kls.append(float(torch.nn.functional.kl_div(got.logits[0].log_softmax(-1), ref.logits[0].log_softmax(-1),
                                                    log_target=True, reduction="sum")))
        if got.mode == "prefix":  # the critic's message measured under this template: prefilled
            assert states[2] == "new-anchor"
            if first.mode == "prefix":  # over an exact prefix: a full prefill's logits
                assert kls[-1] < 1e-6
    modes = [r.mode for r in engine.records if r.agent == "planner#3"]
    assert modes[:2] == ["prefix", "prefix"] and "reuse" in modes[2:], modes
    reused = [r for r in engine.records if r.agent == "planner#3" and r.mode == "reuse"]
    # beyond the exact prefix: the critic's message, all but the few tokens recomputed (the last one,
    # and the end markers of the planner's own message between the prefix and the critic's)
    assert all(r.reused_tokens > int(r.slots[CONTINUATION_KEY].split("/")[0]) for r in reused)
    assert max(kls) < 1.0, kls
