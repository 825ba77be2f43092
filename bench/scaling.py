"""Multi-GPU scaling of `chatforge train --gpus N`: tokens/s per GPU and efficiency against 1 GPU.

    PYTHONPATH=. python3 bench/scaling.py                      # GPU: InternLM2-1.8B shape, 1/2/4 GPUs
    PYTHONPATH=. python3 bench/scaling.py --gpus 1,2 --runs lora:ddp,full:fsdp2
    PYTHONPATH=. python3 bench/scaling.py --tiny --gpus 1,2    # CPU smoke test (gloo), no speed meaning

Each run is the real CLI (torchrun launcher, chatforge's trainer with its default speed plan) on
GPUs 0..N-1 of this machine, continued pretraining on random 2,048-token documents so every
sample is full length. Per-GPU work is fixed (weak scaling): each GPU takes `--per-gpu` samples per
optimizer step, so the global batch is per-gpu x N. A run is stopped once `--warm` + `--steps`
steps are logged; throughput is taken over the last `--steps` steps from the run's log.jsonl.
Efficiency = tokens/s per GPU / tokens/s of the 1-GPU run of the same method (plain, unwrapped).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RUNS = [
    "lora:ddp",
    "full:fsdp2",
    "lora:deepspeed_zero2",
    "full:deepspeed_zero2",
    "lora:deepspeed_zero3",
    "full:deepspeed_zero3",
]


def build_inputs(folder: Path, tiny: bool, docs: int, seq: int) -> tuple[Path, Path]:
    """A random-weight Llama of InternLM2-1.8B's shape with a word-level tokenizer, and documents."""
    import random

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, data = folder / "model", folder / "docs.jsonl"
    if (model_dir / "config.json").is_file() and data.is_file():
        return model_dir, data
    vocab = 2048 if tiny else 92544
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64 if tiny else 2048,
        intermediate_size=128 if tiny else 8192,
        num_hidden_layers=2 if tiny else 24,
        num_attention_heads=4 if tiny else 16,
        num_key_value_heads=2 if tiny else 8,
        max_position_embeddings=32768,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)  # on the GPU in a child process (--build-only): the bench holds no GPU memory
    with torch.device("cuda" if torch.cuda.is_available() and not tiny else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.float32 if tiny else torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab)}}
    tk = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<pad>"
    ).save_pretrained(model_dir)
    rng = random.Random(0)
    with data.open("w") as f:
        for _ in range(docs):
            f.write(json.dumps({"text": " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(seq + 8))}) + "\n")
    return model_dir, data


def recipe(folder: Path, model: Path, data: Path, method: str, seq: int, per_gpu: int, gpus: int) -> Path:
    path = folder / f"{method}.yaml"
    path.write_text(
        json.dumps(
            {  # JSON is YAML
                "model": str(model),
                "method": method,
                "task": "pretrain",
                "data": str(data),
                "max_length": seq,
                "overflow": "truncate",
                "batch_size": per_gpu,
                "grad_accum": gpus,
                "max_steps": 100000,
                "lr": 2e-4,
                "lr_scheduler": "constant",
                "warmup_ratio": 0.0,
                "save_every": 0,
                "log_every": 1,
                "eval_prompts": [],
                "lora": {"r": 64, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
                "collective_timeout": 300,
            }
        )
    )
    return path


def run_one(folder: Path, method: str, strategy: str, gpus: int, a, model: Path, data: Path) -> dict:
    """One `chatforge train --gpus N` run, stopped after warm + steps logged steps.

    strategy may carry recipe overrides: "deepspeed_zero3+compile=false".
    """
    strategy, *extra = strategy.split("+")
    out = folder / f"run-{method}-{strategy}-{gpus}"
    subprocess.run(["rm", "-rf", str(out)])
    cfg = recipe(folder, model, data, method, a.seq, a.per_gpu, gpus)
    cmd = [
        sys.executable,
        "-m",
        "chatforge",
        "train",
        str(cfg),
        f"output_dir={out}",
        *extra,
        "--no-progress",
        "--gpus",
        str(gpus),
    ]
    if strategy != "plain":
        cmd += ["--strategy", strategy]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
    )
    if not a.tiny:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(gpus)))
    t0 = time.perf_counter()
    logf = (folder / f"{out.name}.out").open("w")
    proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    need, log = a.warm + a.steps, out / "log.jsonl"
    rows: list = []
    last_change, peak = time.perf_counter(), 0.0
    while proc.poll() is None and time.perf_counter() - t0 < a.run_timeout:
        time.sleep(1)
        if len(rows) >= a.warm:
            peak = max(peak, gpu_memory_gib(gpus))
        new = [json.loads(x) for x in log.read_text().splitlines()] if log.is_file() else []
        if len(new) != len(rows):
            rows, last_change = new, time.perf_counter()
        if len(rows) >= need or (rows and time.perf_counter() - last_change > a.stall_s):
            break
    stopped_by_us = proc.poll() is None
    if stopped_by_us:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    logf.close()
    wall = round(time.perf_counter() - t0, 1)
    wait_gpus_free()
    if len(rows) < need:
        tail = (folder / f"{out.name}.out").read_text()[-1500:]
        return {
            "method": method,
            "strategy": "+".join([strategy, *extra]),
            "gpus": gpus,
            "wall_s": wall,
            "error": f"{len(rows)} of {need} steps logged (exit {proc.returncode}): {tail}",
        }
    a0, b0 = rows[a.warm - 1], rows[need - 1]
    tok_s = (b0["tokens"] - a0["tokens"]) / (b0["elapsed_s"] - a0["elapsed_s"])
    plan = json.loads((out / "speed_plan.json").read_text()) if (out / "speed_plan.json").is_file() else {}
    return {
        "method": method,
        "strategy": "+".join([strategy, *extra]),
        "gpus": gpus,
        "tok_s": tok_s,
        "tok_s_gpu": tok_s / gpus,
        "step_s": (b0["elapsed_s"] - a0["elapsed_s"]) / a.steps,
        "losses": [r["loss"] for r in rows],
        "plan": {k: plan.get(k) for k in ("micro_batch", "checkpoint_layers", "compile", "loss")},
        "first_step_s": rows[0]["elapsed_s"],
        "wall_s": wall,
        "gpu_mem_gib": round(peak, 1),
    }


def gpu_memory_gib(gpus: int) -> float:
    """Largest memory in use (nvidia-smi, so the CUDA context and the allocator's cache count) of GPUs 0..N-1."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return 0.0
    return max((float(x) / 1024 for x in out[:gpus]), default=0.0)


def wait_gpus_free(limit_s: float = 60) -> None:
    """Until no process holds a GPU (the next run's memory budget is taken from free memory)."""
    end = time.time() + limit_s
    while time.time() < end:
        try:
            busy = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return  # no GPU tools: CPU run
        if not busy:
            return
        time.sleep(1)


def table(results: list[dict], device: str) -> str:
    base = {
        r["method"]: r["tok_s_gpu"] for r in results if r["gpus"] == 1 and r["strategy"] == "plain" and "error" not in r
    }
    lines = [
        f"{device}; efficiency = tokens/s per GPU / the same method's 1-GPU run",
        "| method | strategy | GPUs | tokens/s | tokens/s per GPU | efficiency | GPU memory GiB | "
        "micro-batch / ckpt layers |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['strategy']} | {r['gpus']} | failed | | | | {r['error'][:200]!r} |")
            continue
        eff = f"{r['tok_s_gpu'] / base[r['method']] * 100:.1f}%" if r["method"] in base else "-"
        p = r["plan"]
        lines.append(
            f"| {r['method']} | {r['strategy']} | {r['gpus']} | {r['tok_s']:,.0f} | {r['tok_s_gpu']:,.0f} | "
            f"{eff} | {r.get('gpu_mem_gib', '-')} | {p.get('micro_batch')} / {p.get('checkpoint_layers')} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2,4", help="GPU counts (1 runs once per method, unwrapped)")
    ap.add_argument(
        "--runs",
        default=",".join(DEFAULT_RUNS),
        help="method:strategy[+key=value...] pairs for "
        "N > 1; method:plain+key=value... runs one more 1-GPU variant (e.g. +profile_steps=2)",
    )
    ap.add_argument("--per-gpu", type=int, default=8, help="samples per GPU per optimizer step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--run-timeout", type=float, default=240)
    ap.add_argument("--stall-s", type=float, default=60, help="stop a run whose log has not grown this long")
    ap.add_argument(
        "--fallback",
        default="",
        help="method:strategy+overrides runs made only when the same "
        "method:strategy failed at that GPU count, e.g. full:deepspeed_zero3+compile=false",
    )
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no run after this many seconds")
    ap.add_argument("--folder", default="/tmp/chatforge-scaling")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--tiny", action="store_true", help="tiny model on CPU (gloo): proves the path, not speed")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.tiny:
        a.seq, a.per_gpu = min(a.seq, 64), min(a.per_gpu, 2)
    folder = Path(a.folder)
    folder.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in a.gpus.split(",")]
    pairs = [tuple(x.split(":")) for x in a.runs.split(",") if x]
    t0 = time.perf_counter()
    docs = max(counts) * a.per_gpu * (a.warm + a.steps + 2)
    if a.build_only:
        build_inputs(folder, a.tiny, docs=docs, seq=a.seq)
        return 0
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--build-only",
            "--folder",
            str(folder),
            "--gpus",
            a.gpus,
            "--per-gpu",
            str(a.per_gpu),
            "--seq",
            str(a.seq),
            "--warm",
            str(a.warm),
            "--steps",
            str(a.steps),
        ]
        + ["--tiny"] * a.tiny,
        check=True,
    )
    model, data = build_inputs(folder, a.tiny, docs=docs, seq=a.seq)  # built: returns the paths
    print(f"inputs ready in {time.perf_counter() - t0:.0f} s", flush=True)
    plan = []
    for method in dict.fromkeys(m for m, _ in pairs):
        if 1 in counts:  # plus 1-GPU variants given as plain+overrides, e.g. full:plain+profile_steps=2
            plan += [(method, "plain", 1)] + [
                (method, s, 1) for m, s in pairs if m == method and s.startswith("plain+")
            ]
        for n in (c for c in counts if c > 1):
            plan += [(method, s, n) for m, s in pairs if m == method and not s.startswith(("deepspeed", "plain"))]
    for n in sorted((c for c in counts if c > 1), reverse=True):
        plan += [(m, s, n) for m, s in pairs if s.startswith("deepspeed")]
    fallback = {}
    for x in filter(None, a.fallback.split(",")):
        m, s = x.split(":")
        fallback.setdefault((m, s.split("+")[0]), []).append(s)
    results, failed = [], set()
    plan += [(m, s, n) for n in sorted(counts, reverse=True) if n > 1 for (m, _), ss in fallback.items() for s in ss]
    for method, strategy, n in plan:
        if (
            "+" in strategy
            and (method, strategy.split("+")[0], n) not in failed
            and strategy in fallback.get((method, strategy.split("+")[0]), [])
        ):
            continue  # a fallback, and what it falls back from did not fail
        if time.perf_counter() - t0 > a.budget_s:
            results.append({"method": method, "strategy": strategy, "gpus": n, "error": "not run: time budget"})
            continue
        r = run_one(folder, method, strategy, n, a, model, data)
        results.append(r)
        if "error" in r:
            failed.add((method, strategy, n))
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    import torch

    device = (
        f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU (gloo)"
    ) + f", sequences of {a.seq}, {a.per_gpu} samples per GPU per step"
    print("\n" + table(results, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
