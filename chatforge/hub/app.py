"""`chatforge app`: write a deployable Gradio app folder for a model kept in a git-lfs model repo.

The folder is the seed's deployment (app.py, requirements.txt, packages.txt) plus a README with
the Space metadata. app.py uses plain transformers and gradio, never chatforge.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

from chatforge.files import ChatforgeError, write_text

# What the app imports; pinned to the versions installed beside this chatforge (the ones its tests ran with).
REQUIREMENTS = ("gradio", "transformers", "torch", "safetensors", "sentencepiece", "tokenizers")
SYSTEM_PACKAGES = ("git", "git-lfs")


def pinned_requirements() -> str:
    lines = []
    for name in REQUIREMENTS:
        try:
            version = importlib.metadata.version(name).split("+")[0]  # 2.13.0+cpu -> 2.13.0
        except importlib.metadata.PackageNotFoundError:
            raise ChatforgeError(
                f"cannot pin {name}: it is not installed here (pip install 'chatforge[web]')"
            ) from None
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def _template(name: str) -> str:
    return resources.files("chatforge").joinpath("templates", name).read_text(encoding="utf-8")


def write_app(model_repo: str, out_dir: str | Path, title: str = "", branch: str = "main") -> Path:
    """Write app.py, chat_tokens.py (message text stays text), requirements.txt, packages.txt and README.md
    into `out_dir`.

    Args:
        model_repo: git URL the app clones the model from on first start (https, ssh or file://).

    Raises:
        ChatforgeError: credentials in the URL, or the pinned packages are not installed.
    """
    parts = urlsplit(model_repo)
    if parts.username or parts.password:
        raise ChatforgeError(
            "the model repo URL must not carry credentials: the app reads a token from the "
            "MODEL_REPO_TOKEN secret instead"
        )
    if not re.match(r"^[\w.+-]+://|^[\w.-]+@[\w.-]+:", model_repo):
        raise ChatforgeError(f"--model-repo must be a git URL (https://, ssh or file://), got {model_repo!r}")
    name = model_repo.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    title = title or name or "chat"
    values = {
        "__TITLE__": title,
        "__MODEL_REPO__": model_repo,
        "__BRANCH__": branch,
        "__GRADIO_VERSION__": importlib.metadata.version("gradio") if _has("gradio") else "6.31.0",
        "__PYTHON_VERSION__": f"{sys.version_info.major}.{sys.version_info.minor}",
    }
    for key, value in values.items():
        if any(c in value for c in '"\\\n'):
            raise ChatforgeError(f"{key.strip('_').lower()} must not contain quotes, backslashes or newlines")
    fill = lambda text: re.sub("|".join(values), lambda m: values[m.group(0)], text)  # noqa: E731
    out = Path(out_dir)  # files are written one by one (atomically): an existing Space clone keeps its .git
    write_text(out / "app.py", fill(_template("gradio_app.py")))
    own = resources.files("chatforge.models").joinpath("chat_tokens.py").read_text(encoding="utf-8")
    write_text(out / "chat_tokens.py", own)  # the app tokenises prompts as chatforge does
    write_text(out / "README.md", fill(_template("gradio_app_README.md")))
    write_text(out / "requirements.txt", pinned_requirements())
    write_text(out / "packages.txt", "\n".join(SYSTEM_PACKAGES) + "\n")
    write_text(out / ".gitignore", "model/\nmodel.partial/\n.gradio/\n__pycache__/\n")
    return out


def _has(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
