"""Talk to a model: the terminal chat (streamed, multi-turn)."""

from __future__ import annotations

import sys

from chatforge.inference.generate import stream_reply
from chatforge.models.load import load_model, load_tokenizer

HELP = "commands: /reset clears the history, /exit quits"


def chat(
    model_spec: str | None = None,
    system: str | None = None,
    temperature: float = 0.7,
    top_p: float = 0.9,
    max_new_tokens: int = 256,
    stdin=None,
    stdout=None,
    chat_template: str | None = None,
) -> None:
    """Interactive chat in the terminal; replies stream as they are generated.

    Raises:
        ChatforgeError: the model cannot be loaded or has no chat template (and none is given).
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    tokenizer, model = load_tokenizer(model_spec, chat_template, for_chat=True), load_model(model_spec)
    history: list[dict] = [{"role": "system", "content": system}] if system is not None else []
    interactive = stdin.isatty()
    if interactive:
        print(f"chatforge chat — {HELP}", file=stdout)
    while True:
        if interactive:
            stdout.write("\nyou> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history = history[:1] if system is not None else []
            print("(history cleared)", file=stdout)
            continue
        history.append({"role": "user", "content": text})
        stdout.write("assistant> ")
        stdout.flush()
        reply = ""
        for piece in stream_reply(model, tokenizer, history, max_new_tokens, temperature, top_p):
            reply += piece
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": reply.strip()})
