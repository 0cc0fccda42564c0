"""kvcomm.call: a call's layout and its exact prefix (no model needed; the paths that run a model
are covered through the engine in test_engine.py)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kvcomm.call import CallLayout, ExactPrefix
from kvcomm.kv import KVBlock


def _kv(n: int) -> KVBlock:
    return KVBlock(torch.zeros(2, 1, n, 4), torch.zeros(2, 1, n, 4))


def test_layout_interleaves_segments_and_contents() -> None:
    prompt = SimpleNamespace(segments=((1, 2, 3), (4,), (5, 6)))
    contents = [SimpleNamespace(ids=(10, 11)), SimpleNamespace(ids=(20, 21, 22))]
    call = CallLayout.build(prompt, contents)  # type: ignore[arg-type]
    assert call.ids == [1, 2, 3, 10, 11, 4, 20, 21, 22, 5, 6]
    assert call.seg_starts == [0, 5, 9]
    assert call.slot_starts == [3, 6]
    for start, content in zip(call.slot_starts, contents, strict=True):
        assert tuple(call.ids[start:start + len(content.ids)]) == content.ids


def test_exact_prefix_serves_the_slots_that_start_before_its_end() -> None:
    slot_starts, prompt_len = [3, 6], 11
    assert ExactPrefix.of(None, slot_starts, prompt_len) is None
    # ends inside the first slot: it serves that slot (and the gap after it), the next slot is planned
    inside = ExactPrefix.of(_kv(4), slot_starts, prompt_len)
    assert inside is not None and (inside.length, inside.slots, inside.served) == (4, 1, 6)
    # ends exactly where the second slot starts: that slot is not served
    at = ExactPrefix.of(_kv(6), slot_starts, prompt_len)
    assert at is not None and (at.length, at.slots, at.served) == (6, 1, 6)
    # covers every slot: it serves up to the last prompt token, which is always computed
    whole = ExactPrefix.of(_kv(50), slot_starts, prompt_len)
    assert whole is not None and (whole.length, whole.slots, whole.served) == (prompt_len - 1, 2, prompt_len - 1)
    assert ExactPrefix.of(_kv(0), slot_starts, prompt_len) is None
