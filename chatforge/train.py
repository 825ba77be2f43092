"""The training recipe: LoRA / QLoRA / full fine-tuning, read top to bottom.

Own loop rather than Hugging Face's Trainer: the loss is summed over trained tokens and divided
by the trained-token count of the whole optimizer step, so micro-batching and accumulation
never change the result; the data order is a pure function of (seed, step), so a run killed at
any moment resumes from its last checkpoint to the same weights.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import yaml

from . import data as data_mod
from .config import TrainConfig, to_dict
from .files import ChatforgeError, append_jsonl, atomic_path, read_jsonl, write_jsonl, write_text
from .models import load_model, load_tokenizer, resolve

STATE_FILE = "trainer_state.pt"


# ---------------------------------------------------------------- model

def build_model(cfg: TrainConfig, device: str):
    """The model to train: base weights frozen with LoRA adapters, or all weights trainable."""
    quant = None
    if cfg.method == "qlora":
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ChatforgeError("method qlora needs bitsandbytes: pip install bitsandbytes") from None
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    model = load_model(cfg.model, dtype=cfg.dtype, device=device, quantization_config=quant)
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg.method == "full":
        model.train()
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at random
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.peft_config["default"].base_model_name_or_path = model_reference(cfg.model)
    model.train()
    return model


def model_reference(spec: str) -> str:
    """How an adapter names its base: aliases stay aliases, paths become absolute."""
    src = resolve(spec)
    return spec if src.gguf_file and not Path(spec).exists() else str(Path(spec).resolve())


def save_weights(model, folder: Path, tokenizer=None) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


# ---------------------------------------------------------------- data order

class StepSampler:
    """Which samples each optimizer step uses: a seeded permutation per epoch, indexed by step."""

    def __init__(self, n: int, per_step: int, seed: int):
        self.n, self.per_step, self.seed = n, per_step, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            order = list(range(self.n))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._perms = {epoch: order}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        start = step * self.per_step
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.per_step)]


def total_steps(cfg: TrainConfig, n_samples: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_samples / (cfg.batch_size * cfg.grad_accum)))


def lr_lambda(cfg: TrainConfig, steps: int):
    warmup = int(cfg.warmup_ratio * steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.lr_scheduler == "constant":
            return 1.0
        progress = (step - warmup) / max(1, steps - warmup)
        if cfg.lr_scheduler == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# ---------------------------------------------------------------- loss

def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over trained tokens (labels != IGNORE), and their count."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                             ignore_index=data_mod.IGNORE, reduction="sum")
    return loss, int((labels != data_mod.IGNORE).sum())


# ---------------------------------------------------------------- checkpoints

def checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, tokenizer, keep: int) -> Path:
    final = run_dir / f"checkpoint-{step}"
    with atomic_path(final, is_dir=True) as tmp:
        save_weights(model, tmp, tokenizer)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / STATE_FILE)
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer, scheduler, method: str) -> int:
    from safetensors.torch import load_file

    if method == "full":
        weights = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            weights.update(load_file(f))
        model.load_state_dict(weights, strict=False)  # tied heads are absent from the files
    else:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    state = torch.load(ckpt / STATE_FILE, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return int(state["step"])


# ---------------------------------------------------------------- samples and plots

def write_samples(run_dir: Path, step: int, model, tokenizer, cfg: TrainConfig) -> None:
    """Answers to the recipe's fixed prompts (XTuner's evaluation_inputs), kept per step."""
    if not cfg.eval_prompts:
        return
    from .generate import generate_batch

    was_training = model.training
    model.eval()
    model.config.use_cache = True
    convs = [([{"role": "system", "content": cfg.system}] if cfg.system else []) + [{"role": "user", "content": p}]
             for p in cfg.eval_prompts]
    replies = generate_batch(model, tokenizer, convs, max_new_tokens=cfg.eval_max_new_tokens)
    model.config.use_cache = False
    model.train(was_training)
    path = run_dir / "samples.jsonl"
    rows = [r for r in (read_jsonl(path) if path.exists() else []) if r["step"] != step]
    rows += [{"step": step, "prompt": p, "reply": r} for p, r in zip(cfg.eval_prompts, replies)]
    write_jsonl(path, rows)
    lines = ["# Sample answers (step 0 = before training)\n"]
    for s in sorted({r["step"] for r in rows}):
        lines.append(f"\n## step {s}\n\n| prompt | reply |\n|---|---|\n")
        lines += [f"| {r['prompt']} | {r['reply'].replace(chr(10), ' ').replace('|', '/')} |\n"
                  for r in rows if r["step"] == s]
    write_text(run_dir / "samples.md", "".join(lines))


def plot_loss(run_dir: Path) -> None:
    from .plots import loss_curve

    rows = read_jsonl(run_dir / "log.jsonl")
    if rows:
        loss_curve(rows, run_dir / "loss.png", title=f"training loss — {run_dir.name}")


# ---------------------------------------------------------------- the recipe

def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune as the recipe says; returns the folder of the final weights (adapter or model).

    Raises:
        ChatforgeError: bad data, a missing model, or --resume without a checkpoint.
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_dir = Path(cfg.output_dir)
    if not resume and checkpoints(run_dir):
        raise ChatforgeError(f"{run_dir} already holds checkpoints: pass --resume to continue, "
                             f"or choose another output_dir")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    # 1. data: read, render, mask, check lengths (errors name file and line) before any output
    tokenizer = load_tokenizer(cfg.model)
    samples, stats = data_mod.build_dataset(cfg, tokenizer)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False))
    stats["samples"] = len(samples)
    write_text(run_dir / "data_stats.json", json.dumps(stats, ensure_ascii=False, indent=2))

    # 2. model, optimizer, schedule
    model = build_model(cfg, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device == "cuda")
    steps = total_steps(cfg, len(samples))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    sampler = StepSampler(len(samples), cfg.batch_size * cfg.grad_accum, cfg.seed)

    # 3. resume or start
    step = 0
    log_path = run_dir / "log.jsonl"
    if resume and checkpoints(run_dir):
        step = load_checkpoint(checkpoints(run_dir)[-1], model, optimizer, scheduler, cfg.method)
        kept = [r for r in read_jsonl(log_path) if r.get("step", 0) <= step] if log_path.exists() else []
        write_jsonl(log_path, kept)  # drop lines logged after the checkpoint the run died past
    elif resume:
        raise ChatforgeError(f"--resume: no checkpoint in {run_dir}")
    else:
        log_path.unlink(missing_ok=True)
        write_samples(run_dir, 0, model, tokenizer, cfg)

    # 4. the loop
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=step, desc="train", unit="step", disable=not progress, dynamic_ncols=True)
    start, tokens_seen = time.perf_counter(), 0
    while step < steps:
        idx = sampler.indices(step)
        micro = [[samples[i] for i in idx[k:k + cfg.batch_size]] for k in range(0, len(idx), cfg.batch_size)]
        batches = [{k: v.to(device) for k, v in data_mod.collate(m, pad).items()} for m in micro]
        n_trained = sum(int((b["labels"][:, 1:] != data_mod.IGNORE).sum()) for b in batches)
        total = 0.0
        for b in batches:
            loss_sum, _ = token_loss_sum(model, b)
            (loss_sum / max(1, n_trained)).backward()
            total += loss_sum.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else None
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += sum(int(b["attention_mask"].sum()) for b in batches)
        elapsed = time.perf_counter() - start
        row = {"step": step, "loss": round(total / max(1, n_trained), 6), "lr": scheduler.get_last_lr()[0],
               "tokens": tokens_seen, "tokens_per_s": round(tokens_seen / elapsed, 1),
               "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
               "elapsed_s": round(elapsed, 2)}
        if step % cfg.log_every == 0 or step == steps:
            append_jsonl(log_path, row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if (cfg.save_every and step % cfg.save_every == 0) or step == steps:
            save_checkpoint(run_dir, step, model, optimizer, scheduler, tokenizer, cfg.keep_checkpoints)
            write_samples(run_dir, step, model, tokenizer, cfg)
            plot_loss(run_dir)
    bar.close()

    # 5. final weights, directly loadable (PEFT adapter or a full model)
    final = run_dir / ("model" if cfg.method == "full" else "adapter")
    with atomic_path(final, is_dir=True) as tmp:
        save_weights(model, tmp, tokenizer)
    plot_loss(run_dir)
    return final
