"""Model folders: the GGUF cache (filled by one process at a time), the replay answers' dtype."""

from __future__ import annotations

import threading
import time

from chatforge.files import atomic_path
from chatforge.models import load


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


def test_replay_answers_are_generated_in_fp32_where_that_fits(tmp_path, monkeypatch):
    """`reference_dtype`: fp32 on a CPU; on a GPU fp32 while the fp32 weights (twice a 16-bit file) take at
    most half the free memory, else the device's default (a large model must still fit)."""
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\0" * 1000)  # fp32: ~2,000 bytes
    assert load.reference_dtype(folder) == "fp32"  # the tests run on a CPU
    free = {"bytes": 4000}
    monkeypatch.setattr(load.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(load.torch.cuda, "mem_get_info", lambda *a: (free["bytes"], 10**9))
    assert load.reference_dtype(folder) == "fp32"
    free["bytes"] = 3999
    assert load.reference_dtype(folder) == "auto"
