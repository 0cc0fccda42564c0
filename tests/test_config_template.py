"""Config table and template parsing (no model needed but a tokenizer-like object)."""

from __future__ import annotations

import pytest

from kvcomm import ConfigError, KVCommConfig, Template, TemplateError
from kvcomm.config import config_table
from kvcomm.tools.bench import SyntheticTokenizer


def test_defaults_follow_the_paper():
    cfg = KVCommConfig()
    assert (cfg.policy, cfg.gamma, cfg.max_anchors, cfg.eviction_window, cfg.top_p) == ("kvcomm", 0.3, 20, 5, 0.9)


@pytest.mark.parametrize(
    "field, value, match",
    [("policy", "magic", "policy='magic'"), ("gamma", -1, "gamma=-1"), ("max_anchors", 1, "max_anchors=1"),
     ("eviction_window", 50, "eviction_window=50"), ("top_p", 0, "top_p=0"), ("tau", 0, "tau=0"),
     ("cacheblend_ratio", 2, "cacheblend_ratio=2"), ("kernels", "cuda", "kernels='cuda'")],
)
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ConfigError, match=match):
        KVCommConfig(**{field: value})


def test_keyword_only_and_unknown_fields():
    with pytest.raises(TypeError):
        KVCommConfig("kvcomm")  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown config field"):
        KVCommConfig().replace(gama=1.0)


def test_from_env_and_file(tmp_path):
    cfg = KVCommConfig.from_env({"KVCOMM_GAMMA": "1.0", "KVCOMM_POLICY": "naive", "KVCOMM_FAST_PATH": "off"})
    assert (cfg.gamma, cfg.policy, cfg.fast_path) == (1.0, "naive", False)
    with pytest.raises(ConfigError, match="max_anchors='many'"):
        KVCommConfig.from_env({"KVCOMM_MAX_ANCHORS": "many"})
    f = tmp_path / "kvcomm.toml"
    f.write_text("[kvcomm]\ngamma = 0.5\nmax_anchors = 8\n")
    assert KVCommConfig.from_file(f).max_anchors == 8
    (tmp_path / "bad.toml").write_text("gamma = [")
    with pytest.raises(ConfigError, match="not valid"):
        KVCommConfig.from_file(tmp_path / "bad.toml")


def test_config_table_documents_every_field():
    rows = config_table()
    assert {r[0] for r in rows} == set(KVCommConfig().to_dict())
    assert all(r[2].startswith("KVCOMM_") and r[3] for r in rows)


def test_template_slots_segments_and_braces():
    tok = SyntheticTokenizer(1000)
    t = Template.from_system_user("sys {{literal}}", "Q: {question} and {agent:planner} then {doc:3} end")
    assert t.slots == ["question", "agent:planner", "doc:3"]
    r = t.render(tok)
    assert r.slots == ("question", "agent:planner", "doc:3")
    assert len(r.segment_ids) == 4 and all(r.segment_ids[-1])
    assert "{literal}" in r.segment_texts[0]
    filled = t.fill({"question": "q", "agent:planner": "p", "doc:3": "d"})
    assert filled[1]["content"] == "Q: q and p then d end" and filled[0]["content"] == "sys {literal}"


@pytest.mark.parametrize(
    "user, match",
    [("no slot here", "no slots"), ("{question} {question}", "more than once"), ("{bad slot}", "bad slot"),
     ("{9lives}", "bad slot")],
)
def test_template_errors(user, match):
    with pytest.raises(TemplateError, match=match):
        Template.from_system_user("sys", user)


def test_template_message_shape_errors():
    with pytest.raises(TemplateError, match="'role' and 'content'"):
        Template([{"content": "x {question}"}])
    with pytest.raises(TemplateError, match="at least one message"):
        Template([])


def test_readme_documents_every_config_field(repo_root):
    readme = (repo_root / "README.md").read_text()
    for name, _default, env, _doc in config_table():
        assert f"| `{name}` |" in readme and env in readme, name


def test_text_before_a_slot_and_common_suffix() -> None:
    from kvcomm.template import common_suffix

    t = Template.from_system_user("sys", "Task:\n{question}\n\nPlanner said:\n{agent:planner}\nGo {{now}}.")
    assert t.text_before("question") == "Task:\n"
    assert t.text_before("agent:planner") == "\n\nPlanner said:\n"
    assert Template("{question} tail").text_before("question") == ""
    with pytest.raises(TemplateError, match="no slot 'nope'"):
        t.text_before("nope")
    assert common_suffix(["a.Task:\n", "b.Task:\n", "xTask:\n"]) == "Task:\n"
    assert common_suffix(["abc"]) == "abc" and common_suffix([]) == "" and common_suffix(["ab", "cd"]) == ""


def test_a_variant_is_the_config_with_fields_changed() -> None:
    base = KVCommConfig(gamma=1.0)
    assert base.variant("fidelity=0") == base.replace(fidelity=0)
    assert base.variant(" fidelity = 3 , fallback_margin=0.25,") == base.replace(fidelity=3, fallback_margin=0.25)
    assert base.variant("policy=epic,epic_tokens=4").policy == "epic"
    for bad, says in (("fidelity", "expected FIELD=VALUE"), ("=1", "expected FIELD=VALUE"), ("", "expected"),
                      ("fidelty=1", "unknown config field"), ("fidelity=x", "not a valid int")):
        with pytest.raises(ConfigError, match=says):
            base.variant(bad)
