"""`chatforge web`: chat with a model in the browser (Gradio), optionally side by side with its base.

The seed compares the model before and after fine-tuning in a web page; `--compare BASE` puts
both in one screen: every message goes to both models and both replies stream at once.
Chats are queued (one generation at a time per page event), which suits a CPU or one GPU.
On a loopback address the page answers only local Host/Origin names; on any other address it needs
a login (USER:PASSWORD from $CHATFORGE_WEB_AUTH or --auth-file).
"""

import hmac
import queue
import threading
from collections.abc import Iterator

from chatforge.extras import require  # noqa: E402
from chatforge.files import ChatforgeError  # noqa: E402
from chatforge.inference.generate import stream_reply  # noqa: E402
from chatforge.models.load import display_name, load_model, load_tokenizer, resolve
from chatforge.serving.access import LoopbackOnly, check_bind, is_loopback, read_secret  # noqa: E402

WEB_AUTH_ENV = "CHATFORGE_WEB_AUTH"

CSS = "#chats .message { font-size: 15px; } footer { display: none !important; }"


def merge_streams(streams: list[Iterator[str]], parallel: bool = True) -> Iterator[tuple[int, str]]:
    """(stream index, piece) from several text streams: interleaved as each produces, or one stream
    after the other. On a CPU, two generations at once oversubscribe the cores: torch's OpenMP
    threads then wait on each other (measured here: 32 tokens in 76 s instead of 2 s)."""
    if not parallel:
        for i, stream in enumerate(streams):
            for piece in stream:
                yield i, piece
        return
    out: queue.Queue = queue.Queue()

    def pump(i: int, stream):
        try:
            for piece in stream:
                out.put((i, piece))
        except Exception as e:  # shown in the page instead of killing the other stream
            out.put((i, f"\n[error: {e}]"))
        finally:
            out.put((i, None))

    for i, s in enumerate(streams):
        threading.Thread(target=pump, args=(i, s), daemon=True).start()
    live = len(streams)
    while live:
        i, piece = out.get()
        if piece is None:
            live -= 1
        else:
            yield i, piece


def build_demo(models: list[tuple[str, object, object]], title: str = "chatforge"):
    """A Gradio Blocks page chatting with one model, or several side by side.

    Args:
        models: (label, model, tokenizer) per column; the first is the model under test.

    Raises:
        ChatforgeError: gradio is not installed.
    """
    gr = require("gradio", "web", "chatforge web")
    stop_events: dict[str, threading.Event] = {}

    def respond(message, system, temperature, top_p, max_tokens, history, request: gr.Request):
        n = len(models)
        history = history or [[] for _ in range(n)]
        if not (message or "").strip():
            yield ("", *history, history)
            return
        stop = stop_events[request.session_hash] = threading.Event()
        turns = [h + [{"role": "user", "content": message}] for h in history]
        prefix = [{"role": "system", "content": system}] if (system or "").strip() else []
        replies = [""] * n
        shown = lambda: [t + [{"role": "assistant", "content": r}] for t, r in zip(turns, replies)]  # noqa: E731
        yield ("", *shown(), history)
        streams = [
            stream_reply(
                model,
                tok,
                prefix + t,
                max_new_tokens=int(max_tokens),
                temperature=temperature,
                top_p=top_p,
                stop_event=stop,
            )
            for (_, model, tok), t in zip(models, turns)
        ]
        try:
            on_gpu = all(next(m.parameters()).device.type == "cuda" for _, m, _ in models)
            for i, piece in merge_streams(streams, parallel=on_gpu):
                replies[i] += piece
                yield ("", *shown(), history)
        finally:
            stop.set()  # a closed page stops its generation too
        new_history = [t + [{"role": "assistant", "content": r.strip()}] for t, r in zip(turns, replies)]
        yield ("", *shown(), new_history)

    def stop_now(request: gr.Request):
        event = stop_events.get(request.session_hash)
        if event:
            event.set()

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"## {title}")
        history = gr.State(None)
        with gr.Row(elem_id="chats"):
            chats = [
                gr.Chatbot(label=label, elem_id=f"chat-{i}", height=460, buttons=["copy"])
                for i, (label, _, _) in enumerate(models)
            ]
        with gr.Row():
            msg = gr.Textbox(
                placeholder="Type a message and press Enter", show_label=False, scale=6, elem_id="msg", autofocus=True
            )
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            clear = gr.Button("Clear", scale=1, elem_id="clear")
        with gr.Accordion("Settings", open=False):
            system = gr.Textbox(label="System prompt (empty: the model's default)", lines=2, elem_id="system")
            with gr.Row():
                temperature = gr.Slider(
                    0.0, 1.5, value=0.7, step=0.05, label="Temperature (0 = greedy)", elem_id="temperature"
                )
                top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", elem_id="top_p")
                max_tokens = gr.Slider(8, 1024, value=256, step=8, label="Max new tokens", elem_id="max_tokens")
        inputs = [msg, system, temperature, top_p, max_tokens, history]
        outputs = [msg, *chats, history]
        msg.submit(respond, inputs, outputs)
        send.click(respond, inputs, outputs)
        stop.click(stop_now, None, None, queue=False)
        clear.click(lambda: (None, *[[] for _ in chats]), None, [history, *chats], queue=False)
    return demo


def load_columns(
    model_spec: str | None, compare: str | None = None, dtype: str = "auto", chat_template: str | None = None
):
    """(label, model, tokenizer) for the model and, if given, its base; a shared spec loads once."""

    first = (
        display_name(model_spec),
        load_model(model_spec, dtype=dtype),
        load_tokenizer(model_spec, chat_template, for_chat=True),
    )
    if not compare:
        return [first]
    same = lambda a, b: (a.path.resolve(), a.gguf_file) == (b.path.resolve(), b.gguf_file)  # noqa: E731
    if same(resolve(compare), resolve(model_spec)):  # one model under two labels: load it once
        return [first, (f"{first[0]} (base)", first[1], first[2])]
    second = (
        f"{display_name(compare)} (base)",
        load_model(compare, dtype=dtype),
        load_tokenizer(compare, chat_template, for_chat=True),
    )
    return [first, second]


def login_check(auth: str):
    """Gradio's login test for `auth` ("USER:PASSWORD"), in constant time.

    Raises:
        ChatforgeError: `auth` is not USER:PASSWORD.
    """
    user, _, password = auth.partition(":")
    if not user or not password:
        raise ChatforgeError(f"a web login must be USER:PASSWORD (from ${WEB_AUTH_ENV} or --auth-file)")

    def check(given_user: str, given_password: str) -> bool:
        ok_user = hmac.compare_digest(given_user.encode(), user.encode())
        return hmac.compare_digest(given_password.encode(), password.encode()) and ok_user

    return check


def serve_web(
    model_spec: str | None = None,
    compare: str | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    dtype: str = "auto",
    block: bool = True,
    auth: str | None = None,
    auth_file: str | None = None,
    chat_template: str | None = None,
):
    """Load the model(s) and serve the chat page; returns the Gradio app when `block` is False.

    Args:
        auth: USER:PASSWORD for the page's login; if empty: the first line of `auth_file`, else
            $CHATFORGE_WEB_AUTH (none: no login, which only a loopback host allows).
        chat_template: a built-in name or file for models without a chat template.

    Raises:
        ChatforgeError: no login on a non-loopback host, a malformed login, a model cannot be loaded.
    """
    auth = auth or read_secret(auth_file, WEB_AUTH_ENV)
    check_bind(host, bool(auth), "chatforge web", "a login", f"${WEB_AUTH_ENV} or --auth-file")
    check = login_check(auth) if auth else None
    require("gradio", "web", "chatforge web")  # before minutes of model loading
    columns = load_columns(model_spec, compare, dtype, chat_template)
    title = f"chatforge — {columns[0][0]}" + (f" vs {columns[1][0]}" if compare else "")
    demo = build_demo(columns, title)
    demo.queue(default_concurrency_limit=1)
    from starlette.middleware import Middleware

    demo.launch(
        server_name=host,
        server_port=port,
        ssr_mode=False,
        prevent_thread_lock=not block,
        quiet=not block,
        footer_links=[],
        css=CSS,
        auth=check,
        app_kwargs={"middleware": [Middleware(LoopbackOnly)]} if is_loopback(host) else None,
    )
    return demo
