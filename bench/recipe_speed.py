"""The benchmark of record: shipped recipes through `chatforge train`, as a user runs them, on real data,
beside the Hugging Face Trainer set-up a user would pick on the same data, in one invocation.

    PYTHONPATH=. python3 bench/recipe_speed.py --model IL2_FOLDER --data huatuo.jsonl [SCENARIO ...] [--json F]

SCENARIO (default: DEFAULT below):
  cf_METHOD_STEPS[,key=value...]  `chatforge train internlm2_chat_1_8b_medical_sft method=METHOD max_steps=STEPS
                                  memory_budget_gib=BUDGET[METHOD]` (the recipe packs; compile: auto) + overrides
  hf_METHOD_STEPS[_bN]            Hugging Face Trainer + PEFT on the same samples, padding-free
                                  (DataCollatorWithFlattening: transformers' sdpa keeps samples apart by position
                                  ids), N samples per step (default 16, the recipe's batch_size); QLoRA as the seed
                                  (NF4, double quantisation, gradient checkpointing), full in fp32 with bf16 autocast
  parity_METHOD_STEPS[_bN]        chatforge (one sample per row, no compile, no dropout, constant lr) and the
                                  Trainer on the very same batches: the largest per-step loss difference
  assistant[_default]             `chatforge assistant --name ... --model MODEL` wall time (data, train, merge, eval);
                                  _default: on the embedded default model
  recipe:NAME[:STEPS][,key=value...]
                                  any shipped recipe as a user runs it (memory budget auto), whole or STEPS steps:
                                  InternLM2 recipes on MODEL, SmolLM2 ones on the default model; data: Huatuo,
                                  its answers as raw text (pretraining), `chatforge data identity` (identity)
Each scenario runs in its own process (peaks do not mix). Prints real (non-padding) tokens/s over the whole
run (warm-up and compilation included) and after warm-up, peak GiB, compilations and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RECIPE = "internlm2_chat_1_8b_medical_sft"
BUDGET_GIB = {"lora": 24, "qlora": 8, "full": 32.5}
DEFAULT = [
    "cf_lora_200",
    "hf_lora_30",
    "hf_lora_20_b64",
    "parity_lora_12",
    "cf_qlora_100",
    "hf_qlora_30",
    "parity_qlora_12",
    "cf_full_100",
    "hf_full_30",
    "parity_full_12",
]
PARITY_KEYS = [
    "packing=false",
    "compile=false",
    "lora.dropout=0",
    "lr_scheduler=constant",
    "warmup_ratio=0",
    "eval_prompts=[]",
]


def warmup_steps(steps: int) -> int:
    """As chatforge's RunMeter counts warm-up."""
    return min(max(5, steps // 20), steps - 1)


def env() -> dict:
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )


# ---------------------------------------------------------------- chatforge, through its CLI


def run_train(recipe: str, keys: list[str], out: Path) -> dict:
    """`chatforge train RECIPE KEYS`: its metrics.json, per-step losses and the wall time."""
    cmd = [sys.executable, "-m", "chatforge", "train", recipe, *keys, f"output_dir={out}", "--no-progress"]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        return {"error": p.stderr.strip()[-1500:]}
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    plan = json.loads((out / "speed_plan.json").read_text())
    shutil.rmtree(out, ignore_errors=True)  # a full run's weights are 3.5 GB: the next scenario needs the disk
    return {
        **metrics,
        "wall_s": round(wall, 1),
        "losses": [r["loss"] for r in rows],
        "elapsed_s": [r["elapsed_s"] for r in rows],  # per step: where a run's time went
        "log_tail": p.stderr.splitlines()[-20:],  # the run's last messages (warnings, its summary line)
        "plan": plan,
        "command": "chatforge " + " ".join(cmd[3:]),
    }


def run_cf(method: str, steps: int, a, extra: list[str], out: Path) -> dict:
    """The medical recipe on Huatuo with a method, a step count and that method's memory budget."""
    keys = [f"model={a.model}", f"data={a.data}", f"method={method}", f"max_steps={steps}", "save_every=0"]
    return run_train(RECIPE, keys + [f"memory_budget_gib={BUDGET_GIB[method]}", *a.set, *extra], out)


def recipe_data(recipe: str, model: str | None, a, work: Path) -> str:
    """The data a user gives a shipped recipe: Huatuo (alpaca) for SFT, Huatuo's answers as raw text for
    pretraining, `chatforge data identity` output for the identity recipes (replay answers written by the
    recipe's model, None: the default one, as `chatforge assistant` makes them). Each made once per invocation."""
    from chatforge.config import load_recipe

    cfg = load_recipe(recipe)
    if cfg.task == "pretrain":
        out = work / "pretrain.jsonl"
        if not out.exists():
            rows = [json.loads(line) for line in Path(a.data).read_text(encoding="utf-8").splitlines() if line.strip()]
            text = "".join(json.dumps({"text": r["output"]}, ensure_ascii=False) + "\n" for r in rows)
            out.write_text(text, encoding="utf-8")
        return str(out)
    if "identity" not in str(cfg.data):
        return a.data
    out = work / f"identity-{'given' if model else 'default'}-model.jsonl"
    if not out.exists():
        cmd = [sys.executable, "-m", "chatforge", "data", "identity", "--name", "Ada Park", "--out", str(out)]
        subprocess.run(cmd + (["--model", model] if model else []), env=env(), check=True)
    return str(out)


def run_recipe(recipe: str, steps: str, a, extra: list[str], work: Path) -> dict:
    """A shipped recipe as a user runs it: its own settings (memory budget auto), on the InternLM2 folder
    (InternLM2 recipes) or the default model, for its whole run or `steps` steps."""
    model = a.model if recipe.startswith("internlm2") else None
    keys = [f"model={model}"] if model else []
    keys += [f"data={recipe_data(recipe, model, a, work)}", "save_every=0"]
    result = run_train(recipe, keys + ([f"max_steps={steps}"] if steps else []) + [*a.set, *extra], work / recipe)
    return {"recipe": recipe, **result}


# ---------------------------------------------------------------- the Hugging Face Trainer, same samples


def samples_in_order(model: str, data: str, steps: int, batch: int, overrides: list[str]):
    """The recipe's samples (chatforge's reading, template and masks) in the order chatforge's
    unpacked run draws them: step k of the Trainer gets step k's samples."""
    from chatforge.config import load_recipe
    from chatforge.data import dataset
    from chatforge.models.load import load_tokenizer
    from chatforge.training.trainer import StepSampler

    cfg = load_recipe(RECIPE, [f"model={model}", f"data={data}", f"batch_size={batch}", *overrides])
    tokenizer = load_tokenizer(model)
    samples, _ = dataset.build_dataset(cfg, tokenizer)
    sampler = StepSampler(len(samples), batch, cfg.seed)
    return [samples[i] for step in range(steps) for i in sampler.indices(step)], tokenizer


def run_hf(method: str, steps: int, batch: int, model_path: str, data: str, parity: bool, overrides: list[str]) -> dict:
    import torch
    from torch.utils.data import SequentialSampler
    from transformers import DataCollatorWithFlattening, Trainer, TrainerCallback, TrainingArguments

    from chatforge.models.load import load_model

    ordered, _ = samples_in_order(model_path, data, steps, batch, overrides + (PARITY_KEYS if parity else []))
    cuda = torch.cuda.is_available()
    quant = None
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    dtype = torch.bfloat16 if cuda and method != "full" else torch.float32  # full: fp32 weights, bf16 autocast
    model = load_model(model_path, dtype=dtype, device="cuda" if cuda else "cpu", quantization_config=quant)
    model.config.use_cache = False
    if method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    if method != "full":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(42)
        model = get_peft_model(
            model,
            LoraConfig(
                r=64,
                lora_alpha=16,
                lora_dropout=0.0 if parity else 0.1,
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            ),
        )

    class Clock(TrainerCallback):
        def __init__(self):
            self.t, self.loss = [], []

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.t.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss.append(float(logs["loss"]))

    class InOrder(Trainer):  # chatforge's order, so step k holds the same samples on both sides
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    rows = [{"input_ids": s.input_ids, "labels": s.labels} for s in ordered]
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="hf_bench_"),
        per_device_train_batch_size=batch,
        max_steps=steps,
        learning_rate=2e-4,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=cuda,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        dataloader_num_workers=2 if cuda else 0,
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not cuda,
        gradient_checkpointing=method == "qlora",
    )
    clock = Clock()
    trainer = InOrder(
        model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithFlattening(), callbacks=[clock]
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    tokens = [sum(len(s.input_ids) for s in ordered[k * batch : (k + 1) * batch]) for k in range(steps)]
    warm = warmup_steps(steps)
    out = {
        "steps": steps,
        "real_tokens": sum(tokens),
        "seconds": round(clock.t[-1], 2),
        "tokens_per_s": round(sum(tokens) / clock.t[-1], 1),
        "warmup_steps": warm,
        "tokens_per_s_after_warmup": round(sum(tokens[warm:]) / (clock.t[-1] - clock.t[warm - 1]), 1),
        "losses": clock.loss,
        "batch": batch,
    }
    if cuda:
        out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


# ---------------------------------------------------------------- scenarios


def child(name: str, a) -> dict:
    kind, method, steps, *rest = name.split("_")
    batch = int(rest[0][1:]) if rest else 16
    return run_hf(method, int(steps), batch, a.model, a.data, kind == "parity", a.set)


def run_child(name: str, a) -> dict:
    cmd = [sys.executable, __file__, name, "--child", "--model", a.model, "--data", a.data] + [
        f"--set={kv}" for kv in a.set
    ]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    found = [line[7:] for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    r = json.loads(found[-1]) if found else {"error": (p.stderr or p.stdout).strip()[-1500:]}
    r["wall_s"] = round(time.perf_counter() - t, 1)
    return r


def run_scenario(name: str, a, work: Path) -> dict:
    head, *opts = name.split(",")
    kind, *parts = head.split("_")
    if kind == "assistant":  # assistant_default: the embedded default model
        model = [] if parts == ["default"] else ["--model", a.model]
        cmd = [
            sys.executable,
            "-m",
            "chatforge",
            "assistant",
            "--name",
            "Ada Park",
            *model,
            "--out",
            str(work / head),
            "--no-progress",
            *opts,
        ]
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env(), capture_output=True, text=True)
        if p.returncode:
            return {"error": p.stderr.strip()[-1500:]}
        scores = json.loads((work / head / "eval.json").read_text())["scores"]["fine-tuned"]
        return {
            "wall_s": round(time.perf_counter() - t, 1),
            "identity": scores.get("identity"),
            "stages": json.loads((work / head / "timings.json").read_text()),
        }
    if head.startswith("recipe:"):
        _, recipe, *steps = head.split(":")
        return run_recipe(recipe, steps[0] if steps else "", a, opts, work)
    method, steps = parts[0], int(parts[1])
    if kind == "cf":
        return run_cf(method, steps, a, opts, work / name.replace(",", "_").replace("=", "-"))
    if kind == "hf":
        return run_child(head, a)
    if kind == "parity":
        batch = int(parts[2][1:]) if len(parts) > 2 else 16
        cf = run_cf(method, steps, a, PARITY_KEYS + [f"batch_size={batch}"], work / head)
        hf = run_child(head, a)
        if "error" in cf or "error" in hf:
            return {"error": cf.get("error") or hf.get("error")}
        n = min(len(cf["losses"]), len(hf["losses"]))
        rel = [abs(x - y) / abs(y) * 100 for x, y in zip(cf["losses"][:n], hf["losses"][:n])]
        return {
            "steps": n,
            "max_diff_pct": round(max(rel), 4),
            "final_diff_pct": round(rel[-1], 4),
            "chatforge": cf["losses"],
            "trainer": hf["losses"],
        }
    raise SystemExit(f"unknown scenario {name!r}")


def table(results: dict) -> str:
    lines = [
        "| scenario | real tokens/s (whole run) | after warm-up | peak GiB | compilations | wall s | x Trainer |",
        "|---|---|---|---|---|---|---|",
    ]
    base = {}
    for name, r in results.items():
        if name.startswith("hf_") and "error" not in r:
            method = name.split("_")[1]
            base[method] = max(base.get(method, 0), r["tokens_per_s"])
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][-200:]} | | | | | |")
        elif name.startswith("parity"):
            lines.append(
                f"| {name} | per-step loss vs the Trainer: max {r['max_diff_pct']}%, final "
                f"{r['final_diff_pct']}% over {r['steps']} steps | | | | | |"
            )
        elif name.startswith("assistant"):
            lines.append(f"| {name} | stages {r['stages']} | | | | {r['wall_s']} | |")
        else:
            method = name.split("_")[1]
            ratio = f"{r['tokens_per_s'] / base[method]:.2f}" if name.startswith("cf") and method in base else ""
            lines.append(
                f"| {name} | {r['tokens_per_s']:,.0f} | {r.get('tokens_per_s_after_warmup', 0):,.0f} | "
                f"{r.get('peak_gib', 0):.1f} | {r.get('compilations', '')} | {r.get('wall_s', '')} | {ratio} |"
            )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("scenarios", nargs="*")
    ap.add_argument("--model", required=True, help="an InternLM2-Chat-1.8B folder (official format)")
    ap.add_argument("--data", required=True, help="Huatuo llama_data.jsonl (alpaca lines)")
    ap.add_argument("--json", help="write all results here (after every scenario)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for every scenario (e.g. max_length=256 for a CPU smoke run)",
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a.scenarios[0], a)), flush=True)
        return 0
    results, work = {}, Path(tempfile.mkdtemp(prefix="recipe_speed_"))
    for name in a.scenarios or DEFAULT:
        results[name] = run_scenario(name, a, work)
        print(
            json.dumps(
                {name: {k: v for k, v in results[name].items() if k not in ("losses", "chatforge", "trainer", "plan")}}
            ),
            flush=True,
        )
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1, ensure_ascii=False))
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{gpu}, recipe {RECIPE} on {Path(a.data).name}, budgets GiB {BUDGET_GIB}\n{table(results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
