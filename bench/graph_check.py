"""Does CUDA-graph capture of the decoder layers work here, and what does it buy? (GPU only)

    PYTHONPATH=. python3 bench/graph_check.py compile=1 compile=1,expandable=0 compile=0 compile=1,mode=thread_local

Each configuration runs in its own process: LoRA r 64 on InternLM2-1.8B's layer shape (fewer layers,
`--layers`), micro-batch 4 x 2,048 tokens, two micro-batches per step. It prints the full error when
`torch.cuda.make_graphed_callables` fails, then the step time with and without graphs and the largest
loss and gradient difference between the two.
Keys: compile=0|1, expandable=0|1 (allocator expandable segments), mode=global|thread_local|relaxed
(capture error mode).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(opts: dict, layers: int, steps: int) -> None:
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = f"expandable_segments:{opts.get('expandable', '1') == '1'}"
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    import functools

    import torch

    import hf_baseline
    from chatforge import fastpath

    if "mode" in opts:
        graph_init = torch.cuda.graphs.graph.__init__
        torch.cuda.graphs.graph.__init__ = functools.partialmethod(graph_init, capture_error_mode=opts["mode"])
    original = torch.cuda.make_graphed_callables

    def loud(*a, **k):
        try:
            return original(*a, **k)
        except Exception:
            traceback.print_exc()
            raise

    torch.cuda.make_graphed_callables = loud
    results = {}
    for graphs in (False, True):
        cfg = hf_baseline.cfg(False)
        cfg.num_hidden_layers = layers
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = hf_baseline.LlamaForCausalLM(cfg).to(torch.bfloat16)
        model = hf_baseline.add_lora(model, 0.0)
        model.config.use_cache = False
        model.train()
        plan = fastpath.make_plan(model, device="cuda", method="lora", seq=2048, global_batch=8, micro_batch=4,
                                  checkpointing=False, compile=opts.get("compile", "1") == "1",
                                  memory_budget_gib=100, cuda_graphs=graphs)
        fastpath.apply(model, plan)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = fastpath.make_optimizer(params, 1e-4, 0.0, "cuda")
        g = torch.Generator().manual_seed(0)
        batches = [{"input_ids": (ids := torch.randint(0, cfg.vocab_size, (4, 2048), generator=g).cuda()),
                    "labels": ids} for _ in range(2)]
        times, first = [], None
        for step in range(steps):
            for b in batches:
                loss, n = fastpath.loss_sum(model, b)
                (loss / n / 2).backward()
            if first is None:
                first = (loss.item(), [p.grad.float().clone() for p in params])
            opt.step()
            opt.zero_grad(set_to_none=not fastpath.keeps_grads(model))
            torch.cuda.synchronize()
            times.append(time.perf_counter())
        ms = (times[-1] - times[2]) / (steps - 3) * 1000
        results[graphs] = (ms, first)
        print(f"graphs={graphs}: active={fastpath.keeps_grads(model)} step {ms:.1f} ms "
              f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        del model, opt, params
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    (l0, g0), (l1, g1) = results[False][1], results[True][1]
    gd = max(float((a - b).abs().max() / (a.abs().max() + 1e-12)) for a, b in zip(g0, g1))
    print(f"first-step loss {l0:.6f} vs {l1:.6f}; largest relative gradient difference {gd:.2e}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", default=["compile=1"])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(dict(kv.split("=") for kv in a.child.split(",") if kv), a.layers, a.steps)
        return 0
    for c in a.configs:
        print(f"\n=== {c}", flush=True)
        subprocess.run([sys.executable, __file__, "--child", c, "--layers", str(a.layers), "--steps", str(a.steps)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
