"""`chatforge chat|web|serve`: talk to a model in the terminal, the browser, or over an OpenAI-style API."""

from __future__ import annotations

import argparse
from typing import get_args

from chatforge.cli.common import TEMPLATE_HELP
from chatforge.files import ChatforgeError
from chatforge.inference.engines import Engine
from chatforge.models.load import DEFAULT_MODEL
from chatforge.serving.chat import chat as chat_in_terminal
from chatforge.serving.openai_api import API_KEY_ENV, Limits, serve_api
from chatforge.serving.web import serve_web


def chat(a):
    chat_in_terminal(
        a.model,
        system=a.system,
        temperature=a.temperature,
        top_p=a.top_p,
        max_new_tokens=a.max_new_tokens,
        chat_template=a.chat_template,
    )


def web(a):
    serve_web(
        a.model,
        compare=a.compare,
        host=a.host,
        port=a.port,
        dtype=a.dtype,
        auth_file=a.auth_file,
        chat_template=a.chat_template,
    )


def serve(a):
    if a.api_key is not None:
        raise ChatforgeError(
            f"--api-key would show the key to every user of this machine (ps); put it in "
            f"${API_KEY_ENV} or in a file given with --api-key-file"
        )
    limits = Limits(
        max_tokens=a.max_tokens_limit,
        max_body_bytes=a.max_body_bytes,
        max_context=a.max_context,
        max_batch=a.max_batch,
        engine=a.engine,
        max_prompt_tokens=a.max_prompt_tokens,
        request_timeout_s=a.request_timeout,
        max_connections=a.max_connections,
    )
    serve_api(
        a.model,
        host=a.host,
        port=a.port,
        api_key_file=a.api_key_file,
        model_name=a.model_name,
        limits=limits,
        dtype=a.dtype,
        chat_template=a.chat_template,
    )


def add_commands(sub) -> None:
    s = sub.add_parser("chat", help="chat with a model in the terminal")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    s.add_argument("--system", help="system prompt (default: the chat template's)")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=chat)

    s = sub.add_parser("web", help="chat in the browser (Gradio); --compare BASE shows before/after side by side")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    s.add_argument("--compare", metavar="BASE", help="a second model answering the same messages")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--dtype", default="auto")
    s.add_argument(
        "--auth-file",
        help="file whose first line is USER:PASSWORD for the page's login (default: "
        "$CHATFORGE_WEB_AUTH; neither: no login, allowed on a loopback host only)",
    )
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=web)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API: /v1/chat/completions, /v1/models, /health")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--api-key-file",
        help="file whose first line is the required Bearer key (default: "
        "$CHATFORGE_API_KEY; neither: open, allowed on a loopback host only)",
    )
    s.add_argument("--api-key", help=argparse.SUPPRESS)  # refused: `ps` would show it
    s.add_argument("--model-name", help="the model id clients use (default: the model's name)")
    s.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--max-context", type=int, default=0, help="prompt+completion tokens (0: the model's)")
    s.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt in tokens (0: the context)")
    s.add_argument("--request-timeout", type=float, default=300, help="seconds a request may take in all")
    s.add_argument("--max-connections", type=int, default=64, help="open connections (more get 503)")
    s.add_argument("--max-batch", type=int, default=32, help="requests decoded together (slots, static batches)")
    s.add_argument(
        "--engine",
        choices=get_args(Engine),
        default="auto",
        help="slots (own KV-cache slots, CUDA graphs; Llama-shaped models), continuous (transformers' "
        "continuous batching), static (batches of waiting requests); auto: slots where they run",
    )
    s.add_argument("--dtype", default="auto")
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=serve)
