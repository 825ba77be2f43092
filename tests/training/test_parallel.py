"""Several processes on CPU (gloo): the same losses as one process, resume across world sizes,
a killed rank ends the job, two launchers on one host act as two machines."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from chatforge.files import ChatforgeError
from chatforge.training import launch, parallel
from conftest import ROOT

RECIPE = "smollm2_135m_identity_lora"
WORDS = "alpha beta gamma delta echo foxtrot golf hotel india juliet kilo lima mike".split()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("dist-data") / "data.jsonl"
    with path.open("w") as f:
        for _ in range(24):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20)))
            f.write(
                json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            )
    return path


def overrides(model, data, out, **extra) -> list[str]:
    keys = {
        "model": model,
        "data": data,
        "output_dir": out,
        "max_steps": 4,
        "batch_size": 4,
        "grad_accum": 1,
        "save_every": 2,
        "keep_checkpoints": 2,
        "eval_prompts": "[]",
        "lr": 1e-3,
        "collective_timeout": 30,
    }
    keys.update(extra)
    return [f"{k}={v}" for k, v in keys.items()]


def train_here(args: list[str], resume: bool = False):
    """One process, inside pytest (no interpreter start-up), one thread like each launched rank."""
    import torch

    from chatforge.config import load_recipe
    from chatforge.training.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine, 2 spinning OpenMP threads ran 70x slower
    try:
        return train(load_recipe(RECIPE, args), resume=resume, progress=False)
    finally:
        torch.set_num_threads(threads)


def cli(*args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(k, None)
    return subprocess.Popen(
        [sys.executable, "-m", "chatforge", "train", RECIPE, *map(str, args), "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())}


def assert_same(a: dict, b: dict, steps):
    for s in steps:
        assert a[s] == pytest.approx(b[s], rel=1e-4, abs=1e-5), (s, a, b)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resume_alone(run: Path, copy: Path, method_args: list[str]) -> dict:
    """Resume a multi-process run from its step-2 checkpoint in this one process; its log from there."""
    shutil.copytree(run, copy)
    for p in ("checkpoint-4", "adapter", "model"):
        shutil.rmtree(copy / p, ignore_errors=True)
    train_here(method_args, resume=True)
    return losses(copy)


def test_ddp_two_processes_match_one_and_resume_on_one(tmp_path, tiny_llama, data_file):
    two = cli(*overrides(tiny_llama, data_file, tmp_path / "ddp2", profile_steps=1), "--gpus", "2")
    train_here(overrides(tiny_llama, data_file, tmp_path / "one"))  # while the two ranks run
    finish(two)
    one, ddp = losses(tmp_path / "one"), losses(tmp_path / "ddp2")
    assert_same(one, ddp, range(1, 5))  # profiling one step changes nothing
    for rank in (0, 1):
        assert "idle" in (tmp_path / "ddp2" / "profile" / f"rank{rank}.txt").read_text()
    assert (tmp_path / "ddp2" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "ddp2").glob(".*tmp"))  # rank 0 alone wrote, nothing half-written
    resumed = resume_alone(
        tmp_path / "ddp2", tmp_path / "resumed", overrides(tiny_llama, data_file, tmp_path / "resumed")
    )
    assert_same(resumed, ddp, (3, 4))


@pytest.fixture(scope="module")
def full_alone(tmp_path_factory, tiny_llama, data_file) -> Path:
    """Full fine-tuning in one process: the reference of the sharded strategies."""
    run = tmp_path_factory.mktemp("full") / "one"
    train_here(overrides(tiny_llama, data_file, run, method="full"))
    return run


def test_fsdp2_on_two_launchers_as_two_machines(tmp_path, tiny_llama, data_file, full_alone):
    """Two torchrun launchers (--nnodes 2) on 127.0.0.1; full fine-tuning, FSDP2 (auto for full),
    gathered weights kept from forward to backward (auto on CPU reshards)."""
    port = free_port()
    args = overrides(tiny_llama, data_file, tmp_path / "fsdp", method="full") + ["fsdp_reshard_after_forward=false"]
    nodes = [
        cli(
            *args,
            "--gpus",
            "1",
            "--nnodes",
            "2",
            "--node-rank",
            str(r),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(port),
        )
        for r in (0, 1)
    ]
    outs = [finish(p) for p in nodes]
    one, fsdp = losses(full_alone), losses(tmp_path / "fsdp")
    assert_same(one, fsdp, range(1, 5))
    assert (tmp_path / "fsdp" / "model" / "model.safetensors").is_file(), outs[0][-2000:]
    resumed = resume_alone(
        tmp_path / "fsdp", tmp_path / "resumed", overrides(tiny_llama, data_file, tmp_path / "resumed", method="full")
    )
    assert_same(resumed, fsdp, (3, 4))


def test_deepspeed_zero3_matches_one_process(tmp_path, tiny_llama, data_file, full_alone):
    """ZeRO-3 on CPU (gloo): same losses and, gathered on save, the same final weights."""
    pytest.importorskip("deepspeed")
    from safetensors.torch import load_file

    run = tmp_path / "zero3"
    finish(cli(*overrides(tiny_llama, data_file, run, method="full"), "--gpus", "2", "--strategy", "deepspeed_zero3"))
    assert_same(losses(full_alone), losses(run), range(1, 5))
    mine, ref = load_file(run / "model" / "model.safetensors"), load_file(full_alone / "model" / "model.safetensors")
    assert set(mine) == set(ref)
    assert all((mine[k] - ref[k]).abs().max() < 1e-5 for k in ref)


def test_killed_rank_ends_the_job_with_its_error(tmp_path, tiny_llama, data_file):
    import psutil

    run = tmp_path / "killed"
    job = cli(
        *overrides(tiny_llama, data_file, run, max_steps=100000, save_every=0, collective_timeout=20), "--gpus", "2"
    )
    deadline = time.time() + 180
    while not (run / "log.jsonl").is_file() and time.time() < deadline and job.poll() is None:
        time.sleep(0.5)
    assert job.poll() is None, job.communicate()[0][-3000:]
    ranks = {
        p.environ().get("RANK"): p
        for p in psutil.Process(job.pid).children(recursive=True)
        if "chatforge" in " ".join(p.cmdline()) and p.environ().get("RANK") is not None
    }
    assert set(ranks) >= {"0", "1"}, ranks
    killed_at = time.time()
    os.kill(ranks["1"].pid, signal.SIGKILL)
    out, _ = job.communicate(timeout=60)
    assert job.returncode != 0
    assert time.time() - killed_at < 40  # well inside the collective timeout plus torchrun's grace
    assert "SIGKILL" in out or "Signal 9" in out, out[-3000:]
    assert "chatforge: error: training stopped" in out


def test_launch_layout_slurm_and_strategies(monkeypatch, capsys):
    from chatforge.cli import main

    assert main(["train", RECIPE, "data=x.jsonl", "batch_size=3", "--gpus", "2"]) == 2  # before any process starts
    assert "batch_size x grad_accum = 3 does not split over 2 processes" in capsys.readouterr().err
    assert launch.expand_nodelist("gpu[01-03,07],login2") == ["gpu01", "gpu02", "gpu03", "gpu07", "login2"]
    env = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[3-4]"}
    cmd = launch.torchrun_argv(["train", "r"], 4, env=env)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]  # this interpreter, never PATH's
    assert {"--nproc-per-node=4", "--nnodes=2", "--node-rank=1", "--master-addr=n3"} <= set(cmd)
    assert cmd[-4:] == ["-m", "chatforge", "train", "r"]
    assert "--standalone" in launch.torchrun_argv(["train", "r"], 2, env={})
    with pytest.raises(ChatforgeError, match="master-addr"):
        launch.torchrun_argv(["train", "r"], 2, nnodes=2, node_rank=0, env={})
    srun = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "n[3-4]"}
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert launch.rank_env(srun) == (5, 8, 1) and os.environ["MASTER_ADDR"] == "n3"
    assert parallel.resolve_strategy("auto", "lora", 2) == "ddp"
    assert parallel.resolve_strategy("auto", "full", 4) == "fsdp2"
    assert parallel.resolve_strategy("fsdp2", "full", 1) == "none"
    with pytest.raises(ChatforgeError, match="QLoRA"):
        parallel.resolve_strategy("fsdp2", "qlora", 2)
    par = parallel.Parallel(rank=1, world=2)
    assert par.shard(list(range(8))) == [4, 5, 6, 7]
    with pytest.raises(ChatforgeError, match="does not split"):
        par.shard(list(range(6))[:3])


def test_fsdp2_options():
    model = torch.nn.Linear(1000, 1000).to(torch.bfloat16)  # 1M weights: 2 MB gathered
    gpu = parallel.FullyShardedParallel(world=2, device="cuda")
    assert parallel.fsdp2_options(model, gpu, 100 * 2**20) == (torch.bfloat16, torch.bfloat16, False)
    assert parallel.fsdp2_options(model, gpu, 10 * 2**20)[2] is True  # over a tenth: reshard
    cpu = parallel.FullyShardedParallel(world=2, device="cpu", reduce_dtype="fp32", reshard_after_forward=False)
    assert parallel.fsdp2_options(model, cpu, 0) == (None, torch.float32, False)
    assert (
        parallel.fsdp2_options(model.float(), parallel.FullyShardedParallel(world=2, device="cuda"), 100 * 2**20)[1]
        == torch.float32
    )  # fp32 weights: fp32 exchange


def test_plan_config_sizes_for_the_rank_and_turns_off_what_zero3_breaks():
    from chatforge.config import TrainConfig, build

    cfg = build(TrainConfig, {"batch_size": 4, "grad_accum": 2}, "r")
    ddp = parallel.for_strategy("ddp", world=2).plan_config(cfg, 4)
    assert (ddp.batch_size, ddp.grad_accum, ddp.compile, ddp.lora_groups) == (4, 1, "auto", "auto")
    assert ddp.cuda_graphs is False and parallel.Parallel().plan_config(cfg, 8).cuda_graphs == "auto"
    with pytest.raises(ChatforgeError, match="cuda_graphs"):
        parallel.for_strategy("ddp", world=2).plan_config(build(TrainConfig, {"cuda_graphs": True}, "r"), 4)
    z3 = parallel.for_strategy("deepspeed_zero3", world=2).plan_config(cfg, 4)
    assert (z3.compile, z3.lora_groups) == (False, False)  # parameters gathered per module call
    asked = build(TrainConfig, {"lora_groups": True}, "r")
    with pytest.raises(ChatforgeError, match="lora_groups"):
        parallel.for_strategy("deepspeed_zero3", world=2).plan_config(asked, 4)
