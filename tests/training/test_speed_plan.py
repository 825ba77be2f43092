"""CPU checks of the training speed levers (chatforge/training/: speed_plan.py, loss.py, attention.py,
patches.py) and the speed bench's smoke run."""

import functools
import sys

import pytest
import torch
import torch.nn.functional as F

from chatforge.config import TrainConfig, build
from chatforge.data.encode import IGNORE
from chatforge.files import ChatforgeError
from chatforge.training import patches
from chatforge.training.loss import linear_cross_entropy_sum, loss_rows, loss_sum
from chatforge.training.patches import checkpoint_indices
from chatforge.training.speed_plan import (
    Plan,
    Shape,
    choose_micro_batch,
    decoder_layers,
    default_chunk_rows,
    estimate_bytes,
    is_quantized,
    make_plan,
)
from conftest import ROOT


def tiny_llama(layers=2, vocab=300, seed=0, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
        tie_word_embeddings=False,
        **config,
    )
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


# ---------------------------------------------------------------- chunked linear + CE


@pytest.mark.parametrize("chunk", [7, 64, 1000])
def test_chunked_loss_and_gradients_equal_plain(chunk):
    torch.manual_seed(1)
    h = torch.randn(150, 48, requires_grad=True)
    w = (torch.randn(700, 48) * 0.3).requires_grad_()
    y = torch.randint(0, 700, (150,))
    y[::4] = IGNORE
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y, ignore_index=IGNORE, reduction="sum")
    gh, gw = torch.autograd.grad(ref * 0.37, (h, w))
    out = linear_cross_entropy_sum(h, w, y, backend="chunked", chunk_rows=chunk)
    ch, cw = torch.autograd.grad(out * 0.37, (h, w))
    assert torch.allclose(out, ref, rtol=1e-5)
    assert torch.allclose(ch, gh, rtol=1e-4, atol=1e-6)
    assert torch.allclose(cw, gw, rtol=1e-4, atol=1e-6)


def test_chunked_loss_frozen_weight_and_all_ignored():
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(20, 8)  # frozen (LoRA): no weight gradient is made
    y = torch.full((10,), IGNORE)
    out = linear_cross_entropy_sum(h, w, y, chunk_rows=4)
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(h.grad) == 0


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ChatforgeError, match="fused_loss"):
        linear_cross_entropy_sum(torch.randn(2, 4), torch.randn(5, 4), torch.zeros(2, dtype=torch.long), backend="fast")


def test_default_chunk_rows_bounds_logits_memory():
    rows = default_chunk_rows(92544)
    assert rows & (rows - 1) == 0 and rows * 92544 * 4 <= 512 * 2**20


# ---------------------------------------------------------------- the loss on a model


def batch_with_padding(vocab=300):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (3, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 9:] = 0
    labels = torch.where(mask.bool(), ids, IGNORE)
    labels[:, :3] = IGNORE  # a prompt carries no loss
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def test_loss_sum_matches_model_loss_and_lora_gradients():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    b = batch_with_padding()
    results = {}
    for backend in ("plain", "chunked"):
        model.zero_grad()
        loss, n = loss_sum(model, b, Plan(loss=backend, chunk_rows=16))
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        results[backend] = (loss.item(), n, grads)
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    lp, n, gp = results["plain"]
    lc, nc, gc = results["chunked"]
    assert n == nc == int((b["labels"][:, 1:] != IGNORE).sum())
    assert lc == pytest.approx(lp, rel=1e-5) and lc / n == pytest.approx(out.loss.item(), rel=1e-5)
    for a, c in zip(gp, gc):
        assert torch.allclose(a, c, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("multiple", [1, 16, 64])
def test_loss_rows_give_the_full_width_loss_and_gradients(multiple):
    """Only positions with a target meet the output layer (in whole chunks of `multiple`): the loss and every
    gradient are those of the full width, on packed rows whose sample starts and row ends carry no target."""
    from chatforge.data.dataset import Sample, collate_packed

    g = torch.Generator().manual_seed(3)

    def sample(n, prompt):
        ids = torch.randint(0, 300, (n,), generator=g).tolist()
        return Sample(input_ids=ids, labels=[IGNORE] * prompt + ids[prompt:], source="t")

    packs = [[sample(9, 4), sample(13, 6)], [sample(20, 15)], [sample(6, 1), sample(8, 8), sample(5, 2)]]
    batch = collate_packed(packs, pad_id=0, width=32)
    rows = loss_rows(batch, multiple)
    n_trained = sum(len([t for t in s.labels[1:] if t != IGNORE]) for p in packs for s in p)
    if multiple == 64:  # 96 positions, at most 64 of them: one chunk of 64
        assert rows.numel() == 64
    else:
        assert rows.numel() == -(-n_trained // multiple) * multiple and rows.numel() % multiple == 0
    results = []
    for b in (batch, {**batch, "loss_rows": rows}):
        model = tiny_llama(layers=1)
        loss, n = loss_sum(model, b, Plan(compile=True, chunk_rows=16))  # compile: no nonzero of its own
        loss.backward()
        results.append((loss.item(), int(n), [p.grad for p in model.parameters()]))
    (full, n_full, g_full), (part, n_part, g_part) = results
    assert n_full == n_part == n_trained
    assert part == pytest.approx(full, rel=1e-6)
    for a, b in zip(g_full, g_part):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    only_targets = loss_rows({**batch, "labels": batch["labels"].clone().fill_(IGNORE)}, 8)
    assert only_targets.numel() == 8 and (only_targets == batch["input_ids"].numel() - 1).all()
    all_rows = {"input_ids": batch["input_ids"][:1, :4], "labels": batch["input_ids"][:1, :4]}
    assert loss_rows(all_rows, 4) is None  # every position: no rows, the full width


def test_packed_batch_loss_equals_samples_run_alone():
    model = tiny_llama()
    g = torch.Generator().manual_seed(5)
    lens = [7, 12, 5]
    samples = [torch.randint(0, 300, (n,), generator=g) for n in lens]
    width = 26
    ids = torch.zeros(1, width, dtype=torch.long)
    ids[0, :24] = torch.cat(samples)
    pos = torch.cat([torch.arange(n) for n in lens] + [torch.arange(2)])[None]
    labels = ids.clone()  # every token trained (pretrain): boundaries must still not leak
    labels[0, 24:] = IGNORE
    cu = torch.tensor([0, 7, 19, 24, 26], dtype=torch.int32)
    packed = {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": None, "cu_seqlens": cu}
    loss, n = loss_sum(model, packed, Plan(attention="varlen"))
    alone = [
        loss_sum(
            model,
            {
                "input_ids": s[None],
                "labels": s[None].clone(),
                "attention_mask": torch.ones(1, len(s), dtype=torch.long),
            },
            Plan(),
        )
        for s in samples
    ]
    assert n == sum(k for _, k in alone) == sum(x - 1 for x in lens)
    assert loss.item() == pytest.approx(sum(loss_i.item() for loss_i, _ in alone), rel=1e-5)


def test_selective_checkpointing_keeps_loss_and_gradients():
    b = batch_with_padding()
    out = []
    for k in (0, 2):
        model = tiny_llama(layers=3)
        patches.apply(model, Plan(checkpoint_layers=k))
        loss, _ = loss_sum(model, b)
        loss.backward()
        out.append((loss.item(), model.model.layers[0].mlp.up_proj.weight.grad.clone()))
    assert out[0][0] == pytest.approx(out[1][0], rel=1e-6)
    assert torch.allclose(out[0][1], out[1][1], rtol=1e-5, atol=1e-7)


def test_checkpoint_indices_spread():
    assert checkpoint_indices(24, 0) == []
    assert checkpoint_indices(24, 3) == [0, 8, 16]
    assert checkpoint_indices(24, 24) == list(range(24))


def test_lora_groups_share_one_a_matmul_and_compute_what_peft_does():
    from peft import LoraConfig, get_peft_model

    from chatforge.training import lora_groups

    b = batch_with_padding()
    runs = []
    for grouped, backend in ((False, None), (True, None), (True, "aot_eager")):
        model = get_peft_model(
            tiny_llama(layers=2), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
        )
        calls = []
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].register_forward_hook(
            lambda *a: calls.append("q")
        )
        patches.apply(model, Plan(lora_groups=grouped))
        calls.clear()  # the probe forward that found the groups
        if backend:  # dynamo traces the group's shared state, AOTAutograd its backward
            for layer in decoder_layers(model):
                layer.forward = torch.compile(layer.forward, backend=backend)
        loss, _ = loss_sum(model, b)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        runs.append((loss.item(), grads, calls))
        if grouped and not backend:
            groups = {
                id(m._chatforge_group): [
                    n.rsplit(".", 1)[-1]
                    for n, x in model.named_modules()
                    if getattr(x, "_chatforge_group", None) is m._chatforge_group
                ]
                for m in lora_groups.lora_linears(model)
                if hasattr(m, "_chatforge_group")
            }
            assert (
                sorted(map(tuple, groups.values()))
                == [("down_proj",)] * 2
                + [("gate_proj", "up_proj")] * 2
                + [("o_proj",)] * 2
                + [("q_proj", "k_proj", "v_proj")] * 2
            )
            with model.disable_adapter(), torch.no_grad():  # PEFT's own forward: the base model
                off, _ = loss_sum(model, b)
            ref = tiny_llama(layers=2)
            with torch.no_grad():
                assert off.item() == pytest.approx(loss_sum(ref, b)[0].item(), rel=1e-6)
    (loss0, grads0, calls0), *others = runs
    assert calls0 == ["q"] and runs[1][2] == []  # grouped: q's own A matmul never runs
    for loss, grads, _ in others:
        assert loss == pytest.approx(loss0, rel=1e-6)
        for k, g in grads0.items():
            assert float((grads[k] - g).abs().max()) <= 1e-5 * float(g.abs().max()), k  # fp32 summation order


def test_lora_groups_on_by_default_without_dropout_or_when_compiled():
    model = tiny_llama()
    plan = lambda **kw: make_plan(model, device="cpu", seq=64, global_batch=4, **kw).lora_groups
    assert plan(method="lora") and plan(method="qlora") and plan(method="lora", lora_dropout=0.1, compile=True)
    assert not plan(method="lora", lora_dropout=0.1) and not plan(method="full")
    assert not plan(method="lora", lora_groups=False)


def dropout_run(grouped: bool, ckpt_layers: int = 0, backend=None, steps=2):
    """Loss and LoRA gradients of two forward/backward passes with dropout 0.3. grouped=False: PEFT's own
    forward, its dropout modules swapped for the grouped path's hash masks with the very same keys."""
    from peft import LoraConfig, get_peft_model

    from chatforge.training import lora_groups

    model = get_peft_model(
        tiny_llama(layers=2), LoraConfig(r=4, lora_dropout=0.3, target_modules="all-linear", init_lora_weights=False)
    )
    model.train()
    patches.apply(model, Plan(lora_groups=True, checkpoint_layers=ckpt_layers))
    if not grouped:

        class Keyed(torch.nn.Module):
            def __init__(self, group, i):
                super().__init__()
                self.group, self.i = group, i

            def forward(self, x):
                key = self.group.clock.value * 1000003 + self.group.keys[self.i]
                return lora_groups.hash_dropout(x, key, 0.3)

        for m in lora_groups.lora_linears(model):
            group = m._chatforge_group
            m.lora_dropout["default"] = Keyed(group, group.members.index(m))
            del m.forward  # PEFT's forward again
    if backend:
        for layer in decoder_layers(model):
            layer.forward = torch.compile(layer.forward, backend=backend)
    out = []
    for _ in range(steps):
        loss, _ = loss_sum(model, batch_with_padding())
        loss.backward()
        out.append(loss.item())
    return out, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_lora_groups_dropout_is_peft_dropout_with_recomputed_masks():
    """The grouped path with dropout computes PEFT's LoRA with the same masks (kept by PEFT, recomputed
    here), also under layer checkpointing and compiled; masks change every forward."""
    stats = torch._dynamo.utils.counters["stats"]
    graphs = stats["unique_graphs"]
    ref_losses, ref_grads = dropout_run(grouped=False)
    assert ref_losses[0] != ref_losses[1]  # same batch, same weights' gradients accumulate: new masks too
    for kw in ({}, {"ckpt_layers": 2}, {"backend": "aot_eager"}, {"ckpt_layers": 1, "backend": "aot_eager"}):
        losses, grads = dropout_run(grouped=True, **kw)
        assert losses == pytest.approx(ref_losses, rel=1e-5), kw
        for k, g in ref_grads.items():
            assert float((grads[k] - g).abs().max()) <= 1e-5 * float(g.abs().max()), (kw, k)
    assert stats["unique_graphs"] - graphs <= 2  # a new counter value recompiles nothing (first layer: its own)


def test_hash_dropout_keeps_one_minus_p_and_masks_are_independent():
    from chatforge.training import lora_groups

    ones = torch.ones(1000, 1000)
    a = lora_groups.hash_dropout(ones, torch.tensor(12345), 0.1)
    b = lora_groups.hash_dropout(ones, torch.tensor(12345 + lora_groups.GOLDEN), 0.1)
    assert torch.equal(a, lora_groups.hash_dropout(ones, torch.tensor(12345), 0.1))
    assert abs(float((a > 0).float().mean()) - 0.9) < 0.002 and float(a.max()) == pytest.approx(1 / 0.9)
    assert abs(float(((a == 0) & (b == 0)).float().mean()) - 0.01) < 0.001  # independent: p x p


def test_int32_masks_are_the_int64_hash_bit_for_bit():
    from chatforge.training import lora_groups as lg

    x = torch.ones(3001, 1000)
    for key in (torch.tensor(12345), torch.tensor(987654321987 * 1000003 + lg.GOLDEN)):
        want = lg.keep_mask64(x, key, 0.1)
        assert torch.equal(lg.keep_mask(x, key, 0.1), want)
        assert torch.equal(torch.compile(lg.keep_mask)(x, key, 0.1), want)  # inductor's int32 wraps too


def test_compiled_dropout_keeps_only_x_and_a_for_backward():
    """Compiled (AOTAutograd with inductor's partitioner), the grouped dropout's backward graph reads x and A
    and recomputes the masks: no dropped copies, no masks kept."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd

    from chatforge.training import lora_groups as lg

    graphs = {}

    def keep(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(
        fw_compiler=keep("fw"), bw_compiler=keep("bw"), partition_fn=min_cut_rematerialization_partition
    )
    torch.manual_seed(0)
    x = torch.randn(2, 256, 64, requires_grad=True)
    w = torch.randn(3 * 8, 64, requires_grad=True)
    keys = torch.tensor([11, 12, 13])
    u = torch.compile(lambda x, w: lg.dropped_a(x, w, keys, 0.1, (8, 8, 8)), backend=backend)(x, w)
    u.square().sum().backward()
    inputs = [n.meta["val"] for n in graphs["bw"].graph.nodes if n.op == "placeholder"]
    kept = sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor) and t.shape != u.shape)
    assert kept <= x.numel() * 4 + w.numel() * 4 + 1024, [(t.shape, t.dtype) for t in inputs]
    ref = torch.cat([F.linear(lg.hash_dropout(x, keys[i], 0.1), a) for i, a in enumerate(w.split(8))], -1)
    gx, gw = torch.autograd.grad(ref.square().sum(), (x, w))
    assert torch.allclose(u, ref, atol=1e-5) and torch.allclose(x.grad, gx, atol=1e-4)
    assert torch.allclose(w.grad, gw, rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------- memory model and chooser

SHAPE = Shape(hidden=2048, layers=24, heads=16, kv_heads=8, ffn=8192, vocab=92544)
GIB = 2**30


def est(tokens, k, static=4 * GIB, compiled=True, loss="chunked"):
    return estimate_bytes(SHAPE, static, tokens, k, compiled, loss)


def test_estimate_grows_with_tokens_and_shrinks_with_checkpointing():
    assert est(4096, 0) < est(8192, 0)
    assert est(8192, 12) < est(8192, 0)
    assert est(8192, 24) < est(8192, 12)
    assert est(8192, 0, compiled=False) > est(8192, 0)
    assert est(8192, 0, loss="plain") - est(8192, 0, loss="chunked") > 8192 * 92544 * 8  # the logits


def test_chooser_prefers_no_checkpointing_then_the_largest_divisor():
    choose = lambda budget, g=8, ck="auto": choose_micro_batch(
        SHAPE, 4 * GIB, 2048, g, budget, True, "chunked", checkpointing=ck
    )
    assert choose(10**13) == (8, 0)
    budget = est(2 * 2048, 0) + 1  # fits 2 sequences, not 3 or 4
    assert choose(budget) == (2, 0)
    assert choose(budget, g=6) == (2, 0)
    assert choose(est(4 * 2048, 0) + 1, g=6) == (3, 0)  # 4 fits but does not divide 6
    m, k = choose(est(2048, 0) - 1)  # one sequence only fits with some layers checkpointed
    assert m >= 1 and 0 < k < 24 and est(m * 2048, k) <= est(2048, 0) - 1
    assert est(2048, k - 1) > est(2048, 0) - 1 or m > 1
    assert choose(10**13, ck=True) == (8, 24)
    assert choose(est(2048, 0) - 1, ck=False) == (1, 0)  # told not to checkpoint: smallest batch


def test_make_plan_on_cpu_keeps_recipe_batch_and_skips_compile():
    model = tiny_llama()
    plan = make_plan(model, device="cpu", method="full", seq=64, global_batch=4)
    assert (plan.micro_batch, plan.compile, plan.loss, plan.attention, plan.autocast) == (
        0,
        False,
        "chunked",
        "sdpa",
        False,
    )
    assert (
        make_plan(model, device="cpu", method="full", seq=64, global_batch=4, checkpointing=True).checkpoint_layers == 2
    )
    with pytest.raises(ChatforgeError, match="varlen"):
        make_plan(model, device="cpu", method="full", seq=64, global_batch=4, attention="varlen")
    model.config.final_logit_softcapping = 30.0  # a head the chunked loss does not model: full logits
    assert make_plan(model, device="cpu", method="full", seq=64, global_batch=4).loss == "plain"


def test_recipe_speed_keys_take_auto_or_values():
    cfg = build(TrainConfig, {"micro_batch": 2, "compile": False, "memory_budget_gib": 7.5}, "r")
    assert (cfg.micro_batch, cfg.compile, cfg.memory_budget_gib, cfg.gradient_checkpointing) == (2, False, 7.5, "auto")
    for bad in ({"micro_batch": 0}, {"compile": "fast"}, {"memory_budget_gib": -1}, {"gradient_checkpointing": 3}):
        with pytest.raises(ChatforgeError, match=list(bad)[0]):
            build(TrainConfig, bad, "r")


# ---------------------------------------------------------------- the bench, tiny, on CPU


def test_train_speed_bench_tiny_smoke(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import train_speed

    out_json = ROOT / "bench" / ".tiny_test.json"
    try:
        assert (
            train_speed.main(
                [
                    "--tiny",
                    "--steps",
                    "3",
                    "--json",
                    str(out_json),
                    "hf_lora_b2",
                    "cf_lora_b2",
                    "cf_full_b2,ckpt=1,micro=1",
                ]
            )
            == 0
        )
        import json

        rows = {r["name"]: r for r in json.loads(out_json.read_text())}
    finally:
        out_json.unlink(missing_ok=True)
    text = capsys.readouterr().out
    assert "| cf_lora_b2 |" in text and "tokens/s" in text
    hf, cf = rows["hf_lora_b2"]["losses"], rows["cf_lora_b2"]["losses"]
    assert len(hf) == len(cf) == 3
    assert max(abs(a - b) / b for a, b in zip(cf, hf)) < 1e-3  # same data, seed, hyper-parameters
    assert rows["cf_full_b2,ckpt=1,micro=1"]["plan"]["checkpoint_layers"] == 2


@pytest.mark.parametrize("matmul", ["bitsandbytes", "torch"])
def test_checkpoint_wraps_the_compiled_layer(matmul):
    """Every layer compiles (NF4 ones too); checkpointed layers run their compiled forward again."""
    pytest.importorskip("bitsandbytes")
    from conftest import nf4_linear

    model = tiny_llama(layers=4)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = nf4_linear(mlp.down_proj)
    assert is_quantized(model)
    patches.apply(model, Plan(compile=True, checkpoint_layers=2, nf4_matmul=matmul))  # compiles lazily
    forwards = [layer.forward for layer in model.model.layers]
    ckpt = [isinstance(f, functools.partial) for f in forwards]
    inner = [f.args[0] if isinstance(f, functools.partial) else f for f in forwards]
    assert ckpt == [True, False, True, False]
    assert all(hasattr(f, "_torchdynamo_orig_callable") for f in inner)
    assert hasattr(mlp.down_proj, "_chatforge_nf4") == (matmul == "torch")
    torch._dynamo.reset()


def test_checkpointed_layers_save_only_their_inputs(monkeypatch):
    """Saved-tensor bytes with every layer checkpointed, layers compiled by apply (through AOTAutograd,
    no C++ build): a small fraction of the run without checkpoints. A checkpoint traced inside the
    compiled region left about half."""
    monkeypatch.setattr(patches, "COMPILE_BACKEND", "aot_eager")

    def saved(ckpt):
        torch._dynamo.reset()
        model = tiny_llama(layers=4)
        plan = Plan(compile=True, checkpoint_layers=ckpt)
        patches.apply(model, plan)
        ids = torch.randint(0, 300, (2, 64))
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = loss_sum(model, {"input_ids": ids, "labels": ids}, plan)
        loss.backward()
        return total[0]

    assert saved(4) < 0.25 * saved(0)
    torch._dynamo.reset()


def test_train_speed_bench_tiny_qlora_matches_trainer():
    """QLoRA on the tiny shape: chatforge's NF4 matmul and the Trainer's bitsandbytes one, same losses."""
    pytest.importorskip("bitsandbytes")
    sys.path.insert(0, str(ROOT / "bench"))
    import train_speed

    hf = train_speed.run_one("hf_qlora_b2", True, 3, 64, 1)
    cf = train_speed.run_one("cf_qlora_b2", True, 3, 64, 1)
    assert cf["plan"]["nf4_matmul"] == "torch"
    # measured 2e-6; a wrong NF4 code table (sign-flipped) gave 1.5e-3 on this tiny model
    assert max(abs(a - b) / b for a, b in zip(cf["losses"], hf["losses"])) < 1e-4


def test_generation_between_steps_runs_in_the_training_dtypes(smol_tokenizer):
    """A GPU run's model: bf16 base weights, fp32 LoRA weights, PEFT's input casts off (autocast does
    them in training). Generation outside autocast failed with 'mat1 and mat2 ... same dtype' (the
    GPU-path issue); patches.inference runs it as training does. Reproduced with CPU autocast."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from chatforge.inference.generate import generate_batch

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    plan = Plan(autocast=True)
    patches.apply(model, plan)
    conv = [[{"role": "user", "content": "Who are you?"}]]
    with pytest.raises(RuntimeError, match="dtype"):
        generate_batch(model, smol_tokenizer, conv, max_new_tokens=3)
    with patches.inference(model, plan):
        assert len(generate_batch(model, smol_tokenizer, conv, max_new_tokens=3)) == 1


# ---------------------------------------------------------------- CUDA graphs of a micro-batch


def test_cuda_graphs_are_planned_for_lora_on_cuda_packed_or_not_compiled_or_not(monkeypatch):
    from chatforge.training import speed_plan

    monkeypatch.setattr(speed_plan, "varlen_available", lambda: True)  # as on a GPU with torch >= 2.10
    model = tiny_llama().to(torch.bfloat16)
    plan = functools.partial(make_plan, model, seq=64, global_batch=4, memory_budget_gib=8, compile=True)
    assert plan(device="cuda", method="lora", packing=True).cuda_graphs
    assert plan(device="cuda", method="lora", packing=True, compile=False).cuda_graphs  # host-bound eager steps
    fp32 = functools.partial(make_plan, tiny_llama(), device="cuda", method="lora", seq=64, global_batch=4)
    fp32_plan = fp32(memory_budget_gib=8, packing=True)  # varlen's flash kernel has no fp32: sdpa, no graphs
    assert fp32_plan.attention == "sdpa" and not fp32_plan.cuda_graphs
    with pytest.raises(ChatforgeError, match="bf16 or fp16"):
        fp32(memory_budget_gib=8, attention="varlen")
    unpacked = plan(device="cuda", method="lora", packing=False, compile=False)
    assert unpacked.cuda_graphs and unpacked.attention == "varlen"  # each sample a segment: no padding mask
    assert plan(device="cuda", method="lora", packing=False, compile=False, cuda_graphs=False).attention == "sdpa"
    assert not plan(device="cuda", method="full", packing=True).cuda_graphs  # kept gradients: the model's size
    assert not plan(device="cpu", method="lora", packing=True).cuda_graphs
    assert not plan(device="cuda", method="qlora", packing=True).cuda_graphs  # asked for only: no measured gain
    with pytest.raises(ChatforgeError, match="cuda_graphs"):
        plan(device="cpu", method="lora", packing=True, cuda_graphs=True)
    monkeypatch.setattr(speed_plan, "varlen_available", lambda: False)  # padding masks would sync: no graphs
    assert not plan(device="cuda", method="lora", packing=False).cuda_graphs
    assert build(TrainConfig, {"cuda_graphs": False}, "r").cuda_graphs is False


def test_varlen_is_planned_only_for_attention_it_computes(monkeypatch):
    """Gemma 3's local layers (a sliding window shorter than the rows) and Gemma 2's logit softcapping attend
    through sdpa, whose masks transformers builds with the window; a window as long as the rows changes nothing."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    from chatforge.training import speed_plan

    monkeypatch.setattr(speed_plan, "varlen_available", lambda: True)
    tiny = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)
    tiny.update(num_key_value_heads=2, head_dim=16)
    gemma3 = Gemma3ForCausalLM(Gemma3TextConfig(**tiny, sliding_window=32)).to(torch.bfloat16)
    gemma2 = Gemma2ForCausalLM(Gemma2Config(**tiny, sliding_window=4096)).to(torch.bfloat16)
    for model, seq, what in ((gemma3, 64, "sliding window of 32"), (gemma2, 64, "softcapping")):
        plan = functools.partial(make_plan, model, device="cuda", method="lora", seq=seq, global_batch=4)
        chosen = plan(memory_budget_gib=8, packing=True)
        assert chosen.attention == "sdpa" and not chosen.cuda_graphs
        with pytest.raises(ChatforgeError, match=what):
            plan(memory_budget_gib=8, attention="varlen")
    long_rows = make_plan(
        gemma3, device="cuda", method="lora", seq=32, global_batch=4, memory_budget_gib=8, packing=True
    )
    assert long_rows.attention == "varlen" and long_rows.cuda_graphs


def test_micro_batch_graphs_fall_back_to_eager_steps_with_the_same_gradients():
    """Where no graph can be captured (here: no CUDA) the steps run eagerly, accumulating into the kept
    gradients exactly as the trainer's plain loop does, step after step (the optimizer sets .grad to None)."""
    from chatforge.training import parallel
    from chatforge.training.graphs import MicroBatchGraphs
    from chatforge.training.trainer import accumulate

    model = tiny_llama()
    params = [p for p in model.parameters() if p.requires_grad]
    engine = functools.partial(loss_sum, model, plan=Plan())
    g = torch.Generator().manual_seed(3)
    batches = [
        {
            "input_ids": (ids := torch.randint(0, 300, (2, 16), generator=g)),
            "labels": ids.clone(),
            "attention_mask": None,
        }
        for _ in range(3)
    ]
    graphs = MicroBatchGraphs(engine, params, model)
    for step in range(2):
        accumulate(engine, batches, 40, parallel.Parallel())
        want = [p.grad.clone() for p in params]
        model.zero_grad(set_to_none=True)
        total = graphs.accumulate(batches, 40)
        assert graphs.status().startswith("eager: capture failed (") and not graphs.graphs
        assert all(p.grad is kept for p, kept in zip(params, graphs.grads))
        for p, w in zip(params, want):
            assert torch.allclose(p.grad, w, rtol=1e-5, atol=1e-7), step
        assert float(total) == pytest.approx(sum(float(engine(b)[0].detach()) for b in batches), rel=1e-5)
        model.zero_grad(set_to_none=True)


def test_dynamic_rope_is_captured_as_plain_rope_within_its_original_context():
    from chatforge.training.graphs import plain_rope

    model = tiny_llama(1, max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0}).eval()
    ids = torch.randint(0, 300, (2, 48))
    want = model(input_ids=ids).logits
    rope = model.model.rotary_emb
    with plain_rope(model, 48):
        assert rope.rope_type == "default"
        assert torch.equal(model(input_ids=ids).logits, want)
    assert "dynamic" in rope.rope_type
    with pytest.raises(RuntimeError, match="original context"), plain_rope(model, 65):
        pass
