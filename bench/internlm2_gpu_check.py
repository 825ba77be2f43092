"""InternLM2 through chatforge on a GPU: load a 1.8B-shaped checkpoint, one LoRA step, a generation.

    PYTHONPATH=. python3 bench/internlm2_gpu_check.py            # InternLM2-1.8B shape, GPU
    PYTHONPATH=. python3 bench/internlm2_gpu_check.py --tiny     # tiny shape, runs on a CPU
    ... --qlora                                                  # also a QLoRA (NF4) load and step

The checkpoint has random weights written in the official file format (config.json fields,
tensor names, fused wqkv, bf16 safetensors shards with an index, a sentencepiece tokenizer.model
whose vocabulary is padded to 92544 with the chat markers at their ids). The tests import the
writers below too.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import struct
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 92544
SHAPE_1_8B = dict(
    hidden_size=2048,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=8,
    intermediate_size=8192,
    vocab_size=VOCAB,
    max_position_embeddings=32768,
)
SHAPE_TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=VOCAB,
    max_position_embeddings=32,
)
MARKERS = {  # as the official tokenizer has them; kept apart from chatforge's own table, which this checkpoint tests
    92538: "<|plugin|>",
    92539: "<|interpreter|>",
    92540: "<|action_end|>",
    92541: "<|action_start|>",
    92542: "<|im_end|>",
    92543: "<|im_start|>",
}

WORDS = (
    "the a assistant user system who are you what is capital of France Paris hello world model train "
    "data merge token chat answer question name my your this that and with for from learn small large "
    "good fine day night water fire tree house city river mountain number one two three"
).split()
HANZI = "我是的小助手你好请介绍一下自己在实战营做什么上海人工智能实验室书生浦语模型大问题回答今天天气很好"


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), "".join(rng.choice(HANZI) for _ in range(rng.randint(2, 8))))
        if rng.random() < 0.2:
            words.append(str(rng.randint(0, 9999)))
        lines.append(" ".join(words) + rng.choice([".", "?", "!", "\n  indented", ""]))
    return lines


def _piece(text: str, score: float, kind: int) -> bytes:
    """One ModelProto.pieces entry in protobuf wire format (piece=1, score=2, type=3)."""
    raw = text.encode()
    body = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(kind)
    return b"\x0a" + _varint(len(body)) + body


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        out += bytes([byte | (0x80 if n else 0)])
        if not n:
            return out


def write_tokenizer_model(path: Path, vocab: int = VOCAB, old_names: bool = False, base_vocab: int = 400) -> None:
    """Train a small sentencepiece BPE model and pad it to `vocab` pieces like InternLM2's:
    unused fillers, then [UNUSED_TOKEN_0..146] ending at vocab-1, or the chat markers at
    92538..92543 unless `old_names`."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=base_vocab,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    proto = buf.getvalue()
    n_base = spm.SentencePieceProcessor(model_proto=proto).get_piece_size()
    n_unused = 147
    extra = [_piece(f"<filler_{i}>", 0.0, 5) for i in range(n_base, vocab - n_unused)]  # type 5: unused
    for j in range(n_unused):
        i = vocab - n_unused + j
        name = MARKERS.get(i) if not old_names and i in MARKERS else f"[UNUSED_TOKEN_{j}]"
        extra.append(_piece(name, 0.0, 1))
    path.write_bytes(proto + b"".join(extra))


def official_config(shape: dict, dtype: str = "bfloat16", rope_scaling: dict | None = None) -> dict:
    cfg = {
        "architectures": ["InternLM2ForCausalLM"],
        "attn_implementation": "eager",
        "auto_map": {
            "AutoConfig": "configuration_internlm2.InternLM2Config",
            "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
            "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
        },
        "bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "model_type": "internlm2",
        "pad_token_id": 2,
        "rms_norm_eps": 1e-05,
        "rope_scaling": rope_scaling if rope_scaling is not None else {"type": "dynamic", "factor": 2.0},
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": "4.41.0",
        "use_cache": True,
    }
    cfg.update(shape)
    return cfg


def tokenizer_config(old_names: bool = False) -> dict:
    tokens = {0: "<unk>", 1: "<s>", 2: "</s>"}
    tokens.update({i: (f"[UNUSED_TOKEN_{i - 92397}]" if old_names else name) for i, name in MARKERS.items()})
    return {
        "auto_map": {
            "AutoTokenizer": [
                "tokenization_internlm2.InternLM2Tokenizer",
                "tokenization_internlm2_fast.InternLM2TokenizerFast",
            ]
        },
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "</s>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "InternLM2Tokenizer",
        "added_tokens_decoder": {
            str(i): {
                "content": c,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, c in tokens.items()
        },
        "additional_special_tokens": [MARKERS[i] for i in (92543, 92542, 92541, 92540, 92539, 92538)]
        if not old_names
        else [],
    }


def random_weights(cfg: dict, seed: int = 0, dtype=torch.bfloat16, device: str = "cpu"):
    """Yield (name, tensor) in the official InternLM2 names and shapes, random values."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = h // heads

    def rnd(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device=device) * std).to(dtype).cpu()

    def norm():
        return (1.0 + 0.1 * torch.randn(h, generator=g, device=device)).to(dtype).cpu()

    yield "model.tok_embeddings.weight", rnd(vocab, h, std=0.5)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "attention.wqkv.weight", rnd((heads + 2 * kv) * head_dim, h, std=h**-0.5)
        yield p + "attention.wo.weight", rnd(h, heads * head_dim, std=h**-0.5)
        yield p + "feed_forward.w1.weight", rnd(ffn, h, std=h**-0.5)
        yield p + "feed_forward.w3.weight", rnd(ffn, h, std=h**-0.5)
        yield p + "feed_forward.w2.weight", rnd(h, ffn, std=ffn**-0.5)
        yield p + "attention_norm.weight", norm()
        yield p + "ffn_norm.weight", norm()
    yield "model.norm.weight", norm()
    yield "output.weight", rnd(vocab, h, std=h**-0.5)


def write_checkpoint(
    folder: Path,
    shape: dict,
    shards: int = 2,
    fmt: str = "safetensors",
    seed: int = 0,
    dtype=torch.bfloat16,
    device: str = "cpu",
    rope_scaling: dict | None = None,
    old_names: bool = False,
) -> Path:
    """Write an InternLM2 folder in the official file format with random weights."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = official_config(shape, str(dtype).replace("torch.", ""), rope_scaling)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": [2, 92542], "pad_token_id": 2, "transformers_version": "4.41.0"})
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(old_names), indent=2))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"})
    )
    (folder / "modeling_internlm2.py").write_text("# the official remote code would be here\n")
    write_tokenizer_model(folder / "tokenizer.model", shape["vocab_size"], old_names)
    tensors = list(random_weights(cfg, seed, dtype, device))
    total = sum(t.numel() * t.element_size() for _, t in tensors)
    per_shard, groups, current, size = total / shards, [], [], 0
    for name, t in tensors:
        current.append((name, t))
        size += t.numel() * t.element_size()
        if size >= per_shard * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(current)
            current = []
    groups.append(current)
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    weight_map = {}
    for k, group in enumerate(groups, 1):
        name = f"{stem}-{k:05d}-of-{len(groups):05d}.{ext}" if len(groups) > 1 else f"{stem}.{ext}"
        part = dict(group)
        if fmt == "safetensors":
            save_file(part, folder / name, metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
        weight_map.update({n: name for n in part})
    if len(groups) > 1:
        (folder / f"{stem}.{ext}.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    return folder


def _peak_gb() -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def run(tiny: bool, qlora: bool, workdir: Path) -> dict:
    from chatforge.inference.generate import generate_batch
    from chatforge.models.load import load_model, load_tokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": "tiny" if tiny else "internlm2-1.8b",
    }
    t = time.perf_counter()
    folder = write_checkpoint(workdir / "internlm2", SHAPE_TINY if tiny else SHAPE_1_8B, shards=2, device=device)
    report["write_s"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    tok = load_tokenizer(folder)
    report["tokenizer_load_s"] = round(time.perf_counter() - t, 2)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = load_model(folder, dtype="bf16" if device == "cuda" else "fp32", device=device)
    if device == "cuda":
        torch.cuda.synchronize()
    report["load_s"] = round(time.perf_counter() - t, 2)
    report["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    report["load_peak_gpu_gb"] = _peak_gb()

    t = time.perf_counter()
    replies = generate_batch(model, tok, [[{"role": "user", "content": "Who are you?"}]], max_new_tokens=32)
    if device == "cuda":
        torch.cuda.synchronize()
    report["generate_32_tokens_s"] = round(time.perf_counter() - t, 2)
    report["reply_chars"] = len(replies[0])
    del model
    print(json.dumps(report), flush=True)

    conv = {
        "messages": [
            {"role": "user", "content": "请介绍一下你自己"},
            {"role": "assistant", "content": "我是Clement Wu的小助手，内在是上海AI实验室书生·浦语的1.8B大模型哦"},
        ]
    }
    data = workdir / "d.jsonl"
    data.write_text("\n".join(json.dumps(conv, ensure_ascii=False) for _ in range(8)) + "\n")
    for method in ["lora"] + (["qlora"] if qlora else []):
        try:
            train_step(report, method, folder, data, tok, workdir, device)
        except Exception as e:  # keep the other method's figures
            report[f"{method}_error"] = f"{type(e).__name__}: {e}"[:500]
        print(json.dumps(report), flush=True)
    return report


def train_step(report: dict, method: str, folder: Path, data: Path, tok, workdir: Path, device: str) -> None:
    from chatforge.config import load_recipe
    from chatforge.data import dataset
    from chatforge.training.trainer import build_model, token_loss_sum

    cfg = load_recipe(
        "internlm2_chat_1_8b_identity_lora",
        [f"model={folder}", f"data={data}", f"method={method}", f"output_dir={workdir / method}", "batch_size=8"],
    )
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    model = build_model(cfg, device)
    report[f"{method}_build_s"] = round(time.perf_counter() - t, 2)
    samples, _ = dataset.build_dataset(cfg, tok)
    batch = {k: v.to(device) for k, v in dataset.collate(samples[:8], tok.pad_token_id).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    times = []
    for _ in range(3):  # the first step warms up kernels; report the last
        t = time.perf_counter()
        loss, n = token_loss_sum(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    report[f"{method}_step_s"] = round(times[-1], 3)
    report[f"{method}_first_step_s"] = round(times[0], 3)
    report[f"{method}_loss"] = round(loss.item() / n, 4)
    report[f"{method}_tokens_per_step"] = int(batch["attention_mask"].sum())
    report[f"{method}_peak_gpu_gb"] = _peak_gb()
    del model, opt


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny shape (CPU-friendly)")
    p.add_argument("--qlora", action="store_true", help="also load NF4-quantised and run a QLoRA step")
    p.add_argument("--workdir", help="where to write the checkpoint (default: a temp dir)")
    a = p.parse_args(argv)
    if a.workdir:
        print(json.dumps(run(a.tiny, a.qlora, Path(a.workdir)), indent=2))
        return
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(a.tiny, a.qlora, Path(d)), indent=2))


if __name__ == "__main__":
    main()
