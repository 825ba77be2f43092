"""Every recipe key, in groups (model, data, lora, optim, speed, parallel, run), with its default, its
allowed values and its check. Recipes stay flat YAML (`lr: 2e-4`, `lora: {r: 16}`): TrainConfig is the
groups together, so code reads `cfg.lr`. `chatforge recipes keys` prints this table."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from chatforge.files import ChatforgeError
from chatforge.models.load import DEFAULT_MODEL

# The one list of each key's allowed values: recipe validation, the CLI's choices and the code read these.
Method = Literal["lora", "qlora", "full"]
Task = Literal["sft", "pretrain"]
Overflow = Literal["error", "drop", "truncate", "split"]
LrScheduler = Literal["cosine", "linear", "constant"]
FusedLoss = Literal["auto", "chunked", "liger", "plain"]
Attention = Literal["auto", "sdpa", "varlen"]
Nf4Matmul = Literal["auto", "torch", "bitsandbytes"]
ReduceDtype = Literal["auto", "fp32", "bf16"]
Strategy = Literal["auto", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"]
DataFormat = Literal["auto", "conversation", "messages", "alpaca", "text", "document"]


def key(default: Any = None, help: str = "", factory=None):  # noqa: A002 (a field's help text)
    """A recipe key: its default and the one line `chatforge recipes keys` prints."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _at_least(cfg, names: tuple[str, ...], low: float, above: bool = False) -> None:
    for name in names:
        value = cfg
        for part in name.split("."):
            value = getattr(value, part)
        if value < low or (above and value == low):
            raise ChatforgeError(f"recipe key {name!r}: must be {'above' if above else 'at least'} {low:g}")


@dataclass
class LoraConfig:
    r: int = key(16, "adapter rank")
    alpha: int = key(32, "scale numerator (the update is scaled by alpha / r)")
    dropout: float = key(0.0, "dropout on the adapter's input; costs speed, buys nothing for identity data")
    target_modules: Any = key("all-linear", "all-linear, or a list of module names")


@dataclass
class DataSource:
    path: str = key("", "a .jsonl/.json/.parquet/.txt file or a folder")
    weight: float = key(1.0, "share of the mix, relative to the other sources")
    format: DataFormat = key("auto", "auto, or the record format (a .txt file is one document)")
    holdout_last: int = key(0, "the last N records are never trained on (the fixed eval split)")


@dataclass
class ModelSettings:
    model: str = key(DEFAULT_MODEL, "a model folder, a .gguf file or a built-in name")
    method: Method = key("lora", "lora | qlora (4-bit base) | full")
    task: Task = key("sft", "sft (loss on assistant replies) | pretrain (loss on every token)")
    dtype: str = key("auto", "auto (bf16 on a GPU that has it, else fp32) | bf16 | fp16 | fp32")
    system: str | None = key(None, "system prompt added to conversations that have none")
    chat_template: str | None = key(None, "a built-in name (chatml, llama3, ...) or file, for models without one")

    def check_model(self) -> None:
        if self.chat_template is not None and not isinstance(self.chat_template, str):
            raise ChatforgeError("recipe key 'chat_template': expected a template name or file")


@dataclass
class DataSettings:
    data: list = key(help="list of data sources (a bare path works too)", factory=list)
    max_length: int = key(512, "tokens per sample (packed: per row)")
    overflow: Overflow = key("error", "a sample longer than max_length: error | drop | truncate | split (pretrain)")
    packing: bool = key(
        True,
        "several samples per max_length row, never attending to each other (XTuner's "
        "pack_to_max_length); batch_size then counts rows; false: one sample per row",
    )

    def check_data(self) -> None:
        _at_least(self, ("max_length",), 1)
        if not self.data:
            raise ChatforgeError("recipe key 'data': no training data given (data=PATH)")
        if self.overflow == "split" and self.task != "pretrain":
            raise ChatforgeError(
                "recipe key 'overflow': split only suits task pretrain (a conversation cut "
                "in pieces loses its prompt); use drop or truncate"
            )
        for i, src in enumerate(self.data):
            if src.weight <= 0 or src.holdout_last < 0:
                raise ChatforgeError(f"recipe key 'data[{i}]': weight must be above 0 and holdout_last at least 0")


@dataclass
class LoraSettings:
    lora: LoraConfig = key(help="the adapter (method lora or qlora)", factory=LoraConfig)

    def check_lora(self) -> None:
        _at_least(self, ("lora.r",), 1)
        _at_least(self, ("lora.alpha",), 0, above=True)
        if not 0 <= self.lora.dropout < 1:
            raise ChatforgeError("recipe key 'lora.dropout': must be at least 0 and below 1")


@dataclass
class OptimSettings:
    batch_size: int = key(4, "samples (packed: rows) per optimizer step, before grad_accum")
    grad_accum: int = key(1, "micro-steps per optimizer step")
    epochs: float = key(1.0, "passes over the data")
    max_steps: int = key(0, "> 0 overrides epochs")
    lr: float = key(2e-4, "peak learning rate")
    lr_scheduler: LrScheduler = key("cosine", "cosine | linear | constant")
    warmup_ratio: float = key(0.03, "share of the steps spent warming up")
    weight_decay: float = key(0.0, "AdamW weight decay")
    max_grad_norm: float = key(1.0, "gradient clipping; 0: none")
    seed: int = key(42, "data order, LoRA init, sampling")

    def check_optim(self) -> None:
        _at_least(self, ("batch_size", "grad_accum"), 1)
        _at_least(self, ("max_steps", "weight_decay", "max_grad_norm"), 0)
        _at_least(self, ("lr", "epochs"), 0, above=True)
        if not 0 <= self.warmup_ratio <= 1:
            raise ChatforgeError("recipe key 'warmup_ratio': must be between 0 and 1")


@dataclass
class SpeedSettings:  # chatforge/training/speed_plan.py, docs/speed.md: auto picks what fits the budget fastest
    gradient_checkpointing: Any = key("auto", "auto (as few layers as the budget needs) | true | false")
    micro_batch: Any = key("auto", "samples per forward pass; the step still takes batch_size x grad_accum")
    memory_budget_gib: Any = key("auto", "GPU memory the run may use; auto: 92% of the card's free memory")
    compile: Any = key("auto", "torch.compile each decoder layer; auto: on CUDA")
    fused_loss: FusedLoss = key("auto", "auto | chunked | liger | plain (plain materialises the full logits)")
    attention: Attention = key("auto", "auto | sdpa | varlen (per-sample segments: packed rows, CUDA-graph runs; bf16)")
    nf4_matmul: Nf4Matmul = key("auto", "QLoRA: auto/torch (compilable, training/nf4.py) | bitsandbytes")
    lora_groups: Any = key("auto", "one LoRA A matmul for projections sharing an input; auto: no dropout, or compiled")
    cuda_graphs: Any = key(
        "auto", "micro-batch CUDA graphs; auto: LoRA on one GPU (compiled or eager); true: QLoRA too"
    )
    profile_steps: int = key(0, "> 0: profile this many steps after 3 warm-up steps (run folder: profile/)")

    def check_speed(self) -> None:
        _at_least(self, ("profile_steps",), 0)


@dataclass
class ParallelSettings:  # chatforge/training/parallel.py, docs/distributed.md; batch_size x grad_accum is global
    strategy: Strategy = key("auto", "auto (ddp for LoRA/QLoRA, fsdp2 for full) | ddp | fsdp2 | deepspeed_zero2|3")
    collective_timeout: int = key(1800, "seconds a rank waits in a collective before the job fails")
    fsdp_reshard_after_forward: Any = key(
        "auto",
        "FSDP2: free gathered weights after forward; auto: keep them "
        "when the 16-bit weights take under a tenth of the GPU",
    )
    reduce_dtype: ReduceDtype = key("auto", "FSDP2 gradient exchange: auto (the weights' dtype) | fp32 | bf16")

    def check_parallel(self) -> None:
        _at_least(self, ("collective_timeout",), 1)


@dataclass
class RunSettings:
    output_dir: str = key("runs/default", "the run folder")
    save_every: int = key(0, "steps between checkpoints; 0: only at the end")
    keep_checkpoints: int = key(2, "checkpoints kept")
    log_every: int = key(1, "steps between log lines")
    eval_prompts: list = key(help="answered before training and at checkpoints (samples.md)", factory=list)
    eval_max_new_tokens: int = key(48, "tokens per sample answer")
    description: str = key("", "what the recipe is for")

    def check_run(self) -> None:
        _at_least(self, ("log_every", "eval_max_new_tokens"), 1)
        _at_least(self, ("save_every", "keep_checkpoints"), 0)


GROUPS = {  # the order `chatforge recipes keys` and config.yaml follow
    "model": ModelSettings,
    "data": DataSettings,
    "lora": LoraSettings,
    "optim": OptimSettings,
    "speed": SpeedSettings,
    "parallel": ParallelSettings,
    "run": RunSettings,
}


# Recipe keys that change what training computes: a resumed run must keep the checkpoint's values, and a
# model card lists them
COMPUTE_KEYS = (
    "model",
    "method",
    "task",
    "data",
    "lora",
    "max_length",
    "overflow",
    "batch_size",
    "grad_accum",
    "epochs",
    "max_steps",
    "lr",
    "lr_scheduler",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "seed",
    "dtype",
    "packing",
    "system",
    "chat_template",
)


@dataclass
class TrainConfig(
    RunSettings, ParallelSettings, SpeedSettings, OptimSettings, LoraSettings, DataSettings, ModelSettings
):
    """Every recipe key (the groups above, flat). Unknown keys are errors, never silently ignored."""

    def check(self) -> None:
        """Each group's checks.

        Raises:
            ChatforgeError: the first key out of its range, naming it.
        """
        for name, group in GROUPS.items():
            getattr(group, f"check_{name}")(self)
