"""`chatforge publish`: write a model card and push a model folder to a git + git-lfs model repo.

Hugging Face, ModelScope and OpenXLab model repos are git remotes whose weight files live in
git-lfs. The folder is mirrored into a staging clone (kept in the cache, so a re-publish pushes
only what changed: git sends new objects, git-lfs uploads objects the remote lacks), weights
are LFS-tracked, and the token reaches git only through a credential helper that reads it
from the environment: it is never on a command line, in a URL, in .git/config or in any output.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote, urlsplit

import yaml

from chatforge.config import COMPUTE_KEYS, load_yaml
from chatforge.files import ChatforgeError, write_text
from chatforge.models.load import ALIASES, cache_dir

TOKEN_ENV = "CHATFORGE_HUB_TOKEN"
USER_ENV = "CHATFORGE_HUB_USER"
LFS_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "*.gguf",
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.model",
    "*.npz",
    "*.tflite",
)
LFS_MIN_BYTES = 10 << 20  # any other file this large is tracked by its path
CARD_FILE, ATTRIBUTES = "README.md", ".gitattributes"
HUB_IDS = {name: a.hub_id for alias, a in ALIASES.items() for name in (alias, a.display)}


# ---------------------------------------------------------------- the model card


def _read(path: Path | None):
    if path is None or not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix in (".yaml", ".yml"):
        return load_yaml(text, str(path))
    return text


def run_files(model_dir: Path) -> dict[str, Path | None]:
    """The run's config.yaml, eval.md and chatforge_merge.json, searched around the model folder."""
    merge_json = model_dir / "chatforge_merge.json"
    dirs = [model_dir, model_dir.parent, model_dir.parent / "train"]
    if merge_json.is_file():
        adapter = Path(json.loads(merge_json.read_text(encoding="utf-8")).get("adapter", ""))
        if str(adapter):
            dirs += [adapter, adapter.parent]
    find = lambda name: next((d / name for d in dirs if (d / name).is_file()), None)  # noqa: E731
    return {
        "config": find("config.yaml"),
        "eval": find("eval.md"),
        "merge": merge_json if merge_json.is_file() else None,
    }


def base_model_id(base: str | None) -> str | None:
    if not base:
        return None
    if base in HUB_IDS:
        return HUB_IDS[base]
    path = Path(base)
    if path.is_dir() and (path / "config.json").is_file():
        name = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path") or path.name
        return HUB_IDS.get(Path(str(name)).name, str(name) if str(name).count("/") == 1 else Path(str(name)).name)
    return base


def run_name(model_dir: Path) -> str:
    """`runs/assistant-x/merged` is named assistant-x; other folders by their own name."""
    model_dir = model_dir.resolve()
    return model_dir.parent.name if model_dir.name in ("merged", "model") else model_dir.name


def model_card(model_dir: str | Path, title: str | None = None, repo_url: str | None = None) -> str:
    """The README.md of a published model: base model, data, recipe, evaluation and usage."""
    model_dir = Path(model_dir)
    found = run_files(model_dir)
    cfg, merge, eval_md = _read(found["config"]) or {}, _read(found["merge"]) or {}, _read(found["eval"])
    base = base_model_id(merge.get("base") or cfg.get("model"))
    title = title or run_name(model_dir)
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["chatforge", "text-generation", "conversational"]
        + ([cfg["method"]] if cfg.get("method") else [])
        + (["gguf"] if any(model_dir.glob("*.gguf")) else []),
    }
    if base:
        meta["base_model"] = base
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip(), "---", "", f"# {title}", ""]
    desc = (cfg.get("description") or "").strip()
    lines += [desc or "A chat model fine-tuned with chatforge.", ""]
    lines += [
        "## Base model",
        "",
        f"`{base}`" if base else "unknown (no chatforge_merge.json or config.yaml found)",
        "",
    ]
    data = cfg.get("data") or []
    if data:
        lines += ["## Training data", "", "| file | weight | format | conversations |", "|---|---|---|---|"]
        for d in data if isinstance(data, list) else [data]:
            d = {"path": d} if isinstance(d, str) else d
            path = Path(d.get("path", ""))
            n = sum(1 for line in path.open(encoding="utf-8") if line.strip()) if path.is_file() else "—"
            lines.append(f"| {path.name} | {d.get('weight', 1.0)} | {d.get('format', 'auto')} | {n} |")
        lines.append("")
    if cfg:
        lines += ["## Recipe", "", "| setting | value |", "|---|---|"]
        for k in (k for k in COMPUTE_KEYS if k not in ("model", "data")):  # both have their own sections
            if k in cfg and cfg[k] not in (None, "", 0) or k == "method":
                v = cfg.get(k)
                if isinstance(v, dict):
                    v = ", ".join(f"{a}={b}" for a, b in v.items())
                lines.append(f"| {k} | {v} |")
        lines.append("")
    if eval_md:
        table = [line for line in eval_md.splitlines() if line.startswith("|")]
        lines += ["## Evaluation", "", *(table or [eval_md.strip()]), ""]
    if merge:
        lines += [
            "## Merge",
            "",
            f"LoRA merged into the base in {merge.get('dtype', '?')}; the merged weights "
            f"give the logits of base+adapter to {merge.get('max_logit_diff', 0):.1e}.",
            "",
        ]
    clone = repo_url or "<this repository's URL>"
    lines += (
        [
            "## Use",
            "",
            "```bash",
            f"git lfs install && git clone {clone} model",
            "```",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'tok = AutoTokenizer.from_pretrained("model")',
            'model = AutoModelForCausalLM.from_pretrained("model")',
            'messages = [{"role": "user", "content": "Who are you?"}]',
            'ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")',
            "print(tok.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:], skip_special_tokens=True))",
            "```",
            "",
        ]
        + local_run(model_dir)
        + ["Made with chatforge.", ""]
    )
    return "\n".join(lines)


def local_run(model_dir: Path) -> list[str]:
    """Model card lines on running the folder's GGUF in llama.cpp, Ollama and LM Studio (none without one)."""
    ggufs = sorted(p.name for p in model_dir.glob("*.gguf"))
    if not ggufs:
        return []
    lines = [
        "## Run it locally",
        "",
        f"`{ggufs[0]}` is this model in one GGUF file, with its tokenizer and chat "
        "template, for llama.cpp, Ollama and LM Studio.",
        "",
        "```bash",
    ]
    if (model_dir / "Modelfile").is_file():
        lines += ["ollama create my-assistant -f Modelfile && ollama run my-assistant   # Ollama"]
    return lines + [
        f"llama-cli -m {ggufs[0]} -cnv      # llama.cpp: chat in the terminal",
        f"llama-server -m {ggufs[0]}        # llama.cpp: OpenAI-compatible API on :8080",
        f"lms import {ggufs[0]}             # LM Studio",
        "```",
        "",
    ]


# ---------------------------------------------------------------- git plumbing


class Git:
    """Runs git in one folder with the token helper in the environment; output is redacted."""

    def __init__(self, folder: Path, token_env: str = TOKEN_ENV, user_env: str = USER_ENV):
        self.folder = folder
        self.secrets = secret_forms(os.environ.get(token_env), os.environ.get(user_env) or "chatforge")
        self.env = git_env(token_env, user_env)

    def __call__(self, *args: str, check: bool = True, extra_env: dict | None = None) -> str:
        env = dict(self.env, **(extra_env or {}))
        proc = subprocess.run(["git", *args], cwd=self.folder, env=env, capture_output=True, text=True)
        out = self.redact(proc.stdout + proc.stderr)
        if check and proc.returncode != 0:
            raise ChatforgeError(f"git {args[0]} failed in {self.folder}: {out.strip()[-2000:]}")
        return self.redact(proc.stdout) if check else out

    def ok(self, *args: str) -> bool:
        return subprocess.run(["git", *args], cwd=self.folder, env=self.env, capture_output=True).returncode == 0

    def redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def secret_forms(token: str | None, user: str) -> list[str]:
    """The token as it can appear in git's output: itself, URL-quoted, and in base64 (HTTP Basic auth)."""
    if not token:
        return []
    b64 = lambda s: base64.b64encode(s.encode()).decode()  # noqa: E731
    return sorted({token, quote(token, safe=""), b64(f"{user}:{token}"), b64(token)}, key=len, reverse=True)


TRACE_VARIABLES = re.compile(r"GIT_TRACE.*|GIT_CURL_VERBOSE|GIT_TRANSFER_TRACE|GIT_REDACT_COOKIES")


def git_env(token_env: str = TOKEN_ENV, user_env: str = USER_ENV) -> dict:
    """The environment for git: no prompts, no tracing (a trace can write credentials where they cannot
    be redacted) and, when the token variable is set, a credential helper that reads it. The helper's
    text names the variable, never its value; git-lfs inherits it."""
    env = {k: v for k, v in os.environ.items() if not TRACE_VARIABLES.fullmatch(k)}
    env.update(GIT_TERMINAL_PROMPT="0", GCM_INTERACTIVE="never")
    if os.environ.get(token_env):
        helper = (
            f'!f() {{ test "$1" = get || exit 0; echo "username=${{{user_env}:-chatforge}}"; '
            f'echo "password=${{{token_env}}}"; }}; f'
        )
        n = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
        env.update(
            {
                f"GIT_CONFIG_KEY_{n}": "credential.helper",
                f"GIT_CONFIG_VALUE_{n}": "",  # drop other helpers
                f"GIT_CONFIG_KEY_{n + 1}": "credential.helper",
                f"GIT_CONFIG_VALUE_{n + 1}": helper,
                "GIT_CONFIG_COUNT": str(n + 2),
            }
        )
    return env


def check_repo_url(url: str) -> None:
    """Refuse a repo URL with credentials in it, in any of git's forms (`transport::address` too).

    Raises:
        ChatforgeError: credentials in the URL, or neither a URL nor an existing path.
    """
    address = url
    while re.match(r"[A-Za-z][A-Za-z0-9+.-]*::", address):  # git's <transport>::<address> (remote helpers)
        address = address.split("::", 1)[1]
    try:
        parts = urlsplit(address)
        host = parts.hostname
    except ValueError:
        raise ChatforgeError("the repo URL is not a valid URL") from None
    if parts.password or (parts.username and parts.scheme not in ("ssh", "git+ssh", "ssh+git")):
        raise ChatforgeError(
            f"the repo URL must not carry credentials; put the token in ${TOKEN_ENV} "
            f"or a git credential helper (URL host: {host})"
        )
    if not parts.scheme and ":" not in url and not Path(url).exists():
        raise ChatforgeError(f"not a git URL or path: {url}")


def lfs_attributes(folder: Path) -> str:
    lines = [f"{p} filter=lfs diff=lfs merge=lfs -text" for p in LFS_PATTERNS]
    for f in sorted(_files(folder)):
        if (folder / f).stat().st_size >= LFS_MIN_BYTES and not any(Path(f).match(p) for p in LFS_PATTERNS):
            lines.append(f"{f.replace(' ', '[[:space:]]')} filter=lfs diff=lfs merge=lfs -text")
    return "\n".join(lines) + "\n"


def _files(folder: Path) -> set[str]:
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and ".git" not in p.relative_to(folder).parts
    }


def sync_tree(src: Path, dst: Path, keep: set[str]) -> None:
    """Make dst's files (outside .git and `keep`) mirror src (hard links where possible); unchanged
    files are left alone."""
    wanted = _files(src)
    for rel in _files(dst) - wanted - keep:
        (dst / rel).unlink()
    for rel in wanted:
        a, b = src / rel, dst / rel
        sa = a.stat()
        if b.is_file() and b.stat().st_size == sa.st_size and int(b.stat().st_mtime) == int(sa.st_mtime):
            continue
        b.parent.mkdir(parents=True, exist_ok=True)
        b.unlink(missing_ok=True)
        try:
            os.link(a, b)  # same file system: the staging tree costs no space
        except OSError:
            shutil.copy2(a, b)


def publish(
    model_dir: str | Path,
    repo: str,
    message: str | None = None,
    branch: str = "main",
    work_dir: str | Path | None = None,
    title: str | None = None,
    token_env: str = TOKEN_ENV,
) -> dict:
    """Write the model card and push `model_dir` to the git repo `repo` with weights in git-lfs.

    Args:
        repo: the model repo's git URL (https://..., ssh, or file:// for a local bare repo).
        work_dir: the staging clone (default: in the chatforge cache, one per repo URL).
        token_env: environment variable holding the access token (else git's own credential helper).

    Raises:
        ChatforgeError: no such folder, git or git-lfs missing, credentials in the URL, or a git failure.
    """

    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not any(model_dir.iterdir()):
        raise ChatforgeError(f"nothing to publish: {model_dir} is not a folder with files")
    check_repo_url(repo)
    for tool in (["git", "--version"], ["git", "lfs", "version"]):
        try:
            found = subprocess.run(tool, capture_output=True).returncode == 0
        except FileNotFoundError:
            found = False
        if not found:
            raise ChatforgeError(
                f"`{' '.join(tool[:-1])}` is needed: apt-get install git git-lfs (https://git-lfs.com on other systems)"
            )
    work = Path(work_dir or cache_dir() / "publish" / hashlib.sha1(repo.encode()).hexdigest()[:16])
    work.mkdir(parents=True, exist_ok=True)
    git = Git(work, token_env)
    no_smudge = {"GIT_LFS_SKIP_SMUDGE": "1"}  # never download the remote's weights: ours replace them
    if not (work / ".git").is_dir():
        git("init", "-q", "-b", branch)
        git("remote", "add", "origin", repo)
    elif git("remote", "get-url", "origin").strip() != repo:
        git("remote", "set-url", "origin", repo)
    git("lfs", "install", "--local")
    git("fetch", "-q", "origin", extra_env=no_smudge, check=False)
    if git.ok("rev-parse", "--verify", "-q", f"origin/{branch}"):
        git("reset", "-q", "--mixed", f"origin/{branch}", extra_env=no_smudge)  # build on the remote's history
    sync_tree(model_dir, work, keep={CARD_FILE, ATTRIBUTES})
    # replaced, never written in place: staging files are hard links to the user's own
    if not (model_dir / CARD_FILE).is_file():
        write_text(work / CARD_FILE, model_card(model_dir, title, repo))
    write_text(work / ATTRIBUTES, lfs_attributes(work))
    git("add", "-A")
    changes = [line.split("\t", 1) for line in git("diff", "--cached", "--name-status").splitlines()]
    if changes:
        ident = {
            k: v
            for k, v in (
                ("GIT_AUTHOR_NAME", "chatforge"),
                ("GIT_AUTHOR_EMAIL", "chatforge@localhost"),
                ("GIT_COMMITTER_NAME", "chatforge"),
                ("GIT_COMMITTER_EMAIL", "chatforge@localhost"),
            )
            if not git.ok("config", "user.name")
        }
        git("commit", "-q", "-m", message or f"Publish {title or run_name(model_dir)} with chatforge", extra_env=ident)
    ahead = (
        not git.ok("rev-parse", "--verify", "-q", f"origin/{branch}")
        or git("rev-list", "--count", f"origin/{branch}..HEAD").strip() != "0"
    )
    pushed = ""
    if ahead:
        pushed = git("push", "origin", f"HEAD:refs/heads/{branch}", check=False)
        if (
            not git.ok("ls-remote", "--exit-code", "origin", f"refs/heads/{branch}")
            or git("ls-remote", "origin", f"refs/heads/{branch}").split()[0] != git("rev-parse", "HEAD").strip()
        ):
            raise ChatforgeError(f"push to {repo} failed: {pushed.strip()[-2000:]}")
        git("fetch", "-q", "origin", extra_env=no_smudge)
    lfs_files = git("lfs", "ls-files", "--name-only").split()
    return {
        "repo": repo,
        "staging": str(work),
        "commit": git("rev-parse", "HEAD").strip(),
        "pushed": ahead,
        "changed": [{"status": s, "path": p} for s, p in changes],
        "lfs_files": lfs_files,
        "output": pushed.strip(),
    }
