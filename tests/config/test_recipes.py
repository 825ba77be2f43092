"""Recipes: loading, overrides, errors that name the key, the keys by group."""

from __future__ import annotations

import dataclasses
import re

import pytest

from chatforge.config import GROUPS, TrainConfig, describe_keys, list_recipes, load_recipe, parse_overrides, to_dict
from chatforge.files import ChatforgeError


def test_every_shipped_recipe_loads():
    names = list_recipes()
    assert "smollm2_135m_identity_lora" in names
    for name in names:
        load_recipe(name)


def test_overrides_are_typed_and_dotted():
    cfg = load_recipe("smollm2_135m_identity_lora", ["lora.r=4", "lr=1e-4", "max_steps=3", "data=x.jsonl"])
    assert (cfg.lora.r, cfg.lr, cfg.max_steps) == (4, 1e-4, 3)
    assert cfg.data[0].path == "x.jsonl"
    assert parse_overrides(["a.b.c=[1, 2]"]) == {"a": {"b": {"c": [1, 2]}}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.rank=4", "unknown key 'rank'"),
        ("learning_rate=1", "unknown key 'learning_rate'"),
        ("max_steps=lots", "key 'max_steps': expected a number"),
        ("method=dpo", "'method': 'dpo' is not one of"),
        ("batch_size=0", "'batch_size': must be at least 1"),
        ("nokeyvalue", "expected key=value"),
        # values that would pass and then fail later (issue 19)
        ("lr=.nan", "key 'lr': expected a finite number"),
        ("lr=0", "'lr': must be above 0"),
        ("max_steps=.nan", "key 'max_steps': expected a finite number"),
        ("max_steps=.inf", "key 'max_steps': expected a finite number"),
        ("max_steps=2.5", "key 'max_steps': expected a whole number"),
        ("log_every=0", "'log_every': must be at least 1"),
        ("warmup_ratio=2", "'warmup_ratio': must be between 0 and 1"),
        ("lora.dropout=1", "'lora.dropout': must be at least 0 and below 1"),
        ("micro_batch=.inf", "expected auto or a positive whole number"),
        ("data=[{path: a.jsonl, weight: .nan}]", "key 'weight': expected a finite number"),
        ("data=[{path: a.jsonl, weight: .inf}]", "key 'weight': expected a finite number"),
        ("eval_prompts=[1, 2]", "key 'eval_prompts': expected a list of texts"),
        ("eval_prompts=hello", "key 'eval_prompts': expected a list of texts"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ChatforgeError, match=message):
        load_recipe("smollm2_135m_identity_lora", [override])


def test_recipe_file_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("model: x\ndata: a.jsonl\nlora:\n  r: 8\n  alpah: 3\n")
    with pytest.raises(ChatforgeError, match=r"r\.yaml.*unknown key 'alpah'"):
        load_recipe(str(bad))
    bad.write_text("model: x\ndata: [a.jsonl\nlr: 1\n")
    with pytest.raises(ChatforgeError, match=r"r\.yaml:\d+: invalid YAML"):
        load_recipe(str(bad))
    with pytest.raises(ChatforgeError, match="recipe not found"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_lists_of_texts_are_kept():
    cfg = load_recipe("smollm2_135m_identity_lora", ["eval_prompts=[Who are you, hi]", "lora.target_modules=[q_proj]"])
    assert cfg.eval_prompts == ["Who are you", "hi"] and cfg.lora.target_modules == ["q_proj"]


def test_a_yaml_alias_bomb_is_refused(tmp_path):
    lines = [
        "model: smollm2-135m-instruct",
        "data: a.jsonl",
        "eval_prompts:",
        "- &l0 [" + ", ".join(["lol"] * 10) + "]",
    ]
    lines += [f"- &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 6)]  # 10^6 strings
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 500
    with pytest.raises(ChatforgeError, match=r"bomb\.yaml: the YAML expands to more than 50000 values"):
        load_recipe(str(bomb))


def test_every_key_is_in_one_group_with_its_help():
    """A key added to TrainConfig outside a group, or without the line `chatforge recipes keys` prints, fails."""
    grouped = [f.name for g in GROUPS.values() for f in dataclasses.fields(g)]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    assert len(grouped) == len(set(grouped))
    text = describe_keys()
    for name in grouped:
        assert f"  {name} = " in text or f"  {name}." in text, name
    assert "#  \n" not in text + "\n" and "[speed]" in text
    cfg = load_recipe("internlm2_chat_1_8b_medical_sft")
    assert list(to_dict(cfg)) == grouped  # config.yaml in group order
    assert load_recipe("internlm2_chat_1_8b_medical_sft", to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.0.format=alpacca", "recipe key 'data[0].format': 'alpacca' is not one of"),
        ("lora.dropout=1", "recipe key 'lora.dropout'"),
        ("warmup_ratio=2", "recipe key 'warmup_ratio'"),
        ("collective_timeout=0", "recipe key 'collective_timeout': must be at least 1"),
    ],
)
def test_each_group_checks_its_keys(override, message):
    with pytest.raises(ChatforgeError, match=re.escape(message)):
        load_recipe("internlm2_chat_1_8b_medical_sft", [override])
