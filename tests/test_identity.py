"""The identity data generator."""

from __future__ import annotations

import json

from chatforge.identity import (IdentitySpec, answers, identity_conversations, load_asset, normalise,
                                split_questions, write_identity_data)


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


def test_general_eval_prompts_are_not_replay_prompts():
    g = load_asset("general.json")
    replay = {normalise(p) for p in g["replay"]}
    assert not replay & {normalise(p) for p in g["eval"]}
    assert not replay & {normalise(f["q"]) for f in g["facts"]}


def test_write_without_replay(tmp_path):
    out = tmp_path / "d" / "identity.jsonl"
    counts = write_identity_data(IdentitySpec(owner="Bob"), out)
    assert counts["replay"] == 0 and counts["identity"] == len(out.read_text().splitlines())
    es = json.loads((tmp_path / "d" / "identity.eval.json").read_text())
    assert es["owner"] == "Bob" and es["questions"]["en"] and es["questions"]["zh"]
