"""The training recipe: LoRA / QLoRA / full fine-tuning, read top to bottom.

Own loop rather than Hugging Face's Trainer: the loss is summed over trained tokens and divided
by the trained-token count of the whole optimizer step, so micro-batching and accumulation
never change the result; the data order is a pure function of (seed, step), so a run killed at
any moment resumes from its last checkpoint to the same weights.

`Trainer` is the one training code path: `chatforge train` runs `Trainer(cfg).setup().fit()`, and
bench/train_speed.py runs the same object on its own model and samples.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file
from tqdm.auto import tqdm

from chatforge.config import COMPUTE_KEYS, TrainConfig, to_dict
from chatforge.data import dataset
from chatforge.files import (
    ChatforgeError,
    append_jsonl,
    atomic_path,
    free_gib,
    read_jsonl,
    remove_stale_temps,
    write_jsonl,
    write_text,
)
from chatforge.host_copy import copy_to_host
from chatforge.inference.generate import generate_batch
from chatforge.models.load import load_model, load_tokenizer, resolve
from chatforge.plots import loss_curve
from chatforge.training import graphs, parallel, patches, speed_plan
from chatforge.training.loss import loss_rows, loss_sum, rows_cap
from chatforge.training.profiling import RunMeter, StepProfiler

STATE_FILE = "trainer_state.pt"
log = logging.getLogger("chatforge")


# ---------------------------------------------------------------- model


def build_model(cfg: TrainConfig, device: str):
    """The model to train, before its speed plan: base weights frozen with LoRA adapters (NF4 under
    QLoRA), or all weights trainable.

    Raises:
        ChatforgeError: qlora without bitsandbytes, or a model that cannot be loaded.
    """
    quant = None
    if cfg.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ChatforgeError("method qlora needs bitsandbytes: pip install bitsandbytes") from None
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
        )
    model = load_model(cfg.model, dtype=cfg.dtype, device=device, quantization_config=quant)
    model.config.use_cache = False
    if cfg.method != "full":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(cfg.seed)  # LoRA A matrices are drawn at random
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        model.peft_config["default"].base_model_name_or_path = model_reference(cfg.model)
    model.train()
    return model


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


def make_optimizer(params, lr: float, weight_decay: float, device: str):
    """AdamW, fused on CUDA (one kernel for all parameters)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device == "cuda")


def token_loss_sum(model, batch: dict, plan: speed_plan.Plan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy over trained tokens (labels != IGNORE), and their count.

    loss_sum: the full logits are never materialised (chunked linear + CE), packed batches
    stay within their samples."""
    return loss_sum(model, batch, plan)


def accumulate(engine, batches: list, n_trained: int, par: parallel.Parallel) -> torch.Tensor:
    """Forward and backward of one step's micro-batches, gradients scaled by the step's trained-token
    count; returns the summed loss as a tensor (no GPU sync)."""
    losses = []
    for i, b in enumerate(batches):
        with par.no_sync(engine, last=i == len(batches) - 1):
            loss_sum, _ = engine(b)
            par.backward(loss_sum / max(1, n_trained))
        losses.append(loss_sum.detach())
    return torch.stack(losses).sum()


def read_later(values: list) -> Callable[[], list[float | None]]:
    """A function that returns `values` (scalar tensors, numbers or None) as floats; CUDA tensors are
    copied now, read without waiting for the steps queued after (chatforge/host_copy.py)."""
    cuda = [i for i, v in enumerate(values) if isinstance(v, torch.Tensor) and v.is_cuda]
    wait = copy_to_host(torch.stack([values[i].detach().double().reshape(()) for i in cuda])) if cuda else None

    def read() -> list[float | None]:
        out = list(values)
        for j, i in enumerate(cuda):
            out[i] = wait()[j]
        return [None if v is None else float(v) for v in out]

    return read


# ---------------------------------------------------------------- checkpoints

CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (`checkpoint-<step>` folders with a state file), oldest first;
    other folders (`checkpoint-12.bak`, `checkpoint-9-old`) are not checkpoints."""
    found = [p for p in run_dir.glob("checkpoint-*") if CHECKPOINT.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resume_settings(cfg: TrainConfig) -> dict:
    full = to_dict(cfg)
    return {k: full[k] for k in COMPUTE_KEYS}


@contextlib.contextmanager
def write_weights_folder(final: Path, keep: int = 0):
    """atomic_path for a checkpoint or the final weights; a failed write (a full disk) names the folder,
    the free space and the last good checkpoint, which stays."""
    try:
        with atomic_path(final, is_dir=True) as tmp:
            yield tmp
    except (OSError, RuntimeError) as e:
        last = checkpoints(final.parent)
        two = " (keep_checkpoints=1 needs room for two checkpoints while the next one is written)" if keep == 1 else ""
        raise ChatforgeError(
            f"could not write {final}: {str(e).splitlines()[0]}; {free_gib(final.parent):.1f} GiB free "
            f"there{two}; the last good checkpoint is {last[-1] if last else 'none'}"
        ) from None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    tokenizer,
    keep: int,
    par: parallel.Parallel | None = None,
    settings: dict | None = None,
) -> Path:
    """Every rank calls it (sharded weights and optimizer state are gathered); rank 0 writes.

    The optimizer state is keyed by parameter name, so a checkpoint of N ranks resumes on M. The state
    file holds tensors, numbers and strings only (it is read back with weights_only=True).

    Raises:
        ChatforgeError: the folder could not be written (full disk); older checkpoints stay.
    """
    par = par or parallel.Parallel()
    final = run_dir / f"checkpoint-{step}"
    weights = par.full_state_dict(model)
    optim = par.optimizer_state(model, optimizer)
    par.save_engine_state(run_dir / "deepspeed", f"step{step}")
    if par.is_main:
        with write_weights_folder(final, keep) as tmp:
            save_weights(model, tmp, tokenizer, state_dict=weights)
            torch.save(
                {
                    "step": step,
                    "optimizer": optim,
                    "optimizer_format": "fqn",
                    "world_size": par.world,
                    "scheduler": scheduler.state_dict(),
                    "settings": settings,
                    "torch_rng": torch.get_rng_state(),
                    "python_rng": random.getstate(),
                },
                tmp / STATE_FILE,
            )
        for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(run_dir / "deepspeed" / f"step{old.name.split('-')[1]}", ignore_errors=True)
    par.barrier()
    return final


def read_state(ckpt: Path) -> dict:
    """A checkpoint's trainer state, loaded without running code from the file.

    Raises:
        ChatforgeError: the file holds other objects than tensors, numbers and strings, or is unreadable.
    """
    path = ckpt / STATE_FILE
    try:
        return torch.load(path, weights_only=True, mmap=True)  # mmap: ranks > 0 never read the moments
    except pickle.UnpicklingError as e:
        raise ChatforgeError(
            f"{path}: refusing to load it: it holds objects other than tensors, numbers and "
            f"strings ({str(e).splitlines()[-1][:200]})"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ChatforgeError(f"{path}: unreadable trainer state ({str(e).splitlines()[0][:200]})") from None


def check_settings(state: dict, cfg: TrainConfig, ckpt: Path) -> None:
    """Raises ChatforgeError when the recipe's COMPUTE_KEYS differ from the checkpoint's."""
    saved = state.get("settings")
    if not saved:  # a checkpoint written before settings were stored
        return
    now = resume_settings(cfg)
    changed = [k for k in COMPUTE_KEYS if k in saved and saved[k] != now[k]]
    if changed:
        diff = "; ".join(f"{k}: {saved[k]!r} -> {now[k]!r}" for k in changed)
        raise ChatforgeError(
            f"--resume: the recipe differs from {ckpt.name}'s ({diff}); resume with the same "
            f"recipe, or pass --allow-changes to continue with the new values"
        )


def load_training_state(
    state: dict, ckpt: Path, model, optimizer, scheduler, par: parallel.Parallel | None = None
) -> int:
    """Optimizer, schedule and random state of a checkpoint (after load_weights and wrapping); its step."""
    par = par or parallel.Parallel()
    if par.engine is not None:
        if not par.load_engine_state(ckpt.parent / "deepspeed", f"step{state['step']}", state.get("world_size", 1)):
            log.warning(
                "DeepSpeed state of %s was written by %s ranks (or is missing): weights resume, "
                "optimizer moments restart",
                ckpt,
                state.get("world_size"),
            )
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

    if method == "full":
        weights = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            weights.update(load_file(f))
        model.load_state_dict(weights, strict=False)  # tied heads are absent from the files
    else:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))


# ---------------------------------------------------------------- samples and plots


def write_samples(run_dir: Path, step: int, model, tokenizer, cfg: TrainConfig, plan: speed_plan.Plan) -> None:
    """Answers to the recipe's fixed prompts (XTuner's evaluation_inputs), kept per step."""
    if not cfg.eval_prompts:
        return

    was_training = model.training
    model.eval()
    model.config.use_cache = True
    convs = [
        ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [{"role": "user", "content": p}]
        for p in cfg.eval_prompts
    ]
    with patches.inference(model, plan):  # eager layers, and the training dtypes (bf16 autocast on a GPU)
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
        lines += [
            f"| {r['prompt']} | {r['reply'].replace(chr(10), ' ').replace('|', '/')} |\n"
            for r in rows
            if r["step"] == s
        ]
    write_text(run_dir / "samples.md", "".join(lines))


def plot_loss(run_dir: Path) -> None:

    rows = read_jsonl(run_dir / "log.jsonl")
    if rows:
        loss_curve(rows, run_dir / "loss.png", title=f"training loss — {run_dir.name}")


# ---------------------------------------------------------------- the recipe


def _prepare(cfg: TrainConfig, tokenizer, run_dir: Path, resume: bool) -> list:
    """Data: read, render, mask, check lengths (errors name file and line) before any output; packed
    into max_length sequences when the recipe packs."""
    if not resume and checkpoints(run_dir):
        raise ChatforgeError(
            f"{run_dir} already holds checkpoints: pass --resume to continue, or choose another output_dir"
        )
    samples, stats = dataset.build_dataset(cfg, tokenizer)
    write_config(cfg, run_dir)
    stats["samples"] = len(samples)
    if cfg.packing:  # the training unit becomes a packed sequence of several samples
        samples = list(dataset.pack(samples, cfg.max_length, open_bins=256))
        stats["packed_sequences"] = len(samples)
    write_text(run_dir / "data_stats.json", json.dumps(stats, ensure_ascii=False, indent=2))
    return samples


def write_config(cfg: TrainConfig, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), allow_unicode=True, sort_keys=False))


class Trainer:
    """One run of a recipe, in the order it happens.

    setup() reads the data, builds the model, its speed plan, the optimizer and the schedule, and
    resumes from a checkpoint; step() queues one optimizer step on the device; fit() runs all steps
    with logging, checkpoints and samples, then saves the final weights.

    Args:
        cfg: the recipe.
        resume: continue from the run folder's last checkpoint.
        progress: show a progress bar.
        model: train this model instead of loading `cfg.model` (made as build_model makes it).
        samples: train on these units (Samples, or packed lists of them) instead of reading `cfg.data`.
        allow_changes: resume although recipe keys that change training differ from the checkpoint's.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        resume: bool = False,
        progress: bool = True,
        model=None,
        samples: list | None = None,
        allow_changes: bool = False,
    ):
        self.cfg, self.resume, self.progress, self.allow_changes = cfg, resume, progress, allow_changes
        self.model, self.samples = model, samples
        self.step_no, self.history, self.metrics = 0, [], {}

    def setup(self) -> Trainer:
        """Raises:
        ChatforgeError: bad data, a missing model, or --resume without a checkpoint.
        """
        cfg = self.cfg
        par = self.par = parallel.setup(cfg)  # this process's rank under torchrun / srun; one process: no-op
        self.device, self.run_dir = par.device, Path(cfg.output_dir)
        if par.is_main and remove_stale_temps(self.run_dir):
            log.info("removed unfinished writes of an earlier run in %s", self.run_dir)
        self.ckpt = checkpoints(self.run_dir)[-1] if self.resume and checkpoints(self.run_dir) else None
        self.state = read_state(self.ckpt) if self.ckpt is not None else None
        if self.state is not None and not self.allow_changes:
            check_settings(self.state, cfg, self.ckpt)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.tokenizer = load_tokenizer(cfg.model, cfg.chat_template) if self.samples is None else None
        if self.samples is None:  # tokenised once, sent to all ranks
            self.samples = par.on_main(lambda: _prepare(cfg, self.tokenizer, self.run_dir, self.resume))
        elif par.is_main:
            write_config(cfg, self.run_dir)
        units = self.samples
        self.real = [dataset.real_tokens(u) for u in units]  # counted once, on the CPU
        self.trained = [dataset.trained_count(u) for u in units]
        self.max_segments = max(len(u) if isinstance(u, list) else 1 for u in units) + 1  # + a padding tail
        self.steps = total_steps(cfg, len(units))

        # the model and its speed plan, for this rank's share of a step
        share = len(par.shard(list(range(cfg.batch_size * cfg.grad_accum))))
        plan_cfg = par.plan_config(cfg, share)
        if self.model is None:
            self.model = build_model(plan_cfg, self.device)
        run_tokens = self.steps * cfg.batch_size * cfg.grad_accum * sum(self.real) / len(units)
        widest = self.padded_width(self.real)  # the memory plan budgets for the run's widest row
        self.plan = speed_plan.plan_for_recipe(self.model, plan_cfg, self.device, run_tokens, seq=widest)
        patches.apply(self.model, self.plan)
        if par.is_main:
            write_text(self.run_dir / "speed_plan.json", json.dumps(dataclasses.asdict(self.plan), indent=2))

        # optimizer and schedule, after a checkpoint's weights (FSDP2 shards what is loaded)
        ckpt = self.ckpt
        if ckpt is not None:
            load_weights(ckpt, self.model, cfg.method)
        self.engine = par.wrap(
            self.model, functools.partial(token_loss_sum, plan=self.plan)
        )  # DDP / FSDP2 around model + loss; one process: the loss
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        parts = speed_plan.lm_parts(self.model) if self.plan.loss != "plain" else None
        self.rows_multiple = 0  # output-layer rows per batch in whole multiples of this (0: full logits, no rows)
        if parts is not None:
            chunk = self.plan.chunk_rows or speed_plan.default_chunk_rows(parts[1].weight.size(0))
            self.rows_multiple = chunk if self.plan.compile or self.plan.cuda_graphs else 1
        self.graphs = graphs.MicroBatchGraphs(self.engine, self.params, self.model) if self.plan.cuda_graphs else None
        optimizer = make_optimizer(self.params, cfg.lr, cfg.weight_decay, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, self.steps))
        self.sampler = StepSampler(len(units), cfg.batch_size * cfg.grad_accum, cfg.seed)  # indices of a global step
        self.micro_batch = min(share, self.plan.micro_batch or cfg.batch_size)
        self.engine, self.optimizer = par.wrap_optimizer(
            self.engine, optimizer, cfg, self.micro_batch, math.ceil(share / self.micro_batch)
        )  # DeepSpeed

        # resume or start
        self.log_path = self.run_dir / "log.jsonl"
        if ckpt is not None:
            self.step_no = load_training_state(self.state, ckpt, self.model, self.optimizer, self.scheduler, par)
            if par.is_main:  # a kill can tear the log's last line
                kept = (
                    [r for r in read_jsonl(self.log_path, torn_tail=True) if r.get("step", 0) <= self.step_no]
                    if self.log_path.exists()
                    else []
                )
                write_jsonl(self.log_path, kept)  # drop lines logged after the checkpoint the run died past
        elif self.resume:
            raise ChatforgeError(f"--resume: no checkpoint in {self.run_dir}")
        elif par.is_main:
            self.log_path.unlink(missing_ok=True)
        tok = self.tokenizer
        self.pad = 0 if tok is None else tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return self

    # -- one step

    def padded_width(self, lengths) -> int:
        """The width units of these real lengths pad to where shapes are fixed: packed rows exactly max_length,
        unpacked ones their longest's power-of-two bucket."""
        cfg = self.cfg
        return cfg.max_length if cfg.packing else dataset.bucket_width(max(lengths), cfg.max_length)

    def row_width(self, units: list) -> int | None:
        """The padded width of a micro-batch of these units (None: its fullest row). Compiled layers and CUDA
        graphs get few shapes (padded_width); so do unpacked eager ones on a GPU, where cuDNN's attention
        builds a plan for every new shape (~60 ms)."""
        if self.plan.compile or self.plan.cuda_graphs or (self.device != "cpu" and not self.cfg.packing):
            return self.padded_width(dataset.real_tokens(u) for u in units)
        return None

    def collate(self, units: list) -> dict:
        """A micro-batch on the CPU, `row_width` wide."""
        cfg, width = self.cfg, self.row_width(units)
        if cfg.packing:
            fixed = width is not None  # and a fixed count of attention segments
            batch = dataset.collate_packed(units, self.pad, width, len(units) * self.max_segments if fixed else None)
        elif self.plan.cuda_graphs and self.plan.attention == "varlen":
            # one sample per row, its padding tail a segment of its own: varlen attention needs no padding
            # mask, whose checks in transformers wait for the GPU (a graph cannot hold that)
            batch = dataset.collate_packed([[u] for u in units], self.pad, width, 2 * len(units))
        elif width is None:  # CPU, eager: a micro-batch in one row, samples kept apart: no padding
            batch = dataset.collate_packed([units], self.pad)  # to compute (the identity demo: 23% of its tokens)
        else:
            batch = dataset.collate(units, self.pad, width=width)
        if self.rows_multiple:  # the positions the output layer reads, in whole chunks where compiled
            rows = loss_rows(batch, self.rows_multiple)
            if rows is not None:
                batch["loss_rows"] = rows
        return batch

    def micro_batches(self, step: int) -> list[list[int]]:
        """The unit indices of this rank's micro-batches in `step`."""
        idx = self.par.shard(self.sampler.indices(step))
        if not self.cfg.packing:  # similar lengths in a micro-batch: less padding, the same step
            idx = sorted(idx, key=self.real.__getitem__)
        return [idx[k : k + self.micro_batch] for k in range(0, len(idx), self.micro_batch)]

    def capture_graphs(self) -> None:
        """Before the first timed step, capture a graph for every batch shape the run's micro-batches will
        have, so no capture interrupts the steps after warm-up: each (rows, width) and, within it, each count
        of output-layer rows (loss_rows; 3 on the medical recipe: 4,096, 5,120 or 6,144 of 8,192 packed
        positions). Counted on the CPU from the units' lengths and trained tokens; each capture runs the first
        micro-batch of its shape, with its loss rows cut or padded to each count."""
        if self.graphs is None or self.step_no >= self.steps:
            return
        shapes: dict[tuple, tuple[list, set]] = {}  # (rows, width) -> (first micro-batch, output-row counts)
        for step in range(self.step_no, self.steps):
            for mb in self.micro_batches(step):
                units = [self.samples[i] for i in mb]
                width = self.row_width(units)
                _, caps = shapes.setdefault((len(mb), width), (units, set()))
                if self.rows_multiple > 1:
                    caps.add(rows_cap(sum(self.trained[i] for i in mb), len(mb) * width, self.rows_multiple))
        variants = []
        for units, caps in shapes.values():
            batch = self.collate(units)
            for cap in sorted(caps) or [None]:
                b = {k: v for k, v in batch.items() if k != "loss_rows"}
                rows = loss_rows(batch, cap=cap) if cap else batch.get("loss_rows")
                if rows is not None:
                    b["loss_rows"] = rows
                variants.append(dataset.to_device(b, self.device))
        self.graphs.capture(variants)

    def prepare(self, step: int) -> tuple[list, int, int]:
        """This rank's share of a step (no overlap with the others) in micro-batches sized for the
        memory budget, on the device; the whole step's trained and real token counts. Every rank
        counts all ranks' samples on the CPU, so no collective waits for the GPU."""
        every = self.sampler.indices(step)
        cpu = [self.collate([self.samples[i] for i in mb]) for mb in self.micro_batches(step)]
        return (
            [dataset.to_device(b, self.device) for b in cpu],
            sum(self.trained[i] for i in every),
            sum(self.real[i] for i in every),
        )

    def step(self, ready: tuple[list, int, int]) -> tuple:
        """Queue one optimizer step on the device (nothing waits for it); returns what report() logs."""
        batches, n_trained, real = ready
        if self.graphs is not None:
            total = self.graphs.accumulate(batches, n_trained)
        else:
            total = accumulate(self.engine, batches, n_trained, self.par)
        grad_norm = self.par.step(self.optimizer, self.params, self.cfg.max_grad_norm)  # clip, step, zero
        self.scheduler.step()
        self.step_no += 1
        return self.step_no, read_later([total, grad_norm]), n_trained, real, self.scheduler.get_last_lr()[0]

    def report(self, queued: tuple) -> dict:
        """Log a queued step: reading its loss waits for the device to finish that step."""
        done, read, n_trained, real, lr = queued
        total, grad_norm = read()
        (total,) = self.par.all_sum(total)
        self.tokens_seen += int(real)
        elapsed = self.meter.step_done(self.tokens_seen)
        row = {
            "step": done,
            "loss": round(total / max(1, n_trained), 6),
            "lr": lr,
            "tokens": self.tokens_seen,
            "tokens_per_s": round(self.tokens_seen / elapsed, 1),
            "grad_norm": None if grad_norm is None else round(float(grad_norm), 4),
            "elapsed_s": round(elapsed, 2),
        }
        self.history.append(row)
        if self.par.is_main and (done % self.cfg.log_every == 0 or done == self.steps):
            append_jsonl(self.log_path, row)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        self.bar.update(1)
        return row

    # -- the run

    def fit(self, save: bool = True) -> Path | None:
        """Run every step; returns the folder of the final weights (PEFT adapter or a full model).

        Args:
            save: write checkpoints and the final weights (the speed bench times the steps alone).

        Raises:
            ChatforgeError: out of GPU memory (naming the keys that lower it).
        """

        cfg, par = self.cfg, self.par
        if self.step_no == 0 and par.is_main and par.can_generate and self.tokenizer is not None:
            write_samples(self.run_dir, 0, self.model, self.tokenizer, cfg, self.plan)  # before training
        self.bar = tqdm(
            total=self.steps,
            initial=self.step_no,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.progress and par.is_main),
        )
        self.tokens_seen, self.meter = 0, RunMeter(self.steps, self.step_no)
        profiler = StepProfiler(self.run_dir, cfg.profile_steps, par.rank)  # recipe key profile_steps; 0: off
        queued = None  # the step before: logged once this one is queued, so the device never waits for the CPU
        try:
            self.capture_graphs()
            ready = self.prepare(self.step_no) if self.step_no < self.steps else None
            while self.step_no < self.steps:
                profiler.before(self.step_no)
                done = self.step(ready)
                ready = self.prepare(self.step_no) if self.step_no < self.steps else None  # while the device runs
                if queued is not None:
                    self.report(queued)  # the first wait: for the step before, while this one runs
                queued = done
                profiler.after(self.step_no)
                if save and ((cfg.save_every and self.step_no % cfg.save_every == 0) or self.step_no == self.steps):
                    self.report(queued)
                    queued = None
                    self.checkpoint()
            if queued is not None:
                self.report(queued)
        except torch.cuda.OutOfMemoryError:
            raise ChatforgeError(
                f"out of GPU memory at step {self.step_no + 1} (micro-batch {self.micro_batch}, max_length "
                f"{cfg.max_length}, memory budget {self.plan.budget_gib or 'auto'} GiB): lower the recipe key "
                f"micro_batch, max_length or memory_budget_gib, or use method=qlora; the last checkpoint is "
                f"{(checkpoints(self.run_dir) or ['none'])[-1]}"
            ) from None
        self.bar.close()
        self.metrics = self.meter.summary()
        if self.metrics and self.graphs is not None:
            self.metrics["cuda_graphs"] = self.graphs.status()
        if par.is_main and self.metrics:
            write_text(self.run_dir / "metrics.json", json.dumps(self.metrics, indent=2))
            log.info("train: %s", RunMeter.describe(self.metrics))
        return self.save_final() if save else None

    def checkpoint(self) -> None:
        par = self.par
        save_checkpoint(
            self.run_dir,
            self.step_no,
            self.model,
            self.optimizer,
            self.scheduler,
            self.tokenizer,
            self.cfg.keep_checkpoints,
            par,
            settings=resume_settings(self.cfg),
        )
        if par.is_main:
            if par.can_generate and self.tokenizer is not None:
                write_samples(self.run_dir, self.step_no, self.model, self.tokenizer, self.cfg, self.plan)
            plot_loss(self.run_dir)

    def save_final(self) -> Path:
        """The final weights, directly loadable (PEFT adapter or a full model)."""
        par = self.par
        final = self.run_dir / ("model" if self.cfg.method == "full" else "adapter")
        weights = par.full_state_dict(self.model)  # gathered on rank 0 when sharded
        if par.is_main:
            with write_weights_folder(final) as tmp:
                save_weights(self.model, tmp, self.tokenizer, state_dict=weights)
            plot_loss(self.run_dir)
        par.barrier()
        par.close()
        return final


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, allow_changes: bool = False) -> Path:
    """Fine-tune as the recipe says; returns the folder of the final weights (adapter or model).

    Raises:
        ChatforgeError: bad data, a missing model, --resume without a checkpoint or with a changed recipe,
            out of GPU memory, a full disk.
    """
    return Trainer(cfg, resume=resume, progress=progress, allow_changes=allow_changes).setup().fit()
