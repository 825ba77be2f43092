"""Atomic writes: nothing half-written at a final path; a cache filled by one process at a time."""

from __future__ import annotations

import threading
import time

import pytest

from chatforge.files import atomic_path, write_json
from chatforge.models import load


def test_atomic_file_is_all_or_nothing(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []  # no temp debris either
    write_json(target, {"a": 1})
    assert target.read_text().strip().startswith("{")


def test_atomic_dir_replaces_old_only_on_success(tmp_path):
    target = tmp_path / "model"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "w.bin").write_text("v1")
    with pytest.raises(ValueError):
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "w.bin").write_text("v2-partial")
            raise ValueError
    assert (target / "w.bin").read_text() == "v1"
    with atomic_path(target, is_dir=True) as tmp:
        (tmp / "w.bin").write_text("v2")
    assert (target / "w.bin").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_processes_filling_one_gguf_cache_wait_for_each_other(tmp_path, monkeypatch):
    """Two assistants started at once on a fresh machine: one dequantises, the other waits and reuses it
    (both used to rename onto the same folder, and the second failed with 'Directory not empty')."""
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    calls = []

    def dequantise(src, target):
        calls.append(threading.get_ident())
        time.sleep(0.3)  # both threads are inside _materialise_gguf by now
        with atomic_path(target, is_dir=True) as tmp:
            (tmp / "config.json").write_text("{}")

    monkeypatch.setattr(load, "_dequantise_gguf", dequantise)
    src = load.resolve(gguf)
    out, errors = [], []

    def materialise():
        try:
            out.append(load._materialise_gguf(src))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=materialise) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and len(calls) == 1 and len(set(out)) == 1 and (out[0] / "config.json").is_file()
