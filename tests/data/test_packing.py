"""Packing: several samples per sequence, no attention across them, the same loss as unpacked."""

from __future__ import annotations

import random

import pytest
import torch

from chatforge.data.dataset import Sample, batch_tokens, collate, collate_packed, pack
from chatforge.data.encode import IGNORE
from chatforge.files import ChatforgeError


def random_samples(n, lo, hi, seed=0, vocab=500):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(lo, hi)
        ids = [rng.randrange(1, vocab) for _ in range(k)]
        cut = rng.randint(1, k - 1)  # a prompt without loss, then a trained reply
        out.append(Sample(ids, [IGNORE] * cut + ids[cut:], f"s:{i}"))
    return out


def test_pack_never_splits_and_keeps_every_sample():
    samples = random_samples(300, 5, 120)
    packs = list(pack(samples, 256, open_bins=8))
    flat = [s for p in packs for s in p]
    assert sorted(s.source for s in flat) == sorted(s.source for s in samples)  # each exactly once
    assert all(sum(len(s.input_ids) for s in p) <= 256 for p in packs)
    fill = sum(len(s.input_ids) for s in samples) / (256 * len(packs))
    assert fill > 0.9, fill
    with pytest.raises(ChatforgeError, match="s:0: sample has 300 tokens"):
        list(pack([Sample([1] * 300, [1] * 300, "s:0")], 256))


def test_collate_packed_positions_boundaries_and_labels():
    a, b, c = (
        Sample([1, 2, 3], [IGNORE, 2, 3], "a"),
        Sample([4, 5], [4, 5], "b"),
        Sample([6, 7, 8, 9], [IGNORE, IGNORE, 8, 9], "c"),
    )
    batch = collate_packed([[a, b], [c]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    # the first token of every sample is never a target (it would be predicted across the boundary)
    assert batch["labels"].tolist() == [[IGNORE, 2, 3, IGNORE, 5], [IGNORE, IGNORE, 8, 9, IGNORE]]
    assert batch["cu_seqlens"].tolist() == [0, 3, 5, 9, 10] and batch["max_seqlen"] == 4
    assert batch["attention_mask"] is None and batch_tokens(batch) == 9


def per_sample_losses(model, batch, spans):
    """Mean loss of each sample, given (row, start, length) spans in the batch."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    logp = torch.log_softmax(out.logits.float(), -1)
    res = []
    for row, start, n in spans:
        lab = batch["labels"][row, start + 1 : start + n]
        lp = logp[row, start : start + n - 1].gather(-1, lab.clamp(min=0)[:, None])[:, 0]
        keep = lab != IGNORE
        res.append(float(-(lp[keep]).mean()))
    return res


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked_loss(tiny_llama, attn):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn).eval()
    samples = random_samples(12, 8, 60, seed=1, vocab=model.config.vocab_size)
    with torch.no_grad():
        plain = collate(samples, pad_id=0)
        ref = per_sample_losses(model, plain, [(i, 0, len(s.input_ids)) for i, s in enumerate(samples)])
        packs = list(pack(samples, 128, open_bins=4))
        assert len(packs) < len(samples)  # several samples share a sequence
        batch = collate_packed(packs, pad_id=0)
        spans, order = [], []
        for row, p in enumerate(packs):
            off = 0
            for s in p:
                spans.append((row, off, len(s.input_ids)))
                order.append(samples.index(s))
                off += len(s.input_ids)
        got = per_sample_losses(model, batch, spans)
        want = [ref[i] for i in order]
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
        # the same packs with one causal mask over the whole row (positions not restarting) differ
        leaky = dict(batch, position_ids=None, attention_mask=torch.ones_like(batch["input_ids"]))
        assert per_sample_losses(model, leaky, spans) != pytest.approx(want, rel=1e-3)


def test_cpu_micro_batch_in_one_row_has_the_padded_batchs_loss_and_gradients(tiny_llama):
    """The trainer on a CPU puts an unpacked micro-batch in one row and sends only rows with a target
    through the output layer: the same loss and gradients as the padded batch."""
    from transformers import AutoModelForCausalLM

    from chatforge.training.loss import loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    samples = random_samples(4, 8, 60, seed=2, vocab=model.config.vocab_size)
    results = []
    for batch in (collate(samples, pad_id=0), collate_packed([samples], pad_id=0)):
        model.zero_grad()
        loss, count = loss_sum(model, batch)
        loss.backward()
        results.append((loss.item(), int(count), [p.grad.clone() for p in model.parameters()]))
    (a, n_a, g_a), (b, n_b, g_b) = results
    assert n_a == n_b and b == pytest.approx(a, rel=1e-5)
    for x, y in zip(g_a, g_b):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_training_with_packing_runs_and_counts_sequences(tmp_path, tiny_llama):
    import json

    from chatforge.config import load_recipe
    from chatforge.training.trainer import train

    rows = [{"text": " ".join(["token"] * (5 + 7 * i))} for i in range(12)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_recipe(
        "smollm2_135m_pretrain_full",
        {  # the shipped recipe: pretrain, packing, overflow split
            "model": str(tiny_llama),
            "data": [{"path": str(data), "holdout_last": 2}],
            "output_dir": str(tmp_path / "run"),
            "max_length": 64,
            "batch_size": 2,
            "grad_accum": 1,
            "max_steps": 2,
            "save_every": 0,
            "lr": 1e-3,
        },
    )
    assert cfg.task == "pretrain" and cfg.packing and cfg.overflow == "split"
    train(cfg, progress=False)
    stats = json.loads((tmp_path / "run" / "data_stats.json").read_text())
    assert stats["split"] == 1 and stats["samples"] == 11 and stats["packed_sequences"] < 11  # 10 docs, one split
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["loss"] > 0 for r in log)
    assert log[0]["tokens"] > 64  # two packed rows of real tokens in one step


def test_training_reads_each_loss_after_the_next_step_is_queued(tmp_path, tiny_llama, monkeypatch):
    """A step's loss is read (a GPU wait) only once the next step is queued, so the GPU never idles
    while the CPU starts a step; every step is still logged, with its own loss, and a checkpoint waits
    for all queued steps."""
    import json

    from chatforge.config import load_recipe
    from chatforge.training import trainer as train_mod

    events = []

    class Loss(float):  # the summed loss of a queued step; float() is the read
        def __float__(self):
            events.append(("read", self.step))
            return float.__float__(self)

    real = train_mod.accumulate

    def accumulate(*args, **kwargs):
        events.append(("queue", sum(1 for e in events if e[0] == "queue") + 1))
        out = Loss(real(*args, **kwargs).item())
        out.step = events[-1][1]
        return out

    monkeypatch.setattr(train_mod, "accumulate", accumulate)
    rows = [{"text": " ".join(["word"] * (6 + i))} for i in range(8)]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_recipe(
        "smollm2_135m_pretrain_full",
        {
            "model": str(tiny_llama),
            "data": [{"path": str(data)}],
            "output_dir": str(tmp_path / "run"),
            "max_length": 32,
            "batch_size": 1,
            "grad_accum": 1,
            "packing": False,
            "max_steps": 5,
            "save_every": 2,
        },
    )
    train_mod.train(cfg, progress=False)
    assert events == [
        ("queue", 1),
        ("queue", 2),
        ("read", 1),
        ("read", 2),  # checkpoint at 2
        ("queue", 3),
        ("queue", 4),
        ("read", 3),
        ("read", 4),  # checkpoint at 4
        ("queue", 5),
        ("read", 5),
    ]
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5] and len({r["loss"] for r in log}) == 5
