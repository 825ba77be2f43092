"""Recipes: YAML files of training settings (chatforge/config/settings.py), loaded with overrides into a
typed, validated TrainConfig; the shipped ones listed, found and copied."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import shutil
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from chatforge.config.settings import GROUPS, DataSource, TrainConfig
from chatforge.files import ChatforgeError


def build(cls, values: dict, where: str):
    """A settings dataclass from a dict, values coerced to the keys' types.

    Raises:
        ChatforgeError: an unknown key or a value of the wrong type, naming the key and `where`.
    """
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
        return build(type(default), value or {}, where)
    if f.name == "data":
        items = value if isinstance(value, list) else [value]
        return [
            build(DataSource, {"path": v} if isinstance(v, str) else v, f"{where}[{i}]") for i, v in enumerate(items)
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
    "cuda_graphs": bool,
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
    cfg = build(TrainConfig, tree, str(path))
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        cfg = build(TrainConfig, _merge(to_dict(cfg), extra), "override")
    validate(cfg)
    return cfg


def choices(cls) -> dict[str, tuple]:
    """The allowed values of each of a settings class's Literal keys."""
    return {key: get_args(hint) for key, hint in get_type_hints(cls).items() if get_origin(hint) is Literal}


CHOICES = choices(TrainConfig)


def validate(cfg: TrainConfig) -> None:
    """Allowed values, then each group's ranges (TrainConfig.check).

    Raises:
        ChatforgeError: the first bad key, named.
    """
    items = [("", cfg, CHOICES)] + [(f"data[{i}].", s, choices(DataSource)) for i, s in enumerate(cfg.data)]
    for prefix, obj, allowed_by_key in items:
        for key, allowed in allowed_by_key.items():
            if getattr(obj, key) not in allowed:
                raise ChatforgeError(
                    f"recipe key {prefix + key!r}: {getattr(obj, key)!r} is not one of {', '.join(allowed)}"
                )
    cfg.check()


def to_dict(cfg) -> dict:
    """The recipe keys as plain values, group by group (the order of a run's config.yaml)."""
    flat = dataclasses.asdict(cfg)
    if not isinstance(cfg, TrainConfig):
        return flat
    ordered = [f.name for group in GROUPS.values() for f in dataclasses.fields(group)]
    return {k: flat[k] for k in ordered}


def describe_keys() -> str:
    """Every recipe key by group: name, default, help (`chatforge recipes keys`)."""
    lines = []
    for name, group in GROUPS.items():
        lines.append(f"[{name}]")
        for f in dataclasses.fields(group):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                for sub in dataclasses.fields(default):
                    lines.append(f"  {f.name}.{sub.name} = {getattr(default, sub.name)!r}  # {sub.metadata['help']}")
                continue
            lines.append(f"  {f.name} = {default!r}  # {f.metadata['help']}")
        if name == "data":
            for sub in dataclasses.fields(DataSource):
                lines.append(f"  data[i].{sub.name} = {sub.default!r}  # {sub.metadata['help']}")
    return "\n".join(lines)


def copy_recipe(name: str, dest_dir: str) -> Path:
    src = find_recipe(name)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / src.name
    shutil.copyfile(src, target)
    return target
