"""Other chat models through the same code: tiny random Qwen2 and Gemma 3 checkpoints, a model without a
chat template, and GGUF architectures transformers cannot read."""

from __future__ import annotations

import copy
import json

import pytest

from conftest import run_cli

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
FAST = ["max_steps=3", "save_every=0", "eval_prompts=[]", "batch_size=2"]


def save_tiny(folder, model_cls, config, tokenizer, drop_template: bool = False):
    """A random model of `config` beside `tokenizer` (without its chat template if `drop_template`)."""
    import torch

    torch.manual_seed(0)
    model_cls(config).save_pretrained(folder)
    tok = copy.deepcopy(tokenizer)
    if drop_template:
        tok.chat_template = None
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory, smol_tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=len(smol_tokenizer), eos_token_id=smol_tokenizer.eos_token_id, **TINY)
    return save_tiny(tmp_path_factory.mktemp("tiny-qwen2"), Qwen2ForCausalLM, cfg, smol_tokenizer)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, smol_tokenizer):
    """Gemma 3 text-only, no chat template in its tokenizer (trained with --chat-template gemma)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = smol_tokenizer
    cfg = Gemma3TextConfig(
        vocab_size=len(tok),
        head_dim=16,
        sliding_window=32,
        query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY,
    )
    return save_tiny(tmp_path_factory.mktemp("tiny-gemma3"), Gemma3ForCausalLM, cfg, smol_tokenizer, drop_template=True)


def check_run(run, merged_template: str | None = None):
    """The run folder of a finished `assistant`: merged model, eval with per-language figures."""
    from transformers import AutoTokenizer

    scores = json.loads((run / "eval.json").read_text())["scores"]
    for column in scores.values():
        assert {k.split(" (")[0] for k in column} >= {"identity", "general accuracy", "general leaks"}
        assert any(k.startswith("general accuracy (zh") for k in column)
    tok = AutoTokenizer.from_pretrained(run / "merged")
    if merged_template:
        assert tok.chat_template == merged_template
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "three worst general answers" in (run / "eval.md").read_text()


def test_assistant_on_tiny_qwen2(tiny_qwen2, tmp_path):
    from chatforge.pipeline import assistant

    result = assistant("Ada", model=str(tiny_qwen2), out=str(tmp_path / "run"), overrides=FAST, progress=False)
    check_run(tmp_path / "run")
    assert result["merge"]["max_logit_diff"] < 1e-3


def test_assistant_on_tiny_gemma3_without_a_template(tiny_gemma3, tmp_path):
    """Without --chat-template: one clear line naming the option; with a built-in one: the whole flow, and the
    merged folder keeps the template (plain transformers and llama.cpp's GGUF conversion read it)."""
    import gguf

    r = run_cli("assistant", "--name", "Ada", "--model", tiny_gemma3, "--out", tmp_path / "a", timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "--chat-template" in r.stderr and "gemma" in r.stderr, r.stderr
    run = tmp_path / "run"
    r = run_cli(
        "assistant",
        "--name",
        "Ada",
        "--model",
        tiny_gemma3,
        "--out",
        run,
        "--chat-template",
        "gemma",
        "--no-progress",
        *FAST,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    template = (run / "merged" / "chat_template.jinja").read_text()
    assert "<start_of_turn>model" in template and "<|im_end|>" in template  # Gemma's turns, this tokenizer's EOS
    check_run(run, template)
    assert gguf.SpecialVocab(run / "merged", load_merges=False).chat_template == template
    assert "max logit diff" in r.stdout


def test_chat_and_serve_take_the_option(tiny_gemma3):
    r = run_cli("serve", tiny_gemma3, "--port", "0", timeout=120)
    assert r.returncode == 2 and "--chat-template" in r.stderr, r.stderr  # before any server starts
    r = run_cli(
        "chat", tiny_gemma3, "--chat-template", "gemma", "--max-new-tokens", "3", input="hi\n/exit\n", timeout=120
    )
    assert r.returncode == 0 and r.stdout.count("assistant> ") == 1, r.stderr[-2000:]


def _tiny_gguf(path, arch):
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_an_architecture_nobody_reads(tmp_path):
    r = run_cli("chat", _tiny_gguf(tmp_path / "tiny-rwkv.gguf", "rwkv7"), timeout=120, input="")
    assert r.returncode == 2 and "'rwkv7'" in r.stderr and "GGUF" in r.stderr, r.stderr


def test_internlm2_gguf_without_metadata_names_the_missing_keys(tmp_path):
    r = run_cli("chat", _tiny_gguf(tmp_path / "tiny-internlm2.gguf", "internlm2"), timeout=120, input="")
    assert r.returncode == 2 and "tokenizer.ggml.tokens" in r.stderr and "internlm2.block_count" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
