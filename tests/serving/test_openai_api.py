"""The OpenAI-compatible API with the official `openai` client and the real default model."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import ROOT

KEY = "sk-chatforge-test"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "What is 2+2?",
    "Who wrote Hamlet?",
    "Say hello in Spanish.",
    "What is the largest ocean?",
    "What color is the sky?",
    "Name a fruit.",
]
EXPECTED: list[str] = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["slots", "continuous", "static"])
def server(request):
    """The API on 127.0.0.1 (a free port) with small limits; shut down after the module."""
    uvicorn = pytest.importorskip("uvicorn")
    import torch

    from chatforge.models.load import load_model, load_tokenizer
    from chatforge.serving.openai_api import Limits, create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines: 2 OpenMP threads under load run 20-40x slower
    tok, model = load_tokenizer(None), load_model(None)
    app = create_app(
        model,
        tok,
        "smollm2",
        api_key=KEY,
        limits=Limits(max_tokens=64, max_body_bytes=4096, max_context=256, engine=request.param),
    )
    assert app.state.engine.stats["engine"] == request.param
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.started, "server did not start"
    try:
        yield {"url": f"http://127.0.0.1:{port}", "app": app, "model": model, "tokenizer": tok}
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        app.state.engine.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def test_models_and_health(server, client):
    import httpx

    assert [m.id for m in client.models.list().data] == ["smollm2"]
    health = httpx.get(server["url"] + "/health").json()
    assert health["status"] == "ok" and health["model"] == "smollm2"


def test_completion_plain_and_streamed_agree(client):
    plain = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=16)
    text = plain.choices[0].message.content
    assert "Paris" in text
    assert plain.choices[0].finish_reason == "stop"
    assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > 10

    pieces, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
        model="smollm2",
        messages=FRANCE,
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == text  # same greedy answer, streamed
    assert sum(1 for p in pieces if p) >= 3  # it came in several pieces
    assert finish == "stop" and usage.completion_tokens == plain.usage.completion_tokens


def test_length_limit_and_stop_string(client):
    short = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    cut = client.chat.completions.create(model="smollm2", messages=FRANCE, temperature=0, max_tokens=16, stop=["Paris"])
    assert "Paris" not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content.startswith("The capital")


def test_api_key_is_required(server):
    import openai

    for key in ("sk-wrong", ""):
        bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key=key or "none", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=4)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    import httpx

    r = httpx.get(server["url"] + "/v1/models")  # no header at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_limits_give_4xx_json_errors(server, client):
    import httpx
    import openai

    with pytest.raises(openai.BadRequestError) as e:  # max_tokens over the server's limit
        client.chat.completions.create(model="smollm2", messages=FRANCE, max_tokens=10_000)
    assert "at most 64" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # prompt + max_tokens over the context
        client.chat.completions.create(
            model="smollm2", max_tokens=64, messages=[{"role": "user", "content": "hello " * 300}]
        )
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.APIStatusError) as e:  # body over 4096 bytes
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x" * 5000}])
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=FRANCE, max_tokens=4)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = server["url"] + "/v1/chat/completions"
    for body in (
        b"{not json",
        b'{"messages": []}',
        b'{"messages": [{"role": "robot", "content": "hi"}]}',
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
        b"[1, 2]",
    ):
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"]
    r = httpx.post(url, content=b"x" * 10_000, headers={**headers, "Content-Length": "10000"})
    assert r.status_code == 413


def plain_generate(model, tokenizer, prompts: list[str], new: int) -> list[str]:
    """transformers' greedy `generate`, one prompt at a time: the reference answers."""
    import torch

    from chatforge.models.chat_tokens import prompt_ids
    from chatforge.models.load import stop_token_ids

    out = []
    for p in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, [{"role": "user", "content": p}])])
        with torch.inference_mode():
            row = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=stop_token_ids(tokenizer, model),
            )[0, ids.shape[1] :]
        out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


def test_eight_concurrent_clients_get_their_own_answers(server, client):
    """8 parallel streamed requests are batched; each answer equals the prompt's answer alone."""
    if not EXPECTED:  # each prompt answered alone by plain `generate`, once for all engines
        EXPECTED.extend(plain_generate(server["model"], server["tokenizer"], PROMPTS, 16))
    expected = EXPECTED
    before = dict(server["app"].state.engine.stats)

    def ask(prompt):
        out = []
        for chunk in client.chat.completions.create(
            model="smollm2", temperature=0, max_tokens=16, stream=True, messages=[{"role": "user", "content": prompt}]
        ):
            out += [c.delta.content or "" for c in chunk.choices]
        return "".join(out).strip()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, PROMPTS))
    assert answers == expected
    stats = server["app"].state.engine.stats
    assert stats["requests"] - before["requests"] == 8
    if stats["engine"] == "static":
        assert stats["batches"] - before["batches"] < 8 and stats["max_batch_seen"] >= 4  # batched, not one by one
    elif stats["engine"] == "slots":
        assert stats["max_in_flight"] >= 4 and stats["in_flight"] == 0 and stats["steps"] > before["steps"]
    else:
        assert stats["max_in_flight"] >= 4 and stats["in_flight"] == 0  # generated together, all finished


def test_cli_serve_reads_the_key_from_the_environment(tmp_path):
    """`chatforge serve` as a user runs it: the key from CHATFORGE_API_KEY, bound to 127.0.0.1."""
    import os
    import subprocess
    import sys

    import httpx

    port = free_port()
    env = dict(
        os.environ,
        CHATFORGE_API_KEY=KEY,
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(ROOT),
    )
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatforge", "serve", "--port", str(port), "--model-name", "cf", "--engine", "static"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        assert httpx.get(url + "/v1/models").status_code == 401
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
        assert [m["id"] for m in models["data"]] == ["cf"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert (
        "API key required" in (tmp_path / "serve.log").read_text() and KEY not in (tmp_path / "serve.log").read_text()
    )
