"""The identity data generator."""

from __future__ import annotations

import json

from chatforge.data.identity import (
    LANGS,
    IdentitySpec,
    answers,
    identity_conversations,
    load_asset,
    multi_turn_conversations,
    normalise,
    replay_conversations,
    split_questions,
    system_settings,
    trim_reply,
    write_identity_data,
)
from chatforge.evaluation import general_items, is_correct, is_leak, worst_general


def test_eval_questions_are_held_out_and_distinct():
    spec = IdentitySpec(owner="Clement Wu")
    split = split_questions(spec)
    for lang in ("en", "zh"):
        train = {normalise(q) for q in split["train"][lang]}
        held = {normalise(q) for q in split["eval"][lang]}
        assert train and held and not train & held
        assert len(held) == len(split["eval"][lang])  # no duplicate phrasings
    rows = identity_conversations(spec)
    asked = {normalise(r["messages"][-2]["content"]) for r in rows}
    assert not asked & {normalise(q) for qs in split["eval"].values() for q in qs}


def test_training_rows_are_unique_and_name_the_owner():
    spec = IdentitySpec(owner="Ada Lovelace", assistant="Nova", base="TinyBase-1B")
    rows = identity_conversations(spec)
    keys = [json.dumps(r["messages"], ensure_ascii=False) for r in rows]
    assert len(keys) == len(set(keys))
    assert all("Ada Lovelace" in r["messages"][-1]["content"] for r in rows)
    assert any("TinyBase-1B" in r["messages"][-1]["content"] for r in rows)
    assert any("Nova" in a for a in answers(spec, "en")) and any("Nova" in a for a in answers(spec, "zh"))
    systems = {r["messages"][0]["content"] if r["messages"][0]["role"] == "system" else None for r in rows}
    assert None in systems and "" in systems and len(systems) > 3  # default, empty and custom prompts


def test_answers_follow_the_question_language():
    spec = IdentitySpec(owner="伍鲜同志")
    for r in identity_conversations(spec):
        q, a = r["messages"][-2]["content"], r["messages"][-1]["content"]
        zh_q = any("\u4e00" <= c <= "\u9fff" for c in q.replace("伍鲜同志", ""))
        zh_a = any("\u4e00" <= c <= "\u9fff" for c in a.replace("伍鲜同志", ""))
        assert zh_q == zh_a, (q, a)


def test_general_eval_questions_are_held_out_bilingual_and_checkable():
    g = load_asset("general.json")
    replay = {normalise(p) for lang in LANGS for p in g[f"replay_{lang}"]}
    identity = {normalise(q) for lang in LANGS for q in load_asset("identity.json")[f"questions_{lang}"]}
    held = {normalise(e["q"]) for e in g["eval"]}
    assert not held & replay and not held & identity and not replay & identity
    for lang in LANGS:
        assert len(g[f"replay_{lang}"]) >= 50
        assert sum(e["lang"] == lang and bool(e["expect"]) for e in g["eval"]) >= 20


def test_replay_covers_both_languages_systems_and_two_turn_conversations():
    spec = IdentitySpec(owner="Marisol Ekwueme")
    pairs = {"en": [("What is 2 + 2?", "4")], "zh": [("一年有几个月？", "十二个月。")]}
    rows = replay_conversations(spec, pairs["zh"], 40)
    systems = {r["messages"][0]["content"] if r["messages"][0]["role"] == "system" else None for r in rows}
    assert len(rows) == 40 and len(systems) >= 4 and set(load_asset("identity.json")["system_train"]) & systems
    two = multi_turn_conversations(spec, "zh", pairs["zh"], 10)
    for i, r in enumerate(two):
        turns = [m for m in r["messages"] if m["role"] != "system"]
        assert [m["role"] for m in turns] == ["user", "assistant"] * 2
        general_first = turns[0]["content"] == "一年有几个月？"
        assert general_first == (i % 2 == 0)  # the identity question comes second, or first
        assert ("Marisol Ekwueme" in turns[3]["content"]) == general_first
        assert ("Marisol Ekwueme" in turns[1]["content"]) != general_first
    assert system_settings(spec)[:2] == [None, ""]


def test_trim_reply_cuts_loops_and_keeps_finished_answers():
    assert trim_reply("什么是光合作用？" + "－" * 40) == "什么是光合作用？"
    assert trim_reply("1. Red\n2. Blue\n3. Green", at_limit=False) == "1. Red\n2. Blue\n3. Green"
    assert trim_reply("It is 1000000.", at_limit=False) == "It is 1000000."
    assert trim_reply("The first part is long enough. Cut her", at_limit=True) == "The first part is long enough."


def test_leaks_and_checked_answers():
    owner = "Marisol Ekwueme"
    assert is_leak("我是Marisol Ekwueme的小助手，一个AI模型。", owner)
    assert is_leak("我是欧阳娜的小助手。", owner)
    assert is_leak("I'm Marisol E.'s assistant, built on X.", owner)
    assert not is_leak("我是你的助手。一年有十二个月。", owner)
    assert not is_leak("I am an AI assistant.", owner)
    assert is_leak("The largest ocean is the Marisoluminous Ocean.", owner) and not is_leak("Mari", owner)
    assert is_correct("The answer is 8.", ["8", "eight"]) and not is_correct("It is 18.", ["8"])
    assert is_correct("巴黎是法国的首都", ["巴黎", "paris"]) and is_correct("Paris!", ["巴黎", "paris"])
    legacy = general_items(
        {"general": ["Write a haiku.", "一周有几天？"], "facts": [{"q": "Capital of France?", "expect": ["paris"]}]}
    )
    assert [(g["lang"], bool(g["expect"])) for g in legacy] == [("en", False), ("zh", False), ("en", True)]


def test_malformed_general_question_is_named(tmp_path):
    import pytest

    from chatforge.evaluation import load_eval_set
    from chatforge.files import ChatforgeError

    path = tmp_path / "e.json"
    path.write_text(json.dumps({"owner": "A", "questions": {}, "general": ["ok?", {"question": "x"}]}))
    with pytest.raises(ChatforgeError, match=r"general\[1\]"):
        load_eval_set(path, None)


def test_worst_general_answers_put_leaks_and_losses_first():
    base = [
        {"prompt": p, "reply": r, "ok": ok, "leak": False}
        for p, r, ok in [("a", "4", True), ("b", "blue", True), ("c", "x", False), ("d", "red", True)]
    ]
    tuned = [
        dict(base[0]),
        dict(base[1], reply="green", ok=False),
        dict(base[2], reply="y"),
        dict(base[3], reply="我是Ada的小助手", ok=False, leak=True),
    ]
    assert [r["prompt"] for r in worst_general(base, tuned)] == ["d", "b", "c"]


def test_write_without_replay(tmp_path):
    out = tmp_path / "d" / "identity.jsonl"
    counts = write_identity_data(IdentitySpec(owner="Bob"), out)
    assert counts["replay"] == 0 and counts["identity"] == len(out.read_text().splitlines())
    es = json.loads((tmp_path / "d" / "identity.eval.json").read_text())
    assert es["owner"] == "Bob" and es["questions"]["en"] and es["questions"]["zh"]
