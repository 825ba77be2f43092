"""What LoRA dropout costs in the grouped A matmul of one layer: guidance for the LoRA recipe's step time, not a
figure of record (that is bench/recipe_speed.py).

A profile of the medical LoRA recipe on an H200 (docs/speed.md) put the dropout kernels of the earlier
chatforge/training/lora_groups.py (masks hashed in int64, hashed again in backward) at about 97 of 577 ms a
step, about ten times what their memory traffic needs. Each row compiles x @ A.T of one group (q/k/v: three
members, gate/up: two) and times forward and backward together, in this one process:

  none       no dropout (the floor: the matmul and the gradient of A)
  recompute  the earlier form: the int64 hash under plain checkpointing, hashed again in backward
  recompute32  as shipped (lora_groups.dropped_a): the same in int32 (the masks of keep_mask)
  torch      torch's dropout, one mask per member, kept for backward as PEFT does (inductor's own random numbers)
  shared     one recomputed mask for the whole group (one dropped copy, one matmul): the headroom; not PEFT's
             independent masks
It also checks that the shipped masks equal the earlier ones, compiled on this device.

    PYTHONPATH=. python3 bench/lora_dropout_kernels.py [--tokens 8192] [--hidden 2048] [--rank 64] [--json F]
    TORCH_LOGS=output_code PYTHONPATH=. python3 bench/lora_dropout_kernels.py 2> kernels.txt   (the Triton code)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

from chatforge.training import lora_groups  # noqa: E402

P = 0.1


def hash_dropout64(x: torch.Tensor, key: torch.Tensor, p: float) -> torch.Tensor:
    """The earlier masks: lora_groups' hash in int64 arithmetic."""
    return torch.where(lora_groups.keep_mask64(x, key, p), x * (1.0 / (1.0 - p)), 0.0)


def _dropped_a64(x, weight, keys, p, sizes):
    return torch.cat([F.linear(hash_dropout64(x, keys[i], p), w) for i, w in enumerate(weight.split(sizes))], -1)


def recompute(x, weight, keys, p, sizes):
    return checkpoint(_dropped_a64, x, weight, keys, p, sizes, use_reentrant=False)


def _shared_a(x, weight, keys, p):
    return F.linear(lora_groups.hash_dropout(x, keys[0], p), weight)


def shared(x, weight, keys, p, sizes):
    return checkpoint(_shared_a, x, weight, keys, p, use_reentrant=False)


def torch_dropout(x, weight, keys, p, sizes):
    return torch.cat([F.linear(F.dropout(x, p), w) for w in weight.split(sizes)], -1)


def no_dropout(x, weight, keys, p, sizes):
    return F.linear(x, weight)


VARIANTS = {
    "none": no_dropout,
    "recompute": recompute,
    "recompute32": lora_groups.dropped_a,
    "torch": torch_dropout,
    "shared": shared,
}


def time_variant(fn, x, weight, keys, sizes, repeats: int) -> float:
    """Milliseconds per forward + backward, compiled, after three warm-up calls."""
    f = torch.compile(fn)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(3):
        f(x, weight, keys, P, sizes).sum().backward()
    sync()
    t = time.perf_counter()
    for _ in range(repeats):
        f(x, weight, keys, P, sizes).sum().backward()
    sync()
    return 1e3 * (time.perf_counter() - t) / repeats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of a micro-batch (4 rows of 2,048)")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "tokens": a.tokens, "hidden": a.hidden}
    shape = f"x ({a.tokens}, {a.hidden}) {dtype}, rank {a.rank}, dropout {P}"
    print(f"{results['device']}: {shape}; ms per forward + backward")
    print("| group | " + " | ".join(VARIANTS) + " |\n|---|" + "---|" * len(VARIANTS))
    for members in (3, 2):
        sizes = (a.rank,) * members
        x = torch.randn(a.tokens, a.hidden, device=dev, dtype=dtype, requires_grad=True)
        weight = torch.randn(sum(sizes), a.hidden, device=dev, dtype=dtype, requires_grad=True)
        keys = torch.tensor([7 * 1000003 + i * lora_groups.GOLDEN for i in range(members)], device=dev)
        ones = torch.ones_like(x, requires_grad=False)
        keep = torch.compile(lora_groups.hash_dropout)
        same = all(torch.equal(keep(ones, keys[i], P), hash_dropout64(ones, keys[i], P)) for i in range(members))
        results[f"group_{members}_masks_equal_earlier"] = same
        row = {name: round(time_variant(fn, x, weight, keys, sizes, a.repeats), 3) for name, fn in VARIANTS.items()}
        results[f"group_{members}"] = row
        cells = " | ".join(f"{v:.3f}" for v in row.values())
        print(f"| {members} members | {cells} | masks equal the earlier ones: {same}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
