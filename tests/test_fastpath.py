"""The static-buffer fast path gives the eager path's first token and cache (CPU)."""

from __future__ import annotations

import functools
import importlib

import pytest
import torch

from kvcomm import KVCommConfig, KVCommEngine, Template
from kvcomm.fastpath.static_cache import StaticPromptCache
from kvcomm.kernels import set_backend
from kvcomm.kernels._triton import HAS_TRITON, INTERPRET
from kvcomm.models import tiny_random_model
from kvcomm.store import MemoryStore

AGENTS = [
    ("a", Template.from_system_user("You are agent A.", "Q: {question}\nAnswer:")),
    ("b", Template.from_system_user("You are agent B.", "Q: {question}\nA said: {agent:a}\nAnswer:")),
]
QUESTIONS = ["What is two plus two, and why?", "Name a colour of the sky at noon.", "Is seven a prime number?",
             "What is the boiling point of water at sea level?"]


def _run(loaded, fast: bool, policy: str):
    eng = KVCommEngine(loaded.model, loaded.tokenizer, store=MemoryStore(), fingerprint=loaded.fingerprint,
                       config=KVCommConfig(policy=policy, fast_path=fast, max_new_tokens=6))
    for name, tmpl in AGENTS:
        eng.register_agent(name, tmpl)
    out = []
    for q in QUESTIONS:
        eng.reset_answers()
        for name, _ in AGENTS:
            out.append(eng.generate(name, {"question": q}, return_cache=True, return_logits=True))
    return out


@pytest.mark.parametrize("policy", ["naive", "kvcomm"])
def test_fast_path_equals_eager_path(smollm2, policy):
    eager, fast = _run(smollm2, False, policy), _run(smollm2, True, policy)
    reused = 0
    for e, f in zip(eager, fast, strict=True):
        assert e.mode == f.mode
        assert e.token_ids == f.token_ids
        assert torch.allclose(e.logits[0], f.logits[0], atol=1e-4, rtol=1e-4)
        # the prompt's own pieces are bit-identical; an upstream answer's KV was computed by decode
        # steps over the static buffer in one run and over a dynamic cache in the other: the same
        # fp32 math summed in another order, ~1e-5 apart on keys of magnitude up to ~20 (measured
        # 1.3e-5 at most), so 1e-4 is the bound
        assert torch.allclose(e.cache.k, f.cache.k, atol=1e-4) and torch.allclose(e.cache.v, f.cache.v, atol=1e-4)
        reused += f.mode == "reuse"
    assert reused > 0  # the fast path was exercised


def test_static_cache_steps_match_dynamic_forward():
    model = tiny_random_model("llama")
    ids = torch.randint(0, 256, (1, 12))
    ref = model(input_ids=ids).logits[0].float()
    buf = StaticPromptCache(model, 32)
    buf.begin(0)
    for i in range(12):
        got = buf.step(int(ids[0, i]), i)
        assert torch.allclose(got, ref[i], atol=1e-5), i
    with pytest.raises(ValueError, match="position"):
        buf.step(1, 3)


def test_eager_forwards_read_the_filled_slots_only(monkeypatch):
    """A step and a teacher-forced forward_many hand the attention the slots up to their last
    token, not the buffer's empty tail (which the mask hides, at the same cost per slot), and
    give the logits of a forward without the buffer."""
    attention = importlib.import_module("kvcomm.fastpath.attention")
    seen: list[int] = []
    real = attention._sdpa
    monkeypatch.setattr(attention, "_sdpa", lambda module, q, k, *a: seen.append(k.shape[2]) or real(module, q, k, *a))
    model = tiny_random_model("llama")
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(5))
    ref = model(input_ids=ids).logits[0].float()
    buf = StaticPromptCache(model, 64)
    buf.begin(0)
    for i in range(4):
        assert torch.allclose(buf.step(int(ids[0, i]), i), ref[i], atol=1e-5), i
    layers = model.config.num_hidden_layers
    assert seen == [n for n in range(1, 5) for _ in range(layers)]
    seen.clear()
    monkeypatch.setattr(attention, "_many_applies", lambda *_: False)  # its SDPA fallback, seen above
    got = buf.forward_many(ids[0, 4:].tolist(), 4)
    assert torch.allclose(got, ref[4:], atol=1e-5)
    assert seen == [9] * layers
    assert model.config._attn_implementation == "sdpa" and buf._visible == buf.capacity


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", [False, True])
def test_cuda_eager_steps_over_the_filled_slots_equal_graph_replays(kernel):
    """On CUDA a captured step reads the whole buffer (fixed shapes), an eager one the filled slots
    only (the fallback when capture fails): same logits, with or without the decode kernel."""
    model = tiny_random_model("llama").cuda()
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(7))
    ref = model(input_ids=ids.cuda()).logits[0].float()
    logits = {}
    for graph in (True, False):
        buf = StaticPromptCache(model, 48, use_graph=graph, decode_kernel=kernel)
        buf.begin(0)
        logits[graph] = torch.stack([buf.step(int(t), i) for i, t in enumerate(ids[0])])
        assert (buf.graph is not None) == graph and buf._visible == buf.capacity
    assert torch.allclose(logits[False], ref, atol=1e-4)
    assert torch.allclose(logits[True], logits[False], atol=1e-5)


def test_a_step_over_a_reused_buffer_writes_at_its_position():
    """The buffer outlives a call: a shorter call's step writes at its own position, not after the
    longer call's stale slots (what transformers < 5.4 did: kvcomm.kv.MIN_TRANSFORMERS)."""
    model = tiny_random_model("llama")
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    buf = StaticPromptCache(model, 16)
    buf.begin(0)
    for i in range(8):
        buf.step(int(ids[0, i]), i)
    before = buf.k.clone()
    buf.begin(3)  # a new call: its prompt is the first 3 slots, the 5 after them are stale
    got = buf.step(7, 3)  # another token at position 3: slot 3 is rewritten, and only it
    changed = (buf.k != before).any(dim=4).any(dim=(0, 1, 2))
    assert changed.nonzero().flatten().tolist() == [3]
    want = model(input_ids=torch.cat([ids[:, :3], torch.tensor([[7]])], dim=1)).logits[0, -1].float()
    assert torch.allclose(got, want, atol=1e-5)


# Triton's interpreter is chosen when kvcomm.kernels is imported: `make test` exports it
decode_module = importlib.import_module("kvcomm.kernels.decode_attention")  # the package attribute is the function
needs_interpreter = pytest.mark.skipif(not (HAS_TRITON and INTERPRET), reason="needs triton with TRITON_INTERPRET=1")


@needs_interpreter
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decode_kernel_steps_match_sdpa_steps(arch, monkeypatch):
    model = tiny_random_model(arch)
    ids = torch.randint(0, 256, (1, 10))
    launches = []
    real = decode_module.decode_attention_forward
    monkeypatch.setattr(decode_module, "decode_attention_forward",
                        lambda *a, **kw: launches.append(1) or real(*a, **kw))
    logits = {}
    set_backend("triton")  # the kernel on CPU tensors, through the interpreter
    try:
        for kernel in (False, True):
            buf = StaticPromptCache(model, 24, decode_kernel=kernel)
            buf.begin(0)  # a partly filled buffer: the mask hides the slots after each position
            logits[kernel] = torch.stack([buf.step(int(t), i) for i, t in enumerate(ids[0])])
            assert model.config._attn_implementation == "sdpa"  # restored after every call
        with pytest.raises(IndexError):  # a token outside the vocabulary fails inside the model
            buf.step(10_000, 10)
        assert model.config._attn_implementation == "sdpa"  # restored on failure too
    finally:
        set_backend(None)
    assert len(launches) == 10 * model.config.num_hidden_layers  # every layer of every step
    # float32 throughout: the kernel's attention differs from SDPA's by summation order only
    # (~1e-7 relative); through three tiny layers and the LM head that stays ~2e-7 on logits of
    # magnitude < 1 (measured), so 1e-5 leaves a wide margin and still catches any real error
    assert torch.allclose(logits[True], logits[False], atol=1e-5, rtol=1e-5)


def test_decode_kernel_defaults_off_on_cpu():
    model = tiny_random_model("llama")
    assert StaticPromptCache(model, 8).decode_kernel is False
    set_backend("torch")
    try:
        assert StaticPromptCache(model, 8, decode_kernel=None).decode_kernel is False
    finally:
        set_backend(None)


@needs_interpreter
def test_a_failing_decode_kernel_falls_back_to_sdpa(monkeypatch, caplog):
    model = tiny_random_model("llama")
    ids = [5, 17, 42, 8]
    ref = StaticPromptCache(model, 16, decode_kernel=False)
    ref.begin(0)
    want = torch.stack([ref.step(t, i) for i, t in enumerate(ids)])

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this device")

    monkeypatch.setattr(decode_module, "decode_attention_forward", broken)
    set_backend("triton")
    try:
        buf = StaticPromptCache(model, 16, decode_kernel=True)
        buf.begin(0)
        with caplog.at_level("WARNING", logger="kvcomm.fastpath.static_cache"):
            got = torch.stack([buf.step(t, i) for i, t in enumerate(ids)])
        assert buf.decode_kernel is False
        assert "no kernel image for this device" in caplog.text
        assert torch.allclose(got, want, atol=1e-6)
        # an error that is not the kernel's is raised, and does not turn a working kernel off
        monkeypatch.undo()
        set_backend("triton")
        ok = StaticPromptCache(model, 16, decode_kernel=True)
        ok.begin(0)
        with pytest.raises(IndexError):
            ok.step(10_000, 0)
        assert ok.decode_kernel is True
    finally:
        set_backend(None)


# -- the selective recompute's attention on the CPU (many queries over the buffer) -------------------
static_module = importlib.import_module("kvcomm.fastpath.static_cache")
attention_module = importlib.import_module("kvcomm.fastpath.attention")


class _Module:  # what transformers hands an attention function (the grouped-heads count)
    def __init__(self, groups: int) -> None:
        self.num_key_value_groups, self.is_causal, self.training = groups, True, False


@pytest.fixture(params=["onednn", "grouped-sdpa", "folded"])
def many_path(request, monkeypatch):
    """Every way the many-query attention reads grouped K/V heads: oneDNN's matmuls over folded
    query heads (float32, where torch has oneDNN; here over any number of keys), torch's SDPA
    (torch >= 2.5) and the folded torch matmuls (before)."""
    if request.param == "onednn":
        if attention_module._LINEAR is None:
            pytest.skip("this torch has no oneDNN")
        monkeypatch.setattr(attention_module, "ONEDNN_MIN_KEYS", 0)
    elif request.param == "grouped-sdpa" and not attention_module.GROUPED_SDPA:
        pytest.skip("torch < 2.5: SDPA has no enable_gqa")
    monkeypatch.setattr(attention_module, "ONEDNN_FOLDED", request.param == "onednn")
    monkeypatch.setattr(attention_module, "GROUPED_SDPA", request.param != "folded")
    return request.param


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, q, S", [(9, 3, 7, 40), (4, 4, 3, 17), (8, 2, 2, 64)])
def test_many_query_attention_equals_sdpa(dtype, tol, heads, kv_heads, q, S, many_path):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = torch.Generator().manual_seed(heads * 100 + q)
    query = torch.randn(1, heads, q, 16, generator=g).to(dtype)
    key, value = (torch.randn(1, kv_heads, S, 16, generator=g).to(dtype) for _ in range(2))
    positions = torch.linspace(S // 3, S - 1, q).long()  # scattered queries, each seeing up to itself
    visible = torch.arange(S + 5).unsqueeze(0) <= positions.unsqueeze(1)  # a mask wider than the keys
    mask = torch.zeros(1, 1, q, S + 5, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    module = _Module(heads // kv_heads)
    got, _ = attention_module.many_query_attention(module, query, key, value, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, query, key, value, mask[..., :S], scaling=0.25)
    assert got.shape == want.shape == (1, q, heads, 16)
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    one, _ = attention_module.many_query_attention(module, query[:, :, :1], key, value, mask[:, :, :1, :S])
    ref, _ = sdpa_attention_forward(module, query[:, :, :1], key, value, mask[:, :, :1, :S])
    assert torch.equal(one, ref)  # one query: SDPA's own result


@pytest.mark.skipif(attention_module._LINEAR is None, reason="this torch has no oneDNN")
@pytest.mark.parametrize("heads, kv_heads, q, S", [(9, 3, 7, 40), (4, 4, 3, 17), (8, 2, 2, 1500), (9, 3, 25, 3629)])
def test_onednn_folded_attention_equals_sdpa(heads, kv_heads, q, S, monkeypatch):
    """oneDNN's two matmuls per K/V head, the mask added from the first row's next key on only,
    give SDPA's attention over grouped heads (float32), and the many-query attention takes that
    path from ONEDNN_MIN_KEYS keys on."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    calls = []
    real = attention_module._LINEAR
    monkeypatch.setattr(attention_module, "_LINEAR", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(attention_module, "ONEDNN_FOLDED", True)
    g = torch.Generator().manual_seed(S + q)
    query = torch.randn(1, heads, q, 64, generator=g)
    key, value = (torch.randn(1, kv_heads, S + 9, 64, generator=g)[:, :, :S] for _ in range(2))  # buffer views
    positions = sorted(torch.randperm(S, generator=g)[:q].tolist())
    visible = torch.arange(S).unsqueeze(0) <= torch.tensor(positions).unsqueeze(1)
    mask = torch.zeros(1, 1, q, S).masked_fill_(~visible, torch.finfo(torch.float32).min)
    module = _Module(heads // kv_heads)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.125)
    for masked_from in (0, positions[0] + 1):
        got = attention_module._onednn_folded_attention(query, key, value, mask, 0.125, masked_from)
        assert got.shape == want.shape == (1, q, heads, 64)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert len(calls) == 2 * 2 * kv_heads  # two matmuls per K/V head, twice
    calls.clear()
    monkeypatch.setattr(attention_module, "ONEDNN_MIN_KEYS", 1024)
    with attention_module.chunked_rows(None, positions):
        got, _ = attention_module.many_query_attention(module, query, key, value, mask, scaling=0.125)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert len(calls) == (2 * kv_heads if S >= 1024 else 0)


def test_a_failing_onednn_matmul_falls_back_to_sdpa_with_a_warning(monkeypatch, caplog):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def broken(*_):
        raise RuntimeError("could not create a primitive")

    monkeypatch.setattr(attention_module, "_LINEAR", broken)
    monkeypatch.setattr(attention_module, "ONEDNN_FOLDED", True)
    monkeypatch.setattr(attention_module, "ONEDNN_MIN_KEYS", 0)
    g = torch.Generator().manual_seed(5)
    query = torch.randn(1, 9, 4, 16, generator=g)
    key, value = (torch.randn(1, 3, 30, 16, generator=g) for _ in range(2))
    mask = torch.zeros(1, 1, 4, 30)
    module = _Module(3)
    with caplog.at_level("WARNING", logger="kvcomm.fastpath.attention"):
        got, _ = attention_module.many_query_attention(module, query, key, value, mask, scaling=0.25)
    want, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    assert torch.allclose(got, want, atol=1e-5)
    assert attention_module.ONEDNN_FOLDED is False  # not tried again
    assert "oneDNN matmuls failed" in caplog.text and "could not create a primitive" in caplog.text


def test_onednn_is_the_default_where_mkl_runs_no_avx512(monkeypatch, tmp_path):
    """MKL dispatches its AVX-512 code on Intel CPUs only: there SDPA's kernel (on MKL) is the
    faster, elsewhere (AMD, torch without MKL) oneDNN's matmuls are."""
    from kvcomm.fastpath import cpu

    assert cpu.onednn_beats_mkl("GenuineIntel", mkl=True) is False
    assert cpu.onednn_beats_mkl("AuthenticAMD", mkl=True) is True
    assert cpu.onednn_beats_mkl("GenuineIntel", mkl=False) is True
    assert cpu.onednn_beats_mkl("", mkl=True) is True
    # the attention's default follows the rule on this machine
    assert attention_module.ONEDNN_FOLDED == (
        attention_module._LINEAR is not None
        and cpu.onednn_beats_mkl(cpu.cpu_vendor(), torch.backends.mkl.is_available()))
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel name\t: AMD EPYC 9B45\n\n"
                    "processor\t: 1\nvendor_id\t: AuthenticAMD\nbogus field\t: only on cpu 1\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **kw: real_open(info if path == "/proc/cpuinfo" else path, *a, **kw))
    assert cpu.cpu_vendor() == "AuthenticAMD"
    assert cpu.cpuinfo("model name") == "AMD EPYC 9B45"
    assert cpu.cpuinfo("bogus field") == ""  # the first CPU's block only
    capability = torch.backends.cpu.get_cpu_capability()
    assert cpu.cpu_description() == f"CPU ({torch.get_num_threads()} threads; AMD EPYC 9B45, {capability})"
    info.unlink()  # no /proc/cpuinfo (not Linux)
    assert cpu.cpu_vendor() == ""
    assert cpu.cpu_description() == f"CPU ({torch.get_num_threads()} threads; {capability})"


def test_causal_chunks_cover_every_row_once_and_read_only_visible_keys():
    positions = [3, 4, 5, 6, 20, 21, 22, 23, 40, 41, 90, 91, 92, 93, 94, 95, 96, 97, 98, 99]
    for overhead in (0, 8, 64, 10_000):
        chunks = attention_module.causal_chunks(positions, overhead=overhead)
        assert [c[0] for c in chunks] == [0, *[c[1] for c in chunks[:-1]]] and chunks[-1][1] == len(positions)
        for first, end, keys in chunks:
            assert keys == positions[end - 1] + 1  # every row of the chunk sees all it may: keys <= its position
            assert all(positions[i] + 1 <= keys for i in range(first, end))
    assert attention_module.causal_chunks(positions, overhead=0) == ((0, 4, 7), (4, 8, 24), (8, 10, 42), (10, 20, 100))
    assert attention_module.causal_chunks(positions, overhead=10_000) == ((0, 20, 100),)  # not worth a cut
    many = list(range(0, 2000, 7))  # a scattered selection: at most max_cuts + 1 chunks
    assert len(attention_module.causal_chunks(many, overhead=0, max_cuts=16)) <= 17


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_chunked_many_query_attention_equals_one_pass(dtype, tol, many_path):
    g = torch.Generator().manual_seed(7)
    S, q = 96, 12
    positions = [2, 3, 4, 30, 31, 32, 60, 61, 92, 93, 94, 95]
    query = torch.randn(1, 9, q, 16, generator=g).to(dtype)
    key, value = (torch.randn(1, 3, S, 16, generator=g).to(dtype) for _ in range(2))
    visible = torch.arange(S).unsqueeze(0) <= torch.tensor(positions).unsqueeze(1)
    mask = torch.zeros(1, 1, q, S, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    module = _Module(3)
    whole, _ = attention_module.many_query_attention(module, query, key, value, mask, scaling=0.25)
    plan = attention_module.causal_chunks(positions, overhead=0)
    assert len(plan) == 4
    with attention_module.chunked_rows(plan):
        chunked, _ = attention_module.many_query_attention(module, query, key, value, mask, scaling=0.25)
    assert chunked.shape == whole.shape and chunked.is_contiguous()
    assert torch.allclose(chunked.float(), whole.float(), atol=tol, rtol=tol)
    # with the rows' positions, the mask is added from each chunk's first row's next key on only
    for chunks in (plan, None):
        with attention_module.chunked_rows(chunks, positions):
            got, _ = attention_module.many_query_attention(module, query, key, value, mask, scaling=0.25)
        assert torch.allclose(got.float(), whole.float(), atol=tol, rtol=tol)
    with attention_module.chunked_rows(plan, positions[:-1]):  # positions of other rows: not used
        got, _ = attention_module.many_query_attention(module, query, key, value, mask, scaling=0.25)
    assert torch.allclose(got.float(), whole.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("overhead", [0, None])  # 0: the recompute's rows go in chunks
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_recompute_with_many_query_attention_equals_sdpa(arch, overhead, monkeypatch, many_path):
    """StaticPromptCache.recompute on the CPU (grouped SDPA or folded matmuls over the prompt's
    slots only, in causal row chunks or not) gives transformers' SDPA's logits and KV over the
    whole buffer, and leaves the model's attention setting alone."""
    plans = []
    if overhead is not None:
        monkeypatch.setattr(attention_module, "CHUNK_OVERHEAD", overhead)
        monkeypatch.setattr(attention_module, "FOLDED_CHUNK_OVERHEAD", overhead)
        real_chunks = attention_module.causal_chunks
        monkeypatch.setattr(static_module, "causal_chunks",
                            lambda p, **kw: plans.append(real_chunks(p, **kw)) or plans[-1])
    model = tiny_random_model(arch)
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(3))[0].tolist()
    from kvcomm.kv import block_from_cache, prefill

    _, cache = prefill(model, ids)
    blk = block_from_cache(cache, 0, len(ids) - 1)
    selected = torch.tensor([2, 3, 9, 15])
    out = {}
    folded = []
    real = attention_module._many_applies

    def applies(*args, fold: bool):  # fold False: every call goes on to SDPA's function
        if fold and real(*args):
            folded.append(1)
            return True
        return False

    for fold in (True, False):
        monkeypatch.setattr(attention_module, "_many_applies", functools.partial(applies, fold=fold))
        buf = StaticPromptCache(model, 64)
        view = buf.prompt_views(len(ids) - 1)
        view.k.copy_(blk.k.add(0.05))  # "reused" KV a little off, so the recomputed tokens differ from it
        view.v.copy_(blk.v)
        out[fold] = (buf.recompute(ids, selected), buf.k.clone(), buf.v.clone())
        assert model.config._attn_implementation == "sdpa"
    (la, ka, va), (lb, kb, vb) = out[True], out[False]
    assert len(folded) == model.config.num_hidden_layers  # kvcomm's attention ran, in every layer
    if overhead == 0:
        assert [len(p) for p in plans] == [4, 4]  # [2, 3], [9], [15], [19]: both runs planned 4 chunks
    assert torch.allclose(la, lb, atol=1e-5, rtol=1e-5)
    assert torch.allclose(ka, kb, atol=1e-5) and torch.allclose(va, vb, atol=1e-5)



def test_static_buffer_grows_by_half_so_lengthening_prompts_reallocate_rarely():
    from kvcomm.fastpath import CAPACITY_STEP, FastPath

    model = tiny_random_model("llama")
    model.config.max_position_embeddings = 8192  # the growth stops at the model's context
    fast = FastPath(model, KVCommConfig())
    buffers = []
    for need in range(100, 6000, 40):  # a conversation: every call a little longer than the last
        buf = fast._buffer(need)
        assert buf.capacity >= need and buf.capacity % CAPACITY_STEP == 0
        if not buffers or buffers[-1] is not buf:
            buffers.append(buf)
    capacities = [b.capacity for b in buffers]
    assert capacities == sorted(capacities) and len(capacities) <= 6, capacities  # 512 -> 1024 -> 1536 -> ...
    assert all(b > a * 1.4 for a, b in zip(capacities, capacities[1:], strict=False)), capacities
    assert fast._buffer(8000).capacity == 8192  # never past the context (rounded to the step)
