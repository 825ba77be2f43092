"""Bad input through the CLI: one clear line naming file, line or key; exit 2; nothing half-written."""

from __future__ import annotations

import json

import pytest

from conftest import call_cli

GOOD = {"messages": [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A helper."}]}


def write_lines(path, *lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ('{"messages": [', ":2: invalid JSON"),
        ('{"conversation": []}', ":2: empty conversation"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', ":2: empty conversation"),
    ],
)
def test_train_rejects_bad_records(tmp_path, tiny_llama, bad_line, message):
    data = write_lines(tmp_path / "d.jsonl", json.dumps(GOOD), bad_line)
    out = tmp_path / "run"
    r = call_cli(
        "train",
        "smollm2_135m_identity_lora",
        f"model={tiny_llama}",
        f"data={data}",
        f"output_dir={out}",
        "--no-progress",
        cwd=tmp_path,
    )
    assert r.returncode == 2, r.stderr
    assert f"d.jsonl{message}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_train_rejects_a_sample_longer_than_max_length(tmp_path, tiny_llama):
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    data = write_lines(tmp_path / "d.jsonl", json.dumps(GOOD), json.dumps(long))
    r = call_cli(
        "train",
        "smollm2_135m_identity_lora",
        f"model={tiny_llama}",
        f"data={data}",
        f"output_dir={tmp_path / 'run'}",
        "max_length=64",
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert "d.jsonl:2: sample has" in r.stderr and "max_length 64" in r.stderr
    assert not (tmp_path / "run").exists()


def test_unknown_recipe_key_and_missing_files(tmp_path, tiny_llama):
    r = call_cli("train", "smollm2_135m_identity_lora", "lora.rnak=8", cwd=tmp_path)
    assert r.returncode == 2 and "unknown key 'rnak'" in r.stderr
    r = call_cli("train", "smollm2_135m_identity_lora", f"model={tiny_llama}", "data=missing.jsonl", cwd=tmp_path)
    assert r.returncode == 2 and "data file not found: missing.jsonl" in r.stderr
    r = call_cli("train", "no_such_recipe", cwd=tmp_path)
    assert r.returncode == 2 and "recipe not found: no_such_recipe" in r.stderr
    r = call_cli("chat", str(tmp_path / "no-model"), cwd=tmp_path)
    assert r.returncode == 2 and f"model not found: {tmp_path / 'no-model'}" in r.stderr
    r = call_cli("merge", str(tmp_path), str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and "adapter_config.json is missing" in r.stderr
    assert not (tmp_path / "out").exists()


def test_recipes_list_and_copy(tmp_path):
    r = call_cli("recipes", "list", "smollm2")
    assert r.returncode == 0 and "smollm2_135m_identity_lora" in r.stdout.split()
    r = call_cli("recipes", "copy", "smollm2_135m_identity_lora", tmp_path / "cfg")
    assert r.returncode == 0 and (tmp_path / "cfg" / "smollm2_135m_identity_lora.yaml").is_file()


def test_install_gives_every_command_of_the_readme(tmp_path):
    """install.sh run with a stand-in python that records what pip is asked to install."""
    import os
    import subprocess

    from conftest import ROOT

    log = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), PATH="/usr/bin:/bin")
    subprocess.run(["bash", str(ROOT / "install.sh")], env=env, check=True, capture_output=True)
    editable = next(line for line in log.read_text().splitlines() if " -e " in line)
    extras = editable.split(".[", 1)[1].rstrip("]").split(",")
    assert {"serve", "web"} <= set(extras)  # chatforge serve and chatforge web work after ./install.sh


@pytest.mark.parametrize(
    "command, module, extra",
    [(["serve"], "uvicorn", "serve"), (["serve"], "fastapi", "serve"), (["web"], "gradio", "web")],
)
def test_a_missing_optional_package_is_one_line_naming_the_extra(command, module, extra, monkeypatch, capsys):
    import sys

    from chatforge.cli import main

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    monkeypatch.setenv("CHATFORGE_API_KEY", "")
    assert main(command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"needs {module}" in err and f"pip install 'chatforge[{extra}]'" in err, err


def test_publish_without_git_or_git_lfs_is_one_line(tmp_path, monkeypatch, capsys):
    import shutil

    from chatforge.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["publish", str(tmp_path / "model"), "--repo", "file:///nowhere.git"]) == 2
    assert "`git` is needed: apt-get install git git-lfs" in capsys.readouterr().err
    if shutil.which("git", path="/usr/bin:/bin"):
        (tmp_path / "bin" / "git").symlink_to(shutil.which("git", path="/usr/bin:/bin"))
        assert main(["publish", str(tmp_path / "model"), "--repo", "file:///nowhere.git"]) == 2
        assert "`git lfs` is needed: apt-get install git git-lfs" in capsys.readouterr().err
