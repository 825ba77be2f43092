"""Training data: read conversation files, render them with the chat template, mask the loss.

Records are read from JSON arrays or JSONL and normalised to a list of chat messages
(`{"role", "content"}`). Accepted shapes:
- the seed's XTuner format: {"conversation": [{"system"?, "input", "output"}, ...]}
- OpenAI messages: {"messages": [{"role", "content"}, ...]}
- ShareGPT: {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}
- alpaca: {"instruction", "input"?, "output", "system"?, "history"?}
Every error names the file and line.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .files import ChatforgeError

IGNORE = -100  # label of tokens that carry no loss


@dataclass
class Record:
    messages: list[dict]
    source: str  # "file:line", for error messages


# ---------------------------------------------------------------- reading files

def iter_json_records(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """Yield (line, parsed JSON value) for each record of a JSON array or JSONL file.

    Raises:
        ChatforgeError: missing file, invalid UTF-8 or invalid JSON, naming file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"data file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ChatforgeError(f"{path}:{line}: invalid UTF-8 ({e.reason})") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _iter_json_array(path, text)
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise ChatforgeError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _iter_json_array(path: Path, text: str) -> Iterator[tuple[int, object]]:
    decoder = json.JSONDecoder()
    pos = text.index("[") + 1
    n = len(text)

    def skip_ws(p):
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip_ws(pos)
    if pos < n and text[pos] == "]":
        return
    while True:
        pos = skip_ws(pos)
        line = text.count("\n", 0, pos) + 1
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ChatforgeError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield line, value
        pos = skip_ws(pos)
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            return
        line = text.count("\n", 0, pos) + 1
        raise ChatforgeError(f"{path}:{line}: invalid JSON: expected ',' or ']' in the array")


def _text(value, where: str, field: str, required: bool = True) -> str:
    if value is None:
        if required:
            raise ChatforgeError(f"{where}: missing field {field!r}")
        return ""
    if not isinstance(value, str):
        raise ChatforgeError(f"{where}: field {field!r} must be text, got {type(value).__name__}")
    return value


ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "bot": "assistant", "model": "assistant", "system": "system"}


def to_messages(obj, where: str) -> list[dict]:
    """Normalise one record to chat messages.

    Raises:
        ChatforgeError: unknown shape, missing or mistyped field, or an empty conversation.
    """
    if not isinstance(obj, dict):
        raise ChatforgeError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
    msgs: list[dict] = []
    if "conversation" in obj:
        turns = obj["conversation"]
        if not isinstance(turns, list):
            raise ChatforgeError(f"{where}: field 'conversation' must be a list")
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise ChatforgeError(f"{where}: conversation[{i}] must be an object")
            system = _text(t.get("system"), where, f"conversation[{i}].system", required=False)
            if system:
                msgs.append({"role": "system", "content": system})
            msgs.append({"role": "user", "content": _text(t.get("input"), where, f"conversation[{i}].input")})
            msgs.append({"role": "assistant", "content": _text(t.get("output"), where, f"conversation[{i}].output")})
    elif "messages" in obj or "conversations" in obj:
        key = "messages" if "messages" in obj else "conversations"
        turns = obj[key]
        if not isinstance(turns, list):
            raise ChatforgeError(f"{where}: field {key!r} must be a list")
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise ChatforgeError(f"{where}: {key}[{i}] must be an object")
            role = t.get("role", t.get("from"))
            if role not in ROLE_ALIASES:
                raise ChatforgeError(f"{where}: {key}[{i}] has unknown role {role!r}")
            content = _text(t.get("content", t.get("value")), where, f"{key}[{i}].content")
            msgs.append({"role": ROLE_ALIASES[role], "content": content})
        if obj.get("system") and not any(m["role"] == "system" for m in msgs):
            msgs.insert(0, {"role": "system", "content": _text(obj["system"], where, "system")})
    elif "instruction" in obj or "output" in obj:
        instruction = _text(obj.get("instruction"), where, "instruction")
        extra = _text(obj.get("input"), where, "input", required=False)
        system = _text(obj.get("system"), where, "system", required=False)
        if system:
            msgs.append({"role": "system", "content": system})
        for j, pair in enumerate(obj.get("history") or []):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise ChatforgeError(f"{where}: history[{j}] must be a [question, answer] pair")
            msgs += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = f"{instruction}\n{extra}" if extra else instruction
        msgs += [{"role": "user", "content": prompt},
                 {"role": "assistant", "content": _text(obj.get("output"), where, "output")}]
    else:
        raise ChatforgeError(f"{where}: unknown record shape (keys: {', '.join(obj) or 'none'}); "
                             f"expected 'conversation', 'messages', 'conversations' or alpaca fields")
    if not any(m["role"] == "assistant" for m in msgs):
        raise ChatforgeError(f"{where}: empty conversation (no assistant reply)")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        raise ChatforgeError(f"{where}: empty assistant reply")
    return msgs


def read_conversations(path: str | os.PathLike) -> list[Record]:
    return [Record(to_messages(obj, f"{path}:{line}"), f"{path}:{line}")
            for line, obj in iter_json_records(path)]


# ---------------------------------------------------------------- tokenising

def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatforgeError("the model's tokenizer has no chat template; "
                             "supervised fine-tuning needs one")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def trained_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans that carry loss.

    A span is one assistant reply plus its end-of-turn marker, found by rendering the
    conversation up to each reply with and without it, so any chat template works.
    """
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise ChatforgeError("the chat template does not render conversations incrementally; "
                                 "cannot locate assistant replies")
        reply = upto[len(prefix):].rstrip()
        spans.append((len(prefix), len(prefix) + len(reply)))
    return full, spans


def encode_sft(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels: labels equal ids on assistant replies and IGNORE elsewhere."""
    text, spans = trained_spans(tokenizer, messages)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        labels = [tok if any(a <= start < b for a, b in spans) else IGNORE
                  for tok, (start, _end) in zip(ids, enc["offset_mapping"])]
        return ids, labels
    # Slow tokenizers have no offsets: encode the pieces between span edges one by one.
    ids, labels, pos = [], [], 0
    for a, b in spans + [(len(text), len(text))]:
        for piece, trained in ((text[pos:a], False), (text[a:b], True)):
            if piece:
                part = tokenizer.encode(piece, add_special_tokens=False)
                ids += part
                labels += part if trained else [IGNORE] * len(part)
        pos = b
    return ids, labels


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Continued pretraining: loss on every token, EOS closing the document."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    source: str


def fit_length(ids, labels, max_length: int, overflow: str, source: str):
    """Apply the overflow policy; return None to drop the sample.

    Raises:
        ChatforgeError: the sample is too long and the policy is 'error'.
    """
    if len(ids) <= max_length:
        return ids, labels
    if overflow == "error":
        raise ChatforgeError(f"{source}: sample has {len(ids)} tokens, more than max_length "
                             f"{max_length} (raise max_length, or set overflow=drop or truncate)")
    if overflow == "drop":
        return None
    ids, labels = ids[:max_length], labels[:max_length]
    return (ids, labels) if any(l != IGNORE for l in labels) else None


def build_dataset(cfg, tokenizer) -> tuple[list[Sample], dict]:
    """Read, tokenise and mix every data source of a recipe; returns samples and statistics."""
    rng = random.Random(cfg.seed)
    samples: list[Sample] = []
    stats = {"sources": [], "dropped": 0, "truncated": 0}
    for src in cfg.data:
        part = []
        for rec in read_source(src, cfg):
            if cfg.task == "pretrain":
                ids, labels = encode_text(tokenizer, rec.messages[0]["content"])
            else:
                ids, labels = encode_sft(tokenizer, rec.messages)
            fitted = fit_length(ids, labels, cfg.max_length, cfg.overflow, rec.source)
            if fitted is None:
                stats["dropped"] += 1
                continue
            stats["truncated"] += len(ids) > cfg.max_length
            part.append(Sample(fitted[0], fitted[1], rec.source))
        if not part:
            raise ChatforgeError(f"{src.path}: no usable samples")
        count = max(1, round(len(part) * src.weight))  # weight 2 = twice as often, 0.5 = half
        picked = [part[i % len(part)] for i in range(count)] if count >= len(part) else rng.sample(part, count)
        samples += picked
        stats["sources"].append({"path": src.path, "records": len(part), "used": len(picked)})
    rng.shuffle(samples)
    return samples, stats


def read_source(src, cfg) -> list[Record]:
    """Records of one data source of a recipe, with the recipe's system prompt applied."""
    if cfg.task == "pretrain":
        return read_text_documents(src.path)
    records = read_conversations(src.path)
    if cfg.system is not None:
        for r in records:
            if not any(m["role"] == "system" for m in r.messages):
                r.messages.insert(0, {"role": "system", "content": cfg.system})
    return records


def read_text_documents(path: str | os.PathLike) -> list[Record]:
    """Raw text: a .txt file (documents split by blank lines) or JSON/JSONL with a 'text' field."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise ChatforgeError(f"data file not found: {path}")
        blocks, out, line0 = path.read_text(encoding="utf-8").split("\n\n"), [], 1
        for block in blocks:
            if block.strip():
                out.append(Record([{"role": "text", "content": block.strip()}], f"{path}:{line0}"))
            line0 += block.count("\n") + 2
        return out
    out = []
    for line, obj in iter_json_records(path):
        where = f"{path}:{line}"
        if not isinstance(obj, dict):
            raise ChatforgeError(f"{where}: a record must be a JSON object")
        out.append(Record([{"role": "text", "content": _text(obj.get("text"), where, "text")}], where))
    return out


# ---------------------------------------------------------------- batching

def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get no attention and no loss."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
