"""Time to first token and tokens/s of `chatforge serve` for 1, 8 and 32 concurrent streaming clients.

Compared in the same run with plain transformers `generate` on the same model (one request after another
with a streamer, as a naive server would; and one static batch of all requests), and across the
server's engines: slots (the default for Llama-shaped models: own KV-cache slots, CUDA graphs on a GPU),
continuous batching, static batches. Each server is `chatforge serve` in its own process, as a user runs
it; the clients (threads here) each build their HTTP client before the clock starts, as an application
does. Each client's answer is compared with plain greedy `generate`'s
answer to the same prompt alone ("equal"; bf16 kernels may part ways on random weights).

    python bench/serve_latency.py [--model FOLDER] [--max-tokens 128] [--clients 1 8 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms.",
    "Describe a day at the beach.",
    "Give advice for learning to cook.",
    "Tell me about the moon.",
    "Write a poem about autumn.",
    "Explain why exercise is healthy.",
    "Describe your favourite city.",
]
CONTEXT = "The river carries light from the hills to the sea, and every stone along it remembers the rain."


def long_prompts(tokenizer, n: int, tokens: int) -> list[str]:
    """n different prompts of about `tokens` tokens each (chat template included)."""
    from chatforge.models.chat_tokens import prompt_ids

    out = []
    for i in range(n):
        text = f"{PROMPTS[i % len(PROMPTS)]} (request {i})"
        while len(prompt_ids(tokenizer, [{"role": "user", "content": text}])) < tokens:
            text = CONTEXT + " " + text
        out.append(text)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plain_loop(model, tokenizer, prompts: list[str], max_tokens: int, batch: bool = False) -> list[dict]:
    """All requests arrive at t0. batch=False: served one after another with `generate` and a streamer;
    batch=True: one left-padded greedy `generate` for all (no first-token time)."""
    import torch
    from transformers.generation.streamers import BaseStreamer

    from chatforge.inference.generate import prompt_ids
    from chatforge.models.load import stop_token_ids

    stops = stop_token_ids(tokenizer, model)
    device = next(model.parameters()).device

    class Clock(BaseStreamer):
        def __init__(self):
            self.first, self.calls = None, 0

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.first is None:  # call 1 is the prompt
                self.first = time.perf_counter()

        def end(self):
            pass

    groups = [prompts] if batch else [[p] for p in prompts]
    t0, out = time.perf_counter(), []
    for group in groups:
        rows = [prompt_ids(tokenizer, [{"role": "user", "content": p}]) for p in group]
        width = max(map(len, rows))
        ids = torch.tensor([[stops[0]] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        clock = None if batch else Clock()
        with torch.inference_mode():
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=stops,
                pad_token_id=stops[0],
                streamer=clock,
            )
        if device.type == "cuda":
            torch.cuda.synchronize()
        end = time.perf_counter() - t0
        for row in gen[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            out.append(
                {
                    "ttft": clock.first - t0 if clock else None,
                    "end": end,
                    "tokens": cut,
                    "text": tokenizer.decode(row[:cut], skip_special_tokens=True).strip(),
                }
            )
    return out


def start_server(model: str | None, engine: str, max_batch: int, device: str):
    """`chatforge serve` as a user starts it, in its own process (its own GIL, as in production);
    returns (process, URL, seconds until /health answered)."""
    import subprocess
    import tempfile

    import httpx

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "chatforge",
        "serve",
        *([model] if model else []),
        "--port",
        str(port),
        "--engine",
        engine,
        "--max-batch",
        str(max_batch),
    ]
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in path if p))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = tempfile.NamedTemporaryFile("w+", prefix=f"serve_{engine}_", suffix=".log", delete=False)
    t0, url = time.perf_counter(), f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    while time.perf_counter() - t0 < 900:
        if proc.poll() is not None:
            raise RuntimeError(f"chatforge serve --engine {engine} exited: {Path(log.name).read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"chatforge serve --engine {engine} did not answer in 900 s ({log.name})")


def api_clients(url: str, prompts: list[str], max_tokens: int) -> list[dict]:
    """Concurrent streamed requests to the API, one client each (made before the clock starts, as an
    application makes its client once: building an httpx client takes ~50 ms); each records its first
    content chunk, its token count and its text."""
    import httpx

    def one(client, prompt: str, t0: float) -> dict:
        first, tokens, text = None, 0, []
        body = {
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                text += [c["delta"].get("content") or "" for c in data["choices"]]
                if first is None and any(text):
                    first = time.perf_counter()
        return {"ttft": first - t0, "end": time.perf_counter() - t0, "tokens": tokens, "text": "".join(text).strip()}

    clients = [httpx.Client(timeout=600) for _ in prompts]
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            t0 = time.perf_counter()
            return list(pool.map(lambda cp: one(*cp, t0), zip(clients, prompts)))
    finally:
        for c in clients:
            c.close()


def summary(name: str, clients: int, rows: list[dict], reference: dict[int, str]) -> dict:
    wall = max(r["end"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    firsts = [r["ttft"] for r in rows if r["ttft"] is not None]
    equal = [rows[i]["text"] == ref for i, ref in reference.items() if i < len(rows)]
    return {
        "setup": name,
        "clients": clients,
        "ttft_mean_s": statistics.mean(firsts) if firsts else None,
        "ttft_max_s": max(firsts) if firsts else None,
        "tokens": tokens,
        "wall_s": wall,
        "total_tok_s": tokens / wall,
        "equal": f"{sum(equal)}/{len(equal)}" if equal else "",
        "per_client_tok_s": statistics.mean(r["tokens"] / max(r["end"] - (r["ttft"] or 0), 1e-9) for r in rows),
    }


def over_rounds(name: str, clients: int, rounds: list[list[dict]], reference: dict[int, str]) -> dict:
    """`summary` of several rounds of the same requests: the mean of each figure, the worst first token."""
    each = [summary(name, clients, rows, reference) for rows in rounds]
    out = dict(each[0], rounds=len(each))
    for key in ("ttft_mean_s", "wall_s", "total_tok_s", "per_client_tok_s"):
        out[key] = statistics.mean(e[key] for e in each) if out[key] is not None else None
    out["ttft_max_s"] = max(e["ttft_max_s"] for e in each) if out["ttft_max_s"] is not None else None
    equal = [e["equal"].split("/") for e in each if e["equal"]]
    out["equal"] = f"{sum(int(a) for a, _ in equal)}/{sum(int(b) for _, b in equal)}" if equal else ""
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model folder (default: the embedded default model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--engines", nargs="+", default=["slots", "continuous", "static"])
    ap.add_argument(
        "--plain-one-by-one-max",
        type=int,
        default=8,
        help="clients up to which the one-at-a-time baseline runs (it takes clients x a reply's time)",
    )
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--single-rounds", type=int, default=5, help="rounds of the 1-client case (mean and max)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()

    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    from chatforge.models.load import load_model, load_tokenizer

    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    tokenizer, model = load_tokenizer(a.model), load_model(a.model, device=device)
    prompts = long_prompts(tokenizer, max(a.clients), a.prompt_tokens)
    # warm-up at full length: on an H100/H200 torch's SDPA picks cuDNN, which builds a plan for each new
    # KV length (~60 ms); a long-running naive server has them all, so the baselines are timed warm
    plain_loop(model, tokenizer, prompts[:1], a.max_tokens)
    results, reference = [], {}
    repeats = lambda n: a.single_rounds if n == 1 else 1  # noqa: E731 (one client: a sample of one is noise)
    for n in a.clients:  # the baselines first: the continuous engine switches the model's attention
        if n <= a.plain_one_by_one_max:
            rounds = [plain_loop(model, tokenizer, prompts[:n], a.max_tokens) for _ in range(repeats(n))]
            reference.update({i: r["text"] for i, r in enumerate(rounds[0])})
            results.append(over_rounds("plain transformers generate, one at a time", n, rounds, reference))
            print(json.dumps(results[-1]), flush=True)
        if n > 1:
            plain_loop(model, tokenizer, prompts[:n], a.max_tokens, batch=True)  # warm-up (see above)
            rows = plain_loop(model, tokenizer, prompts[:n], a.max_tokens, batch=True)
            results.append(over_rounds("plain transformers generate, one static batch", n, [rows], reference))
            print(json.dumps(results[-1]), flush=True)
    for engine in sorted(a.engines, key=lambda e: e == "continuous"):  # one server at a time
        proc, url, ready = start_server(a.model, engine, max(a.clients), a.device)
        try:
            import httpx

            label = f"chatforge serve --engine {httpx.get(url + '/health', timeout=10).json()['engine']}"
            print(f"{label}: ready in {ready:.1f} s", flush=True)
            for n in a.clients:
                api_clients(url, prompts[:n], 8)  # warm-up: graphs of this batch size
                rounds = [api_clients(url, prompts[:n], a.max_tokens) for _ in range(repeats(n))]
                results.append(over_rounds(label, n, rounds, reference))
                print(json.dumps(results[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"\n{a.model or 'SmolLM2-135M-Instruct'}, {name}, {next(model.parameters()).dtype}, prompts of "
        f"~{a.prompt_tokens} tokens, greedy, max_tokens {a.max_tokens}\n"
    )
    print(
        "| setup | clients | rounds | TTFT mean (ms) | TTFT max (ms) | tokens | wall (s) | total tok/s | tok/s per "
        "client | answers equal to plain generate's |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    ms = lambda v: f"{v * 1000:.0f}" if v is not None else "n/a"
    for r in results:
        print(
            f"| {r['setup']} | {r['clients']} | {r['rounds']} | {ms(r['ttft_mean_s'])} | {ms(r['ttft_max_s'])} | "
            f"{r['tokens']} | "
            f"{r['wall_s']:.2f} | {r['total_tok_s']:,.1f} | {r['per_client_tok_s']:,.1f} | {r['equal']} |"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    rc = 0
    try:
        main()
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)  # engine threads (transformers' continuous batching) must not keep the process alive
