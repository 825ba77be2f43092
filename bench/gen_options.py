"""Which generation set-up is fastest on this machine: the options of the fast-generation issue, side by side.

Guidance for choosing chatforge's generation path, not a figure of record (that is `chatforge serve` /
`chatforge chat`, bench/serve_latency.py). Every row runs in this one process on the same model and prompts:

  generate                  plain `model.generate`, dynamic KV cache (chatforge's path today)
  generate+static           `cache_implementation="static"`: transformers compiles the decoding step (CUDA)
  continuous[+graphs][+cN]  `init_continuous_batching` (paged KV cache) as chatforge's serve engine uses it,
                            with CUDA graphs on and compile level N (`ContinuousBatchingConfig`)
  decode[+reuse]            chatforge/inference/decode.py: slots with their own positions in a static KV cache, the
                            step captured as a CUDA graph on CUDA (set-up and capture counted in each run;
                            +reuse: the warm-up's cache and graph serve again, as in a chat session)

    PYTHONPATH=. python3 bench/gen_options.py --model IL2_FOLDER --batches 1 8 32 [--json F]

Prints, per batch size, time to first token (mean over the batch), total tokens/s and whether each row's
greedy tokens equal plain generate's (the first rows of the batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prompts(tokenizer, n: int, length: int) -> list[list[int]]:
    """n chat prompts of about `length` tokens each, all different."""
    from chatforge.models.chat_tokens import prompt_ids

    words = "the river carries light from the hills to the sea and every stone remembers".split()
    out = []
    for i in range(n):
        text, ids = f"Question {i}:", []
        while len(ids) < length:
            text += " " + words[(len(text) + i) % len(words)]
            ids = prompt_ids(tokenizer, [{"role": "user", "content": text}])
        out.append(ids)
    return out


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def run_generate(model, batch: list[list[int]], new: int, pad: int, static: bool) -> dict:
    """One left-padded static batch through `generate`; first-token time from a streamer."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    device = next(model.parameters()).device
    width = max(map(len, batch))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)

    class First(BaseStreamer):
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2:  # call 1 is the prompt
                self.at = time.perf_counter()

        def end(self):
            pass

    extra = {"cache_implementation": "static"} if static else {}
    first = First() if len(batch) == 1 else None  # streamers take batch 1 only
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            pad_token_id=pad,
            streamer=first,
            **extra,
        )
    sync(device.type)
    wall = time.perf_counter() - t0
    rows = out[:, width:].tolist()
    ttft = (first.at - t0) if first and first.at else None
    return {"wall_s": wall, "tokens": sum(map(len, rows)), "ttft_s": ttft, "rows": rows}


def run_continuous(model, batch: list[list[int]], new: int, pad: int, graphs: bool, level: int) -> dict:
    """All requests at once into a continuous-batching manager; per-request first-token times."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=pad)
    cb = ContinuousBatchingConfig(use_cuda_graph=graphs, default_compile_level=level)
    manager = model.init_continuous_batching(generation_config=cfg, continuous_batching_config=cb)
    manager.start()
    try:
        warm = manager.add_request(batch[0], max_new_tokens=4)  # the paged cache is set up on first use
        for _ in manager.request_id_iter(warm):
            pass
        firsts, rows, t0 = {}, {}, time.perf_counter()
        ids = [manager.add_request(p, max_new_tokens=new, streaming=True) for p in batch]

        def read(rid):
            for out in manager.request_id_iter(rid):
                if out.generated_tokens and rid not in firsts:
                    firsts[rid] = time.perf_counter() - t0
                rows[rid] = list(out.generated_tokens)

        threads = [threading.Thread(target=read, args=(r,)) for r in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        manager.stop(block=True)
    ordered = [rows.get(r, []) for r in ids]
    return {
        "wall_s": wall,
        "tokens": sum(map(len, ordered)),
        "ttft_s": statistics.mean(firsts.values()),
        "rows": ordered,
    }


_KEPT: dict = {}


def run_decode(model, batch: list[list[int]], new: int, reuse: bool) -> dict:
    """chatforge's Decoder: one batched prefill, then `new - 1` steps; first-token time = the prefill's.
    reuse: the Decoder (cache and captured graph) of the warm-up run serves again, as in a chat session."""
    from chatforge.inference.decode import Decoder

    device = next(model.parameters()).device
    t0 = time.perf_counter()
    key = (len(batch), max(map(len, batch)) + new + 1)
    dec = _KEPT.get(key) if reuse else None
    if dec is None:
        dec = Decoder(model, *key)
        if reuse:
            _KEPT[key] = dec
    for slot in range(dec.rows):
        dec.release(slot)
    slots, first = dec.prefill(batch)
    ttft = time.perf_counter() - t0
    rows = [[t] for t in first]
    for _ in range(new - 1):
        toks = dec.step()
        for row, slot in zip(rows, slots):
            row.append(toks[slot])
    sync(device.type)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": sum(map(len, rows)), "ttft_s": ttft, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a model folder (default: the embedded default model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--setups", nargs="+", help="default: every setup this device runs")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    import torch

    from chatforge.models.load import load_model, load_tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    tokenizer, model = load_tokenizer(a.model), load_model(a.model, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    setups = a.setups or (
        ["generate", "generate+static", "continuous", "continuous+graphs", "decode", "decode+reuse"]
        if device == "cuda"
        else ["generate", "continuous", "decode", "decode+reuse"]
    )
    results = []
    for n in a.batches:
        batch = prompts(tokenizer, n, a.prompt_tokens)
        reference = None
        for name in setups:
            try:
                if name.startswith("decode"):
                    run = lambda: run_decode(model, batch, a.new_tokens, reuse=name.endswith("reuse"))
                elif name.startswith("generate"):
                    run = lambda: run_generate(model, batch, a.new_tokens, pad, static=name.endswith("static"))
                else:
                    level = int(name.rsplit("+c", 1)[1]) if "+c" in name else 0
                    run = lambda: run_continuous(model, batch, a.new_tokens, pad, "graphs" in name, level)
                run()  # warm-up: compilation, graph capture, cache set-up
                r = run()
            except Exception as e:  # an option this stack cannot run is a finding, not a crash
                results.append({"setup": name, "batch": n, "error": f"{type(e).__name__}: {e}"[:300]})
                continue
            reference = reference or r["rows"]
            same = sum(x == y for x, y in zip(r["rows"], reference))
            results.append(
                {
                    "setup": name,
                    "batch": n,
                    "ttft_s": r["ttft_s"],
                    "wall_s": round(r["wall_s"], 3),
                    "tokens": r["tokens"],
                    "tok_s": round(r["tokens"] / r["wall_s"], 1),
                    "greedy_equal_rows": f"{same}/{len(reference)}",
                }
            )
            print(json.dumps(results[-1]), flush=True)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"\n{name}, {a.model or 'default model'}, prompts of ~{a.prompt_tokens} tokens, {a.new_tokens} new, greedy\n")
    print("| setup | batch | time to first token | total tokens/s | wall s | greedy rows equal to `generate` |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['setup']} | {r['batch']} | failed: {r['error'][:120]} | | | |")
        else:
            ttft = f"{r['ttft_s'] * 1000:.0f} ms" if r["ttft_s"] is not None else "n/a (batch > 1)"
            print(
                f"| {r['setup']} | {r['batch']} | {ttft} | {r['tok_s']:,.0f} | {r['wall_s']} | "
                f"{r['greedy_equal_rows']} |"
            )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
