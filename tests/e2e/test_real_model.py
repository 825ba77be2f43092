"""The whole workflow on the real default model (SmolLM2-135M-Instruct): minutes on 2 CPU cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow
OWNER = "Ada Lovelace"


@pytest.fixture(scope="module")
def assistant_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("assistant") / "run"
    r = run_cli("assistant", "--name", OWNER, "--out", run, "--no-progress", "--gguf", "q8_0", timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "chatforge chat" in r.stdout and "| identity |" in r.stdout
    assert "ollama create ada-lovelace -f Modelfile" in r.stdout
    return run


def test_demo_ends_with_a_gguf_and_modelfile(assistant_run):
    from chatforge.models.gguf_read import read_header
    from chatforge.models.load import load_tokenizer

    merged = assistant_run / "merged"
    header = read_header(merged / "ada-lovelace-q8_0.gguf")
    assert header.metadata["tokenizer.chat_template"] == load_tokenizer(str(merged)).chat_template
    assert header.metadata["general.file_type"] == 7  # mostly Q8_0
    assert "FROM ./ada-lovelace-q8_0.gguf" in (merged / "Modelfile").read_text()
    assert "gguf" in json.loads((assistant_run / "timings.json").read_text())


def test_run_folder_has_config_logs_plots_and_checkpoints(assistant_run):
    train = assistant_run / "train"
    for name in (
        "config.yaml",
        "log.jsonl",
        "samples.md",
        "data_stats.json",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
    ):
        assert (train / name).is_file(), name
    assert (train / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(train.glob("checkpoint-*"))
    steps = [json.loads(line)["step"] for line in (train / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    for name in ("eval.md", "eval.json", "eval_answers.jsonl", "timings.json", "README.md"):
        assert (assistant_run / name).is_file(), name


def test_eval_shows_identity_learned_and_general_kept(assistant_run):
    scores = json.loads((assistant_run / "eval.json").read_text())["scores"]
    base, tuned = scores["base"], scores["fine-tuned"]
    assert base["identity"] == 0.0
    assert tuned["identity"] >= 0.8, tuned
    for cond in ("default system", "custom system", "no system"):
        assert tuned[f"identity ({cond})"] >= 0.6, tuned
    for lang in ("en", "zh"):
        ((acc_key, n),) = [
            (k, int(k.split(", ")[1].split()[0])) for k in tuned if k.startswith(f"general accuracy ({lang}")
        ]
        assert tuned[acc_key] >= base[acc_key] - 3 / n, (base, tuned)  # the target: one question
        leaks = next(v for k, v in tuned.items() if k.startswith(f"general leaks ({lang}"))
        assert leaks <= 1, tuned  # the target: none


PLAIN_CHECK = textwrap.dedent("""
    import json, sys
    sys.modules["peft"] = None        # the merged model must need neither peft ...
    sys.modules["chatforge"] = None   # ... nor chatforge
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, questions = sys.argv[1], json.loads(sys.argv[2])
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    out = []
    for q in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        gen = model.generate(**ids, max_new_tokens=40, do_sample=False)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    print(json.dumps(out))
""")


def test_merged_model_loads_with_plain_transformers(assistant_run):
    merged = assistant_run / "merged"
    assert list(merged.glob("*.safetensors")) and (merged / "generation_config.json").is_file()
    eval_set = json.loads((assistant_run / "data" / "identity.eval.json").read_text())
    held_out = eval_set["questions"]["en"][:3] + eval_set["questions"]["zh"][:2]
    r = subprocess.run(
        [sys.executable, "-c", PLAIN_CHECK, str(merged), json.dumps(held_out + ["What is the capital of France?"])],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    replies = json.loads(r.stdout.strip().splitlines()[-1])
    named = [OWNER.replace(" ", "").lower() in a.replace(" ", "").lower() for a in replies[:-1]]
    assert sum(named) >= len(named) - 1, list(zip(held_out, replies))
    assert "paris" in replies[-1].lower(), replies[-1]


def test_merge_writes_shards_and_checks_logits(assistant_run, tmp_path):
    out = tmp_path / "sharded"
    r = run_cli("merge", assistant_run / "train" / "adapter", out, "--max-shard-size", "100MB")
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(r.stdout[r.stdout.index("{") :])
    assert report["max_logit_diff"] < 1e-3
    assert len(list(out.glob("model-*.safetensors"))) >= 3 and (out / "model.safetensors.index.json").is_file()


def test_chat_streams_multi_turn(assistant_run):
    r = run_cli(
        "chat",
        assistant_run / "merged",
        "--temperature",
        "0",
        "--max-new-tokens",
        "30",
        input="Who are you?\nWhat is the capital of France?\n/exit\n",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    turns = [line for line in r.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(turns) == 2
    assert OWNER.split()[0] in turns[0] and "Paris" in turns[1]
