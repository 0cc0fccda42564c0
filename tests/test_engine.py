"""The engine on the real SmolLM2 (fp32, CPU) and on tiny random Llama/Qwen2 configs."""

from __future__ import annotations

import math

import pytest
import torch

from kvcomm import (
    AgentError,
    ConfigError,
    ContextLengthError,
    FingerprintMismatchError,
    KVCommConfig,
    KVCommEngine,
    SlotError,
    Template,
    TemplateError,
)
from kvcomm.config import POLICIES
from kvcomm.kv import block_from_cache, prefill
from kvcomm.metrics import CONTINUATION_KEY
from kvcomm.models import tiny_random_model
from kvcomm.rope import model_inv_freq, shift_keys
from kvcomm.store import KVEntry, MemoryStore

PLANNER = Template.from_system_user("You are a careful planner.", "Question: {question}\nGive a short plan.")
SOLVER = Template.from_system_user(
    "You are a precise solver.", "Question: {question}\nPlan: {agent:planner}\nAnswer briefly."
)
Q1 = "What is the capital of France, and which river flows through it?"
Q2 = "Name three prime numbers larger than ten and explain why they are prime."
Q3 = "Why is the sky blue during the day but red at sunset?"


def make_engine(loaded, **cfg) -> KVCommEngine:
    # fidelity 0: the paper's path (only the last token recomputed), whose exactness these tests pin;
    # the recompute knobs' tests set their own
    return KVCommEngine(loaded.model, loaded.tokenizer, store=MemoryStore(), fingerprint=loaded.fingerprint,
                        config=KVCommConfig(**{"max_new_tokens": 8, "fidelity": 0, **cfg}))


def test_rope_shift_matches_keys_at_shifted_positions(smollm2):
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog.", add_special_tokens=False).input_ids
    delta = 37
    _, c0 = prefill(smollm2.model, ids, start=0)
    _, c1 = prefill(smollm2.model, ids, start=delta)
    k0, k1 = block_from_cache(c0).k, block_from_cache(c1).k
    shifted = shift_keys(k0, delta, model_inv_freq(smollm2.model))
    assert (shifted - k1).abs().max().item() < 1e-4
    assert (k0 - k1).abs().max().item() > 1e-2  # the shift is not a no-op


def test_dense_equals_model_generate(smollm2):
    eng = make_engine(smollm2, policy="dense")
    eng.register_agent("planner", PLANNER)
    res = eng.generate("planner", {"question": Q1}, max_new_tokens=12)
    ids = torch.tensor([eng.last_prompt_ids])
    ref = smollm2.model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=sorted(eng.eos_ids))
    assert res.token_ids == ref[0, ids.shape[1]:].tolist()
    assert res.mode == "dense" and res.record.reused_tokens == 0


def test_first_two_contents_become_anchors_then_shareable(smollm2):
    eng = make_engine(smollm2)
    for q in (Q1, Q2):
        assert eng.publish("question", q).decision.new_anchor
    assert len(eng.planner.pool("question").anchors()) == 2
    third = eng.publish("question", Q1[:-1] + " exactly?")
    assert third.decision is not None and third.decision.reason in ("shareable", "entropy", "too few anchors")


def test_exact_anchor_reuse_equals_dense_cache(smollm2):
    """Every anchor carries the request's own content: the corrected cache is the dense cache."""
    eng = make_engine(smollm2)
    eng.register_agent("planner", PLANNER)
    eng.register_agent("solver", SOLVER)
    first_p = eng.generate("planner", {"question": Q1})
    first_s = eng.generate("solver", {"question": Q1})
    assert first_p.mode == "prefix" and first_s.mode == "prefix"  # new anchors: deltas recorded
    reuse_p = eng.generate("planner", {"question": Q1}, return_cache=True)
    reuse_s = eng.generate("solver", {"question": Q1}, return_cache=True)
    assert reuse_p.mode == "reuse" and reuse_s.mode == "reuse"
    dense = make_engine(smollm2, policy="dense")
    dense.register_agent("planner", PLANNER)
    dense.register_agent("solver", SOLVER)
    ref_p = dense.generate("planner", {"question": Q1}, return_cache=True)
    ref_s = dense.generate("solver", {"question": Q1}, return_cache=True)
    for got, ref in ((reuse_p, ref_p), (reuse_s, ref_s)):
        assert (got.cache.k - ref.cache.k).abs().max().item() < 2e-4
        assert (got.cache.v - ref.cache.v).abs().max().item() < 2e-4
        assert got.token_ids == ref.token_ids
        assert got.record.recomputed_tokens == 1
        assert got.record.reused_tokens == got.record.prompt_tokens - 1


def test_shared_content_reuses_and_stays_close(smollm2):
    eng = make_engine(smollm2)
    eng.register_agent("planner", PLANNER)
    for q in (Q1, Q2):
        eng.generate("planner", {"question": q})
    res = eng.generate("planner", {"question": Q3}, return_cache=True, return_logits=True)
    if res.mode != "reuse":
        pytest.skip(f"the shareability test made {Q3!r} an anchor: {res.record.slots}")
    dense = make_engine(smollm2, policy="dense")
    dense.register_agent("planner", PLANNER)
    ref = dense.generate("planner", {"question": Q3}, return_cache=True, return_logits=True)
    naive = make_engine(smollm2, policy="naive")
    naive.register_agent("planner", PLANNER)
    nai = naive.generate("planner", {"question": Q3}, return_logits=True)
    kl = lambda a, b: torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True,  # noqa: E731
                                                 reduction="sum").item()
    assert kl(ref.logits[0], res.logits[0]) < kl(ref.logits[0], nai.logits[0])


def test_cacheblend_full_ratio_equals_dense(smollm2):
    eng = make_engine(smollm2, policy="cacheblend", cacheblend_ratio=1.0)
    eng.register_agent("planner", PLANNER)
    got = eng.generate("planner", {"question": Q2}, max_new_tokens=10)
    dense = make_engine(smollm2, policy="dense")
    dense.register_agent("planner", PLANNER)
    ref = dense.generate("planner", {"question": Q2}, max_new_tokens=10)
    assert got.token_ids == ref.token_ids
    assert got.record.recomputed_tokens == got.record.prompt_tokens - len(eng.agents["planner"].rendered.segment_ids[0])


def test_kvcomm_recompute_ratio(smollm2):
    """recompute_ratio=1 recomputes every corrected token: dense's answer; a small ratio some."""
    dense = make_engine(smollm2, policy="dense")
    dense.register_agent("planner", PLANNER)
    ref = dense.generate("planner", {"question": Q3}, max_new_tokens=10, return_logits=True)
    for ratio in (1.0, 0.2):
        eng = make_engine(smollm2, recompute_ratio=ratio, gamma=1.0)
        eng.register_agent("planner", PLANNER)
        for q in (Q1, Q2):
            assert eng.generate("planner", {"question": q}).mode == "prefix"  # anchors, deltas recorded
        got = eng.generate("planner", {"question": Q3}, max_new_tokens=10, return_logits=True)
        assert got.mode == "reuse", got.record.slots
        fixed = len(eng.agents["planner"].rendered.segment_ids[0])
        reused = got.record.prompt_tokens - 1 - fixed
        if ratio == 1.0:
            assert got.record.recomputed_tokens == reused + 1
            assert got.token_ids == ref.token_ids
            assert torch.allclose(got.logits[0], ref.logits[0], atol=1e-3)
        else:
            assert got.record.recomputed_tokens == math.ceil(ratio * reused) + 1
    with pytest.raises(ConfigError, match="recompute_ratio"):
        KVCommConfig(recompute_ratio=1.5)


def test_epic_recomputing_whole_pieces_gives_dense_logits(smollm2):
    """epic with k >= every piece's length recomputes everything after the exact prefix: dense."""
    dense = make_engine(smollm2, policy="dense")
    dense.register_agent("planner", PLANNER)
    ref = dense.generate("planner", {"question": Q3}, max_new_tokens=6, return_logits=True)
    eng = make_engine(smollm2, policy="epic", epic_tokens=10_000)
    eng.register_agent("planner", PLANNER)
    got = eng.generate("planner", {"question": Q3}, max_new_tokens=6, return_logits=True)
    fixed = len(eng.agents["planner"].segments[0])
    assert got.mode == "reuse" and got.record.recomputed_tokens == got.record.prompt_tokens - fixed
    assert got.token_ids == ref.token_ids
    assert torch.allclose(got.logits[0], ref.logits[0], atol=1e-3)
    small = make_engine(smollm2, policy="epic", epic_tokens=2)
    small.register_agent("planner", PLANNER)
    out = small.generate("planner", {"question": Q3}, max_new_tokens=2)
    tail = len(small.agents["planner"].segments[-1])
    # 2 tokens of the question, 2 of the segment after it (the query), the whole query, the last token
    assert out.record.recomputed_tokens == 2 + tail


def _reuse_call_selection(smollm2, **cfg):
    """A planner reuse call (fidelity 0 plus ``cfg``'s recompute knobs) after two anchors: the
    engine, its result, and the positions the engine's own selection picked to recompute."""
    eng = make_engine(smollm2, fidelity=0, gamma=1.0, **cfg)
    eng.register_agent("planner", PLANNER)
    for q in (Q1, Q2):
        eng.generate("planner", {"question": q})
    picked: list[torch.Tensor] = []
    original = eng.builder.selection
    eng.builder.selection = lambda *a: picked.append(original(*a)) or picked[-1]  # type: ignore[method-assign]
    out = eng.generate("planner", {"question": Q3}, max_new_tokens=2)
    assert out.mode == "reuse" and len(picked) == 1
    return eng, out, picked[0]


@pytest.mark.parametrize("where", ["all", "segments", "contents"])
def test_boundary_recompute_covers_the_pieces_asked_for(smollm2, where):
    """recompute_boundary_at picks which moved pieces' first tokens are recomputed: the slot
    contents, the template segments after them, or both (the engine's own selection, read back)."""
    eng, out, picked = _reuse_call_selection(smollm2, recompute_boundary=2, recompute_boundary_at=where,
                                             recompute_boundary_by="first")
    prompt = eng.agents["planner"]
    slot_start = len(prompt.segments[0])
    seg_start = slot_start + len(eng._encode(Q3))
    want = {"all": [slot_start, slot_start + 1, seg_start, seg_start + 1], "segments": [seg_start, seg_start + 1],
            "contents": [slot_start, slot_start + 1]}[where]
    assert picked.tolist() == want
    assert out.record.recomputed_tokens == len(want) + 1
    with pytest.raises(ConfigError, match="recompute_boundary_at"):
        KVCommConfig(recompute_boundary_at="middle")


@pytest.mark.parametrize("where", ["all", "segments", "contents"])
def test_boundary_recompute_by_deviation_spends_as_many_tokens_where_the_correction_is_largest(smollm2, where):
    """recompute_boundary_by="deviation": k tokens per moved piece in scope, as
    "first" recomputes, but the ones whose keys the correction moved most, read back from the
    per-token norms the assembly reported."""
    eng = make_engine(smollm2, fidelity=0, gamma=1.0, recompute_boundary=2, recompute_boundary_at=where,
                      recompute_boundary_by="deviation")
    eng.register_agent("planner", PLANNER)
    for q in (Q1, Q2):
        eng.generate("planner", {"question": q})
    seen: dict[str, torch.Tensor] = {}
    assemble, select = eng.fast.assemble, eng.builder.selection

    def spy_assemble(*a, **kw):
        out = assemble(*a, **kw)
        seen["deviation"] = kw["deviation"].clone()
        return out

    eng.fast.assemble = spy_assemble  # type: ignore[method-assign]
    eng.builder.selection = lambda *a: seen.setdefault("picked", select(*a))  # type: ignore[method-assign]
    out = eng.generate("planner", {"question": Q3}, max_new_tokens=2)
    assert out.mode == "reuse"
    prompt = eng.agents["planner"]
    slot_start = len(prompt.segments[0])
    seg_start = slot_start + len(eng._encode(Q3))
    scope = {"all": [(slot_start, seg_start), (seg_start, len(eng.last_prompt_ids) - 1)],
             "segments": [(seg_start, len(eng.last_prompt_ids) - 1)], "contents": [(slot_start, seg_start)]}[where]
    picked, deviation = seen["picked"].tolist(), seen["deviation"]
    assert len(picked) == 2 * len(scope)
    assert all(any(a <= p < b for a, b in scope) for p in picked)
    inside = [p for a, b in scope for p in range(a, b)]
    assert (deviation[inside] >= 0).all(), "every token of a corrected piece has its norm"
    firsts = [a for a, _ in scope]  # recompute_boundary_keep_first=1: each piece's first token
    ranked = sorted((p for p in inside if p not in firsts), key=lambda p: -float(deviation[p]))
    assert sorted(picked) == sorted(firsts + ranked[: len(picked) - len(firsts)])
    assert out.record.recomputed_tokens == len(picked) + 1
    with pytest.raises(ConfigError, match="recompute_boundary_by"):
        KVCommConfig(recompute_boundary_by="largest")


def test_fallback_margin_prefills_a_near_tie_in_full(smollm2):
    """A reuse call whose first token is not clear by fallback_margin becomes a full prefill: dense's
    tokens and logits, recorded as a dense call that fell back; a margin of 0 never falls back."""
    dense = make_engine(smollm2, policy="dense")
    dense.register_agent("planner", PLANNER)
    ref = dense.generate("planner", {"question": Q3}, max_new_tokens=6, return_logits=True, return_cache=True)
    got = {}
    for margin in (0.0, 1e9):  # no call clears a margin of 1e9 nats: every reuse call falls back
        eng = make_engine(smollm2, fallback_margin=margin, gamma=1.0)
        eng.register_agent("planner", PLANNER)
        for q in (Q1, Q2):
            eng.generate("planner", {"question": q})
        got[margin] = eng.generate("planner", {"question": Q3}, max_new_tokens=6, return_logits=True,
                                   return_cache=True)
    assert got[0.0].mode == "reuse" and not got[0.0].record.fallback
    fell = got[1e9]
    assert fell.mode == "prefix" and fell.record.mode == "prefix" and fell.record.fallback
    # the fallback prefill starts after the agent's fixed prefix, whose registered KV is exact
    n_fixed = len(eng.agents["planner"].segments[0])
    assert fell.record.reused_tokens == n_fixed > 0
    assert fell.record.recomputed_tokens == fell.record.prompt_tokens - n_fixed
    r = fell.record  # the TTFT holds the abandoned attempt (fetch, correction) and the full prefill
    assert r.fetch_ms >= 0 and r.correct_ms > 0 and 0 < r.first_token_ms
    assert r.fetch_ms + r.correct_ms + r.first_token_ms <= r.ttft_ms + 1e-6
    assert fell.token_ids == ref.token_ids
    assert torch.allclose(fell.logits[0], ref.logits[0], atol=1e-4)
    assert torch.allclose(fell.cache.k, ref.cache.k, atol=1e-4)  # the answer's KV is the prefill's too
    with pytest.raises(ConfigError, match="fallback_margin"):
        KVCommConfig(fallback_margin=-1.0)


def test_answers_are_keyed_by_the_context_that_produced_them(smollm2):
    """Token-identical answers to different questions are different contents: the consumer reads
    the KV its own producer computed, and never reports an "exact" slot it did not earn."""
    forced = smollm2.tokenizer("1. Look it up. 2. Answer.", add_special_tokens=False).input_ids
    eng = make_engine(smollm2, gamma=1.0)
    for name, tmpl in (("planner", PLANNER), ("solver", SOLVER)):
        eng.register_agent(name, tmpl)
    produced = []
    for q in (Q1, Q2, Q3, Q1):
        eng.reset_answers()
        eng.generate("planner", {"question": q}, forced_ids=forced, max_new_tokens=len(forced))
        answer = eng.latest["agent:planner"]
        assert list(answer.ids) == forced  # the same tokens every time
        produced.append(answer)
        solver = eng.generate("solver", {"question": q}, max_new_tokens=2)
        # the solver was handed this request's answer, never another request's KV
        assert eng.latest["agent:planner"] is answer
        if q != Q1 or len(produced) == 1:
            assert solver.record.slots.get("agent:planner") != "exact", solver.record.slots
    first, second, third, again = produced
    assert len({first.hash, second.hash, third.hash}) == 3
    assert not torch.allclose(first.kv.v, second.kv.v)  # another context, another KV
    # the same answer in the same context (Q1 again, same engine state for the planner) is the same content
    assert again.hash == first.hash
    # a fresh engine computing request 2 alone gets the KV this engine served for it
    alone = make_engine(smollm2, gamma=1.0)
    alone.register_agent("planner", PLANNER)
    alone.generate("planner", {"question": Q2}, forced_ids=forced, max_new_tokens=len(forced))
    torch.testing.assert_close(alone.latest["agent:planner"].kv.k, second.kv.k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(alone.latest["agent:planner"].kv.v, second.kv.v, atol=1e-4, rtol=1e-4)


def test_prefix_policy_reuses_system_prompt_exactly(smollm2):
    eng = make_engine(smollm2, policy="prefix")
    eng.register_agent("planner", PLANNER)
    got = eng.generate("planner", {"question": Q1})
    dense = make_engine(smollm2, policy="dense")
    dense.register_agent("planner", PLANNER)
    assert got.token_ids == dense.generate("planner", {"question": Q1}).token_ids
    assert 0 < got.record.reused_tokens < got.record.prompt_tokens


def test_answer_published_for_downstream_slot(smollm2):
    eng = make_engine(smollm2)
    eng.register_agent("planner", PLANNER)
    eng.register_agent("solver", SOLVER)
    plan = eng.generate("planner", {"question": Q1})
    latest = eng.latest["agent:planner"]
    assert list(latest.ids) == [t for t in plan.token_ids if t not in eng.eos_ids]
    assert latest.kv.k.shape[2] == latest.length
    out = eng.generate("solver", {"question": Q1})  # the plan comes from the latest answer
    assert out.record.prompt_tokens > plan.record.prompt_tokens


def test_bad_input_errors(smollm2):
    eng = make_engine(smollm2)
    eng.register_agent("planner", PLANNER)
    with pytest.raises(AgentError, match="unknown agent 'nobody'"):
        eng.generate("nobody", {"question": Q1})
    with pytest.raises(SlotError, match="no content for slot 'question'"):
        eng.generate("planner", {})
    with pytest.raises(SlotError, match="has no slot"):
        eng.generate("planner", {"question": Q1, "doc:1": "x"})
    with pytest.raises(TemplateError, match="no slots"):
        eng.register_agent("x", Template.from_system_user("sys", "no slot here"))
    with pytest.raises(ContextLengthError, match="exceeds the model's context"):
        eng.generate("planner", {"question": "word " * 9000})
    with pytest.raises(AgentError, match="different template"):
        eng.register_agent("planner", SOLVER)
    foreign = KVEntry(tensors={"k": torch.zeros(30, 3, 2, 64), "v": torch.zeros(30, 3, 2, 64)},
                      fingerprint="0123456789abcdef00000000")
    with pytest.raises(FingerprintMismatchError, match="different|computed by model"):
        eng.publish("question", ids=[1, 2], kv=foreign)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("policy", POLICIES)
def test_tiny_models_run_every_policy(smollm2, arch, policy):
    model = tiny_random_model(arch, vocab_size=len(smollm2.tokenizer))
    eng = KVCommEngine(model, smollm2.tokenizer, config=KVCommConfig(policy=policy, max_new_tokens=4))
    eng.register_agent("planner", PLANNER)
    eng.register_agent("solver", SOLVER)
    modes = []
    for q in (Q1, Q2, Q3):
        eng.reset_answers()
        for agent in ("planner", "solver"):
            res = eng.generate(agent, {"question": q})
            assert 1 <= len(res.token_ids) <= 4
            modes.append(res.mode)
    expected = {"dense": {"dense"}, "prefix": {"prefix"}, "naive": {"reuse"}, "cacheblend": {"reuse"},
                "epic": {"reuse"}}
    if policy in expected:
        assert set(modes) == expected[policy]
    else:
        assert modes[:2] == ["prefix", "prefix"]


def test_chat_sink_base_kv_and_its_own_entries(smollm2):
    """sink_text="chat" (the default): a content's base KV is prefilled behind the chat template's user-message
    prefix, stored under its own key (bases of two sinks never mix in one store), and exact
    anchors still reproduce the dense cache."""
    from kvcomm.template import chat_prefix

    prefix = chat_prefix(smollm2.tokenizer)
    assert prefix.startswith("<|im_start|>system\n") and prefix.endswith("<|im_start|>user\n")
    store = MemoryStore()
    plain = KVCommEngine(smollm2.model, smollm2.tokenizer, store=store, fingerprint=smollm2.fingerprint,
                         config=KVCommConfig(max_new_tokens=8, sink_text="\n"))
    chat = KVCommEngine(smollm2.model, smollm2.tokenizer, store=store, fingerprint=smollm2.fingerprint,
                        config=KVCommConfig(max_new_tokens=8))
    assert chat.config.sink_text == "chat"
    a, b = plain.publish("question", Q1), chat.publish("question", Q1)
    assert a.ids == b.ids and a.hash != b.hash
    assert (a.kv.v - b.kv.v).abs().max().item() > 1e-2  # another context, another base
    sink = smollm2.tokenizer(prefix, add_special_tokens=False).input_ids
    _, cache = prefill(smollm2.model, sink + list(b.ids))
    want = block_from_cache(cache, len(sink))
    assert torch.allclose(b.kv.v, want.v, atol=1e-5)
    assert torch.allclose(b.kv.k, shift_keys(want.k, -len(sink), model_inv_freq(smollm2.model)), atol=1e-4)

    chat.register_agent("planner", PLANNER)
    assert chat.generate("planner", {"question": Q1}).mode == "prefix"
    again = chat.generate("planner", {"question": Q1}, return_cache=True)
    dense = make_engine(smollm2, policy="dense")
    dense.register_agent("planner", PLANNER)
    ref = dense.generate("planner", {"question": Q1}, return_cache=True)
    assert again.mode == "reuse" and again.token_ids == ref.token_ids
    assert (again.cache.v - ref.cache.v).abs().max().item() < 2e-4


def test_calls_from_threads_run_one_at_a_time(smollm2, watch_engine_calls):
    """One engine, one static KV buffer: calls from several threads are serialised, so each
    answer equals the one the same call gives on its own."""
    from concurrent.futures import ThreadPoolExecutor

    eng = make_engine(smollm2)
    eng.register_agent("planner", PLANNER)
    eng.register_agent("solver", SOLVER)
    calls = watch_engine_calls(eng)
    jobs = [("planner", q) for q in (Q1, Q2, Q3, Q1)]
    eng.generate("planner", {"question": Q1})  # dense once: later Q1 calls reuse
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda job: eng.generate(job[0], {"question": job[1]}), jobs))
    assert len(calls.threads) > 1 and calls.most == 1
    dense = make_engine(smollm2, policy="dense")
    dense.register_agent("planner", PLANNER)
    want = dense.generate("planner", {"question": Q1}).token_ids
    again = [res for (_, q), res in zip(jobs, got, strict=True) if q == Q1]
    # Q1 is its own anchor whatever the thread order: reused exactly, the dense answer
    assert [r.mode for r in again] == ["reuse", "reuse"] and all(r.token_ids == want for r in again)


def test_min_anchor_coverage_lets_shorter_anchors_stand_in(smollm2):
    """The reference's length rule makes a content longer than every anchor of its slot a new
    anchor (a dense call); with min_anchor_coverage=0.5 anchors half its length are candidates,
    its covered tokens are corrected and the rest only moved."""
    short = [Q1, "Name three prime numbers larger than ten, please."]  # 14 and 10 tokens
    longer = "What is the capital of Italy, and which river flows through that old city today?"  # 17
    modes = {}
    for cover in (1.0, 0.5):
        eng = make_engine(smollm2, gamma=1.0, min_anchor_coverage=cover)
        eng.register_agent("planner", PLANNER)
        for q in short:
            assert eng.generate("planner", {"question": q}).mode == "prefix"  # anchors, deltas recorded
        n_short = max(len(eng._encode(q)) for q in short)
        assert n_short < len(eng._encode(longer)) <= 2 * min(len(eng._encode(q)) for q in short)
        res = eng.generate("planner", {"question": longer}, return_cache=True)
        content = eng.latest.get("question") or eng.publish("question", longer)
        modes[cover] = res.mode
        if cover == 0.5:
            assert res.record.reused_tokens == res.record.prompt_tokens - 1
            # past the longest anchor the slot's tokens are the base moved to the slot: naive
            naive = make_engine(smollm2, policy="naive")
            naive.register_agent("planner", PLANNER)
            ref = naive.generate("planner", {"question": longer}, return_cache=True)
            start = len(eng.agents["planner"].rendered.segment_ids[0])
            tail = slice(start + n_short, start + content.length)
            assert torch.allclose(res.cache.v[:, :, tail], ref.cache.v[:, :, tail], atol=1e-6)
            assert torch.allclose(res.cache.k[:, :, tail], ref.cache.k[:, :, tail], atol=1e-5)
            head = slice(start + 1, start + n_short)  # corrected: not the naive values
            assert (res.cache.v[1:, :, head] - ref.cache.v[1:, :, head]).abs().max() > 1e-3
    assert modes == {1.0: "prefix", 0.5: "reuse"}
    with pytest.raises(ConfigError, match="min_anchor_coverage"):
        KVCommConfig(min_anchor_coverage=0)


def test_shorter_anchor_distance_is_scaled_to_the_content_length():
    from kvcomm.anchors import _distance

    values = torch.ones(2, 1, 8, 4)
    full = torch.zeros(2, 1, 8, 4)
    half = torch.zeros(2, 1, 4, 4)  # the same per-token difference over half the tokens
    assert torch.isclose(_distance(values, half), _distance(values, full))
    assert torch.isclose(_distance(values, full), torch.tensor(8.0))  # sqrt(2*8*4)


def test_partial_reuse_prefills_from_the_first_slot_without_anchors(smollm2):
    """partial_reuse: a call whose later slot is a new anchor reuses the slots before it and
    prefills the rest, recording that slot's deltas, so the next call with it is a reuse call."""
    dense = make_engine(smollm2, policy="dense")
    dense.register_agent("solver", SOLVER)
    plans = ["First list the facts.", "Start from the river, then name the city."]
    refs = [dense.generate("solver", {"question": Q1, "agent:planner": p}, return_cache=True) for p in plans]
    for partial in (False, True):
        eng = make_engine(smollm2, partial_reuse=partial)
        eng.register_agent("solver", SOLVER)
        first = eng.generate("solver", {"question": Q1, "agent:planner": plans[0]})
        assert first.mode == "prefix"  # both slots new anchors
        got = eng.generate("solver", {"question": Q1, "agent:planner": plans[1]}, return_cache=True)
        if not partial:
            assert got.mode == "prefix"  # prefilled after the fixed prefix
            continue
        assert got.mode == "partial" and got.record.slots["agent:planner"] == "new-anchor"
        ids, plan_ids = eng.last_prompt_ids, eng.publish("agent:planner", plans[1]).ids
        plan_start = next(i for i in range(len(ids)) if tuple(ids[i : i + len(plan_ids)]) == tuple(plan_ids))
        # the question (an exact anchor of this agent) reused; the plan slot on prefilled
        assert got.record.reused_tokens == plan_start
        assert got.record.recomputed_tokens == got.record.prompt_tokens - plan_start
        assert got.token_ids == refs[1].token_ids
        assert (got.cache.k - refs[1].cache.k).abs().max().item() < 2e-4
        again = eng.generate("solver", {"question": Q1, "agent:planner": plans[1]}, return_cache=True)
        assert again.mode == "reuse"  # the partial call recorded the plan's deltas
        assert again.token_ids == refs[1].token_ids
        assert (again.cache.v - refs[1].cache.v).abs().max().item() < 2e-4


@pytest.mark.parametrize("query_tokens", [0, 5, 40])
def test_query_recompute_reaches_back_into_the_last_content(smollm2, query_tokens):
    """recompute_query_tokens: the query recompute covers the template's tail and at least that
    many of the prompt's last tokens, reaching into the content before it (never into the exact
    prefix)."""
    eng, out, picked = _reuse_call_selection(smollm2, recompute_query=True, recompute_query_tokens=query_tokens)
    last = out.record.prompt_tokens - 1
    tail_start = last - len(eng.agents["planner"].segments[-1]) + 1
    start = max(len(eng.agents["planner"].segments[0]), min(tail_start, last - query_tokens))
    assert picked.tolist() == list(range(start, last))
    assert out.record.recomputed_tokens == last - start + 1
    with pytest.raises(ConfigError, match="recompute_query_tokens"):
        KVCommConfig(recompute_query_tokens=-1)


@pytest.mark.parametrize("exact_prefix", [True, False])
def test_a_prefilled_call_starts_after_the_exact_prefix(smollm2, exact_prefix):
    """A call that measures new anchors prefills after the agent's fixed prefix (its registered KV,
    at the same positions): the first token, the logits and the cache are a full prefill's."""
    dense = make_engine(smollm2, policy="dense", exact_prefix=True)  # the baseline never reuses it
    dense.register_agent("planner", PLANNER)
    ref = dense.generate("planner", {"question": Q1}, return_logits=True, return_cache=True)
    assert ref.mode == "dense" and ref.record.reused_tokens == 0
    eng = make_engine(smollm2, exact_prefix=exact_prefix)
    eng.register_agent("planner", PLANNER)
    got = eng.generate("planner", {"question": Q1}, return_logits=True, return_cache=True)
    n_fixed = len(eng.agents["planner"].segments[0])
    assert got.record.slots == {"question": "new-anchor"} or got.record.slots["question"].startswith("shared")
    if exact_prefix:
        assert got.mode == "prefix" and got.record.reused_tokens == n_fixed > 0
        assert got.record.recomputed_tokens == got.record.prompt_tokens - n_fixed
    else:
        assert got.mode == "dense" and got.record.reused_tokens == 0
    assert got.token_ids == ref.token_ids
    assert torch.allclose(got.logits[0], ref.logits[0], atol=1e-4)
    assert torch.allclose(got.cache.k, ref.cache.k, atol=1e-4) and torch.allclose(got.cache.v, ref.cache.v, atol=1e-4)


def test_an_exact_prefix_serves_the_slots_it_covers(smollm2):
    """``generate(exact_kv=...)``: the slots inside the given KV are neither planned nor moved, the
    tokens between its end and the next slot are recomputed. With every token after it recomputed
    (epic, k past every piece) the call is a full prefill's; covering every slot, it is a prefill
    after it (mode ``prefix``)."""
    dense = make_engine(smollm2, policy="dense")
    for name, tmpl in (("planner", PLANNER), ("solver", SOLVER)):
        dense.register_agent(name, tmpl)
    dense.generate("planner", {"question": Q3}, max_new_tokens=6)
    ref = dense.generate("solver", {"question": Q3}, max_new_tokens=6, return_logits=True, return_cache=True)
    eng = make_engine(smollm2, policy="epic", epic_tokens=10_000)
    for name, tmpl in (("planner", PLANNER), ("solver", SOLVER)):
        eng.register_agent(name, tmpl)
    eng.generate("planner", {"question": Q3}, max_new_tokens=6)
    P = ref.record.prompt_tokens
    n = len(eng.agents["solver"].segments[0]) + len(eng.publish("question", Q3).ids) + 1  # 1 token past the slot
    got = eng.generate("solver", {"question": Q3}, max_new_tokens=6, return_logits=True,
                       exact_kv=ref.cache.slice(0, n))
    assert got.mode == "reuse" and got.record.slots["question"] == "exact-prefix"
    assert got.record.slots[CONTINUATION_KEY] == f"{n}/{P}" and got.record.reused_tokens == n
    assert got.token_ids == ref.token_ids
    assert torch.allclose(got.logits[0], ref.logits[0], atol=1e-3)
    # covering every slot: the rest (the query) is prefilled after it
    whole = eng.generate("solver", {"question": Q3}, max_new_tokens=6, return_logits=True,
                         exact_kv=ref.cache.slice(0, P - 3))
    assert whole.mode == "prefix" and whole.record.reused_tokens == P - 3
    assert whole.token_ids == ref.token_ids
    assert torch.allclose(whole.logits[0], ref.logits[0], atol=1e-3)
    # the dense policy, the reference, ignores it
    again = dense.generate("solver", {"question": Q3}, max_new_tokens=6, exact_kv=ref.cache.slice(0, n))
    assert again.mode == "dense" and CONTINUATION_KEY not in again.record.slots
