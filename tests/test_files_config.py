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


@pytest.mark.parametrize("override, message", [
    ("lora.rank=4", "unknown key 'rank'"),
    ("learning_rate=1", "unknown key 'learning_rate'"),
    ("max_steps=lots", "key 'max_steps': expected a number"),
    ("method=dpo", "'method': 'dpo' is not one of"),
    ("batch_size=0", "'batch_size': must be at least 1"),
    ("nokeyvalue", "expected key=value"),
])
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
