"""GPU-only checks and micro-benchmarks behind the speed plan's choices (run on the GPU machine).

1. linear + cross-entropy backends on InternLM2's head (8,192 tokens x 2,048 -> 92,544):
   time (fwd+bwd), peak extra memory, and agreement with the plain fp32 loss and gradients;
2. varlen attention on a packed batch equals sdpa with transformers' block-causal mask;
3. chunked loss with compiled layers, eager vs compiled decoder layer (same loss).
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from chatforge.training import loss, patches, speed_plan  # noqa: E402


def bench(fn, reps=10):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1000


def loss_backends():
    n, h, v = 8192, 2048, 92544
    torch.manual_seed(0)
    hid = (torch.randn(n, h, device="cuda") * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device="cuda") * 0.02).to(torch.bfloat16)
    y = torch.randint(0, v, (n,), device="cuda")
    y[::5] = -100
    ref = loss.linear_cross_entropy_sum(hid.float(), w.float(), y, backend="plain")
    (gref,) = torch.autograd.grad(ref, hid)
    for frozen in (True, False):
        w.requires_grad_(not frozen)
        for backend in ("plain", "chunked", "liger"):
            try:

                def step():
                    out = loss.linear_cross_entropy_sum(hid, w, y, backend=backend)
                    out.backward()
                    return out

                hid.grad = None
                out = step()
                err = (out.float() - ref).abs().item() / ref.item()
                gerr = ((hid.grad.float() - gref).norm() / gref.norm()).item()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                ms = bench(step)
                extra = (torch.cuda.max_memory_allocated() - base) / 2**30
                print(
                    f"loss {backend:8s} weight {'frozen' if frozen else 'trained'}: {ms:7.2f} ms fwd+bwd, "
                    f"extra peak {extra:5.2f} GiB, rel loss err {err:.2e}, rel grad err {gerr:.2e}",
                    flush=True,
                )
            except Exception as e:  # a missing or failing backend is a finding, not a stop
                print(f"loss {backend}: failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            hid.grad = None
            w.grad = None


def varlen_check():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).cuda().to(torch.bfloat16)
    lens = [100, 37, 200, 175]
    width = 256
    ids = torch.randint(0, 1000, (2, width), device="cuda")
    pos = torch.cat([torch.arange(100), torch.arange(37), torch.arange(119), torch.arange(200), torch.arange(56)])
    pos = pos.view(2, width).cuda()
    cu = torch.tensor([0, 100, 137, 256, 456, 512], dtype=torch.int32, device="cuda")
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": pos, "attention_mask": None, "cu_seqlens": cu}
    ref, n = loss.loss_sum(model, batch, speed_plan.Plan(attention="sdpa", loss="plain"))
    patches.apply(model, speed_plan.Plan(attention="varlen"))
    out, n2 = loss.loss_sum(model, batch, speed_plan.Plan(attention="varlen"))
    print(
        f"varlen vs sdpa block mask: loss {out.item():.5f} vs {ref.item():.5f} "
        f"(rel {abs(out.item() - ref.item()) / ref.item():.1e}), tokens {int(n2)} vs {int(n)}; lens {lens}",
        flush=True,
    )


if __name__ == "__main__":
    for check in (loss_backends, varlen_check):
        try:
            check()
        except Exception as e:
            import traceback

            traceback.print_exc()
            print(f"{check.__name__} failed: {e}", flush=True)
