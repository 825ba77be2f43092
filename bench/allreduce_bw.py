"""NCCL bandwidth between this machine's GPUs, as the trainers' gradient exchange sees it.

    python3 -m torch.distributed.run --nproc-per-node 2 bench/allreduce_bw.py
    NCCL_PROTO=Simple python3 -m torch.distributed.run --nproc-per-node 2 bench/allreduce_bw.py

Prints, on rank 0: whether the GPUs can reach each other directly (peer access), and the bus
bandwidth of all-reduce, all-gather and reduce-scatter on bf16 messages of DDP's bucket size and of
one decoder layer of InternLM2-1.8B (bus bandwidth as nccl-tests defines it).
"""

import os

import torch
import torch.distributed as dist
from gpu_checks import bench  # this folder: torchrun puts the script's folder on sys.path


def timed(fn) -> float:
    return bench(fn) / 1000  # seconds per call


def main() -> None:
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl")
    if rank == 0:
        peers = [torch.cuda.can_device_access_peer(0, j) for j in range(1, torch.cuda.device_count())]
        print(f"{world} ranks; GPU 0 peer access to the others: {peers}; NCCL_PROTO={os.environ.get('NCCL_PROTO')}")
    for mib in (25, 160):
        n = mib * 2**20 // 2
        x = torch.ones(n, dtype=torch.bfloat16, device="cuda")
        shard = torch.empty(n // world, dtype=torch.bfloat16, device="cuda")
        rows = {
            "all-reduce": (timed(lambda: dist.all_reduce(x)), 2 * (world - 1) / world),
            "all-gather": (timed(lambda: dist.all_gather_into_tensor(x, shard)), (world - 1) / world),
            "reduce-scatter": (timed(lambda: dist.reduce_scatter_tensor(shard, x)), (world - 1) / world),
        }
        if rank == 0:
            print(
                f"{mib} MiB: "
                + ", ".join(
                    f"{k} {x.numel() * 2 / t * f / 1e9:.0f} GB/s bus ({t * 1e3:.2f} ms)" for k, (t, f) in rows.items()
                ),
                flush=True,
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
