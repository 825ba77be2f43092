"""The servers as an attacker meets them: cross-site pages, odd bodies, clients that leave, slow sockets.

A tiny random model (it never says EOS) whose forward pass is slowed to ~20 ms makes generation
last as long as max_tokens says, so cancellation and deadlines are visible.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import pytest

pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
STEP_S = 0.02


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slow_model(tiny_llama):
    from chatforge.models.load import load_model, load_tokenizer

    model, tok = load_model(str(tiny_llama)), load_tokenizer(str(tiny_llama))
    model.register_forward_pre_hook(lambda *a: time.sleep(STEP_S))
    return model, tok


@contextlib.contextmanager
def serving(slow_model, api_key=None, **limits):
    """The API on 127.0.0.1 with the static engine and `limits`; yields (url, app)."""
    from chatforge.serving.openai_api import Limits, create_app, http_server

    model, tok = slow_model
    limits = Limits(**{"engine": "static", "max_tokens": 400, "max_context": 512, **limits})
    app = create_app(model, tok, "tiny", api_key=api_key, limits=limits)
    port = free_port()
    server = http_server(app, "127.0.0.1", port, limits)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        app.state.engine.close()


def chat(url, body, **headers):
    headers = {"Content-Type": "application/json", **headers}
    return httpx.post(url + "/v1/chat/completions", content=json.dumps(body), headers=headers, timeout=30)


HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_web_pages_cannot_drive_a_local_server(slow_model):
    with serving(slow_model) as (url, app):  # no key: the default
        evil = {"Origin": "http://evil.example", "Host": "evil.example"}
        r = chat(url, HI, **evil, **{"Content-Type": "text/plain"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed"  # DNS rebinding
        assert httpx.get(url + "/health", headers={"Host": "evil.example:80"}).status_code == 403
        r = chat(url, HI, **{"Content-Type": "text/plain"})  # a cross-site form post
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
        r = chat(url, HI, Origin="http://evil.example")
        assert r.status_code == 403
        for host in ("localhost", "127.0.0.1:1234", "[::1]:8000"):
            r = chat(url, HI, Host=host, Origin=f"http://{host}")
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, host


def test_request_fields_are_checked_not_coerced(slow_model):
    with serving(slow_model) as (url, app):
        r = chat(url, {**HI, "max_tokens": 4, "stop": ""})
        assert r.json()["usage"]["completion_tokens"] == 4 and r.json()["choices"][0]["finish_reason"] == "length"
        for bad in ({"max_tokens": True}, {"max_tokens": "3"}, {"stream": 1}, {"stop": ["a", "b", "c", "d", "e"]}):
            r = chat(url, {**HI, **bad})
            assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", bad
        deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        r = httpx.post(url + "/v1/chat/completions", content=deep, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]


def test_prompt_token_limit(slow_model):
    with serving(slow_model, max_prompt_tokens=50) as (url, app):
        r = chat(url, {"messages": [{"role": "user", "content": "word " * 60}], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
        assert chat(url, HI).status_code == 200


def raw_request(url: str, body: dict) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(data), data)
    )
    return sock


def wait_for(condition, seconds: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < seconds, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_stops_its_generation(slow_model, stream):
    with serving(slow_model) as (url, app):
        stats = app.state.engine.stats
        sock = raw_request(url, {**HI, "max_tokens": 400, "stream": stream})  # ~8 s of generation
        wait_for(lambda: stats["busy"], 10)
        time.sleep(0.3)
        sock.close()
        assert wait_for(lambda: not stats["busy"], 8) < 5  # the whole reply took 95 s before the fix
        assert stats["cancelled"] == 1


def test_a_request_has_a_deadline(slow_model):
    with serving(slow_model, request_timeout_s=1.0) as (url, app):
        start = time.monotonic()
        r = chat(url, {**HI, "max_tokens": 400})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert time.monotonic() - start < 5
        wait_for(lambda: not app.state.engine.stats["busy"], 5)
        assert app.state.engine.stats["cancelled"] == 1


def test_health_reports_a_stopped_engine(slow_model):
    with serving(slow_model) as (url, app):
        assert httpx.get(url + "/health").json()["engine_alive"] is True
        app.state.engine.close()  # the worker thread ends, as it would after a crash
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["engine_alive"] is False
        r = chat(url, HI)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"


def test_large_prompts_do_not_block_the_server(slow_model, monkeypatch):
    import asyncio

    from chatforge.serving import openai_api as api

    calls = []

    def spy(tokenizer, messages):  # where the server tokenises: a running event loop means on the loop
        try:
            asyncio.get_running_loop()
            calls.append("event loop")
        except RuntimeError:
            calls.append("worker thread")
        return real(tokenizer, messages)

    real = api.prompt_ids
    monkeypatch.setattr(api, "prompt_ids", spy)
    words = " ".join(f"w{i} {i * 7919 % 10007}" for i in range(90_000))  # ~1 MB, ~400k tokens
    with serving(slow_model, max_body_bytes=2 << 20) as (url, app):
        r = chat(url, {**HI, "messages": [{"role": "user", "content": words}]})
        assert r.json()["error"]["code"] == "prompt_too_long" and calls == []  # refused before tokenising
        r = chat(url, {**HI, "messages": [{"role": "user", "content": words[:200_000]}]})
        assert r.json()["error"]["code"] == "prompt_too_long" and calls == ["worker thread"]


def test_slow_and_half_open_connections_are_dropped(slow_model):
    with serving(slow_model, header_timeout_s=1.0, body_timeout_s=1.0, max_connections=4) as (url, app):
        port = int(url.rsplit(":", 1)[1])
        half = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for s in half:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # headers never end
        time.sleep(0.3)
        assert chat(url, HI).status_code == 503  # 4 connections: the limit
        time.sleep(1.5)
        for s in half:
            s.settimeout(2)
            assert s.recv(100) == b""  # closed by the server
            s.close()
        assert chat(url, HI).status_code == 200
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"mess'
        )  # the body stops
        slow.settimeout(5)
        assert slow.recv(200).startswith(b"HTTP/1.1 408")
        slow.close()


def test_keys_come_from_the_environment_or_a_file(tmp_path, monkeypatch):
    from chatforge.files import ChatforgeError
    from chatforge.serving.access import read_secret

    monkeypatch.setenv("CHATFORGE_API_KEY", "from-env")
    assert read_secret(None, "CHATFORGE_API_KEY") == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert read_secret(tmp_path / "key", "CHATFORGE_API_KEY") == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ChatforgeError, match="is empty"):
        read_secret(tmp_path / "empty", "CHATFORGE_API_KEY")
    monkeypatch.setenv("CHATFORGE_API_KEY", "")
    assert read_secret(None, "CHATFORGE_API_KEY") is None


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve", "--host", "0.0.0.0"], "chatforge serve on 0.0.0.0 without an API key"),
        (["serve", "--api-key", ""], "--api-key would show the key"),
        (["serve", "--api-key", "sk-visible"], "--api-key would show the key"),
        (["serve", "--api-key-file", "/nonexistent/key"], "cannot read the secret file /nonexistent/key"),
        (["web", "--host", "0.0.0.0"], "chatforge web on 0.0.0.0 without a login"),
    ],
)
def test_unsafe_server_settings_are_refused(args, message, capsys, monkeypatch):
    from chatforge.cli import main

    monkeypatch.setenv("CHATFORGE_API_KEY", "")
    monkeypatch.delenv("CHATFORGE_WEB_AUTH", raising=False)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "sk-visible" not in err, err


def test_web_page_needs_its_login_and_a_local_host(tiny_llama, monkeypatch):
    pytest.importorskip("gradio")
    from chatforge.serving.web import serve_web

    monkeypatch.setenv("CHATFORGE_WEB_AUTH", "clement:s3cret")
    port = free_port()
    demo = serve_web(str(tiny_llama), host="127.0.0.1", port=port, block=False)
    url = f"http://127.0.0.1:{port}"
    try:
        assert httpx.get(url + "/config").status_code == 401
        assert httpx.get(url + "/config", headers={"Host": "evil.example"}).status_code == 403
        assert httpx.post(url + "/login", data={"username": "clement", "password": "wrong"}).status_code == 400
        with httpx.Client() as browser:
            assert browser.post(url + "/login", data={"username": "clement", "password": "s3cret"}).json()["success"]
            assert browser.get(url + "/config").status_code == 200
            assert browser.get(url + "/config", headers={"Origin": "http://evil.example"}).status_code == 403
    finally:
        demo.close()
