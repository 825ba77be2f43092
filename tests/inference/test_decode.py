"""chatforge/inference/decode.py on CPU: the slots decode what plain `generate` decodes (greedy, token for token),
with refilled slots, mixed sampling rows, stops, and streaming; other shapes fall back to `generate`."""

from __future__ import annotations

import pytest
import torch

from chatforge.inference import decode
from chatforge.inference.generate import generate_batch, stream_reply
from chatforge.models.chat_tokens import prompt_ids
from chatforge.models.load import load_model, load_tokenizer, stop_token_ids
from conftest import bench_module

QUESTIONS = [
    "Who are you?",
    "What is 2+2? Answer briefly please, thanks.",
    "你好",
    "Tell me about rivers and the sea.",
    "Name a colour.",
    "Write one line about the moon, and another one about the sun, please.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random InternLM2 checkpoint in the official format (loads as Llama; varied greedy tokens)."""
    check = bench_module("internlm2_gpu_check")
    folder = check.write_checkpoint(
        tmp_path_factory.mktemp("il2") / "il2", dict(check.SHAPE_TINY, max_position_embeddings=256)
    )
    return load_tokenizer(str(folder)), load_model(str(folder), dtype="fp32", device="cpu")


def plain(model, tokenizer, ids: list[int], new: int) -> list[int]:
    """transformers' greedy `generate` on one prompt: the reference."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=stop_token_ids(tokenizer, model),
        )[0, len(ids) :].tolist()
    stops = stop_token_ids(tokenizer, model)
    return out[: next((i for i, t in enumerate(out) if t in stops), len(out))]


@pytest.mark.parametrize("rows", [1, 2, 6])
def test_greedy_slots_equal_plain_generate(tiny, rows):
    tok, model = tiny
    assert decode.supports(model)
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    got = decode.generate(model, prompts, 20, stop_token_ids(tok, model), rows=rows)
    assert got == [plain(model, tok, p, 20) for p in prompts]


def test_prompts_padded_to_their_graph_bucket_decode_the_same(tiny, monkeypatch):
    """On a GPU up to 8 prompts prefill as the CUDA graph of their bucket (rows and width powers of two):
    padding rows repeat the last prompt, padding columns are masked; neither changes a token, beside busy
    slots."""
    tok, model = tiny
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    want = [plain(model, tok, p, 20) for p in prompts]
    monkeypatch.setattr(decode.Decoder, "_bucket", lambda self, n, w: (n + 2, min(self.max_len - 1, w + 17)))
    assert decode.generate(model, prompts, 20, stop_token_ids(tok, model), rows=3) == want
    monkeypatch.undo()
    dec = decode.Decoder(model, rows=2, max_len=300, graphs=True)  # buckets only: nothing runs here
    assert [dec._bucket(1, w) for w in (5, 64, 65, 200, 290)] == [(1, 64), (1, 64), (1, 128), (1, 256), (1, 300)]
    assert dec._bucket(3, 65) == (4, 128) and dec._bucket(9, 65) is None and dec._bucket(1, 2000) is None


def test_sampled_rows_leave_greedy_rows_alone_and_stops_end_a_row(tiny):
    tok, model = tiny
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS[:3]]
    dec = decode.Decoder(model, rows=3, max_len=64)
    slots, first = dec.prefill(prompts, temperature=[0.0, 1.0, 0.0], top_p=[1.0, 0.9, 1.0])
    rows = [[t] for t in first]
    for _ in range(9):
        toks = dec.step()
        for row, slot in zip(rows, slots):
            row.append(toks[slot])
    for i in (0, 2):
        assert rows[i] == plain(model, tok, prompts[i], 10)
    assert all(0 <= t < model.config.vocab_size for t in rows[1])
    # a stop token ends a reply and frees its slot for the next prompt
    replies = [plain(model, tok, prompt_ids(tok, [{"role": "user", "content": q}]), 10) for q in QUESTIONS]
    i, k = next((i, k) for i, r in enumerate(replies) for k in range(2, len(r)) if r[k] not in r[:k])
    stop = replies[i][k]
    out = decode.generate(
        model, [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS], 10, [stop], rows=1
    )
    assert out[i] == replies[i][:k] and all(stop not in r for r in out)


def test_stream_reply_pieces_add_up_to_the_batch_reply(tiny):
    tok, model = tiny
    conv = [{"role": "user", "content": QUESTIONS[3]}]
    pieces = list(stream_reply(model, tok, conv, max_new_tokens=16, temperature=0.0))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == generate_batch(model, tok, [conv], max_new_tokens=16)[0]
    with pytest.raises(ValueError, match="no room"):
        decode.Decoder(model, rows=1, max_len=4).prefill([prompt_ids(tok, conv)])


def test_other_shapes_use_plain_generate(tmp_path, smol_tokenizer):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=len(smol_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        eos_token_id=smol_tokenizer.eos_token_id,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    assert not decode.supports(model)  # q_norm/k_norm: not the Llama shape
    from transformers import MistralConfig, MistralForCausalLM

    small = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    assert not decode.supports(MistralForCausalLM(MistralConfig(sliding_window=16, **small)))  # a window in use
    assert decode.supports(MistralForCausalLM(MistralConfig(sliding_window=None, **small)))
    replies = generate_batch(model, smol_tokenizer, [[{"role": "user", "content": "hi"}]], max_new_tokens=4)
    assert len(replies) == 1 and isinstance(replies[0], str)


def test_eager_inference_keeps_off_cudnn_attention_and_restores_it():
    """cuDNN's SDPA builds a plan per new shape (~60 ms on an H200): eager inference keeps to flash and
    memory-efficient attention inside `no_plan_attention`, and the process's choice comes back after."""
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with decode.no_plan_attention():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
