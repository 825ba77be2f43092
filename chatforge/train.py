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
from . import distributed
from . import fastpath
from .config import TrainConfig, to_dict
from .files import ChatforgeError, append_jsonl, atomic_path, read_jsonl, write_jsonl, write_text
from .models import load_model, load_tokenizer, resolve
from .profiling import StepProfiler

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
    if cfg.method == "full":
        model.train()
        return fastpath.apply(model, fastpath.plan_for_recipe(model, cfg, device))
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at random
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.peft_config["default"].base_model_name_or_path = model_reference(cfg.model)
    model.train()
    return fastpath.apply(model, fastpath.plan_for_recipe(model, cfg, device))


def model_reference(spec: str) -> str:
    """How an adapter names its base: aliases stay aliases, paths become absolute."""
    src = resolve(spec)
    return spec if src.gguf_file and not Path(spec).exists() else str(Path(spec).resolve())


def save_weights(model, folder: Path, tokenizer=None, state_dict: dict | None = None) -> None:
    extra = {} if state_dict is None else {"state_dict": state_dict}  # gathered from sharded ranks
    if hasattr(model, "peft_config"):
        extra["save_embedding_layers"] = False  # LoRA never touches the vocabulary here
    model.save_pretrained(folder, safe_serialization=True, **extra)
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

def token_loss_sum(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over trained tokens (labels != IGNORE), and their count.

    fastpath.loss_sum: the full logits are never materialised (chunked linear + CE), packed batches
    stay within their samples."""
    return fastpath.loss_sum(model, batch)


def accumulate(engine, batches: list, n_trained: int, par: distributed.Parallel) -> torch.Tensor:
    """Forward and backward of one step's micro-batches, gradients scaled by the step's trained-token
    count; returns the summed loss as a tensor (no GPU sync)."""
    losses = []
    for i, b in enumerate(batches):
        with par.no_sync(engine, last=i == len(batches) - 1):
            loss_sum, _ = engine(b)
            par.backward(loss_sum / max(1, n_trained))
        losses.append(loss_sum.detach())
    return torch.stack(losses).sum()


# ---------------------------------------------------------------- checkpoints

def checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, tokenizer, keep: int,
                    par: distributed.Parallel | None = None) -> Path:
    """Every rank calls it (sharded weights and optimizer state are gathered); rank 0 writes.

    The optimizer state is keyed by parameter name, so a checkpoint of N ranks resumes on M.
    """
    par = par or distributed.Parallel()
    final = run_dir / f"checkpoint-{step}"
    weights = par.full_state_dict(model)
    optim = par.optimizer_state(model, optimizer)
    par.save_engine_state(run_dir / "deepspeed", f"step{step}")
    if par.is_main:
        with atomic_path(final, is_dir=True) as tmp:
            save_weights(model, tmp, tokenizer, state_dict=weights)
            torch.save({"step": step, "optimizer": optim, "optimizer_format": "fqn", "world_size": par.world,
                        "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}, tmp / STATE_FILE)
        for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(run_dir / "deepspeed" / f"step{old.name.split('-')[1]}", ignore_errors=True)
    par.barrier()
    return final


def load_training_state(ckpt: Path, model, optimizer, scheduler, par: distributed.Parallel | None = None) -> int:
    """Optimizer, schedule and random state of a checkpoint (after load_weights and wrapping); its step."""
    par = par or distributed.Parallel()
    state = torch.load(ckpt / STATE_FILE, weights_only=False, mmap=True)  # mmap: ranks > 0 never read moments
    if par.engine is not None:
        if not par.load_engine_state(ckpt.parent / "deepspeed", f"step{state['step']}", state.get("world_size", 1)):
            import logging
            logging.getLogger(__name__).warning(
                "DeepSpeed state of %s was written by %s ranks (or is missing): weights resume, "
                "optimizer moments restart", ckpt, state.get("world_size"))
    elif state.get("optimizer_format") == "fqn":
        par.load_optimizer_state(model, optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    random.setstate(state["python_rng"])
    return int(state["step"])


def load_weights(ckpt: Path, model, method: str) -> None:
    """A checkpoint's weights into the (not yet wrapped) model."""
    from safetensors.torch import load_file

    if method == "full":
        weights = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            weights.update(load_file(f))
        model.load_state_dict(weights, strict=False)  # tied heads are absent from the files
    else:
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))


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
    with fastpath.eager():  # compiled layers are for training shapes
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

def _prepare(cfg: TrainConfig, tokenizer, run_dir: Path, resume: bool) -> list:
    """1. data: read, render, mask, check lengths (errors name file and line) before any output."""
    if not resume and checkpoints(run_dir):
        raise ChatforgeError(f"{run_dir} already holds checkpoints: pass --resume to continue, "
                             f"or choose another output_dir")
    samples, stats = data_mod.build_dataset(cfg, tokenizer)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False))
    stats["samples"] = len(samples)
    if cfg.packing:  # the training unit becomes a packed sequence of several samples
        samples = list(data_mod.pack(samples, cfg.max_length, open_bins=256))
        stats["packed_sequences"] = len(samples)
    write_text(run_dir / "data_stats.json", json.dumps(stats, ensure_ascii=False, indent=2))
    return samples


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune as the recipe says; returns the folder of the final weights (adapter or model).

    Raises:
        ChatforgeError: bad data, a missing model, or --resume without a checkpoint.
    """
    fastpath.setup_allocator()  # before CUDA starts
    par = distributed.setup(cfg)  # this process's rank under torchrun / srun; one process: no-op
    device = par.device
    run_dir = Path(cfg.output_dir)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.chat_template)
    samples = par.on_main(lambda: _prepare(cfg, tokenizer, run_dir, resume))  # tokenised once, sent to all ranks

    # 2. model, optimizer, schedule
    share = len(par.shard(list(range(cfg.batch_size * cfg.grad_accum))))  # this rank's samples per step
    model = build_model(par.plan_config(cfg, share), device)  # speed plan for this rank's share of the step
    if par.is_main:
        write_text(run_dir / "speed_plan.json", json.dumps(fastpath.asdict(model._chatforge_plan), indent=2))
    ckpt = checkpoints(run_dir)[-1] if resume and checkpoints(run_dir) else None
    if ckpt is not None:
        load_weights(ckpt, model, cfg.method)  # before wrapping: FSDP2 shards what is loaded
    engine = par.wrap(model, token_loss_sum)  # DDP / FSDP2 around model + loss; one process: the loss itself
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = fastpath.make_optimizer(params, cfg.lr, cfg.weight_decay, device)
    steps = total_steps(cfg, len(samples))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps))
    sampler = StepSampler(len(samples), cfg.batch_size * cfg.grad_accum, cfg.seed)  # indices of the global step
    mb = min(share, fastpath.micro_batch_of(model, cfg.batch_size))
    engine, optimizer = par.wrap_optimizer(engine, optimizer, cfg, mb, math.ceil(share / mb))  # DeepSpeed

    # 3. resume or start
    step = 0
    log_path = run_dir / "log.jsonl"
    if ckpt is not None:
        step = load_training_state(ckpt, model, optimizer, scheduler, par)
        if par.is_main:
            kept = [r for r in read_jsonl(log_path) if r.get("step", 0) <= step] if log_path.exists() else []
            write_jsonl(log_path, kept)  # drop lines logged after the checkpoint the run died past
    elif resume:
        raise ChatforgeError(f"--resume: no checkpoint in {run_dir}")
    elif par.is_main:
        log_path.unlink(missing_ok=True)
        if par.can_generate:
            write_samples(run_dir, 0, model, tokenizer, cfg)

    # 4. the loop
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=step, desc="train", unit="step", disable=not (progress and par.is_main),
               dynamic_ncols=True)
    start, tokens_seen = time.perf_counter(), 0
    profiler = StepProfiler(run_dir, cfg.profile_steps, par.rank)  # recipe key profile_steps; 0: off
    collate = data_mod.collate_packed if cfg.packing else data_mod.collate

    def prepare(step: int) -> tuple[list, int, int]:
        """This rank's share of a step (no overlap with the others) in micro-batches sized for the
        memory budget, on the device; the whole step's trained and real token counts. Every rank
        counts all ranks' samples on the CPU (padding adds nothing), so no collective waits for the GPU."""
        every = sampler.indices(step)
        idx = par.shard(every)
        mb = fastpath.micro_batch_of(model, cfg.batch_size)
        cpu = [collate([samples[i] for i in idx[k:k + mb]], pad) for k in range(0, len(idx), mb)]
        counted = [collate([samples[i] for i in every], pad)] if par.world > 1 else cpu
        return ([data_mod.to_device(b, device) for b in cpu], sum(map(data_mod.trained_tokens, counted)),
                sum(map(data_mod.batch_tokens, counted)))

    def report(done: int, total, grad_norm, n_trained: int, step_tokens: int, lr: float) -> None:
        """Log a queued step: reading its loss waits for the GPU to finish that step."""
        nonlocal tokens_seen
        total, = par.all_sum(float(total))
        tokens_seen += int(step_tokens)
        elapsed = time.perf_counter() - start
        row = {"step": done, "loss": round(total / max(1, n_trained), 6), "lr": lr,
               "tokens": tokens_seen, "tokens_per_s": round(tokens_seen / elapsed, 1),
               "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
               "elapsed_s": round(elapsed, 2)}
        if par.is_main and (done % cfg.log_every == 0 or done == steps):
            append_jsonl(log_path, row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)

    ready = prepare(step) if step < steps else None
    queued = None  # the step before: logged once this one is queued, so the GPU never waits for the CPU
    while step < steps:
        profiler.before(step)
        batches, n_trained, step_tokens = ready
        total = accumulate(engine, batches, n_trained, par)  # queued on the GPU, not waited for
        grad_norm = par.step(optimizer, params, cfg.max_grad_norm)  # clip, step, zero (DeepSpeed: its own)
        scheduler.step()
        ready = prepare(step + 1) if step + 1 < steps else None  # on the CPU while the GPU runs this step
        if queued is not None:
            report(*queued)  # the first wait for the GPU: for the step before, while this one runs
        step += 1
        queued = (step, total, grad_norm, n_trained, step_tokens, scheduler.get_last_lr()[0])
        profiler.after(step)
        if (cfg.save_every and step % cfg.save_every == 0) or step == steps:
            report(*queued)
            queued = None
            save_checkpoint(run_dir, step, model, optimizer, scheduler, tokenizer, cfg.keep_checkpoints, par)
            if par.is_main:
                if par.can_generate:
                    write_samples(run_dir, step, model, tokenizer, cfg)
                plot_loss(run_dir)
    bar.close()

    # 5. final weights, directly loadable (PEFT adapter or a full model)
    final = run_dir / ("model" if cfg.method == "full" else "adapter")
    weights = par.full_state_dict(model)  # gathered on rank 0 when sharded
    if par.is_main:
        with atomic_path(final, is_dir=True) as tmp:
            save_weights(model, tmp, tokenizer, state_dict=weights)
        plot_loss(run_dir)
    par.barrier()
    par.close()
    return final
