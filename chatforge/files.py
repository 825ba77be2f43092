"""Atomic writes and run folders: nothing half-written is ever left at a final path."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ChatforgeError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero."""


TMP_SUFFIX = ".tmp"  # atomic_path's temporary siblings: ".<final name>.<random>.tmp"


def fsync_tree(path: Path, recurse: bool = True) -> None:
    """Flush a file, or a folder's entries (and with `recurse` every file below it), to disk."""
    paths = [path] + (sorted(path.rglob("*")) if recurse and path.is_dir() else [])
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:
            if not p.is_dir():  # some file systems cannot flush a folder; a file must be flushed
                raise
        finally:
            os.close(fd)


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove what killed processes left of atomic writes in `folder` (temporary siblings and old copies
    being replaced); returns their names. Call it where no other process writes into the folder."""
    gone = []
    for p in folder.glob(".*") if folder.is_dir() else []:
        if p.name.endswith(TMP_SUFFIX) or ".old-" in p.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            gone.append(p.name)
    return gone


def free_gib(path: Path) -> float:
    """Free space on the disk that holds `path` (or its nearest existing parent), in GiB."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free / 2**30


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds.

    Raises:
        Whatever the block raises; the temporary path is removed first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=TMP_SUFFIX, dir=final.parent))
    target = tmp if is_dir else tmp / final.name
    try:
        yield target
        fsync_tree(tmp)  # the data is on disk before the rename makes it visible
        if is_dir:
            old = None
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                final.rename(old)
            tmp.rename(final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, final)
        fsync_tree(final.parent, recurse=False)  # and the rename itself
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def exclusive(lock_file: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `lock_file` (made if missing): processes that fill one cache wait for
    each other instead of racing to rename onto the same folder."""
    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:  # closing the file releases the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    """Append one line to a log; a log is append-only, so a torn last line is the only risk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: str | os.PathLike, torn_tail: bool = False) -> list[dict]:
    """The rows of a JSONL file.

    Args:
        torn_tail: an append-only log's last line may be cut off by a kill: drop it instead of failing.
    Raises:
        ChatforgeError: a line that is not JSON, naming the file and line.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    rows = []
    for i, (n, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if torn_tail and i == len(lines) - 1:
                break
            raise ChatforgeError(f"{path}:{n}: invalid JSON: {e.msg}") from None
    return rows
