"""Read training data: conversation files (JSON arrays, JSONL) and text documents, as records.

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
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from chatforge.files import ChatforgeError


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
