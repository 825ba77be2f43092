"""Publishing to a local bare git + git-lfs repo (file://), and the generated Gradio app served from it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatforge.hub.publish import git_env
from conftest import ROOT

TOKEN = "hf_FAKEtoken_7c1d9e2b44"
LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or subprocess.run(["git", "lfs", "version"], capture_output=True).returncode != 0,
    reason="needs git and git-lfs",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(*args, cwd=None, env=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def cli(*args, tmp: Path, **extra_env) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        CHATFORGE_CACHE=str(tmp / "cache"),
        CHATFORGE_HUB_TOKEN=TOKEN,
        **extra_env,
    )
    return subprocess.run(
        [sys.executable, "-m", "chatforge", *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


def make_run(tiny_llama: Path, root: Path) -> Path:
    """A run folder as `chatforge assistant` leaves it: merged model, train config, eval table, data."""
    merged = root / "run" / "merged"
    shutil.copytree(tiny_llama, merged)
    (root / "run" / "train").mkdir()
    (root / "run" / "data").mkdir()
    data = root / "run" / "data" / "identity.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}]}) + "\n" for i in range(3)))
    (root / "run" / "train" / "config.yaml").write_text(
        f"model: smollm2-135m-instruct\nmethod: lora\ndata: [{{path: {data}, weight: 1.0}}]\n"
        "lora: {r: 16, alpha: 32}\nlr: 0.001\nmax_steps: 40\ndescription: Clement's assistant.\n"
    )
    (root / "run" / "eval.md").write_text(
        "# Evaluation\n\n| metric | base | fine-tuned |\n|---|---|---|\n| identity | 0.0% | 93.3% |\n"
    )
    (merged / "chatforge_merge.json").write_text(
        json.dumps(
            {
                "adapter": str(root / "run" / "train" / "adapter"),
                "base": "smollm2-135m-instruct",
                "dtype": "float32",
                "max_logit_diff": 2e-6,
            }
        )
    )
    return merged


def all_bytes(*folders: Path):
    for folder in folders:
        for p in folder.rglob("*"):
            if p.is_file():
                yield p, p.read_bytes()


@pytest.fixture(scope="module")
def smol_bf16(smol_folder, tmp_path_factory) -> Path:
    """The real default model saved in bf16 (270 MB): the app test needs real answers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("smol-bf16")
    AutoModelForCausalLM.from_pretrained(smol_folder, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(smol_folder).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def published(smol_bf16, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("publish")
    merged = make_run(smol_bf16, tmp)
    remote = tmp / "remote.git"
    git("init", "-q", "--bare", "-b", "main", str(remote))
    url = remote.as_uri()
    r = cli("publish", merged, "--repo", url, tmp=tmp)
    assert r.returncode == 0, r.stderr
    return {
        "tmp": tmp,
        "merged": merged,
        "remote": remote,
        "url": url,
        "out": r.stdout + r.stderr,
        "report": json.loads(r.stdout),
    }


def test_clone_has_lfs_pointers_and_pull_restores_bytes(published):
    tmp, merged = published["tmp"], published["merged"]
    clone = tmp / "clone"
    git("clone", "-q", published["url"], str(clone), env=dict(os.environ, GIT_LFS_SKIP_SMUDGE="1"))
    weights = clone / "model.safetensors"
    assert weights.read_bytes().startswith(LFS_POINTER)  # a pointer, not the weights
    assert published["report"]["lfs_files"] == ["model.safetensors"]
    assert weights.stat().st_size < 200
    assert "*.safetensors filter=lfs" in (clone / ".gitattributes").read_text()
    assert (clone / "config.json").read_bytes() == (merged / "config.json").read_bytes()  # small files: plain git
    git("lfs", "install", "--local", cwd=clone)
    git("lfs", "pull", cwd=clone)
    assert weights.read_bytes() == (merged / "model.safetensors").read_bytes()  # byte for byte

    card = (clone / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| identity | 0.0% | 93.3% |" in card  # the run's eval table
    assert "| lr | 0.001 |" in card and "r=16, alpha=32" in card and "Clement's assistant." in card
    assert "| identity.jsonl | 1.0 | auto | 3 |" in card


def test_token_appears_nowhere(published):
    tmp = published["tmp"]
    assert TOKEN not in published["out"]
    staging = Path(published["report"]["staging"])
    for path, data in all_bytes(staging, published["remote"], tmp / "cache"):
        assert TOKEN.encode() not in data, path
    config = (staging / ".git" / "config").read_text()
    assert "credential" not in config and TOKEN not in config
    # a URL with credentials in it is refused, without echoing them
    r = cli("publish", published["merged"], "--repo", f"https://user:{TOKEN}@hub.example/org/model", tmp=tmp)
    assert r.returncode == 2 and "must not carry credentials" in r.stderr and TOKEN not in r.stdout + r.stderr


def test_token_reaches_git_through_the_credential_helper(monkeypatch, tmp_path):
    """What git (and git-lfs, which asks `git credential`) gets for an https remote: the env token."""
    monkeypatch.setenv("CHATFORGE_HUB_TOKEN", TOKEN)
    monkeypatch.setenv("CHATFORGE_HUB_USER", "clement")
    env = git_env()
    assert TOKEN not in json.dumps({k: v for k, v in env.items() if k.startswith("GIT_")})  # names the variable only
    out = subprocess.run(
        ["git", "credential", "fill"],
        input="protocol=https\nhost=hub.example\n\n",
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"password={TOKEN}" in out and "username=clement" in out


def test_republish_pushes_only_changes(tiny_llama, tmp_path, monkeypatch):
    from chatforge.hub.publish import publish

    monkeypatch.setenv("CHATFORGE_HUB_TOKEN", TOKEN)
    merged = make_run(tiny_llama, tmp_path)
    remote = tmp_path / "remote.git"
    git("init", "-q", "--bare", "-b", "main", str(remote))
    lfs_objects = lambda: sorted(p.name for p in (remote / "lfs" / "objects").rglob("*") if p.is_file())  # noqa
    commits = lambda: int(git("rev-list", "--count", "main", cwd=remote))  # noqa: E731
    push = lambda: publish(merged, remote.as_uri(), work_dir=tmp_path / "staging")  # noqa: E731
    first = push()
    assert first["pushed"] and commits() == 1 and len(lfs_objects()) == 1

    again = push()
    assert again["pushed"] is False and again["changed"] == [] and commits() == 1  # nothing changed

    (merged / "generation_config.json").write_text('{"do_sample": false}\n')
    small = push()
    assert small["changed"] == [{"status": "M", "path": "generation_config.json"}] and commits() == 2
    assert len(lfs_objects()) == 1  # the weights were not uploaded again

    data = bytearray((merged / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (merged / "model.safetensors").write_bytes(bytes(data))
    big = push()
    assert big["changed"] == [{"status": "M", "path": "model.safetensors"}] and len(lfs_objects()) == 2
    assert TOKEN not in json.dumps([first, again, small, big])


@pytest.mark.slow
def test_generated_app_serves_the_published_model(published):
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    tmp = published["tmp"]
    app = tmp / "app"
    r = cli("app", app, "--model-repo", published["url"], tmp=tmp)
    assert r.returncode == 0, r.stderr
    assert (app / "packages.txt").read_text().split() == ["git", "git-lfs"]
    reqs = (app / "requirements.txt").read_text()
    assert "gradio==" in reqs and "transformers==" in reqs and "chatforge" not in reqs
    assert "chatforge" not in (app / "app.py").read_text().replace("chatforge app", "")
    assert "sdk: gradio" in (app / "README.md").read_text()

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        GRADIO_ANALYTICS_ENABLED="False",
        OMP_NUM_THREADS="1",
    )  # see test_api: avoids OpenMP oversubscription on shared machines
    log = open(tmp / "app.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=app, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import httpx

        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp / "app.log").read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            pytest.fail("the app did not serve its page: " + (tmp / "app.log").read_text()[-3000:])
        page = httpx.get(f"http://127.0.0.1:{port}/").text
        assert "<title>" in page.lower() or "gradio" in page.lower()
        # the model came through git clone + git lfs pull: real bytes, not pointers
        assert (app / "model" / "model.safetensors").read_bytes() == (
            published["merged"] / "model.safetensors"
        ).read_bytes()
        reply = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            "What is the capital of France?", "", 0.0, 1.0, 16, api_name="/chat"
        )
        assert "Paris" in reply
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_credentials_in_any_url_form_are_refused(tmp_path, monkeypatch, capsys):
    from chatforge.cli import main
    from chatforge.files import ChatforgeError
    from chatforge.hub.publish import check_repo_url

    for url in (
        f"http::http://user:{TOKEN}@hub.example/org/model.git",
        f"https://{TOKEN}@hub.example/m.git",
        f"http::https::https://u:{TOKEN}@hub.example/m",
        f"ssh://git:{TOKEN}@hub.example/m.git",
    ):
        with pytest.raises(ChatforgeError, match="must not carry credentials") as e:
            check_repo_url(url)
        assert TOKEN not in str(e.value)
    for url in (
        "https://hub.example/org/model.git",
        "ssh://git@hub.example/m.git",
        "git@hub.example:org/m.git",
        "http::https://hub.example/m",
    ):
        check_repo_url(url)
    merged = tmp_path / "model"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    assert main(["publish", str(merged), "--repo", f"http::http://user:{TOKEN}@127.0.0.1:9/m.git"]) == 2
    err = capsys.readouterr().err
    assert "must not carry credentials" in err and TOKEN not in err
    assert not (tmp_path / "cache").exists()  # no staging clone, no .git/config, no model card


def test_the_users_own_files_are_never_written(tmp_path):
    from chatforge.hub.publish import publish

    merged = tmp_path / "model"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "model.safetensors").write_bytes(b"\0" * 64)
    ours = "*.custom binary\n"
    (merged / ".gitattributes").write_text(ours)
    remote = tmp_path / "remote.git"
    git("init", "-q", "--bare", "-b", "main", str(remote))
    report = publish(merged, remote.as_uri(), work_dir=tmp_path / "staging")
    assert (merged / ".gitattributes").read_text() == ours  # the staging copy is a hard link: replaced, not written
    assert "*.safetensors filter=lfs" in (Path(report["staging"]) / ".gitattributes").read_text()
    assert sorted(p.name for p in merged.iterdir()) == [".gitattributes", "config.json", "model.safetensors"]


def test_git_tracing_cannot_leak_the_token(tmp_path, monkeypatch):
    """An HTTP remote that asks for Basic auth, with every git trace switched on by the user."""
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from chatforge.files import ChatforgeError
    from chatforge.hub.publish import Git, publish

    seen = []

    class AskForAuth(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="hub"')
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), AskForAuth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    trace = tmp_path / "trace.log"
    for name in ("GIT_TRACE", "GIT_TRANSFER_TRACE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("GIT_TRACE_REDACT", "0")
    monkeypatch.setenv("GIT_TRACE_CURL", str(trace))  # straight to a file: nothing could redact it
    monkeypatch.setenv("CHATFORGE_HUB_TOKEN", TOKEN)
    merged = tmp_path / "model"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    try:
        with pytest.raises(ChatforgeError) as e:
            publish(merged, f"http://127.0.0.1:{server.server_port}/org/model.git", work_dir=tmp_path / "staging")
    finally:
        server.shutdown()
    basic = base64.b64encode(f"chatforge:{TOKEN}".encode()).decode()
    assert f"Basic {basic}" in seen  # git did send the token
    assert TOKEN not in str(e.value) and basic not in str(e.value)
    assert basic not in Git(tmp_path).redact(f"Authorization: Basic {basic}")  # should a trace come through
    for path, data in all_bytes(tmp_path):
        assert TOKEN.encode() not in data and basic.encode() not in data, path
