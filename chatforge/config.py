"""Recipes: YAML files of training settings, loaded into a typed, validated TrainConfig."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import shutil
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

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


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # dropout costs speed and, for identity data, buys nothing
    target_modules: Any = "all-linear"


@dataclass
class DataSource:
    path: str = ""
    weight: float = 1.0
    format: str = "auto"  # auto | conversation | messages | alpaca | text | document (a .txt file is one document)
    holdout_last: int = 0  # the last N records of the file are never trained on (the fixed eval split)


@dataclass
class TrainConfig:
    """Every recipe key. Unknown keys are errors, never silently ignored."""

    model: str = DEFAULT_MODEL
    method: Method = "lora"  # lora | qlora | full
    task: Task = "sft"  # sft (loss on assistant replies) | pretrain (loss on every token)
    data: list = field(default_factory=list)  # list of DataSource (a bare path string works too)
    output_dir: str = "runs/default"
    lora: LoraConfig = field(default_factory=LoraConfig)
    max_length: int = 512
    overflow: Overflow = "error"  # a sample longer than max_length: error | drop | truncate | split (pretrain only)
    batch_size: int = 4
    grad_accum: int = 1
    epochs: float = 1.0
    max_steps: int = 0  # > 0 overrides epochs
    lr: float = 2e-4
    lr_scheduler: LrScheduler = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    dtype: str = "auto"
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 1
    system: str | None = None  # system prompt added to conversations that have none
    chat_template: str | None = None  # a built-in name (chatml, llama3, ...) or file, for models without one
    eval_prompts: list = field(default_factory=list)  # answered before training and at checkpoints
    eval_max_new_tokens: int = 48
    # speed keys (chatforge/training/speed_plan.py, docs/speed.md): `auto` picks what fits the memory budget fastest
    gradient_checkpointing: Any = "auto"  # auto (as few layers as the budget needs) | true | false
    micro_batch: Any = "auto"  # samples per forward pass; the step still takes batch_size x grad_accum
    memory_budget_gib: Any = "auto"  # GPU memory the run may use; auto: 92% of the card's free memory
    compile: Any = "auto"  # torch.compile each decoder layer; auto: on CUDA
    fused_loss: FusedLoss = "auto"  # auto | chunked | liger | plain (plain materialises the full logits)
    attention: Attention = "auto"  # auto | sdpa | varlen (packed batches: no attention across samples)
    packing: bool = True  # several samples per max_length sequence (no attention across them); batch_size
    # then counts sequences. On by default, as XTuner's pack_to_max_length; false: one sample per row
    nf4_matmul: Nf4Matmul = "auto"  # QLoRA: auto/torch (compilable, chatforge/training/nf4.py) | bitsandbytes
    lora_groups: Any = "auto"  # one LoRA A matmul for projections with the same input; auto: no dropout, or compiled
    # several GPUs (chatforge/training/parallel.py, docs/distributed.md); batch_size x grad_accum stays the global batch
    strategy: Strategy = (
        "auto"  # auto (ddp for LoRA/QLoRA, fsdp2 for full) | ddp | fsdp2 | deepspeed_zero2 | deepspeed_zero3
    )
    collective_timeout: int = 1800  # seconds a rank waits in a collective before the job fails
    # FSDP2: keep layers' gathered weights from forward to backward (no second all-gather); auto: when
    # the whole model's 16-bit weights take under a tenth of the GPU's memory
    fsdp_reshard_after_forward: Any = "auto"  # auto | true | false
    reduce_dtype: ReduceDtype = "auto"  # gradient exchange dtype under FSDP2: auto (the weights' dtype) | fp32 | bf16
    profile_steps: int = 0  # > 0: profile this many steps after 3 warm-up steps (run folder: profile/rank{R}.txt)
    description: str = ""


def _build(cls, values: dict, where: str):
    """Build a dataclass from a dict, naming the offending key on error."""
    if not isinstance(values, dict):
        raise ChatforgeError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ChatforgeError(f"{where}: unknown key {key!r} (known: {', '.join(names)})")
        kwargs[key] = _coerce(names[key], value, f"{where}: key {key!r}")
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, where: str):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if dataclasses.is_dataclass(default):
        return _build(type(default), value or {}, where)
    if f.name == "data":
        items = value if isinstance(value, list) else [value]
        return [
            _build(DataSource, {"path": v} if isinstance(v, str) else v, f"{where}[{i}]") for i, v in enumerate(items)
        ]
    if f.name in AUTO_KEYS:
        return _coerce_auto(AUTO_KEYS[f.name], value, where)
    if f.name in TEXT_LISTS:
        if isinstance(value, list) and all(isinstance(v, str) for v in value) or value in TEXT_LISTS[f.name]:
            return value
        raise ChatforgeError(f"{where}: expected a list of texts, got {value!r}")
    if value is None or default is None:
        return value
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ChatforgeError(f"{where}: expected true or false, got {value!r}")
    if kind in (int, float):
        return _number(kind, value, where)
    if kind is str and not isinstance(value, str):
        raise ChatforgeError(f"{where}: expected text, got {value!r}")
    if kind is list and not isinstance(value, list):
        raise ChatforgeError(f"{where}: expected a list, got {value!r}")
    return value


TEXT_LISTS = {"eval_prompts": (), "target_modules": ("all-linear",)}  # key: the plain texts it also takes


def _number(kind, value: Any, where: str):
    """A finite number of `kind`; an int key takes only whole numbers.

    Raises:
        ChatforgeError: not a number, not finite, or not whole for an int key.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ChatforgeError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ChatforgeError(f"{where}: expected a finite number, got {value!r}")
    if kind is int and value != int(value):
        raise ChatforgeError(f"{where}: expected a whole number, got {value!r}")
    return kind(value)


AUTO_KEYS = {
    "gradient_checkpointing": bool,
    "micro_batch": int,
    "memory_budget_gib": float,
    "compile": bool,
    "fsdp_reshard_after_forward": bool,
    "lora_groups": bool,
}


def _coerce_auto(kind, value: Any, where: str):
    """`auto` or a value of `kind` (a positive number for numeric keys)."""
    if value == "auto" or value is None:
        return "auto"
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ChatforgeError(f"{where}: expected auto, true or false, got {value!r}")
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or not math.isfinite(value)
        or (kind is int and value != int(value))
    ):
        raise ChatforgeError(
            f"{where}: expected auto or a positive {'whole ' if kind is int else ''}number, got {value!r}"
        )
    return kind(value)


MAX_YAML_NODES = 50_000  # after aliases are expanded; a recipe has a few hundred


def load_yaml(text: str, where: str):
    """YAML text as Python values, refused when its aliases expand it past MAX_YAML_NODES values.

    Raises:
        ChatforgeError: invalid YAML (with its line) or an expansion past the cap.
    """
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ChatforgeError(f"{where}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    count, stack = 0, [tree]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ChatforgeError(
                f"{where}: the YAML expands to more than {MAX_YAML_NODES} values (aliases repeating aliases?)"
            )
        if isinstance(node, dict):
            stack += [*node.keys(), *node.values()]
        elif isinstance(node, list):
            stack += node
    return tree


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ChatforgeError(f"override {dotted}: {p!r} is not a section")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """Parse `key=value` overrides (dotted keys for sections, YAML values)."""
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ChatforgeError(f"override {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        value = load_yaml(raw, f"override {item!r}") if raw else ""
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        cur = out.get(k)
        if isinstance(v, dict) and isinstance(cur, list) and v and all(str(i).isdigit() for i in v):
            cur = list(cur)  # data.0.path=... edits one item of a list
            for i, sub in v.items():
                if int(i) >= len(cur):
                    raise ChatforgeError(f"override {k}.{i}: the list has {len(cur)} items")
                item = cur[int(i)]
                cur[int(i)] = _merge(item, sub) if isinstance(sub, dict) and isinstance(item, dict) else sub
            out[k] = cur
        else:
            out[k] = _merge(cur, v) if isinstance(v, dict) and isinstance(cur, dict) else v
    return out


def recipe_dir():
    return resources.files("chatforge") / "recipes"


def list_recipes(pattern: str | None = None) -> list[str]:
    names = sorted(p.name[:-5] for p in recipe_dir().iterdir() if p.name.endswith(".yaml"))
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, f"*{pattern}*")]
    return names


def find_recipe(name_or_path: str) -> Path:
    """A recipe path from a file path or the name of a shipped recipe.

    Raises:
        ChatforgeError: neither a file nor a shipped recipe.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = recipe_dir() / (p.name if p.name.endswith(".yaml") else p.name + ".yaml")
    if shipped.is_file():
        return Path(str(shipped))
    raise ChatforgeError(f"recipe not found: {name_or_path} (see `chatforge recipes list`)")


def load_recipe(name_or_path: str, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Load a recipe and apply overrides.

    Raises:
        ChatforgeError: missing file, bad YAML (with its line), unknown key, wrong type.
    """
    path = find_recipe(name_or_path)
    tree = load_yaml(path.read_text(encoding="utf-8"), str(path)) or {}
    if not isinstance(tree, dict):
        raise ChatforgeError(f"{path}: a recipe must be a mapping of keys")
    cfg = _build(TrainConfig, tree, str(path))
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        cfg = _build(TrainConfig, _merge(to_dict(cfg), extra), "override")
    validate(cfg)
    return cfg


CHOICES = {key: get_args(hint) for key, hint in get_type_hints(TrainConfig).items() if get_origin(hint) is Literal}


def validate(cfg: TrainConfig) -> None:
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ChatforgeError(f"recipe key {key!r}: {getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    for key in (
        "batch_size",
        "grad_accum",
        "max_length",
        "collective_timeout",
        "log_every",
        "eval_max_new_tokens",
        "lora.r",
    ):
        if _get(cfg, key) < 1:
            raise ChatforgeError(f"recipe key {key!r}: must be at least 1")
    for key in ("max_steps", "save_every", "keep_checkpoints", "weight_decay", "max_grad_norm", "profile_steps"):
        if _get(cfg, key) < 0:
            raise ChatforgeError(f"recipe key {key!r}: must be at least 0")
    for key in ("lr", "epochs", "lora.alpha"):
        if not _get(cfg, key) > 0:
            raise ChatforgeError(f"recipe key {key!r}: must be above 0")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise ChatforgeError("recipe key 'warmup_ratio': must be between 0 and 1")
    if not 0 <= cfg.lora.dropout < 1:
        raise ChatforgeError("recipe key 'lora.dropout': must be at least 0 and below 1")
    if cfg.chat_template is not None and not isinstance(cfg.chat_template, str):
        raise ChatforgeError("recipe key 'chat_template': expected a template name or file")
    if not cfg.data:
        raise ChatforgeError("recipe key 'data': no training data given (data=PATH)")
    if cfg.overflow == "split" and cfg.task != "pretrain":
        raise ChatforgeError(
            "recipe key 'overflow': split only suits task pretrain (a conversation cut "
            "in pieces loses its prompt); use drop or truncate"
        )
    for i, src in enumerate(cfg.data):
        if src.weight <= 0 or src.holdout_last < 0:
            raise ChatforgeError(f"recipe key 'data[{i}]': weight must be above 0 and holdout_last at least 0")


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def copy_recipe(name: str, dest_dir: str) -> Path:
    src = find_recipe(name)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / src.name
    shutil.copyfile(src, target)
    return target
