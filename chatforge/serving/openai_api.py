"""`chatforge serve`: an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health).

Built on FastAPI + uvicorn (the `serve` extra; both also come with Gradio): an async server that keeps
many streams open on one thread. Generation runs in an engine (chatforge/inference/engines.py); the event loop
only moves bytes: prompts are tokenised on worker threads and replies decoded on the engine's.
Measured (bench/serve_latency.py, default model, 1 CPU thread, 8 clients x 64 tokens): continuous
19.1 tok/s total, mean time to first token 2.8 s; static 19.8 tok/s, 7.6 s; one at a time 8.9 tok/s, 25 s.

Guards: loopback Host/Origin only on a loopback address (access.py), JSON bodies only, a size limit
checked before reading, deadlines on headers, body and generation, work cancelled when the client
goes away, at most max_connections connections.
"""

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from chatforge.extras import require
from chatforge.files import ChatforgeError
from chatforge.inference.engines import Engine, Job, make_engine
from chatforge.inference.generate import prompt_ids
from chatforge.models.load import display_name, load_model, load_tokenizer
from chatforge.serving.access import LoopbackOnly, check_bind, is_loopback, read_secret

log = logging.getLogger(__name__)
API_KEY_ENV = "CHATFORGE_API_KEY"
MAX_STOPS = 4  # stop strings per request, as OpenAI allows


@dataclass
class Limits:
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 4096  # 0: only the context limits the prompt
    max_context: int = 0  # prompt + completion tokens; 0: the model's max_position_embeddings
    max_batch: int = 32  # requests decoded together: the slots engine's slots, the static engine's batch
    max_waiting: int = 64  # queued requests beyond this get 429
    batch_window_s: float = 0.02  # how long the static batcher waits for company before starting a batch
    engine: Engine = (
        "auto"  # auto (slots where the model is Llama-shaped, else continuous) | slots | continuous | static
    )
    request_timeout_s: float = 300.0  # a request's whole wait on the engine
    header_timeout_s: float = 10.0  # a connection's next request headers must arrive within this
    body_timeout_s: float = 30.0
    max_connections: int = 64  # uvicorn's limit_concurrency: more get 503


# ---------------------------------------------------------------- request schema and errors


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = ""


class ChatRequest(BaseModel):
    # strict: `"max_tokens": true` or `"3"` is an error, not 1 or 3; other OpenAI fields are accepted and ignored
    model_config = ConfigDict(extra="allow", strict=True)
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _messages(req: ChatRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        content = m.content or ""
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise APIError(400, f"messages[{i}]: only text content is supported", param=f"messages[{i}].content")
            content = "".join(p.text or "" for p in content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def _stops(req: ChatRequest) -> list[str]:
    """The request's stop strings; an empty one stops nothing."""
    stops = [s for s in ([req.stop] if isinstance(req.stop, str) else req.stop or []) if s]
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} strings", param="stop")
    return stops


# ---------------------------------------------------------------- the app


def create_app(
    model, tokenizer, model_id: str, api_key: str | None = None, limits: Limits | None = None, host: str = "127.0.0.1"
):
    """The FastAPI app serving `model` under the name `model_id`.

    Args:
        api_key: if set, every /v1 request needs `Authorization: Bearer <api_key>`.
        limits: request limits; a request over one gets a 4xx JSON error.
        host: the address it will be bound to; a loopback one answers only loopback Host/Origin names.
    """
    require("fastapi", "serve", "chatforge serve")
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.middleware import Middleware

    limits = limits or Limits()
    max_context = limits.max_context or int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    longest_token = max(map(len, tokenizer.get_vocab()))  # characters; a token never covers more of a text
    slot_len = min(max_context, (limits.max_prompt_tokens or max_context) + limits.max_tokens)
    engine = make_engine(model, tokenizer, limits.engine, limits.max_batch, limits.batch_window_s, slot_len)
    app = FastAPI(
        title="chatforge",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        middleware=[Middleware(LoopbackOnly)] if is_loopback(host) else [],
    )
    app.state.engine, app.state.model_id = engine, model_id
    started = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return JSONResponse(APIError(404, f"no route {request.url.path}", code="not_found").body(), status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request, exc):
        return JSONResponse(
            APIError(405, f"method {request.method} not allowed on {request.url.path}").body(), status_code=405
        )

    def check_key(request: Request) -> None:
        if not api_key:
            return
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key", code="invalid_api_key")

    async def read_body(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > limits.max_body_bytes:
            raise APIError(
                413, f"request body is {size} bytes; the limit is {limits.max_body_bytes}", code="request_too_large"
            )
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise APIError(
                415, f"the body must be application/json, not {kind or 'untyped'}", code="unsupported_media_type"
            )

        async def chunks() -> bytearray:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise APIError(
                        413,
                        f"request body is over the limit of {limits.max_body_bytes} bytes",
                        code="request_too_large",
                    )
            return body

        try:
            body = await asyncio.wait_for(chunks(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(
                408, f"the request body did not arrive within {limits.body_timeout_s:g} s", code="request_timeout"
            ) from None
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"body is not valid JSON: {e}") from None
        except RecursionError:
            raise APIError(400, "body is nested too deeply") from None
        if not isinstance(data, dict):
            raise APIError(400, "body must be a JSON object")
        return data

    async def replies(request: Request, job: Job, out: asyncio.Queue):
        """The engine's items for `job` until it is done; the job is cancelled if the client goes away,
        the deadline passes or the consumer stops early."""
        loop = asyncio.get_running_loop()
        deadline, poll = loop.time() + limits.request_timeout_s, 0.0
        try:
            while True:
                now = loop.time()
                if now >= poll:  # a client that went away (either mode) stops its row
                    if await request.is_disconnected():
                        return
                    if not engine.alive():
                        raise APIError(
                            503, "the generation engine has stopped", type_="server_error", code="engine_stopped"
                        )
                    poll = now + 0.25
                if now >= deadline:
                    raise APIError(
                        504,
                        f"no complete reply within {limits.request_timeout_s:g} s",
                        type_="server_error",
                        code="timeout",
                    )
                try:
                    item = await asyncio.wait_for(out.get(), min(deadline, poll) - now)
                except asyncio.TimeoutError:
                    continue
                yield item
                if item[0] != "delta":
                    return
        finally:
            engine.cancel(job)

    @app.get("/health")
    async def health():
        alive = engine.alive()
        return JSONResponse(
            {
                "status": "ok" if alive else "engine stopped",
                "model": model_id,
                "engine_alive": alive,
                "waiting": engine.waiting(),
                **engine.stats,
            },
            status_code=200 if alive else 503,
        )

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": started, "owned_by": "chatforge"}],
        }

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request):
        check_key(request)
        if name != model_id:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server has {model_id!r}",
                code="model_not_found",
                param="model",
            )
        return {"id": model_id, "object": "model", "created": started, "owned_by": "chatforge"}

    @app.post("/v1/chat/completions")
    async def completions(request: Request):
        check_key(request)
        try:
            req = ChatRequest.model_validate(await read_body(request))
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"])
            raise APIError(400, f"{where}: {err['msg']}", param=where or None) from None
        if req.model and req.model != model_id:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server has {model_id!r}",
                code="model_not_found",
                param="model",
            )
        max_new = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
        if max_new > limits.max_tokens:
            raise APIError(
                400, f"max_tokens is {max_new}; this server allows at most {limits.max_tokens}", param="max_tokens"
            )
        stops, messages = _stops(req), _messages(req)
        chars = sum(len(m["content"]) for m in messages)
        if limits.max_prompt_tokens and chars > limits.max_prompt_tokens * longest_token:  # no need to tokenise
            raise APIError(
                400,
                f"the messages hold {chars} characters, more than {limits.max_prompt_tokens} tokens can hold",
                code="prompt_too_long",
                param="messages",
            )
        try:
            ids = await asyncio.to_thread(prompt_ids, tokenizer, messages)  # off the event loop
        except APIError:
            raise
        except Exception as e:  # the chat template rejects some role orders
            raise APIError(400, f"messages cannot be formatted: {e}", param="messages") from None
        if limits.max_prompt_tokens and len(ids) > limits.max_prompt_tokens:
            raise APIError(
                400,
                f"the messages take {len(ids)} tokens; this server allows at most {limits.max_prompt_tokens}",
                code="prompt_too_long",
                param="messages",
            )
        if len(ids) + max_new > max_context:
            raise APIError(
                400,
                f"this model's context is {max_context} tokens; the messages take {len(ids)} "
                f"and max_tokens asks for {max_new}",
                code="context_length_exceeded",
                param="messages",
            )
        if not engine.alive():
            raise APIError(503, "the generation engine has stopped", type_="server_error", code="engine_stopped")
        if engine.waiting() >= limits.max_waiting:
            raise APIError(429, "too many requests waiting; retry later", type_="rate_limit_error", code="server_busy")
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def emit(item):  # called from the engine's thread
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): stop this row
                job.cancelled.set()

        job = Job(ids, max_new, req.temperature, req.top_p, stops, emit=emit)
        engine.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda n: {
            "prompt_tokens": len(ids),
            "completion_tokens": n,  # noqa: E731
            "total_tokens": len(ids) + n,
        }

        if not req.stream:
            text, item = [], None
            async with aclosing(replies(request, job, out)) as items:
                async for item in items:
                    if item[0] == "delta":
                        text.append(item[1])
                    elif item[0] == "error":
                        raise APIError(500, item[1], type_="server_error")
            if item is None or item[0] != "done":  # the client went away: nobody reads this
                return JSONResponse({}, status_code=499)
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": model_id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(text)},
                        "finish_reason": item[1],
                        "logprobs": None,
                    }
                ],
                "usage": usage(item[2]),
            }

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model_id,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            yield chunk({"role": "assistant", "content": ""})
            try:
                async with aclosing(replies(request, job, out)) as items:
                    async for item in items:
                        if item[0] == "delta":
                            yield chunk({"content": item[1]})
                        elif item[0] == "error":
                            raise APIError(500, item[1], type_="server_error")
                        else:
                            yield chunk({}, item[1])
                            if include_usage:
                                yield (
                                    "data: "
                                    + json.dumps(
                                        {
                                            "id": rid,
                                            "object": "chat.completion.chunk",
                                            "created": created,
                                            "model": model_id,
                                            "choices": [],
                                            "usage": usage(item[2]),
                                        }
                                    )
                                    + "\n\n"
                                )
                            yield "data: [DONE]\n\n"
            except APIError as e:  # headers are sent: the error goes into the stream
                yield f"data: {json.dumps(e.body())}\n\n"

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return app


def http_server(app, host: str, port: int, limits: Limits | None = None):
    """A uvicorn server for `app` with chatforge's connection limits: at most max_connections (503 beyond),
    and a connection closed when its next request's headers take longer than header_timeout_s."""
    uvicorn = require("uvicorn", "serve", "chatforge serve")
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    limits = limits or Limits()

    class HeaderDeadline(AutoHTTPProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_deadline()

        def _arm_header_deadline(self):
            self.loop.call_later(limits.header_timeout_s, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle):
            if self.cycle is cycle and (cycle is None or cycle.response_complete):  # no new request began
                self.transport.close()

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=HeaderDeadline,
        limit_concurrency=limits.max_connections,
        timeout_keep_alive=5,
    )
    return uvicorn.Server(config)


def serve_api(
    model_spec: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str | None = None,
    limits: Limits | None = None,
    dtype: str = "auto",
    api_key_file: str | None = None,
    chat_template: str | None = None,
) -> None:
    """Load a model and serve the OpenAI-compatible API until interrupted.

    Args:
        api_key: required Bearer key; if empty: the first line of `api_key_file`, else $CHATFORGE_API_KEY
            (none: open, which only a loopback host allows).
        chat_template: a built-in name or file for a model without a chat template (or to replace it).

    Raises:
        ChatforgeError: fastapi/uvicorn missing, an open server on a non-loopback host, an unreadable key
            file, the model cannot be loaded, or the port is taken.
    """

    require("fastapi", "serve", "chatforge serve")
    require("uvicorn", "serve", "chatforge serve")
    key = api_key or read_secret(api_key_file, API_KEY_ENV)
    check_bind(host, bool(key), "chatforge serve", "an API key", f"${API_KEY_ENV} or --api-key-file")
    tokenizer = load_tokenizer(model_spec, chat_template, for_chat=True)  # no template: an error before loading
    model = load_model(model_spec, dtype=dtype)
    model_id = model_name or display_name(model_spec)
    app = create_app(model, tokenizer, model_id, api_key=key, limits=limits, host=host)
    print(
        f"chatforge serve: {model_id} on http://{host}:{port}/v1 ({'API key required' if key else 'no API key'})",
        flush=True,
    )
    try:
        http_server(app, host, port, limits).run()
    except OSError as e:
        raise ChatforgeError(f"cannot listen on {host}:{port}: {e}") from e
    finally:
        app.state.engine.close()
