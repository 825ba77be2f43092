"""Start the ranks of a training job: torchrun on this machine, SLURM's layout across machines.

torchrun (torch.distributed.run) starts and supervises the ranks: when one rank fails, it stops
the others and prints that rank's error. Inside a rank, `rank_env` reads its place in the job.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from chatforge.files import ChatforgeError

DEFAULT_PORT = 29500


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list ("gpu[01-03,07],login2") as host names."""
    hosts = []
    for name, ranges in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?,?", nodelist):
        if not ranges:
            hosts.append(name)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{name}{str(i).zfill(len(lo))}")
    return hosts


def slurm_nodes(env=os.environ) -> dict:
    """Node layout from a SLURM allocation (one launcher per node): nnodes, node_rank, master_addr."""
    if "SLURM_JOB_ID" not in env or "SLURM_NNODES" not in env:
        return {}
    hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
    return {
        "nnodes": int(env["SLURM_NNODES"]),
        "node_rank": int(env.get("SLURM_NODEID", 0)),
        "master_addr": hosts[0] if hosts else None,
    }


def torchrun_argv(
    args: list[str],
    gpus: int,
    nnodes: int | None = None,
    node_rank: int | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
    env=os.environ,
) -> list[str]:
    """The torchrun command that runs `python -m chatforge ARGS` on `gpus` processes of this node.

    The same interpreter as this process runs torchrun (never one found on PATH). Values not
    given come from SLURM when running inside an allocation.
    """
    slurm = slurm_nodes(env)
    nnodes = nnodes or slurm.get("nnodes") or 1
    node_rank = node_rank if node_rank is not None else slurm.get("node_rank", 0)
    master_addr = master_addr or slurm.get("master_addr")
    if gpus < 1 or nnodes < 1 or not 0 <= node_rank < nnodes:
        raise ChatforgeError(
            f"--gpus {gpus} --nnodes {nnodes} --node-rank {node_rank}: need gpus >= 1 and 0 <= node-rank < nnodes"
        )
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={gpus}"]
    if nnodes == 1 and master_addr is None and master_port is None:
        cmd.append("--standalone")  # a free local port; no clash between jobs on one host
    else:
        if master_addr is None:
            raise ChatforgeError("--nnodes > 1 needs --master-addr (the address of the node with --node-rank 0)")
        cmd += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            f"--master-addr={master_addr}",
            f"--master-port={master_port or DEFAULT_PORT}",
        ]
    return cmd + ["-m", "chatforge", *args]


def launch(args: list[str], gpus: int, **layout) -> int:
    """Run `chatforge ARGS` on several processes through torchrun; returns torchrun's exit status.

    Raises:
        ChatforgeError: an impossible layout, or --nnodes > 1 without --master-addr.
    """
    cmd = torchrun_argv(args, gpus, **layout)
    env = dict(os.environ)
    # NVLink multicast stays off (it can take a shared host's GPUs down); a user can still opt in.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    return subprocess.run(cmd, env=env).returncode


def in_launched_rank(env=os.environ) -> bool:
    return "TORCHELASTIC_RUN_ID" in env or ("RANK" in env and "WORLD_SIZE" in env)


def rank_env(env=os.environ) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else from srun's (one task per GPU)."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env:
        hosts = expand_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "")))
        os.environ.setdefault("MASTER_ADDR", hosts[0] if hosts else "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(DEFAULT_PORT))
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0
