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

import codecs
import hashlib
import itertools
import json
import os
import random
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from chatforge.files import ChatforgeError
from chatforge.models.chat_templates import require
from chatforge.models.chat_tokens import encode_rendered, template_specials

IGNORE = -100  # label of tokens that carry no loss


@dataclass
class Record:
    messages: list[dict]
    source: str  # "file:line", for error messages


# ---------------------------------------------------------------- reading files

OnError = Callable[[str], None]  # receives "file:line: reason" for a record that is skipped
MAX_RECORD_BYTES = 8 << 20  # one JSON record, or one blank-line block of a .txt file
TOO_LARGE = f"record is larger than {MAX_RECORD_BYTES >> 20} MiB, the most chatforge reads as one record"


def _fail(on_error: OnError | None, message: str) -> None:
    if on_error is None:
        raise ChatforgeError(message)
    on_error(message)


def _open_data(path: Path):
    if path.is_dir():
        raise ChatforgeError(f"{path} is a folder, not a data file")
    if not path.is_file():
        where = "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"
        raise ChatforgeError(f"data file not found: {path}{where}")
    return open(path, "rb")


def _lines(f, limit: int | None = MAX_RECORD_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line) of a binary file; None for a line longer than `limit` bytes, which is skipped
    without being held in memory."""
    for lineno in itertools.count(1):
        raw = f.readline(-1 if limit is None else limit + 2)
        if not raw:
            return
        if limit is not None and len(raw.rstrip(b"\r\n")) > limit:
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(1 << 20)
            raw = None
        yield lineno, raw


def iter_json_records(path: str | os.PathLike, on_error: OnError | None = None) -> Iterator[tuple[int, object]]:
    """Yield (line, parsed JSON value) for each record of a JSON array or JSONL file, streaming.

    Memory stays bounded by MAX_RECORD_BYTES, whatever the file size; a larger record is an error.

    Args:
        on_error: None to raise on the first bad record; else called with "file:line: reason" and
            the record is skipped. In a JSON array a syntax error ends the file (it cannot be resynced).
    Raises:
        ChatforgeError: missing file, invalid UTF-8 or invalid JSON (when on_error is None), naming file and line.
    """
    path = Path(path)
    with _open_data(path) as f:
        head = f.read(4096)
        f.seek(0)
        if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
            yield from _iter_json_array(path, f, on_error)
            return
        for lineno, raw in _lines(f):
            if raw is None:
                _fail(on_error, f"{path}:{lineno}: {TOO_LARGE}")
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                _fail(on_error, f"{path}:{lineno}: invalid UTF-8 ({e.reason} at byte {e.start + 1} of the line)")
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as e:
                cut = "; the last line looks truncated" if not raw.endswith(b"\n") else ""
                if not cut and ((lineno == 1 and text.strip() == "{") or text.strip().endswith(",")):
                    cut = "; a JSON file must hold an array of records, or one record per line (JSONL)"
                _fail(on_error, f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno}){cut}")


class _ArrayReader:
    """Incremental reader of one JSON array: decodes chunks, tracks the line of the cursor."""

    def __init__(self, path: Path, f, chunk: int = 1 << 20):
        self.path, self.f, self.chunk = path, f, chunk
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False

    def more(self) -> None:
        raw = self.f.read(self.chunk)
        self.eof = not raw
        try:
            text = self.decoder.decode(raw, final=self.eof)
        except UnicodeDecodeError as e:
            line = self.line + self.buf.count("\n", self.pos) + raw[: max(0, e.start)].count(b"\n")
            raise ChatforgeError(f"{self.path}:{line}: invalid UTF-8 ({e.reason})") from None
        if self.pos > self.chunk:  # drop what was consumed
            self.buf, self.pos = self.buf[self.pos :], 0
        self.buf += text

    def advance(self, end: int) -> None:
        self.line += self.buf.count("\n", self.pos, end)
        self.pos = end

    def peek(self) -> str:
        """The next non-blank character ('' at the end of the file), cursor moved onto it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.line += self.buf[self.pos] == "\n"
                self.pos += 1
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos] if self.pos < len(self.buf) else ""
            self.more()

    def value(self, decoder: json.JSONDecoder):
        while True:
            try:
                value, end = decoder.raw_decode(self.buf, self.pos)
                if end - self.pos > MAX_RECORD_BYTES:
                    raise ChatforgeError(f"{self.path}:{self.line}: {TOO_LARGE}")
                if end < len(self.buf) or self.eof:
                    self.advance(end)
                    return value
            except json.JSONDecodeError as e:
                if len(self.buf) - self.pos > MAX_RECORD_BYTES:
                    raise ChatforgeError(f"{self.path}:{self.line}: {TOO_LARGE}") from None
                if self.eof:
                    line = self.line + self.buf.count("\n", self.pos, e.pos)
                    cut = "; the file looks truncated" if self.eof and e.pos >= len(self.buf) - 1 else ""
                    raise ChatforgeError(f"{self.path}:{line}: invalid JSON: {e.msg}{cut}") from None
            self.more()  # the record may continue in the next chunk


def _iter_json_array(path: Path, f, on_error: OnError | None) -> Iterator[tuple[int, object]]:
    reader, decoder = _ArrayReader(path, f), json.JSONDecoder()
    try:
        reader.peek()
        reader.advance(reader.pos + 1)  # the "["
        if reader.peek() == "]":
            return
        while True:
            reader.peek()
            line = reader.line
            yield line, reader.value(decoder)
            c = reader.peek()
            if c == "]":
                return
            if c != ",":
                what = "the end of the file (the file looks truncated)" if c == "" else repr(c)
                raise ChatforgeError(
                    f"{path}:{reader.line}: invalid JSON: expected ',' or ']' in the array, found {what}"
                )
            reader.advance(reader.pos + 1)
    except ChatforgeError as e:
        _fail(on_error, f"{e} (reading of this array stopped here)" if on_error else str(e))


def _text(value, where: str, field: str, required: bool = True) -> str:
    if value is None:
        if required:
            raise ChatforgeError(f"{where}: missing field {field!r}")
        return ""
    if not isinstance(value, str):
        raise ChatforgeError(f"{where}: field {field!r} must be text, got {type(value).__name__}")
    return value


ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}


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
        msgs += [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(obj.get("output"), where, "output")},
        ]
    else:
        raise ChatforgeError(
            f"{where}: unknown record shape (keys: {', '.join(obj) or 'none'}); "
            f"expected 'conversation', 'messages', 'conversations' or alpaca fields"
        )
    if not any(m["role"] == "assistant" for m in msgs):
        raise ChatforgeError(f"{where}: empty conversation (no assistant reply)")
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        raise ChatforgeError(f"{where}: empty assistant reply")
    return msgs


def iter_records(path: str | os.PathLike, on_error: OnError | None = None) -> Iterator[Record]:
    """Conversation records of a file, streamed; bad ones raise, or go to on_error and are skipped."""
    for line, obj in iter_json_records(path, on_error):
        where = f"{path}:{line}"
        try:
            yield Record(to_messages(obj, where), where)
        except ChatforgeError as e:
            _fail(on_error, str(e))


def read_conversations(path: str | os.PathLike) -> list[Record]:
    return list(iter_records(path))


def iter_text_documents(
    path: str | os.PathLike, on_error: OnError | None = None, whole_file: bool = False
) -> Iterator[Record]:
    """Raw text for pretraining, streamed: a .txt file (one document per blank-line block, or the
    whole file with whole_file), a folder of .txt files (one document per file), or JSON/JSONL
    records with a 'text' field.

    Raises:
        ChatforgeError: missing file, invalid UTF-8, a record without text (when on_error is None).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ChatforgeError(f"{path}: no .txt files in the folder")
        for f in files:
            yield from _txt_documents(f, on_error, whole_file=True)
    elif path.suffix == ".txt":
        yield from _txt_documents(path, on_error, whole_file)
    else:
        for line, obj in iter_json_records(path, on_error):
            where = f"{path}:{line}"
            try:
                if not isinstance(obj, dict):
                    raise ChatforgeError(f"{where}: a record must be a JSON object, got {type(obj).__name__}")
                text = _text(obj.get("text"), where, "text")
                if not text.strip():
                    raise ChatforgeError(f"{where}: empty 'text'")
            except ChatforgeError as e:
                _fail(on_error, str(e))
                continue
            yield Record([{"role": "text", "content": text}], where)


def _txt_documents(path: Path, on_error: OnError | None, whole_file: bool) -> Iterator[Record]:
    """Blank-line blocks of a .txt file (each at most MAX_RECORD_BYTES), or the whole file as one document."""
    block: list[str] = []
    start, size = 1, 0

    def flush():
        text = "".join(block).strip()
        return Record([{"role": "text", "content": text}], f"{path}:{start}") if text else None

    with _open_data(path) as f:
        for lineno, raw in _lines(f, None if whole_file else MAX_RECORD_BYTES):
            if raw is None or (not whole_file and size + len(raw) > MAX_RECORD_BYTES):
                _fail(on_error, f"{path}:{start}: {TOO_LARGE}")
                block, start, size = [], lineno + 1, 0
                continue
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                _fail(on_error, f"{path}:{lineno}: invalid UTF-8 ({e.reason})")
                continue
            if not whole_file and not line.strip():
                doc = flush()
                if doc:
                    yield doc
                block, start, size = [], lineno + 1, 0
                continue
            block.append(line)
            size += len(raw)
    doc = flush()
    if doc:
        yield doc


def drop_last(items: Iterable, n: int, held: list | None = None) -> Iterator:
    """Yield all but the last n items (streaming); the last n are appended to `held`.

    This is the fixed held-out split: the last n records of a file are never trained on.
    """
    if n <= 0:
        yield from items
        return
    tail: deque = deque()
    for x in items:
        tail.append(x)
        if len(tail) > n:
            yield tail.popleft()
    if held is not None:
        held.extend(tail)


def holdout_records(path: str | os.PathLike, n: int) -> list[Record]:
    """The last n conversation records of a file (the held-out split), or all records if n <= 0."""
    if n <= 0:
        return read_conversations(path)
    return list(deque(iter_records(path), maxlen=n))


def record_key(rec: Record) -> str:
    """A digest of a record's content, for finding exact duplicates."""
    return hashlib.sha1(json.dumps(rec.messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- tokenising


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:

    require(tokenizer, "the model")
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
            raise ChatforgeError(
                "the chat template does not render conversations incrementally; cannot locate assistant replies"
            )
        reply = upto[len(prefix) :].rstrip()
        spans.append((len(prefix), len(prefix) + len(reply)))
    return full, spans


def encode_sft(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels: labels equal ids on assistant replies and IGNORE elsewhere. Special-token
    text inside a message stays text (chat_tokens); other conversations tokenise as one rendering.

    Raises:
        ChatforgeError: the template cannot be followed reply by reply, or rewrites special-token text.
    """
    text, spans = trained_spans(tokenizer, messages)
    # Slow tokenizers have no offsets: pieces between span edges are encoded one by one.
    cuts = () if getattr(tokenizer, "is_fast", False) else tuple(e for span in spans for e in span)
    ids, starts = encode_rendered(tokenizer, text, template_specials(tokenizer, messages, text), cuts)
    return ids, [tok if any(a <= s < b for a, b in spans) else IGNORE for tok, s in zip(ids, starts)]


def encode_record(tokenizer, rec: Record) -> tuple[list[int], list[int]]:
    """encode_sft of a record; an error names the record's file and line."""
    try:
        return encode_sft(tokenizer, rec.messages)
    except ChatforgeError as e:
        raise ChatforgeError(f"{rec.source}: {e}") from None


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


def fit_length(ids, labels, max_length: int, overflow: str, source: str) -> list[tuple[list, list]]:
    """Apply the overflow policy to one encoded sample; returns the pieces to keep (none: dropped).

    Policies: error, drop, truncate (keep the first max_length tokens), split (pretraining: cut a
    long document into max_length pieces, each its own sample).

    Raises:
        ChatforgeError: the sample is too long and the policy is 'error'.
    """
    if len(ids) <= max_length:
        return [(ids, labels)]
    if overflow == "error":
        raise ChatforgeError(
            f"{source}: sample has {len(ids)} tokens, more than max_length "
            f"{max_length} (raise max_length, or set overflow=drop or truncate)"
        )
    if overflow == "drop":
        return []
    if overflow == "split":
        pieces = [(ids[i : i + max_length], labels[i : i + max_length]) for i in range(0, len(ids), max_length)]
    else:
        pieces = [(ids[:max_length], labels[:max_length])]
    # a piece needs a trained token after its first (the first token is never a target)
    return [(i, lab) for i, lab in pieces if lab[1:].count(IGNORE) < len(lab) - 1]


def encode_texts(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """encode_text for many documents at once (fast tokenizers encode a batch on all cores)."""
    if not getattr(tokenizer, "is_fast", False):
        return [encode_text(tokenizer, t) for t in texts]
    bos = (
        [tokenizer.bos_token_id]
        if (tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False))
        else []
    )
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = bos + ids + [tokenizer.eos_token_id]
        out.append((ids, list(ids)))
    return out


def read_source(src, cfg, on_error: OnError | None = None) -> Iterator[Record]:
    """Records of one data source of a recipe (streamed, held-out tail removed), with the recipe's
    system prompt applied to conversations that have none."""
    if cfg.task == "pretrain":
        records = iter_text_documents(src.path, on_error, whole_file=src.format == "document")
    else:
        records = iter_records(src.path, on_error)
    for rec in drop_last(records, getattr(src, "holdout_last", 0)):
        if cfg.system is not None and cfg.task != "pretrain" and not any(m["role"] == "system" for m in rec.messages):
            rec.messages.insert(0, {"role": "system", "content": cfg.system})
        yield rec


def iter_samples(
    src, cfg, tokenizer, stats: dict | None = None, on_error: OnError | None = None, batch: int = 64
) -> Iterator[Sample]:
    """Tokenised samples of one data source, streamed, after the overflow policy.

    stats (if given) counts: records, dropped, truncated, split, tokens, trained_tokens.
    """
    stats = stats if stats is not None else {}
    for key in ("records", "dropped", "truncated", "split", "tokens", "trained_tokens"):
        stats.setdefault(key, 0)
    pending: list[Record] = []

    def emit(recs):
        if cfg.task == "pretrain":
            encoded = encode_texts(tokenizer, [r.messages[0]["content"] for r in recs])
        else:
            encoded = [encode_record(tokenizer, r) for r in recs]
        for rec, (ids, labels) in zip(recs, encoded):
            stats["records"] += 1
            pieces = fit_length(ids, labels, cfg.max_length, cfg.overflow, rec.source)
            if not pieces:
                stats["dropped"] += 1
            elif len(ids) > cfg.max_length:
                stats["split" if cfg.overflow == "split" else "truncated"] += 1
            for i, lab in pieces:
                stats["tokens"] += len(i)
                stats["trained_tokens"] += len(lab) - 1 - lab[1:].count(IGNORE)
                yield Sample(i, lab, rec.source)

    for rec in read_source(src, cfg, on_error):
        pending.append(rec)
        if len(pending) >= batch:
            yield from emit(pending)
            pending = []
    yield from emit(pending)


def build_dataset(cfg, tokenizer) -> tuple[list[Sample], dict]:
    """Read, tokenise and mix every data source of a recipe; returns samples and statistics.

    A source's weight sets how often it is used: 2 = every sample twice, 0.5 = a seeded half,
    2.5 = twice plus a seeded half. The final order is shuffled by the recipe's seed.

    Raises:
        ChatforgeError: bad records (file:line), a source without usable samples, a too-long sample
            under overflow=error.
    """
    rng = random.Random(cfg.seed)
    samples: list[Sample] = []
    stats: dict = {"sources": [], "dropped": 0, "truncated": 0, "split": 0}
    for src in cfg.data:
        if src.weight <= 0:
            raise ChatforgeError(f"{src.path}: weight must be above 0, got {src.weight}")
        st: dict = {}
        part = list(iter_samples(src, cfg, tokenizer, st))
        if not part:
            raise ChatforgeError(f"{src.path}: no usable samples")
        whole, frac = divmod(src.weight, 1.0)
        picked = part * int(whole) + rng.sample(part, round(frac * len(part)))
        if not picked:
            picked = rng.sample(part, 1)
        samples += picked
        for key in ("dropped", "truncated", "split"):
            stats[key] += st[key]
        stats["sources"].append(
            {
                "path": src.path,
                "records": st["records"],
                "samples": len(part),
                "used": len(picked),
                "held_out": getattr(src, "holdout_last", 0),
                "tokens": st["tokens"],
                "trained_tokens": st["trained_tokens"],
            }
        )
    rng.shuffle(samples)
    return samples, stats


# ---------------------------------------------------------------- packing


def pack(samples: Iterable[Sample], max_length: int, open_bins: int = 64) -> Iterator[list[Sample]]:
    """Group samples into sequences of at most max_length tokens, never splitting a sample.

    Online best fit: each sample goes into the open sequence it fills best; when `open_bins`
    sequences are open and none has room, the fullest is emitted. Streams with memory bounded
    by open_bins * max_length tokens. A sample longer than max_length is an error (apply the
    overflow policy first).
    """
    bins: list[list] = []  # [used tokens, samples]
    for s in samples:
        n = len(s.input_ids)
        if n > max_length:
            raise ChatforgeError(f"{s.source}: sample has {n} tokens, more than max_length {max_length}")
        best = None
        for b in bins:
            if b[0] + n <= max_length and (best is None or b[0] > best[0]):
                best = b
        if best is None:
            if len(bins) >= open_bins:
                full = max(bins, key=lambda b: b[0])
                bins.remove(full)
                yield full[1]
            best = [0, []]
            bins.append(best)
        best[0] += n
        best[1].append(s)
        if best[0] == max_length:
            bins.remove(best)
            yield best[1]
    for b in sorted(bins, key=lambda b: -b[0]):
        yield b[1]


# ---------------------------------------------------------------- batching


def bucket_width(longest: int, max_length: int, smallest: int = 64) -> int:
    """The padded width of a batch whose longest sample has `longest` tokens: the next power of two
    (at least `smallest`, at most max_length), so compiled code sees a handful of shapes."""
    width = smallest
    while width < longest:
        width *= 2
    return max(longest, min(width, max_length))


def collate(samples: list[Sample], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch (to its longest sample, or to `width`); padded positions get no attention and
    no loss."""
    width = max(width or 0, max(len(s.input_ids) for s in samples))
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(
    packs: list[list[Sample]], pad_id: int, width: int | None = None, segments: int | None = None
) -> dict:
    """A batch of packed sequences: several samples per row, no attention across them.

    Keys: input_ids, labels, position_ids (restarting at 0 for every sample, which makes
    transformers build a block-causal mask for sdpa/eager when attention_mask is None),
    attention_mask (None), cu_seqlens (int32 boundaries over the flattened batch, for varlen
    attention kernels; the padding tail of a row is a segment of its own), max_seqlen (int) and
    num_tokens (real tokens). The first token of every sample carries no loss, so no sample is
    trained to predict across a boundary.

    Args:
        width: pad every row to this many tokens (default: the fullest row).
        segments: pad cu_seqlens with empty segments to this many (a fixed shape for compiled code).
    """
    width = max(width or 0, max(sum(len(s.input_ids) for s in p) for p in packs))
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(packs), width), dtype=torch.long)
    cu, longest, real = [0], 0, 0
    for row, p in enumerate(packs):
        off = 0
        for s in p:
            n = len(s.input_ids)
            ids[row, off : off + n] = torch.tensor(s.input_ids)
            labels[row, off + 1 : off + n] = torch.tensor(s.labels[1:])
            pos[row, off : off + n] = torch.arange(n)
            off += n
            cu.append(row * width + off)
            longest = max(longest, n)
        real += off
        if off < width:
            pos[row, off:] = torch.arange(width - off)
            cu.append((row + 1) * width)
            longest = max(longest, width - off)
    if segments is not None and len(cu) - 1 < segments:
        cu += [cu[-1]] * (segments + 1 - len(cu))  # empty segments: no work in varlen kernels
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "attention_mask": None,
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "max_seqlen": longest,
        "num_tokens": real,
    }


def _members(unit) -> list[Sample]:
    return unit if isinstance(unit, list) else [unit]


def real_tokens(unit: Sample | list[Sample]) -> int:
    """Tokens of a training unit (a sample, or a packed list of samples), padding excluded."""
    return sum(len(s.input_ids) for s in _members(unit))


def trained_count(unit: Sample | list[Sample]) -> int:
    """Tokens a unit trains on, as collate and collate_packed label them (a sample's first token is
    never a target)."""
    return sum(sum(1 for t in s.labels[1:] if t != IGNORE) for s in _members(unit))


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a batch from collate or collate_packed."""
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return int(batch["num_tokens"])


def to_device(batch: dict, device) -> dict:
    """The batch on `device`. To a GPU through pinned memory, asynchronously: a pageable copy would
    wait for the GPU's queue, so preparing the next batch during a step would stall it."""
    pin = torch.device(device).type == "cuda"
    return {
        k: (v.pin_memory().to(device, non_blocking=True) if pin else v.to(device)) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
