"""Time to first token and tokens/s of `chatforge serve` for 1 and 8 concurrent clients (CPU, default model).

Compared in the same run with a plain transformers loop (`model.generate` with a streamer, one
request after another, as a naive server would), and across the server's engines: continuous
batching (default), static batches, and queued (static with --max-batch 1).

    python bench/serve_latency.py [--max-tokens 64] [--clients 1 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = ["Write a short story about a lighthouse keeper.", "Explain how rain forms.",
           "Describe a day at the beach.", "Give advice for learning to cook.", "Tell me about the moon.",
           "Write a poem about autumn.", "Explain why exercise is healthy.", "Describe your favourite city."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_loop(model, tokenizer, prompts: list[str], max_tokens: int) -> list[dict]:
    """All requests arrive at t0 and are served one after another with model.generate."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from chatforge.generate import prompt_ids
    from chatforge.models import stop_token_ids

    stops = stop_token_ids(tokenizer, model)

    class Clock(BaseStreamer):
        def __init__(self):
            self.first, self.calls = None, 0

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    t0, out = time.perf_counter(), []
    for p in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": p}])])
        clock = Clock()
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=False, eos_token_id=stops, pad_token_id=stops[0], streamer=clock)
        n = int(gen.shape[1] - ids.shape[1])
        out.append({"ttft": clock.first - t0, "end": time.perf_counter() - t0, "tokens": n})
    return out


def api_clients(url: str, prompts: list[str], max_tokens: int) -> list[dict]:
    """Concurrent streamed requests to the API; each records its first content chunk and token count."""
    import httpx

    def one(prompt: str, t0: float) -> dict:
        first, tokens = None, 0
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                if first is None and any(c["delta"].get("content") for c in data["choices"]):
                    first = time.perf_counter()
        return {"ttft": first - t0, "end": time.perf_counter() - t0, "tokens": tokens}

    with ThreadPoolExecutor(len(prompts)) as pool:
        t0 = time.perf_counter()
        return list(pool.map(lambda p: one(p, t0), prompts))


def summary(name: str, clients: int, rows: list[dict]) -> dict:
    wall = max(r["end"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    return {"setup": name, "clients": clients, "ttft_mean_s": statistics.mean(r["ttft"] for r in rows),
            "ttft_max_s": max(r["ttft"] for r in rows), "tokens": tokens, "wall_s": wall,
            "total_tok_s": tokens / wall,
            "per_client_tok_s": statistics.mean(r["tokens"] / max(r["end"] - r["ttft"], 1e-9) for r in rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from chatforge.api import Limits, create_app, http_server
    from chatforge.models import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(None), load_model(None, device="cpu")
    results = []
    servers = {}
    for label, engine, max_batch in (("chatforge serve, continuous batching (default)", "continuous", 8),
                                     ("chatforge serve, static batches", "static", 8),
                                     ("chatforge serve, queued (--engine static --max-batch 1)", "static", 1)):
        app = create_app(model, tokenizer, "bench", limits=Limits(max_batch=max_batch, engine=engine))
        port = free_port()
        srv = http_server(app, "127.0.0.1", port)
        threading.Thread(target=srv.run, daemon=True).start()
        while not srv.started:
            time.sleep(0.05)
        servers[label] = (srv, app, f"http://127.0.0.1:{port}")

    plain_loop(model, tokenizer, PROMPTS[:1], 8)  # warm-up
    for n in a.clients:
        prompts = (PROMPTS * 4)[:n]
        results.append(summary("plain transformers generate, one at a time", n,
                               plain_loop(model, tokenizer, prompts, a.max_tokens)))
        for label, (_, _, url) in servers.items():
            if n == 1 and "queued" in label:
                continue  # same as static batches for a single client
            results.append(summary(label, n, api_clients(url, prompts, a.max_tokens)))
    for srv, app, _ in servers.values():
        srv.should_exit = True
        app.state.engine.close()

    print(f"\nSmolLM2-135M-Instruct, CPU ({torch.get_num_threads()} threads), greedy, max_tokens {a.max_tokens}\n")
    print("| setup | clients | TTFT mean (s) | TTFT max (s) | tokens | wall (s) | total tok/s | tok/s per client |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['setup']} | {r['clients']} | {r['ttft_mean_s']:.2f} | {r['ttft_max_s']:.2f} | {r['tokens']} | "
              f"{r['wall_s']:.1f} | {r['total_tok_s']:.1f} | {r['per_client_tok_s']:.1f} |")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
