"""GGUF export on this machine: time and size per dtype, logits and greedy answers against the source.

    PYTHONPATH=. python3 bench/gguf_export.py                 # the default model, f32 f16 bf16 q8_0
    PYTHONPATH=. python3 bench/gguf_export.py --internlm2-1.8b --dtypes f16 q8_0   # random 1.8B shape

The default model's files are read back with transformers' GGUF loader: max logit difference on the
probe batch and how many of 8 greedy answers equal the source model's; for f16 and bf16 also against
the source with its weights rounded to that dtype (what the file must match exactly if the export adds
no error beyond the dtype's rounding). The InternLM2-1.8B shape is a
random-weight checkpoint in the official layout (bench/internlm2_gpu_check.py's writer) written under
a temporary folder and deleted after; only time and size are measured for it (random weights make
greedy answers meaningless). Results go to --json when given.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Who are you?",
    "What is 2 + 2?",
    "Write one sentence about the sea.",
    "Translate 'good morning' into French.",
    "你好，你是谁？",
    "Give me one tip for staying healthy.",
]


def greedy(model, tokenizer, n: int = 16) -> list[str]:
    """Greedy answers to PROMPTS, `n` new tokens at most."""
    from chatforge.inference.generate import generate_batch

    return generate_batch(model, tokenizer, [[{"role": "user", "content": p}] for p in PROMPTS], max_new_tokens=n)


def rounded(model, dtype):
    """A copy of `model` whose 2-D weights are rounded to `dtype` (as the GGUF stores them), computing in fp32:
    what the file must reproduce exactly if the export adds no error of its own."""
    import copy

    import torch

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.dim() == 2:
                p.copy_(p.to(dtype).float())
    return out


def default_model(dtypes: list[str], workdir: Path) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.export.gguf import export_gguf
    from chatforge.export.merge import masked_logits, probe_batch
    from chatforge.models.load import DEFAULT_MODEL, load_model, load_tokenizer

    tokenizer, source = load_tokenizer(DEFAULT_MODEL), load_model(DEFAULT_MODEL, dtype=torch.float32, device="cpu")
    batch, want = probe_batch(tokenizer), greedy(source, tokenizer)
    rows = []
    for dtype in dtypes:
        out = workdir / f"smollm2-135m-instruct-{dtype}.gguf"
        report = export_gguf(DEFAULT_MODEL, out, dtype=dtype, progress=False)
        back_tok = AutoTokenizer.from_pretrained(workdir, gguf_file=out.name)
        back = AutoModelForCausalLM.from_pretrained(workdir, gguf_file=out.name, dtype=torch.float32).eval()
        got = greedy(back, back_tok)
        rows.append(
            {
                "model": "SmolLM2-135M-Instruct",
                "dtype": dtype,
                "seconds": report["seconds"],
                "bytes": report["bytes"],
                "max_logit_diff": float((masked_logits(back, batch) - masked_logits(source, batch)).abs().max()),
                "greedy_identical": sum(a == b for a, b in zip(got, want)),
                "greedy_of": len(PROMPTS),
                "differing": [{"prompt": p, "source": a, "gguf": b} for p, a, b in zip(PROMPTS, want, got) if a != b],
            }
        )
        half = {"f16": torch.float16, "bf16": torch.bfloat16}.get(dtype)
        if half is not None:  # the same comparison against the source rounded to the file's dtype
            same = rounded(source, half)
            rows[-1]["vs_source_rounded_to_dtype"] = {
                "max_logit_diff": float((masked_logits(back, batch) - masked_logits(same, batch)).abs().max()),
                "greedy_identical": sum(a == b for a, b in zip(got, greedy(same, tokenizer))),
            }
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "differing"}), flush=True)
        out.unlink()
        del back
    return rows


def internlm2_1_8b(dtypes: list[str], workdir: Path) -> list[dict]:
    import importlib.util

    from chatforge.export.gguf import export_gguf

    spec = importlib.util.spec_from_file_location("writers", ROOT / "bench" / "internlm2_gpu_check.py")
    writers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writers)
    folder = writers.write_checkpoint(workdir / "internlm2-1_8b-random", writers.SHAPE_1_8B, shards=2)
    rows = []
    for dtype in dtypes:
        out = workdir / f"internlm2-1_8b-{dtype}.gguf"
        report = export_gguf(str(folder), out, dtype=dtype)
        rows.append(
            {
                "model": "InternLM2-1.8B shape (random weights, bf16 safetensors)",
                "dtype": dtype,
                "seconds": report["seconds"],
                "bytes": report["bytes"],
                "tensors": report["tensors"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        out.unlink()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument(
        "--internlm2-1.8b",
        dest="internlm2",
        action="store_true",
        help="the random InternLM2-1.8B shape instead of the default model",
    )
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args(argv)
    import torch

    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        started = time.strftime("%Y-%m-%d %H:%M")
        rows = (internlm2_1_8b if a.internlm2 else default_model)(a.dtypes, Path(d))
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, CPU only",
        "torch": torch.__version__,
        "date": started,
        "rows": rows,
    }
    if a.json:
        Path(a.json).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, ensure_ascii=False, indent=2))


if __name__ == "__main__":
    main()
