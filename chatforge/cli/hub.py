"""`chatforge publish|app`: push a model folder to a model repo, and write an app that serves it."""

from __future__ import annotations

import json

from chatforge.hub.app import write_app
from chatforge.hub.publish import publish as publish_folder


def publish(a):
    report = publish_folder(
        a.model_dir, a.repo, message=a.message, branch=a.branch, title=a.title, token_env=a.token_env
    )
    print(json.dumps({k: v for k, v in report.items() if k != "output"}, indent=2))


def app(a):
    print(write_app(a.model_repo, a.out_dir, title=a.title, branch=a.branch))


def add_commands(sub) -> None:
    s = sub.add_parser("publish", help="model card + git-lfs push of a model folder to a model repo")
    s.add_argument("model_dir")
    s.add_argument("--repo", required=True, help="git URL of the model repo (token: $CHATFORGE_HUB_TOKEN)")
    s.add_argument("--message", help="commit message")
    s.add_argument("--branch", default="main")
    s.add_argument("--title", help="model card title (default: the run's name)")
    s.add_argument("--token-env", default="CHATFORGE_HUB_TOKEN", help="environment variable with the token")
    s.set_defaults(func=publish)

    s = sub.add_parser("app", help="write a deployable Gradio app (Hugging Face Space / OpenXLab) for a model repo")
    s.add_argument("out_dir")
    s.add_argument("--model-repo", required=True, help="git URL the app clones the model from")
    s.add_argument("--title", default="", help="app title (default: from the repo name)")
    s.add_argument("--branch", default="main")
    s.set_defaults(func=app)
