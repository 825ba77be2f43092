"""`chatforge assistant`: the whole workflow in one command (identity data -> LoRA -> merge -> eval)."""

from __future__ import annotations

from chatforge.cli.common import TEMPLATE_HELP
from chatforge.models.load import DEFAULT_MODEL
from chatforge.pipeline import assistant as build_assistant


def assistant(a):
    build_assistant(
        a.name,
        model=a.model,
        assistant_name=a.assistant_name,
        out=a.out,
        recipe=a.recipe,
        overrides=a.overrides,
        progress=not a.no_progress,
        gguf=a.gguf,
        chat_template=a.chat_template,
    )


def add_commands(sub) -> None:
    s = sub.add_parser("assistant", help="one command: identity data -> LoRA -> merge -> eval")
    s.add_argument("--name", required=True, help="the owner: 'I am <name>'s assistant'")
    s.add_argument("--assistant-name", default="")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--out", help="run folder (default: runs/assistant-<name>)")
    s.add_argument("--recipe", help="identity recipe (default: the one for the model)")
    s.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument(
        "--gguf",
        nargs="?",
        const="f16",
        metavar="DTYPE",
        help="end with merged/NAME-DTYPE.gguf and an Ollama Modelfile (f16 default, bf16, f32, q8_0)",
    )
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=assistant)
