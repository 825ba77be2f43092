"""The GPU paths as users run them, through the CLI: `pytest -m gpu` on a CUDA machine (skipped without).

An InternLM2-Chat-1.8B checkpoint in the official file format (random weights), the real Huatuo data
(`data/huatuo/llama_data.jsonl` in the repository, or `../shared/data/huatuo/`), the embedded default
model. Random weights cannot learn much, so on InternLM2 these tests check that each path runs and
writes what it should; the default model checks that the identity is learned.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from conftest import ROOT, cli_env, run_cli

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
OWNER = "Ada Park"
RECIPES = sorted(p.stem for p in (ROOT / "chatforge" / "recipes").glob("*.yaml"))
# bench/gpu_session.sh runs these four at a time on one card (pytest-xdist): each training run plans for
# a share of the card, not for 92% of the memory free when it starts.
SHARE = "memory_budget_gib=30"


def timed_cli(*args, timeout=900):
    t = time.perf_counter()
    r = run_cli(*args, timeout=timeout)
    seconds = time.perf_counter() - t
    print(f"\n[gpu] chatforge {' '.join(map(str, args[:2]))}: rc {r.returncode}, {seconds:.1f} s")
    assert r.returncode == 0, r.stderr[-4000:]
    return r, seconds


@pytest.fixture(scope="module")
def il2(tmp_path_factory) -> Path:
    """The 1.8B-shaped checkpoint: $CHATFORGE_TEST_IL2 if set (written once per machine), else written here."""
    if os.environ.get("CHATFORGE_TEST_IL2"):
        return Path(os.environ["CHATFORGE_TEST_IL2"])
    sys.path.insert(0, str(ROOT / "bench"))
    from internlm2_gpu_check import SHAPE_1_8B, write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("il2") / "internlm2-chat-1_8b", SHAPE_1_8B, device="cuda")


@pytest.fixture(scope="module")
def huatuo() -> Path:
    for path in (
        ROOT / "data" / "huatuo" / "llama_data.jsonl",
        ROOT.parent / "shared" / "data" / "huatuo" / "llama_data.jsonl",
    ):
        if path.is_file():
            return path
    pytest.skip("the Huatuo data is not in data/huatuo/ or ../shared/data/huatuo/")


@pytest.fixture(scope="module")
def identity_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("identity") / "identity.jsonl"
    timed_cli("data", "identity", "--name", OWNER, "--out", out, "--no-replay", "--base-name", "InternLM2-Chat-1.8B")
    return out


@pytest.fixture(scope="module")
def pretrain_data(tmp_path_factory, huatuo) -> Path:
    out = tmp_path_factory.mktemp("pretrain") / "text.jsonl"
    rows = [json.loads(line) for line in huatuo.read_text(encoding="utf-8").splitlines()[:600]]
    out.write_text(
        "".join(json.dumps({"text": r["output"]}, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return out


@pytest.fixture(scope="module")
def il2_lora_run(tmp_path_factory, il2) -> Path:
    """`chatforge assistant` on the InternLM2 checkpoint with the LoRA identity recipe (short)."""
    run = tmp_path_factory.mktemp("il2-lora") / "run"
    timed_cli(
        "assistant",
        "--name",
        OWNER,
        "--model",
        il2,
        "--recipe",
        "internlm2_chat_1_8b_identity_lora",
        "--out",
        run,
        "--no-progress",
        "max_steps=8",
        SHARE,
    )
    return run


def test_assistant_on_the_default_model_learns_the_identity(tmp_path):
    run = tmp_path / "run"
    r, seconds = timed_cli("assistant", "--name", OWNER, "--out", run, "--no-progress", SHARE)
    tuned = json.loads((run / "eval.json").read_text())["scores"]["fine-tuned"]
    print(
        f"[gpu] default model assistant: {seconds:.1f} s, stages {(run / 'timings.json').read_text()}, "
        f"identity {tuned['identity']:.3f}"
    )
    assert tuned["identity"] >= 0.8, tuned
    answers = [json.loads(line) for line in (run / "eval_answers.jsonl").read_text().splitlines()]
    print("[gpu] answers naming the owner:", [a for a in answers if a.get("leak") and a["model"] == "fine-tuned"])
    for lang in ("en", "zh"):  # general answers naming the owner, per language
        assert next(v for k, v in tuned.items() if k.startswith(f"general leaks ({lang}")) <= 1, tuned


@pytest.mark.xdist_group("il2_lora_run")
def test_assistant_on_internlm2_lora(il2_lora_run):
    for name in (
        "train/adapter/adapter_model.safetensors",
        "train/samples.md",
        "train/loss.png",
        "eval.json",
        "merged/config.json",
        "timings.json",
    ):
        assert (il2_lora_run / name).is_file(), name
    samples = (il2_lora_run / "train" / "samples.md").read_text()
    assert "## step 0" in samples and "## step 8" in samples  # generation on the GPU, before and after


def test_assistant_on_internlm2_qlora(tmp_path, il2):
    pytest.importorskip("bitsandbytes")
    run = tmp_path / "run"
    timed_cli("assistant", "--name", OWNER, "--model", il2, "--out", run, "--no-progress", "max_steps=8", SHARE)
    config = (run / "train" / "config.yaml").read_text()
    assert "method: qlora" in config and (run / "eval.json").is_file()
    assert "## step 8" in (run / "train" / "samples.md").read_text()


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_trains_a_few_steps(recipe, tmp_path, il2, huatuo, identity_data, pretrain_data):
    if "qlora" in recipe:
        pytest.importorskip("bitsandbytes")
    data = pretrain_data if "pretrain" in recipe else huatuo if "medical" in recipe else identity_data
    model = [f"model={il2}"] if recipe.startswith("internlm2") else []
    out = tmp_path / "run"
    timed_cli(
        "train",
        recipe,
        *model,
        f"data={data}",
        f"output_dir={out}",
        "max_steps=3",
        "save_every=0",
        SHARE,
        "--no-progress",
    )
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] > 0 for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["real_tokens"] > 0 and metrics["peak_gib"] > 0
    if "eval_prompts" in (ROOT / "chatforge" / "recipes" / f"{recipe}.yaml").read_text():
        assert "## step 3" in (out / "samples.md").read_text()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_in_either_dtype_trains_and_writes_samples(dtype, tmp_path, identity_data):
    """An fp32 base trains without autocast; its samples (the decoder's KV cache) follow the dtype."""
    out = tmp_path / "run"
    timed_cli(
        "train",
        "smollm2_135m_identity_lora",
        f"data={identity_data}",
        f"output_dir={out}",
        f"dtype={dtype}",
        "max_steps=2",
        "save_every=0",
        SHARE,
        "--no-progress",
    )
    assert json.loads((out / "speed_plan.json").read_text())["autocast"] is (dtype == "bf16")
    assert "## step 2" in (out / "samples.md").read_text()


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_compiled_medical_run_on_huatuo(method, tmp_path, il2, huatuo):
    """The packed, compiled path (varlen attention, fixed shapes) on real data: few compilations."""
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    out = tmp_path / "run"
    timed_cli(
        "train",
        "internlm2_chat_1_8b_medical_sft",
        f"model={il2}",
        f"data={huatuo}",
        f"method={method}",
        f"output_dir={out}",
        "max_steps=6",
        "save_every=0",
        "compile=true",
        "eval_prompts=[]",
        SHARE,
        "--no-progress",
    )
    plan = json.loads((out / "speed_plan.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"[gpu] compiled {method}: {metrics}")
    assert plan["compile"] and plan["attention"] == "varlen"
    assert metrics["recompilations"] <= 4 and metrics["steps"] == 6


@pytest.mark.parametrize("path", ["packed_compiled", "unpacked_eager"])
def test_cuda_graph_steps_train_as_eager_steps(path, tmp_path, il2, huatuo, identity_data):
    """LoRA steps replayed as CUDA graphs give the eager steps' losses: the packed, compiled medical recipe
    (InternLM2's dynamic RoPE, recomputed dropout) and the unpacked, eager identity recipe (padded widths, each
    sample a varlen segment, PEFT's dropout)."""
    if path == "packed_compiled":
        keys = ["internlm2_chat_1_8b_medical_sft", f"data={huatuo}", "max_length=512", "batch_size=8"]
        keys += ["micro_batch=4", "compile=true"]
    else:
        keys = ["internlm2_chat_1_8b_identity_lora", f"data={identity_data}", "batch_size=8", "compile=false"]
    losses = {}
    for graphs in ("true", "false"):
        out = tmp_path / graphs
        r, _ = timed_cli(
            "train",
            *keys,
            f"model={il2}",
            f"output_dir={out}",
            "max_steps=4",
            "save_every=0",
            f"cuda_graphs={graphs}",
            "eval_prompts=[]",
            SHARE,
            "--no-progress",
        )
        assert "not captured" not in r.stderr, r.stderr[-2000:]
        assert json.loads((out / "speed_plan.json").read_text())["cuda_graphs"] is (graphs == "true")
        replayed = json.loads((out / "metrics.json").read_text()).get("cuda_graphs")
        assert (replayed or "none").endswith("replayed") if graphs == "true" else replayed is None, replayed
        losses[graphs] = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    print(f"[gpu] {path}: graphs {losses['true']} eager {losses['false']}")
    # the same to within the 1% loss parity: the capture's warm-up forward moves the dropout counter
    # once, so later steps draw other masks (step 1, with B = 0, is the same; unpacked, the eager steps attend
    # through sdpa with a padding mask, the graphs through the varlen kernel: bf16 rounding differs)
    assert len(losses["true"]) == 4 and losses["true"] == pytest.approx(losses["false"], rel=1e-2)
    assert losses["true"][0] == pytest.approx(losses["false"][0], rel=1e-4 if path == "packed_compiled" else 1e-3)


def test_lora_dropout_compiled_on_cuda_equals_the_int64_hash():
    """The grouped LoRA dropout compiled for the GPU (Triton): int32 masks bit for bit the int64 hash, and the
    same output and gradients as dropout with those masks."""
    import torch.nn.functional as F

    from chatforge.training import lora_groups as lg

    torch.manual_seed(0)
    x = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(3 * 64, 2048, device="cuda", requires_grad=True)
    keys = torch.tensor([5 * 1000003 + i * lg.GOLDEN for i in range(3)], device="cuda")
    for key in keys:
        assert torch.equal(torch.compile(lg.keep_mask)(x, key, 0.1), lg.keep_mask64(x, key, 0.1))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        u = torch.compile(lambda x, w: lg.dropped_a(x, w, keys, 0.1, (64, 64, 64)))(x, w)
        ref = torch.cat([F.linear(lg.hash_dropout(x, keys[i], 0.1), a) for i, a in enumerate(w.split(64))], -1)
    gx, gw = torch.autograd.grad(ref.float().square().sum(), (x, w))
    u.float().square().sum().backward()
    assert float((u - ref).float().abs().max()) <= 1e-2 * float(ref.float().abs().max())
    assert float((x.grad.float() - gx.float()).abs().max()) <= 1e-2 * float(gx.float().abs().max())
    assert float((w.grad - gw).abs().max()) <= 1e-2 * float(gw.abs().max())


@pytest.mark.xdist_group("il2_lora_run")
def test_merge_both_formats_then_eval_chat_and_serve(tmp_path, il2, il2_lora_run):
    adapter = il2_lora_run / "train" / "adapter"
    merged = {}
    for fmt in ("hf", "internlm2"):
        merged[fmt] = tmp_path / f"merged-{fmt}"
        r, _ = timed_cli("merge", adapter, merged[fmt], "--format", fmt)
        report = json.loads(r.stdout)
        assert report["reload_diff"] <= report["tolerance"] and report["dtype"] == "bfloat16"
    timed_cli(
        "eval",
        merged["internlm2"],
        "--base",
        il2,
        "--eval-set",
        il2_lora_run / "data" / "identity.eval.json",
        "--out",
        tmp_path / "eval",
    )
    assert (tmp_path / "eval" / "eval.json").is_file()
    r = run_cli(
        "chat", merged["hf"], "--temperature", "0", "--max-new-tokens", "12", input="你好\n/exit\n", timeout=300
    )
    assert r.returncode == 0 and r.stdout.count("assistant> ") == 1, r.stderr[-3000:]
    serve_one_request(merged["internlm2"])


@contextlib.contextmanager
def served(*args):
    """`chatforge serve ARGS` on a free port; yields its URL once /health answers."""
    pytest.importorskip("uvicorn")
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatforge", "serve", *map(str, args), "--port", str(port)],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, url = time.time() + 300, f"http://127.0.0.1:{port}"
        while time.time() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def serve_one_request(model: Path) -> None:
    import httpx

    with served(model) as url:
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["engine"] == "slots", health
        r = httpx.post(
            f"{url}/v1/chat/completions",
            timeout=120,
            json={"model": health["model"], "messages": [{"role": "user", "content": "Who are you?"}], "max_tokens": 8},
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] >= 1


PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rain forms.",
    "你好，请介绍一下你自己。",
    "Give advice for learning to cook.",
    "Tell me about the moon.",
    "Write a poem about autumn.",
    "What is 12 times 7?",
    "Describe your favourite city.",
]
LONG = "Summarise this in one sentence: " + " ".join(f"Day {i}: the tide rose, the boats left." for i in range(20))


def plain_greedy(prompts: list[str], new: int) -> list[str]:
    """transformers' `generate`, one prompt at a time, greedy, the default model in fp32 on the GPU."""
    from chatforge.models.chat_tokens import prompt_ids
    from chatforge.models.load import load_model, load_tokenizer, stop_token_ids

    tok, model = load_tokenizer(None), load_model(None, dtype="fp32", device="cuda")
    out = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": p}])], device="cuda")
        with torch.inference_mode():
            row = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=stop_token_ids(tok, model),
            )[0, ids.shape[1] :]
        out.append(tok.decode(row, skip_special_tokens=True))
    del model
    torch.cuda.empty_cache()
    return out


def stream(url: str, prompt: str, max_tokens: int, stop_after: int = 0) -> str:
    """One streamed chat completion; stop_after > 0: the client goes away after that many chunks."""
    import httpx

    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    text, chunks = [], 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += [c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"]]
                chunks += 1
                if stop_after and chunks >= stop_after:
                    break
    return "".join(text)


def test_serve_eight_streams_equal_plain_generate_and_a_gone_client_stops(tmp_path):
    """The slots engine (CUDA graphs) on the default model in fp32: 8 concurrent streams each get their
    own answer, token for token the greedy answer of plain `generate`; a client that goes away stops its
    generation, and the server stays healthy; then one request at a time (captured prefills, two widths)."""
    import httpx

    expected = plain_greedy(PROMPTS + [LONG], 48)
    with served("--dtype", "fp32") as url:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda p: stream(url, p, 48), PROMPTS))
        for prompt, got, want in zip(PROMPTS, answers, expected):
            assert got.strip() == want.strip(), (prompt, got, want)
        health = httpx.get(url + "/health", timeout=10).json()
        print(f"[gpu] serve after 8 streams: {health}")
        assert health["engine"] == "slots" and health["max_in_flight"] >= 4 and health["in_flight"] == 0
        steps = health["steps"]
        stream(url, "Write a very long story about the sea.", 1000, stop_after=3)
        deadline = time.time() + 10
        while time.time() < deadline and httpx.get(url + "/health", timeout=10).json()["in_flight"]:
            time.sleep(0.05)
        health = httpx.get(url + "/health", timeout=10).json()
        assert health["status"] == "ok" and health["in_flight"] == 0 and health["cancelled"] >= 1, health
        assert health["steps"] - steps < 700, health  # stopped long before its 1,000 tokens
        for prompt, want in zip(PROMPTS + [LONG], expected):  # one at a time: each prefill a CUDA graph
            assert stream(url, prompt, 48).strip() == want.strip(), prompt
