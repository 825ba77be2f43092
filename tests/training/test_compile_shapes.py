"""Compiled training sees few shapes: packed rows of a fixed width, unpacked batches padded to
power-of-two widths, so torch.compile compiles a handful of times over a run of varied real lengths."""

import json

import torch

from chatforge.data import dataset
from chatforge.training import patches


def identity_file(tmp_path):
    """Identity conversations, single and joined into multi-turn ones: 60 to 400 tokens."""
    from chatforge.data.identity import IdentitySpec, identity_conversations

    rows = identity_conversations(IdentitySpec(owner="Ines Okafor"))
    out, k = [], 0
    for i, row in enumerate(rows[:120]):
        turns = [m for r in rows[k : k + i % 5] for m in r["messages"] if m["role"] != "system"]
        out.append({"messages": row["messages"] + turns})
        k += i % 5
    path = tmp_path / "identity.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in out), encoding="utf-8")
    return path


def compiled_run(tmp_path, tiny_llama, monkeypatch, before_fit=None, **keys):
    from chatforge.config import load_recipe
    from chatforge.training.trainer import Trainer

    monkeypatch.setattr(patches, "COMPILE_BACKEND", "eager")  # dynamo with its guards, no code generation
    torch._dynamo.reset()
    widths = []
    real = dataset.collate

    def collate(samples, pad_id, width=None):
        batch = real(samples, pad_id, width)
        widths.append((max(len(s.input_ids) for s in samples), batch["input_ids"].shape[1]))
        return batch

    monkeypatch.setattr(dataset, "collate", collate)
    cfg = load_recipe(
        "smollm2_135m_identity_lora",
        {
            "model": str(tiny_llama),
            "data": str(identity_file(tmp_path)),
            "output_dir": str(tmp_path / "run"),
            "compile": True,
            "max_steps": 8,
            "save_every": 0,
            "eval_prompts": [],
            "batch_size": 4,
            "max_length": 512,
            **keys,
        },
    )
    trainer = Trainer(cfg, progress=False).setup()
    if before_fit:
        before_fit(trainer)
    trainer.fit()
    torch._dynamo.reset()
    return trainer, widths


def test_unpacked_batches_pad_to_buckets_and_compile_a_few_times(tmp_path, tiny_llama, monkeypatch):
    trainer, widths = compiled_run(tmp_path, tiny_llama, monkeypatch, max_length=2048)
    natural = {n for n, _ in widths}
    padded = {w for _, w in widths}
    assert len(natural) >= 6  # real identity conversations of many lengths
    assert padded <= {64, 128, 256, 512} and len(padded) < len(natural)
    # the memory plan budgets for the widest bucket the data makes, not max_length (short identity samples
    # get the micro-batch and checkpointing their own width needs)
    assert max(padded) <= trainer.plan.seq == dataset.bucket_width(max(trainer.real), 2048) <= 512
    assert trainer.metrics["compilations"] <= 3, trainer.metrics
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["real_tokens"] > 0 and "tokens_per_s_after_warmup" in metrics


def test_packed_rows_have_one_width_and_compile_once(tmp_path, tiny_llama, monkeypatch):
    trainer, _ = compiled_run(tmp_path, tiny_llama, monkeypatch, packing=True, max_steps=4)
    batch = trainer.collate(trainer.samples[:2])
    assert batch["input_ids"].shape == (2, 512) and trainer.plan.seq == 512
    assert len(batch["cu_seqlens"]) == 2 * trainer.max_segments + 1  # padded with empty segments
    assert trainer.metrics["compilations"] == 1 and trainer.metrics["recompilations"] == 0, trainer.metrics


def test_bucket_width():
    assert [dataset.bucket_width(n, 512) for n in (1, 64, 65, 200, 300, 512)] == [64, 64, 128, 256, 512, 512]
    assert dataset.bucket_width(700, 1000) == 1000 and dataset.bucket_width(1000, 1000) == 1000


class Recorder:
    """The CPU stand-in of graphs.MicroBatchGraphs: records the shapes captured and used, runs eager steps."""

    def __init__(self, engine, par):
        self.engine, self.par, self.captured, self.used, self.started = engine, par, [], [], False

    def capture(self, batches):
        from chatforge.training import graphs

        assert not self.started, "a capture after the first step"
        self.captured += [graphs.shape_key(b) for b in batches]

    def accumulate(self, batches, n_trained):
        from chatforge.training import graphs
        from chatforge.training import trainer as trainer_mod

        self.started = True
        self.used += [graphs.shape_key(b) for b in batches]
        return trainer_mod.accumulate(self.engine, batches, n_trained, self.par)

    def status(self):
        return f"{len(set(self.captured))} shape(s) replayed"

    def shapes(self, name: str) -> set:
        """The shapes one tensor of the batch had in the steps."""
        return {dict((k, s) for k, s, _ in key)[name] for key in self.used}


def with_recorder(trainer, eager_graphs: bool = False):
    if eager_graphs:  # as planned on a GPU for eager LoRA (the identity recipes)
        trainer.plan.cuda_graphs, trainer.plan.attention = True, "varlen"
    trainer.graphs = Recorder(trainer.engine, trainer.par)
    trainer.rows_multiple = 64  # the tiny model's default chunk is wider than a micro-batch


def test_packed_runs_capture_every_output_row_count_before_the_first_step(tmp_path, tiny_llama, monkeypatch):
    """CUDA graphs are captured per batch shape; the output layer's rows (loss_rows) are the one shape of packed
    micro-batches that varies. capture_graphs() must capture, before step 1, exactly the counts the steps use."""
    trainer, _ = compiled_run(
        tmp_path, tiny_llama, monkeypatch, with_recorder, packing=True, max_steps=6, micro_batch=2
    )
    rows = trainer.graphs.shapes("loss_rows")
    assert len(rows) >= 2 and all(r[0] % 64 == 0 and r[0] < 2 * 512 for r in rows)  # fewer rows than positions
    assert set(trainer.graphs.used) <= set(trainer.graphs.captured)
    assert len(set(trainer.graphs.captured)) == len(trainer.graphs.captured)  # each shape once


def test_unpacked_eager_graph_runs_capture_every_width_before_the_first_step(tmp_path, tiny_llama, monkeypatch):
    """Eager LoRA on a GPU replays graphs too (its steps are bound by kernel launches): unpacked micro-batches
    are padded to power-of-two widths, one sample per row and its padding tail a varlen segment of its own (no
    padding mask, whose checks would sync), and every width is captured before step 1."""
    trainer, widths = compiled_run(
        tmp_path, tiny_llama, monkeypatch, lambda t: with_recorder(t, eager_graphs=True), compile=False, max_steps=8
    )
    assert not widths  # no padded batch with a padding mask
    used = {s[1] for s in trainer.graphs.shapes("input_ids")}
    assert len(used) >= 2 and used <= {64, 128, 256, 512}
    assert set(trainer.graphs.used) <= set(trainer.graphs.captured)
    assert len(set(trainer.graphs.captured)) == len(trainer.graphs.captured)
    batch = trainer.collate(trainer.samples[:3])
    assert batch["attention_mask"] is None and batch["cu_seqlens"].shape == (2 * 3 + 1,)


def test_one_sample_per_row_segments_give_the_padded_batch_loss_and_gradients(tiny_llama):
    """The graphs' layout of an unpacked batch (each row a sample and a padding segment, positions restarting)
    trains exactly as the padded batch with its attention mask."""
    from transformers import AutoModelForCausalLM

    from chatforge.data.encode import IGNORE
    from chatforge.training.loss import loss_sum

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    torch.manual_seed(0)
    units = []
    for n in (9, 30, 17):
        ids = torch.randint(3, 200, (n,)).tolist()
        units.append(dataset.Sample(ids, [IGNORE] * 4 + ids[4:], "t"))
    results = []
    for batch in (dataset.collate(units, 0, width=64), dataset.collate_packed([[u] for u in units], 0, 64, 6)):
        model.zero_grad()
        total, count = loss_sum(model, batch)
        total.backward()
        results.append((total.detach(), count, [p.grad.clone() for p in model.parameters()]))
    (a, na, ga), (b, nb, gb) = results
    assert int(na) == int(nb) == sum(len(u.input_ids) - 4 for u in units)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
