"""Training speed, side by side: Hugging Face Trainer baselines and chatforge's Trainer, one GPU, on
fixed rows of random ids (a guide for the speed levers; the figures of record come from
bench/recipe_speed.py, which runs `chatforge train` on real data).

    PYTHONPATH=. python3 bench/train_speed.py                 # the default set (GPU, InternLM2-1.8B shape)
    PYTHONPATH=. python3 bench/train_speed.py --tiny          # CPU smoke test, tiny shape, no timing meaning
    PYTHONPATH=. python3 bench/train_speed.py hf_lora_b8 cf_lora_b8 cf_lora_b8,compile=0

Scenarios: hf_{lora|qlora|full}[_gc][_bN][_liger] (bench/hf_baseline.py) and
cf_{lora|qlora|full}_bG[,key=value...] (chatforge, G samples per optimizer step; keys: micro, ckpt,
compile, loss, dropout, budget, nf4=torch|bitsandbytes, cpp=1 (Inductor C++ wrapper), autotune=1 (GEMM
autotuning), groups=0 (PEFT's own LoRA forward: no shared A matmul for projections with the same
input), prof=N for a profile of N steps after 3 (the recipe key profile_steps). Each GPU scenario runs
in its own process, so peaks do not mix.
Prints a table: tokens/s, peak GiB, MFU, ratio to the best baseline within the same memory, and the
per-step loss difference against the baseline with the same data and batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import hf_baseline  # noqa: E402
import torch  # noqa: E402

DEFAULT = [
    "hf_lora_b8",
    "cf_lora_b8",
    "hf_lora_gc_b4_liger",
    "hf_full",
    "cf_full_b4",
    "hf_full_gc_b4_liger",
    "hf_qlora_gc",
    "hf_qlora_gc_b4",
    "cf_qlora_b4",
    "cf_qlora_b8",
]
TINY = [
    "hf_lora_b4",
    "hf_full_b4",
    "cf_lora_b4",
    "cf_full_b4",
    "cf_lora_b4,ckpt=1,micro=2",
    "cf_full_b4,loss=plain",
    "hf_qlora_b4",
    "cf_qlora_b4",
]
BUDGET_GIB = {"lora": 24.0, "qlora": 8.0, "full": 32.5}
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}  # dense bf16, datasheet


def parse_cf(name: str) -> tuple[str, int, dict]:
    head, *opts = name.split(",")
    parts = head.split("_")
    method = parts[1]
    batch = int(parts[2][1:]) if len(parts) > 2 else 1
    return method, batch, dict(o.split("=", 1) for o in opts)


def _opt(value, kind):
    if value is None or value == "auto":
        return "auto"
    if kind is bool:
        return value not in ("0", "false", "False")
    return kind(value)


def run_chatforge(name: str, tiny: bool, steps: int, seq: int, warm: int) -> dict:
    """chatforge's Trainer (the object `chatforge train` runs) on the baseline's model and data, in the
    baseline's order."""
    import tempfile

    from chatforge.config import LoraConfig, TrainConfig
    from chatforge.data.dataset import Sample
    from chatforge.training.trainer import StepSampler, Trainer

    method, batch, opts = parse_cf(name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_baseline.build(f"hf_{method}", tiny, device)
    if method == "full" and device == "cuda":
        model.to(torch.bfloat16)  # chatforge trains full models in bf16 (weights, grads, AdamW states)
    dropout = float(opts.get("dropout", 0.0))
    if method != "full":
        model = hf_baseline.add_lora(model, dropout)
    model.config.use_cache = False
    model.train()
    import torch._inductor.config as inductor_config

    # cpp: Inductor's C++ wrapper (fewer Python calls per compiled layer); autotune: GEMM benchmarking
    for key, setting in (("cpp", "cpp_wrapper"), ("autotune", "max_autotune_gemm")):
        if key in opts:
            setattr(inductor_config, setting, _opt(opts[key], bool))
    vocab = (model.get_base_model() if hasattr(model, "get_base_model") else model).config.vocab_size
    data = hf_baseline.Rand(batch * steps, seq, vocab)
    # The Trainer draws each step's samples through a seeded permutation; placing sample p at perm[p]
    # makes it read the baseline's order, so per-step losses compare.
    perm = StepSampler(len(data), batch, seed=0)._perm(0)
    units = [None] * len(data)
    for p, i in enumerate(perm):
        ids = data[p]["input_ids"].tolist()
        units[i] = Sample(ids, ids, f"random:{p}")
    cfg = TrainConfig(
        model="(bench)",
        method=method,
        output_dir=tempfile.mkdtemp(prefix="cf_bench_"),
        lora=LoraConfig(r=64, alpha=16, dropout=dropout),
        max_length=seq,
        batch_size=batch,
        max_steps=steps,
        lr=2e-4,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        seed=0,
        packing=False,
        micro_batch=_opt(opts.get("micro"), int),
        gradient_checkpointing=_opt(opts.get("ckpt"), bool),
        compile=_opt(opts.get("compile"), bool),
        fused_loss=opts.get("loss", "auto"),
        memory_budget_gib=opts.get("budget", BUDGET_GIB[method] if device == "cuda" else "auto"),
        nf4_matmul=opts.get("nf4", "auto"),
        lora_groups=_opt(opts.get("groups"), bool),
        profile_steps=int(opts.get("prof", 0)),
    )
    t0 = time.perf_counter()
    trainer = Trainer(cfg, progress=False, model=model, samples=units).setup()
    trainer.fit(save=False)
    rows = trainer.history
    dt = (rows[-1]["elapsed_s"] - rows[warm - 1]["elapsed_s"]) / (len(rows) - warm)
    prof = Path(cfg.output_dir) / "profile" / "rank0.txt"
    return {
        "profile": prof.read_text() if prof.exists() else "",
        "name": name,
        "method": method,
        "global_batch": batch,
        "micro_batch": trainer.micro_batch,
        "tok_s": batch * seq / dt,
        "peak_gib": trainer.metrics.get("peak_gib", 0.0),
        "losses": [r["loss"] for r in rows],
        "step_ms": dt * 1000,
        "plan": asdict(trainer.plan),
        "compilations": trainer.metrics["compilations"],
        "first_steps_s": round(rows[warm - 1]["elapsed_s"] + trainer.meter.start - t0, 1),
    }


def run_one(name: str, tiny: bool, steps: int, seq: int, warm: int) -> dict:
    if name.startswith("hf_"):
        return hf_baseline.run(name, tiny=tiny, steps=steps, seq=seq, warm=warm)
    if name.startswith("cf_"):
        return run_chatforge(name, tiny, steps, seq, warm)
    raise SystemExit(f"unknown scenario {name!r}")


def flops_per_token(method: str, tiny: bool, seq: int) -> float:
    """Model FLOPs per trained token: 6 (full) or 4 (frozen base) x linear params, LoRA 6 x its
    params, attention 6 x seq x hidden x layers (causal, forward + backward); recomputation excluded."""
    c = hf_baseline.cfg(tiny)
    h, f, n, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = h // c.num_attention_heads * c.num_key_value_heads
    linear = n * (2 * h * h + 2 * h * kv + 3 * h * f) + v * h
    attn = 6 * seq * h * n
    if method == "full":
        return 6 * linear + attn
    lora = n * 64 * ((h + h) * 2 + (h + kv) * 2 + (h + f) * 3)
    return 4 * linear + 6 * lora + attn


def peak_flops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def loss_diff(a: list, b: list) -> tuple[float, float] | None:
    """(largest per-step relative difference, final-step relative difference), in percent."""
    n = min(len(a), len(b))
    if n == 0:
        return None
    rel = [abs(x - y) / abs(y) * 100 for x, y in zip(a[:n], b[:n])]
    return max(rel), rel[-1]


def table(results: list[dict], tiny: bool, seq: int) -> str:
    peak = peak_flops()
    base = [r for r in results if r["name"].startswith("hf_") and "error" not in r]
    lines = [
        "| scenario | batch (micro) | ckpt layers | tokens/s | peak GiB | MFU | x best plain Trainer | "
        "x best Trainer+Liger | loss diff max / final (%) |",
        "|" + "---|" * 9,
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:150]} |" + " |" * 7)
            continue
        mfu = f"{flops_per_token(r['method'], tiny, seq) * r['tok_s'] / peak * 100:.1f}%" if peak else "-"
        ratios = ["-", "-"]
        diff = "-"
        if r["name"].startswith("cf_"):
            budget = BUDGET_GIB[r["method"]] + 0.05
            for i, liger in enumerate((False, True)):
                pool = [
                    b["tok_s"]
                    for b in base
                    if b["method"] == r["method"]
                    and ("liger" in b["name"]) == liger
                    and (tiny or b["peak_gib"] <= budget)
                ]
                if pool:
                    ratios[i] = f"{r['tok_s'] / max(pool):.2f}"
            pair = [b for b in base if b["method"] == r["method"] and b["global_batch"] == r["global_batch"]]
            if pair:
                d = loss_diff(r["losses"], pair[0]["losses"])
                diff = f"{d[0]:.3f} / {d[1]:.3f} (vs {pair[0]['name']})" if d else "-"
        ck = r.get("plan", {}).get("checkpoint_layers", "all" if "_gc" in r["name"] else 0)
        lines.append(
            f"| {r['name']} | {r['global_batch']} ({r['micro_batch']}) | {ck} | {r['tok_s']:,.0f} | "
            f"{r['peak_gib']:.1f} | {mfu} | {ratios[0]} | {ratios[1]} | {diff} |"
        )
    return "\n".join(lines)


def one_gpu_env() -> dict:
    """The scenario's environment with one visible GPU: on a multi-GPU host the HF Trainer would wrap
    the model in nn.DataParallel (measured: 11,001 instead of 27,154 tokens/s on 2 x H200)."""
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    return env


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*")
    ap.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warm", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--json", default=None, help="write all results (per-step losses too) here")
    ap.add_argument("--scenario-timeout", type=float, default=900, help="seconds before a scenario is stopped")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    steps = a.steps or (4 if a.tiny else 30)
    warm = a.warm or (1 if a.tiny else hf_baseline.WARM)
    seq = a.seq or (64 if a.tiny else 2048)
    names = a.scenarios or (TINY if a.tiny else DEFAULT)
    if a.child:
        print("RESULT " + json.dumps(run_one(names[0], a.tiny, steps, seq, warm)), flush=True)
        return 0
    results = []
    for name in names:
        if a.tiny and not torch.cuda.is_available():
            r = run_one(name, True, steps, seq, warm)  # in process: a smoke test
        else:
            cmd = [
                sys.executable,
                __file__,
                name,
                "--child",
                "--steps",
                str(steps),
                "--warm",
                str(warm),
                "--seq",
                str(seq),
            ] + (["--tiny"] if a.tiny else [])
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.scenario_timeout, env=one_gpu_env())
            except subprocess.TimeoutExpired as e:
                out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
                p = subprocess.CompletedProcess(cmd, -9, out, f"timed out after {a.scenario_timeout} s")
            found = [line[7:] for line in p.stdout.splitlines() if line.startswith("RESULT ")]
            r = json.loads(found[-1]) if found else {"name": name, "error": (p.stderr or p.stdout).strip()[-600:]}
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            if "error" in r:
                print(f"{name} failed:\n{r['error']}", file=sys.stderr, flush=True)
        results.append(r)
        short = {k: v for k, v in r.items() if k not in ("losses", "error", "profile")}
        print(json.dumps(short), flush=True)
        if a.json:  # after every scenario: a run cut short keeps what it measured
            Path(a.json).write_text(json.dumps(results, indent=1))
    for r in results:
        if r.get("profile"):
            print(f"\nprofile of {r['name']} (prof=N: N steps):\n{r['profile']}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(
        f"\n{gpu}, sequences of {seq} tokens, {steps} steps ({warm} warm-up), "
        f"budgets GiB {BUDGET_GIB}\n" + table(results, a.tiny, seq)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
