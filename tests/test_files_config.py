"""Atomic writes and recipe loading."""

from __future__ import annotations

import pytest

from chatforge.config import list_recipes, load_recipe, parse_overrides
from chatforge.files import ChatforgeError, atomic_path, write_json


def test_atomic_file_is_all_or_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp debris either
    write_json(target, {"a": 1})
    assert target.read_text().strip().startswith("{")


def test_atomic_dir_replaces_old_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "w.bin").write_text("v1")
    with pytest.raises(ValueError):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "w.bin").write_text("v2-partial")
            raise ValueError
    assert (target / "w.bin").read_text() == "v1"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "w.bin").write_text("v2")
    assert (target / "w.bin").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


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
