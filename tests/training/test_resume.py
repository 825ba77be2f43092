"""Resume as it meets real run folders: no code from the folder runs, ordinary leftovers do not break it,
a changed recipe is refused, and a full disk keeps the last good checkpoint."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from chatforge.files import ChatforgeError
from conftest import call_cli, cli_env


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from chatforge.data.identity import IdentitySpec, write_identity_data

    out = tmp_path_factory.mktemp("data") / "identity.jsonl"
    write_identity_data(IdentitySpec(owner="Noor Haddad"), out)
    return out


def recipe(tiny_llama, data, out, **keys):
    from chatforge.config import load_recipe

    return load_recipe(
        "smollm2_135m_identity_lora",
        {
            "model": str(tiny_llama),
            "data": str(data),
            "output_dir": str(out),
            "max_steps": 3,
            "save_every": 1,
            "keep_checkpoints": 5,
            "batch_size": 2,
            "max_length": 128,
            "eval_prompts": [],
            **keys,
        },
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_llama, data):
    """A finished 3-step run with checkpoints 1, 2, 3 (copied per test)."""
    from chatforge.training.trainer import train

    out = tmp_path_factory.mktemp("run") / "run"
    train(recipe(tiny_llama, data, out), progress=False)
    return out


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_a_crafted_state_file_runs_no_code(run, tmp_path, tiny_llama, data):
    from chatforge.training.trainer import STATE_FILE, train

    folder = copy_of(run, tmp_path)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 3, "x": Payload()}, folder / "checkpoint-3" / STATE_FILE)
    with pytest.raises(ChatforgeError, match="refusing to load"):
        train(recipe(tiny_llama, data, folder, max_steps=4), resume=True, progress=False)
    assert not marker.exists()


def test_leftovers_torn_log_odd_folders_and_stale_temps(run, tmp_path, tiny_llama, data):
    from chatforge.training.trainer import checkpoints, train

    folder = copy_of(run, tmp_path)
    shutil.rmtree(folder / "checkpoint-3")
    shutil.copytree(folder / "checkpoint-2", folder / "checkpoint-12.bak")
    shutil.copytree(folder / "checkpoint-1", folder / "checkpoint-99-old")
    stale = folder / ".checkpoint-7.abc123.tmp"
    stale.mkdir()
    (stale / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
    with open(folder / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # torn by a kill
    assert [p.name for p in checkpoints(folder)] == ["checkpoint-1", "checkpoint-2"]
    train(recipe(tiny_llama, data, folder, max_steps=4), resume=True, progress=False, allow_changes=True)
    steps = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and not stale.exists()
    assert (folder / "checkpoint-12.bak").is_dir() and (folder / "checkpoint-99-old").is_dir()  # not rotated


def test_a_changed_recipe_is_refused_unless_allowed(run, tmp_path, tiny_llama, data):
    from chatforge.training.trainer import train

    folder = copy_of(run, tmp_path)
    with pytest.raises(ChatforgeError, match=r"lr: 0\.002 -> 0\.003.*--allow-changes"):
        train(recipe(tiny_llama, data, folder, lr=0.003), resume=True, progress=False)
    with pytest.raises(ChatforgeError, match="lora"):
        train(recipe(tiny_llama, data, folder, **{"lora": {"r": 8}}), resume=True, progress=False)
    train(
        recipe(tiny_llama, data, folder, max_steps=4, save_every=0), resume=True, progress=False, allow_changes=True
    )  # max_steps changed: allowed when asked
    assert (folder / "checkpoint-4").is_dir()


def test_a_full_disk_names_the_path_and_keeps_the_last_checkpoint(run, tmp_path, tiny_llama, data, monkeypatch):
    from chatforge.training import trainer as train_mod

    folder = copy_of(run, tmp_path)

    def no_space(obj, path, *a, **k):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(train_mod.torch, "save", no_space)
    with pytest.raises(
        ChatforgeError,
        match=r"could not write .*checkpoint-4.*GiB free.*keep_checkpoints=1.*"
        r"last good checkpoint is .*checkpoint-3",
    ):
        train_mod.train(
            recipe(tiny_llama, data, folder, max_steps=4, keep_checkpoints=1),
            resume=True,
            progress=False,
            allow_changes=True,
        )
    assert (folder / "checkpoint-3" / train_mod.STATE_FILE).is_file()
    assert not list(folder.glob(".checkpoint-4*")) and not (folder / "checkpoint-4").exists()


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    from chatforge import files

    synced = []
    real = os.fsync
    monkeypatch.setattr(files.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    with files.atomic_path(tmp_path / "out", is_dir=True) as tmp:
        (tmp / "a.bin").write_bytes(b"x")
    assert any(p.endswith("a.bin") for p in synced) and str(tmp_path) in synced


def test_out_of_memory_names_the_keys_and_keeps_the_checkpoints(run, tmp_path, tiny_llama, data, monkeypatch):
    from chatforge.training import trainer as train_mod

    folder = copy_of(run, tmp_path)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, "accumulate", oom)
    with pytest.raises(
        ChatforgeError,
        match=r"out of GPU memory at step 4 .*micro_batch, max_length or "
        r"memory_budget_gib.*checkpoint-3",
    ):
        train_mod.train(recipe(tiny_llama, data, folder, max_steps=5), resume=True, progress=False, allow_changes=True)
    assert (folder / "checkpoint-3" / train_mod.STATE_FILE).is_file()


def _train_args(model, data, out):
    return [
        "train",
        "smollm2_135m_identity_lora",
        f"model={model}",
        f"data={data}",
        f"output_dir={out}",
        "max_steps=12",
        "save_every=4",
        "batch_size=2",
        "max_length=128",
        "eval_prompts=[]",
        "keep_checkpoints=5",
        "--no-progress",
    ]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, tiny_llama, data):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert call_cli(*_train_args(tiny_llama, data, full)).returncode == 0  # in this process: no start-up

    proc = subprocess.Popen(
        [sys.executable, "-m", "chatforge", *map(str, _train_args(tiny_llama, data, cut))],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (cut / "checkpoint-4").is_dir() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (cut / "checkpoint-4").is_dir() and not (cut / "adapter").exists()
    r = call_cli(*_train_args(tiny_llama, data, cut), "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    log = [json.loads(line) for line in (cut / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
