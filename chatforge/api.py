"""`chatforge serve`: an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/models, /health).

Built on FastAPI + uvicorn: both already come with Gradio (the `web` extra), they give an
async server that keeps many streams open on one thread, and request validation for free.

Concurrency: requests are *batched*, never mixed: each request's tokens go to its own stream.
- `continuous` (default): transformers' continuous batching; a request joins the running batch at
  the next decoding step, so its first token does not wait for other replies to finish.
- `static`: one worker thread gathers the requests waiting while a batch runs into the next batch
  (up to --max-batch rows, left-padded) for `model.generate`; per-row sampling, limits and stops.
Measured (bench/serve_latency.py, default model, 1 CPU thread, 8 clients x 64 tokens): continuous
19.1 tok/s total, mean time to first token 2.8 s; static 19.8 tok/s, 7.6 s; one at a time 8.9 tok/s, 25 s.
"""

import asyncio
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .files import ChatforgeError
from .generate import prompt_ids
from .models import stop_token_ids

log = logging.getLogger(__name__)
API_KEY_ENV = "CHATFORGE_API_KEY"


@dataclass
class Limits:
    max_tokens: int = 1024  # largest max_tokens a request may ask for
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    max_context: int = 0  # prompt + completion tokens; 0: the model's max_position_embeddings
    max_batch: int = 8
    max_waiting: int = 64  # queued requests beyond this get 429
    batch_window_s: float = 0.02  # how long the static batcher waits for company before starting a batch
    engine: str = "continuous"  # continuous (transformers' continuous batching) | static (batches of waiting requests)


# ---------------------------------------------------------------- the batching engine

@dataclass
class Job:
    """One request's generation: its prompt, settings, and where its output goes."""

    ids: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    emit: Callable[[tuple], None]  # ("delta", text) | ("done", finish_reason, n_tokens) | ("error", message)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the reply already emitted
    seen: int = 0  # generated tokens already read (continuous engine)
    finished: str | None = None

    def finish(self, reason: str, text: str | None = None) -> None:
        if text is not None and len(text) > self.sent:
            self.emit(("delta", text[self.sent:]))
            self.sent = len(text)
        self.finished = reason
        self.emit(("done", reason, len(self.tokens)))


class _RowSampling:
    """Per-row temperature and top-p as a logits processor; temperature 0 keeps only the argmax."""

    def __init__(self, jobs: list[Job]):
        self.temp = torch.tensor([max(j.temperature, 1e-5) for j in jobs]).unsqueeze(1)
        self.top_p = torch.tensor([j.top_p for j in jobs]).unsqueeze(1)
        self.greedy = torch.tensor([j.temperature <= 0 for j in jobs])

    def __call__(self, input_ids, scores):
        scores = scores / self.temp.to(scores.device)
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = (cum - sorted_scores.softmax(-1)) > self.top_p.to(scores.device)  # keep the first token always
        drop |= self.greedy.to(scores.device).unsqueeze(1) & (torch.arange(scores.shape[1], device=scores.device) > 0)
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        return torch.empty_like(scores).scatter_(1, order, sorted_scores)


class _RowProgress:
    """Stopping criterion that also streams: it sees each row's new token every step."""

    def __init__(self, jobs: list[Job], tokenizer, stops: list[int]):
        self.jobs, self.tokenizer, self.stops = jobs, tokenizer, set(stops)

    def __call__(self, input_ids, scores, **kw):
        for job, tok in zip(self.jobs, input_ids[:, -1].tolist()):
            if job.finished is None:
                self._advance(job, tok)
        return torch.tensor([j.finished is not None for j in self.jobs], device=input_ids.device)

    def _advance(self, job: Job, tok: int) -> None:
        if job.cancelled.is_set():
            job.finish("cancelled")
            return
        if tok in self.stops:
            job.finish("stop", self._text(job))
            return
        job.tokens.append(tok)
        text = self._text(job)
        for s in job.stop:
            cut = text.find(s)
            if cut >= 0:
                job.finish("stop", text[:cut])
                return
        if len(job.tokens) >= job.max_new_tokens:
            job.finish("length", text)
            return
        # hold back a possible start of a stop string and half-decoded characters
        hold = max((len(s) - 1 for s in job.stop), default=0)
        safe = len(text) - hold
        while safe > job.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > job.sent:
            job.emit(("delta", text[job.sent:safe]))
            job.sent = safe

    def _text(self, job: Job) -> str:
        return self.tokenizer.decode(job.tokens, skip_special_tokens=True)


class BatchEngine:
    """One worker thread that runs waiting jobs in batches through `model.generate`."""

    def __init__(self, model, tokenizer, max_batch: int = 8, window_s: float = 0.02):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.window_s = max_batch, window_s
        self.stops = stop_token_ids(tokenizer, model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"engine": "static", "batches": 0, "requests": 0, "max_batch_seen": 0, "busy": False}
        self.lock = threading.Lock()  # one generate at a time (also shared with direct callers)
        self.thread = threading.Thread(target=self._loop, name="chatforge-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def waiting(self) -> int:
        return self.queue.qsize()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            batch = [job]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.queue.put(None)
                    break
                batch.append(nxt)
            batch = [j for j in batch if not j.cancelled.is_set()]
            if batch:
                self.run(batch)

    @torch.inference_mode()
    def run(self, jobs: list[Job]) -> None:
        """Generate all `jobs` as one left-padded batch; each job's output goes to its own emit."""
        device = next(self.model.parameters()).device
        width = max(len(j.ids) for j in jobs)
        ids = torch.tensor([[self.pad] * (width - len(j.ids)) + j.ids for j in jobs], device=device)
        mask = torch.tensor([[0] * (width - len(j.ids)) + [1] * len(j.ids) for j in jobs], device=device)
        progress = _RowProgress(jobs, self.tokenizer, self.stops)
        with self.lock:
            self.stats["busy"] = True
            self.stats["batches"] += 1
            self.stats["requests"] += len(jobs)
            self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(jobs))
            try:
                self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max(j.max_new_tokens for j in jobs),
                    do_sample=True, temperature=1.0, top_p=1.0, top_k=0, logits_processor=[_RowSampling(jobs)],
                    stopping_criteria=[progress], eos_token_id=self.stops, pad_token_id=self.pad)
            except Exception as e:  # a failed batch fails its requests, not the server
                log.exception("generation failed")
                for j in jobs:
                    if j.finished is None:
                        j.finished = "error"
                        j.emit(("error", f"generation failed: {e}"))
            finally:
                self.stats["busy"] = False
        for j in jobs:
            if j.finished is None:
                j.finish("length", progress._text(j))


class ContinuousEngine:
    """transformers' continuous batching (paged KV cache): a new request joins the running batch at
    the next decoding step instead of waiting for the batch to finish; per-request temperature/top-p."""

    def __init__(self, model, tokenizer):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.stops = stop_token_ids(tokenizer, model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        # temperature/top_p must differ from 1.0 here for the per-request processors to exist
        config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=256,
                                  eos_token_id=self.stops, pad_token_id=pad)
        self.manager = model.init_continuous_batching(
            generation_config=config, continuous_batching_config=ContinuousBatchingConfig(per_request_processors=True))
        self.manager.start()
        self.progress = _RowProgress([], tokenizer, self.stops)
        self.stats = {"engine": "continuous", "requests": 0, "in_flight": 0, "max_in_flight": 0}
        # the first request sets up the paged cache (~16 s on 2 CPU cores): pay it at start, not on a client
        rid = self.manager.add_request(prompt_ids(tokenizer, [{"role": "user", "content": "hi"}]), max_new_tokens=2)
        for _ in self.manager.request_id_iter(rid):
            pass

    def waiting(self) -> int:
        return self.stats["in_flight"]

    def submit(self, job: Job) -> None:
        """Start `job`; must be called on the event loop that will deliver its tokens."""
        rid = f"chatforge-{uuid.uuid4().hex}"
        self.manager.register_result_handler(rid, lambda out: self._on_output(job, rid, out))
        self.stats["requests"] += 1
        self.stats["in_flight"] += 1
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.stats["in_flight"])
        self.manager.add_request(job.ids, request_id=rid, max_new_tokens=job.max_new_tokens, streaming=True,
                                 eos_token_id=self.stops, temperature=max(job.temperature, 1e-4), top_p=job.top_p)

    def _on_output(self, job: Job, rid: str, out) -> None:
        if job.finished is not None:
            return
        if out.error:
            job.finished = "error"
            job.emit(("error", f"generation failed: {out.error}"))
        elif job.cancelled.is_set():
            job.finish("cancelled")
        else:
            for tok in out.generated_tokens[job.seen:]:
                if job.finished is None:
                    self.progress._advance(job, tok)
            job.seen = len(out.generated_tokens)
            if job.finished is None and out.is_finished():
                job.finish("length", self.progress._text(job))
        if job.finished is not None:
            self.stats["in_flight"] -= 1
            if not out.is_finished():
                self.manager.cancel_request(rid)  # stop string, cancelled client

    def close(self) -> None:
        self.manager.stop(block=True)


def make_engine(model, tokenizer, limits: Limits):
    if limits.engine == "continuous":
        try:
            return ContinuousEngine(model, tokenizer)
        except Exception as e:  # a model the paged attention cannot run: fall back, loudly
            log.warning("continuous batching unavailable (%s); using static batches", e)
    elif limits.engine != "static":
        raise ChatforgeError(f"unknown engine {limits.engine!r}: use continuous or static")
    return BatchEngine(model, tokenizer, limits.max_batch, limits.batch_window_s)


# ---------------------------------------------------------------- request schema and errors

class TextPart(BaseModel):
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = ""


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, seed, ...) are accepted and ignored
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
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
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


# ---------------------------------------------------------------- the app

def create_app(model, tokenizer, model_id: str, api_key: str | None = None, limits: Limits | None = None):
    """The FastAPI app serving `model` under the name `model_id`.

    Args:
        api_key: if set, every /v1 request needs `Authorization: Bearer <api_key>`.
        limits: request limits; a request over one gets a 4xx JSON error.
    """
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    limits = limits or Limits()
    max_context = limits.max_context or int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    engine = make_engine(model, tokenizer, limits)
    app = FastAPI(title="chatforge", docs_url=None, redoc_url=None, openapi_url=None)
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
        return JSONResponse(APIError(405, f"method {request.method} not allowed on {request.url.path}").body(),
                            status_code=405)

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
            raise APIError(413, f"request body is {size} bytes; the limit is {limits.max_body_bytes}",
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limits.max_body_bytes:
                raise APIError(413, f"request body is over the limit of {limits.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "body must be a JSON object")
        return data

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, "waiting": engine.waiting(), **engine.stats}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": started,
                                            "owned_by": "chatforge"}]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request):
        check_key(request)
        if name != model_id:
            raise APIError(404, f"model {name!r} does not exist; this server has {model_id!r}",
                           code="model_not_found", param="model")
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
            raise APIError(404, f"model {req.model!r} does not exist; this server has {model_id!r}",
                           code="model_not_found", param="model")
        max_new = req.max_completion_tokens or req.max_tokens or limits.default_max_tokens
        if max_new > limits.max_tokens:
            raise APIError(400, f"max_tokens is {max_new}; this server allows at most {limits.max_tokens}",
                           param="max_tokens")
        try:
            ids = prompt_ids(tokenizer, _messages(req))
        except APIError:
            raise
        except Exception as e:  # the chat template rejects some role orders
            raise APIError(400, f"messages cannot be formatted: {e}", param="messages") from None
        if len(ids) + max_new > max_context:
            raise APIError(400, f"this model's context is {max_context} tokens; the messages take {len(ids)} "
                                f"and max_tokens asks for {max_new}", code="context_length_exceeded",
                           param="messages")
        if engine.waiting() >= limits.max_waiting:
            raise APIError(429, "too many requests waiting; retry later", type_="rate_limit_error",
                           code="server_busy")
        stops = [req.stop] if isinstance(req.stop, str) else [s for s in (req.stop or []) if s]
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item):  # called from the worker thread
            try:
                loop.call_soon_threadsafe(out.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): stop this row
                cancelled.set()

        job = Job(ids, max_new, req.temperature, req.top_p, stops, emit=emit, cancelled=cancelled)
        engine.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda n: {"prompt_tokens": len(ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(ids) + n}

        if not req.stream:
            text = []
            try:
                while True:
                    item = await out.get()
                    if item[0] == "delta":
                        text.append(item[1])
                    elif item[0] == "error":
                        raise APIError(500, item[1], type_="server_error")
                    else:
                        break
            finally:
                job.cancelled.set()  # a client that went away stops its row
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                                 "finish_reason": item[1], "logprobs": None}],
                    "usage": usage(item[2])}

        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def chunk(delta: dict, finish: str | None = None) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
            if include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    item = await out.get()
                    if item[0] == "delta":
                        yield chunk({"content": item[1]})
                    elif item[0] == "error":
                        err = APIError(500, item[1], type_="server_error").body()
                        yield f"data: {json.dumps(err)}\n\n"
                        return
                    else:
                        yield chunk({}, item[1])
                        if include_usage:
                            yield ("data: " + json.dumps({"id": rid, "object": "chat.completion.chunk",
                                                          "created": created, "model": model_id, "choices": [],
                                                          "usage": usage(item[2])}) + "\n\n")
                        yield "data: [DONE]\n\n"
                        return
            finally:
                job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def serve_api(model_spec: str | None = None, host: str = "127.0.0.1", port: int = 8000,
              api_key: str | None = None, model_name: str | None = None, limits: Limits | None = None,
              dtype: str = "auto") -> None:
    """Load a model and serve the OpenAI-compatible API until interrupted.

    Args:
        api_key: required Bearer key; default: the CHATFORGE_API_KEY environment variable (none: open).

    Raises:
        ChatforgeError: the model cannot be loaded, or the port is taken.
    """
    import uvicorn

    from .models import display_name, load_model, load_tokenizer

    tokenizer, model = load_tokenizer(model_spec), load_model(model_spec, dtype=dtype)
    model_id = model_name or display_name(model_spec)
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    app = create_app(model, tokenizer, model_id, api_key=key, limits=limits)
    if host not in ("127.0.0.1", "localhost", "::1") and not key:
        log.warning("serving on %s without an API key: anyone who reaches this address can use it", host)
    print(f"chatforge serve: {model_id} on http://{host}:{port}/v1 "
          f"({'API key required' if key else 'no API key'})", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    except OSError as e:
        raise ChatforgeError(f"cannot listen on {host}:{port}: {e}") from e
    finally:
        app.state.engine.close()

