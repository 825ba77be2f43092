"""InternLM2 without remote code: loading, tokenizer, template, export, LoRA round trip, bad input.

Checkpoints are tiny and random, written in the official file format (bench/internlm2_gpu_check.py
holds the writers; the GPU check uses them at full size). The reference forward pass below is
written from InternLM2's published math, independent of chatforge and of transformers' Llama.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from chatforge.files import ChatforgeError
from chatforge.models import internlm2
from conftest import bench_module

writers = bench_module("internlm2_gpu_check")

TINY = writers.SHAPE_TINY  # hidden 64, 4 heads, 2 kv heads (GQA), 2 layers, vocab 92544, max_pos 32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """bf16 safetensors in two shards with an index; dynamic RoPE factor 2; GQA."""
    return writers.write_checkpoint(tmp_path_factory.mktemp("il2") / "internlm2-chat-tiny", TINY, shards=2, seed=1)


@pytest.fixture(scope="module")
def tok(ckpt):
    return internlm2.load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def sp(ckpt):
    import sentencepiece

    return sentencepiece.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))


# ---------------------------------------------------------------- reference forward pass


def read_official(folder: Path) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    cfg = json.loads((folder / "config.json").read_text())
    weights = {}
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        weights.update(load_file(f) if f.suffix == ".safetensors" else torch.load(f, weights_only=True))
    return cfg, {k: v.float() for k, v in weights.items()}


def reference_logits(folder: Path, ids: list[int]) -> torch.Tensor:
    """InternLM2 forward in fp32 from its definition: RMSNorm, fused grouped wqkv, RoPE with
    dynamic NTK scaling, causal attention with shared key/value heads, SwiGLU."""
    cfg, w = read_official(folder)
    h_dim, n_heads, n_kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, group, eps, n = h_dim // n_heads, n_heads // n_kv, cfg["rms_norm_eps"], len(ids)

    def rms(x, weight):
        return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    base, max_pos = float(cfg["rope_theta"]), cfg["max_position_embeddings"]
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type") == "dynamic" and n > max_pos:  # NTK-aware base growth past the trained length
        f = scaling["factor"]
        base = base * ((f * n / max_pos) - (f - 1)) ** (d / (d - 2))
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    cos, sin = torch.cat([angle.cos()] * 2, -1).float(), torch.cat([angle.sin()] * 2, -1).float()

    def rope(x):  # x: (n, heads, d); rotate the two halves of each head
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    causal = torch.full((n, n), float("-inf")).triu(1)
    h = w["model.tok_embeddings.weight"][torch.tensor(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = rms(h, w[p + "attention_norm.weight"])
        qkv = (x @ w[p + "attention.wqkv.weight"].T).view(n, n_kv, group + 2, d)
        q = rope(qkv[:, :, :group].reshape(n, n_heads, d))
        k, v = rope(qkv[:, :, group]), qkv[:, :, group + 1]
        heads = []
        for j in range(n_heads):
            kv = j // group  # query head j reads the key/value head of its group
            att = torch.softmax(q[:, j] @ k[:, kv].T / d**0.5 + causal, -1)
            heads.append(att @ v[:, kv])
        h = h + torch.cat(heads, -1) @ w[p + "attention.wo.weight"].T
        x = rms(h, w[p + "ffn_norm.weight"])
        gate, up = x @ w[p + "feed_forward.w1.weight"].T, x @ w[p + "feed_forward.w3.weight"].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "feed_forward.w2.weight"].T
    return rms(h, w["model.norm.weight"]) @ w["output.weight"].T


@pytest.mark.parametrize("case", ["gqa_within", "gqa_dynamic_rope_beyond", "mha_bin_no_scaling"])
def test_logits_match_reference(case, ckpt, tmp_path):
    folder, n = ckpt, 20
    if case == "gqa_dynamic_rope_beyond":
        n = 48  # max_position_embeddings is 32: dynamic NTK scaling is active
    if case == "mha_bin_no_scaling":
        shape = dict(TINY, num_key_value_heads=4)
        folder = writers.write_checkpoint(tmp_path / "mha", shape, shards=2, fmt="bin", seed=2, rope_scaling={})
        assert (folder / "pytorch_model.bin.index.json").is_file()
    ids = [1] + [(37 * i + 11) % 400 for i in range(n - 1)]
    model = internlm2.load_model(folder, dtype=torch.float32)
    with torch.no_grad():
        got = model(torch.tensor([ids])).logits[0]
    want = reference_logits(folder, ids)
    assert got.shape == want.shape == (n, TINY["vocab_size"])
    assert float((got - want).abs().max()) <= 1e-5
    if case == "gqa_dynamic_rope_beyond":  # the scaling matters: unscaled RoPE gives other logits
        unscaled = json.loads((folder / "config.json").read_text())
        unscaled["rope_scaling"] = None
        other = tmp_path / "unscaled"
        shutil.copytree(folder, other)
        (other / "config.json").write_text(json.dumps(unscaled))
        assert float((reference_logits(other, ids) - want).abs().max()) > 1e-3


def test_loaded_model_is_native_and_streams_from_shards(ckpt):
    model = internlm2.load_model(ckpt, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.rope_parameters["rope_type"] == "dynamic" and model.config.rope_parameters["factor"] == 2.0
    assert model.config.num_key_value_heads == 2 and not model.config.tie_word_embeddings
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    assert 92542 in model.generation_config.eos_token_id and 2 in model.generation_config.eos_token_id


# ---------------------------------------------------------------- tokenizer and template


def test_special_tokens_by_id(tok, tmp_path):
    assert tok.is_fast
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>"]) == [92543, 92542, 1, 2, 0]
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (1, 2, 2, 92544)
    # an old revision names 92542/92543 [UNUSED_TOKEN_145/146] in the files: same ids
    old = tmp_path / "old"
    old.mkdir()
    writers.write_tokenizer_model(old / "tokenizer.model", old_names=True)
    (old / "tokenizer_config.json").write_text(json.dumps(writers.tokenizer_config(old_names=True)))
    old_tok = internlm2.load_tokenizer(old)
    assert old_tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [92543, 92542]
    assert old_tok("<|im_start|>user\nhi<|im_end|>").input_ids == tok("<|im_start|>user\nhi<|im_end|>").input_ids


TEXTS = [
    "hello world",
    "  two  leading spaces",
    "我是你的小助手",
    "the capital of France is Paris.\n\nnew line",
    "x 123456 ñ € 🙂",
    "tab\there",
    "assistant",
    " ",
    "",
]


def test_encode_decode_match_sentencepiece(tok, sp):
    for text in TEXTS:
        ids = tok(text).input_ids
        assert ids == [1] + sp.encode(text), text  # BOS, then sentencepiece with its dummy prefix
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text)) == text
    # special tokens split the text; each piece is encoded on its own, as the reference tokenizer does
    ids = tok("<|im_start|>user\nhi<|im_end|>\n", add_special_tokens=False).input_ids
    assert ids == [92543] + sp.encode("user\nhi") + [92542] + sp.encode("\n")


def test_chat_template_ids(tok, sp):
    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Clement's assistant."},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<s><|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n"
        "<|im_start|>assistant\nI am Clement's assistant.<|im_end|>\n"
    )
    want = [1]
    for m in msgs:
        want += [92543] + sp.encode(f"{m['role']}\n{m['content']}") + [92542] + sp.encode("\n")
    assert tok(text, add_special_tokens=False).input_ids == want
    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")

    from chatforge.data.encode import IGNORE, encode_sft

    ids, labels = encode_sft(tok, msgs)
    assert ids == want
    trained = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert trained[-1] == 92542 and tok.decode(trained[:-1]).strip() == "I am Clement's assistant."


def test_stop_tokens(tok, ckpt):
    from chatforge.models.load import load_model, stop_token_ids

    model = load_model(ckpt, dtype="fp32", device="cpu")  # through models.py's InternLM2 dispatch
    assert {2, 92542} <= set(stop_token_ids(tok, model))


# ---------------------------------------------------------------- export


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_round_trip_bit_exact(ckpt, tmp_path):
    from chatforge.cli import main

    assert main(["convert", str(ckpt), str(tmp_path / "back"), "--format", "internlm2"]) == 0
    assert main(["convert", str(ckpt), str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back2"), "--format", "internlm2"]) == 0
    original = tensors(ckpt)
    for back in (tmp_path / "back", tmp_path / "back2"):
        again = tensors(back)
        assert set(again) == set(original)
        for name, t in original.items():
            assert again[name].dtype == t.dtype and torch.equal(again[name], t), name
        for f in (
            "config.json",
            "tokenizer.model",
            "tokenizer_config.json",
            "generation_config.json",
            "special_tokens_map.json",
            "modeling_internlm2.py",
        ):
            assert (back / f).read_bytes() == (ckpt / f).read_bytes(), f
    # the native folder loads with plain transformers, template included
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = tmp_path / "hf"
    assert json.loads((hf / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert "q_proj" in " ".join(tensors(hf))
    hf_tok = AutoTokenizer.from_pretrained(hf)
    msgs = [{"role": "user", "content": "你好, who are you?"}]
    ours = internlm2.load_tokenizer(ckpt)
    assert hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == ours.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False
    )
    assert hf_tok("你好, who are you?").input_ids == ours("你好, who are you?").input_ids
    assert AutoModelForCausalLM.from_pretrained(hf).config.rope_parameters["rope_type"] == "dynamic"


def train_tiny_adapter(ckpt, tmp_path):
    from chatforge.config import load_recipe
    from chatforge.training.trainer import train

    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [
            ("Who are you?", "I am the assistant of Clement Wu."),
            ("请介绍一下你自己", "我是小助手"),
            ("What is the capital of France?", "Paris."),
        ]
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    cfg = load_recipe(
        "internlm2_chat_1_8b_identity_lora",
        [
            f"model={ckpt}",
            f"data={data}",
            f"output_dir={tmp_path / 'run'}",
            "max_steps=3",
            "batch_size=3",
            "max_length=64",
            "dtype=fp32",
            "lr=0.01",
            "lora.r=4",
            "lora.alpha=8",
            "lora.dropout=0",
            "gradient_checkpointing=false",
            "eval_prompts=[]",
            "save_every=0",
            "warmup_ratio=0",
        ],
    )
    return train(cfg, progress=False)


def test_lora_train_merge_reload(ckpt, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from chatforge.export.merge import merge
    from chatforge.models.load import load_model

    adapter = train_tiny_adapter(ckpt, tmp_path)

    ids = torch.tensor([[1, 92543, 300, 301, 302, 92542, 315, 92543, 310, 311]])
    with torch.no_grad():
        base = load_model(ckpt, dtype="fp32", device="cpu")
        base_logits = base(ids).logits
        want = PeftModel.from_pretrained(base, adapter)(ids).logits
        assert float((want - base_logits).abs().max()) > 1e-3  # training changed the model

        report = merge(adapter, tmp_path / "merged", base=str(ckpt), dtype="fp32", fmt="internlm2")
        assert report["max_logit_diff"] <= 1e-3
        merged = tmp_path / "merged"
        assert "model.layers.0.attention.wqkv.weight" in tensors(merged)
        assert (merged / "tokenizer.model").read_bytes() == (ckpt / "tokenizer.model").read_bytes()
        got = load_model(merged, dtype="fp32", device="cpu")(ids).logits
        assert float((got - want).abs().max()) <= 1e-4

        merge(adapter, tmp_path / "merged_hf", base=str(ckpt), dtype="fp32")
        got_hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_hf", dtype=torch.float32)(ids).logits
        assert float((got_hf - want).abs().max()) <= 1e-4
        assert (tmp_path / "merged_hf" / "internlm2" / "tokenizer.model").is_file()


@pytest.mark.parametrize("fmt", ["internlm2", "hf"])
def test_bf16_merge_checks_the_saved_weights_not_the_rounding(ckpt, tmp_path, fmt, monkeypatch):
    """A 16-bit merge moves logits by rounding (reported); the check compares the saved folder with the
    rounded weights in fp32, so it passes, and still fails on a folder that holds other weights."""
    from chatforge.export import merge as export

    adapter = train_tiny_adapter(ckpt, tmp_path)
    report = export.merge(adapter, tmp_path / "merged", base=str(ckpt), dtype="bf16", fmt=fmt)
    assert report["dtype"] == "bfloat16" and report["reload_diff"] <= report["tolerance"]
    assert report["merge_diff"] <= 1e-3 and report["max_logit_diff"] > report["reload_diff"]

    import transformers

    def altered(load):  # a saved folder whose weights are not the merged ones (one layer off by 1%)
        def wrapped(*args, **kwargs):
            model = load(*args, **kwargs)
            with torch.no_grad():
                model.model.layers[-1].mlp.down_proj.weight.mul_(1.01)
            return model

        return wrapped

    monkeypatch.setattr(internlm2, "load_model", altered(internlm2.load_model))
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM, "from_pretrained", altered(transformers.AutoModelForCausalLM.from_pretrained)
    )
    with pytest.raises(ChatforgeError, match="merge check failed"):
        export.merge(adapter, tmp_path / "bad", base=str(ckpt), dtype="bf16", fmt=fmt)
    assert not (tmp_path / "bad").exists()


def test_qlora_load(ckpt):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = internlm2.load_model(ckpt, dtype=torch.float32, quantization_config=quant)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    ids = torch.tensor([[1, 300, 301, 302, 303]])
    with torch.no_grad():
        got = model(ids.to(model.device)).logits.flatten().float().cpu()  # quantised on the GPU when there is one
        want = internlm2.load_model(ckpt, dtype=torch.float32)(ids).logits.flatten()
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.9  # NF4 rounding, same model


# ---------------------------------------------------------------- bad input


def test_missing_shard(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ChatforgeError, match="model-00002-of-00002.safetensors.*missing"):
        internlm2.load_model(broken)


def test_unknown_architecture(ckpt, tmp_path, capsys):
    from chatforge.cli import main
    from chatforge.models.load import load_model

    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(architectures=["FooLMForCausalLM"], model_type="foolm")
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatforgeError, match="FooLMForCausalLM"):
        internlm2.load_model(other)
    with pytest.raises(ChatforgeError, match="cannot load the model"):
        load_model(other, device="cpu")
    assert main(["convert", str(other), str(tmp_path / "out"), "--format", "internlm2"]) == 2
    assert "chatforge: error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tokenizer_model_not_sentencepiece(ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(ckpt / "tokenizer_config.json", bad)
    (bad / "tokenizer.model").write_text('{"this": "is a tokenizer.json, not sentencepiece"}')
    with pytest.raises(ChatforgeError, match="not a sentencepiece model"):
        internlm2.load_tokenizer(bad)
    (bad / "tokenizer.model").unlink()
    with pytest.raises(ChatforgeError, match="tokenizer.model is missing"):
        internlm2.load_tokenizer(bad)


def test_shape_that_does_not_fit_config(ckpt, tmp_path):
    wrong = tmp_path / "wrong"
    shutil.copytree(ckpt, wrong)
    cfg = json.loads((wrong / "config.json").read_text())
    cfg["num_key_value_heads"] = 4  # the fused wqkv was written for 2 key/value heads
    (wrong / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ChatforgeError, match="wqkv.*(does|do) not fit"):
        internlm2.load_model(wrong)
