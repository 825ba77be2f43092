"""The generation engines behind `chatforge serve`: requests are *batched*, never mixed.

- `slots` (default where the model is Llama-shaped): chatforge/inference/decode.py's slots; a request is prefilled
  into a free slot between two decoding steps, and every step (a CUDA graph on a GPU) advances all
  requests by one token. 6,900 tokens/s for 32 streams of the 1.8B model on an H200 (docs/speed.md).
- `continuous`: transformers' continuous batching; a request joins the running batch at
  the next decoding step, so its first token does not wait for other replies to finish.
- `static`: one worker thread gathers the requests waiting while a batch runs into the next batch
  (up to max_batch rows, left-padded) for `model.generate`; per-row sampling, limits and stops.
Each request's tokens go to its own `Job.emit`; decoding and stop strings run on engine threads,
never on the server's event loop. `cancel` stops a request that nobody waits for any more.
"""

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from chatforge.files import ChatforgeError
from chatforge.inference import decode
from chatforge.inference.generate import ReplyText, prompt_ids
from chatforge.models.load import stop_token_ids

log = logging.getLogger(__name__)
Engine = Literal["auto", "slots", "continuous", "static"]
ENGINES = get_args(Engine)


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
    reply: ReplyText | None = None  # `tokens` as text (set by the engine, which has the tokenizer)
    seen: int = 0  # generated tokens already read (continuous engine)
    finished: str | None = None
    request_id: str = ""  # the continuous engine's id for it

    def finish(self, reason: str, text: str | None = None) -> None:
        if text is not None and len(text) > self.sent:
            self.emit(("delta", text[self.sent :]))
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
        reply = job.reply = job.reply or ReplyText(self.tokenizer, job.tokens)
        if tok in self.stops:
            job.finish("stop", reply.final())
            return
        text = reply.add(tok)
        for s in job.stop:
            cut = text.find(s)
            if cut >= 0:
                job.finish("stop", text[:cut])
                return
        if len(job.tokens) >= job.max_new_tokens:
            job.finish("length", reply.final())
            return
        # hold back a possible start of a stop string and half-decoded characters
        hold = max((len(s) - 1 for s in job.stop), default=0)
        safe = len(text) - hold
        while safe > job.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe > job.sent:
            job.emit(("delta", text[job.sent : safe]))
            job.sent = safe

    def _text(self, job: Job) -> str:
        return job.reply.final() if job.reply else ""


class _Worker:
    """An engine whose one worker thread takes jobs from a queue (None: stop)."""

    queue: queue.Queue
    thread: threading.Thread

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def alive(self) -> bool:
        return self.thread.is_alive()

    def cancel(self, job: Job) -> None:
        """Stop `job` at its next token (or before it starts); a finished job is left alone."""
        job.cancelled.set()

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=30)


class BatchEngine(_Worker):
    """One worker thread that runs waiting jobs in batches through `model.generate`."""

    def __init__(self, model, tokenizer, max_batch: int = 8, window_s: float = 0.02):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.window_s = max_batch, window_s
        self.stops = stop_token_ids(tokenizer, model)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.stats = {
            "engine": "static",
            "batches": 0,
            "requests": 0,
            "max_batch_seen": 0,
            "busy": False,
            "cancelled": 0,
        }
        self.lock = threading.Lock()  # one generate at a time (also shared with direct callers)
        self.thread = threading.Thread(target=self._loop, name="chatforge-batcher", daemon=True)
        self.thread.start()

    def waiting(self) -> int:
        return self.queue.qsize()

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
            self.stats["cancelled"] += sum(j.cancelled.is_set() for j in batch)
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
                with decode.no_plan_attention():
                    self.model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=max(j.max_new_tokens for j in jobs),
                        do_sample=True,
                        temperature=1.0,
                        top_p=1.0,
                        top_k=0,
                        logits_processor=[_RowSampling(jobs)],
                        stopping_criteria=[progress],
                        eos_token_id=self.stops,
                        pad_token_id=self.pad,
                    )
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
        self.stats["cancelled"] += sum(j.finished == "cancelled" for j in jobs)


class ContinuousEngine:
    """transformers' continuous batching (paged KV cache): a new request joins the running batch at
    the next decoding step instead of waiting for the batch to finish; per-request temperature/top-p."""

    def __init__(self, model, tokenizer):
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        self.stops = stop_token_ids(tokenizer, model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stops[0]
        # temperature/top_p must differ from 1.0 here for the per-request processors to exist
        config = GenerationConfig(
            do_sample=True,
            temperature=0.7,
            top_p=0.9,
            top_k=0,
            max_new_tokens=256,
            eos_token_id=self.stops,
            pad_token_id=pad,
        )
        self.manager = model.init_continuous_batching(
            generation_config=config, continuous_batching_config=ContinuousBatchingConfig(per_request_processors=True)
        )
        self.manager.start()
        self.progress = _RowProgress([], tokenizer, self.stops)
        self.stats = {"engine": "continuous", "requests": 0, "in_flight": 0, "max_in_flight": 0, "cancelled": 0}
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()
        # the first request sets up the paged cache (~16 s on 2 CPU cores): pay it at start, not on a client
        rid = self.manager.add_request(prompt_ids(tokenizer, [{"role": "user", "content": "hi"}]), max_new_tokens=2)
        for _ in self.manager.request_id_iter(rid):
            pass
        self.closed = threading.Event()
        self.reader = threading.Thread(target=self._read, name="chatforge-detokenizer", daemon=True)
        self.reader.start()

    def waiting(self) -> int:
        return self.stats["in_flight"]

    def alive(self) -> bool:
        return self.manager.is_running() and self.reader.is_alive()

    def submit(self, job: Job) -> None:
        job.request_id = rid = f"chatforge-{uuid.uuid4().hex}"
        with self.lock:
            self.jobs[rid] = job
            self.stats["requests"] += 1
            self.stats["in_flight"] += 1
            self.stats["max_in_flight"] = max(self.stats["max_in_flight"], self.stats["in_flight"])
        self.manager.add_request(
            job.ids,
            request_id=rid,
            max_new_tokens=job.max_new_tokens,
            streaming=True,
            eos_token_id=self.stops,
            temperature=max(job.temperature, 1e-4),
            top_p=job.top_p,
        )

    def cancel(self, job: Job) -> None:
        """Stop `job` now; a finished job is left alone."""
        job.cancelled.set()
        if self._retire(job.request_id):
            self.manager.cancel_request(job.request_id)

    def _retire(self, rid: str) -> bool:
        """Forget a request (counting it if it was cancelled); False if it was already forgotten."""
        with self.lock:
            job = self.jobs.pop(rid, None)
            if job is None:
                return False
            self.stats["in_flight"] -= 1
            self.stats["cancelled"] += job.cancelled.is_set()
            return True

    def _read(self) -> None:
        """The engine's outputs, token by token, to their jobs (decoding and stop strings run here)."""
        while not self.closed.is_set():
            out = self.manager.get_result(timeout=0.2)
            if out is None:
                if not self.manager.is_running():
                    time.sleep(0.2)  # get_result returns at once when the engine has stopped
                continue
            job = self.jobs.get(out.request_id)
            if job is not None:
                self._on_output(job, out.request_id, out)

    def _on_output(self, job: Job, rid: str, out) -> None:
        if out.error:
            job.finished = "error"
            job.emit(("error", f"generation failed: {out.error}"))
        else:
            for tok in out.generated_tokens[job.seen :]:
                if job.finished is None:
                    self.progress._advance(job, tok)
            job.seen = len(out.generated_tokens)
            if job.finished is None and out.is_finished():
                job.finish("length", self.progress._text(job))
        if job.finished is not None and self._retire(rid) and not out.is_finished():
            self.manager.cancel_request(rid)  # a stop string

    def close(self) -> None:
        self.closed.set()
        self.manager.stop(block=True)
        self.reader.join(timeout=5)


class SlotEngine(_Worker):
    """One worker thread over a Decoder of `slots` rows: between two decoding steps it prefills the
    waiting requests into free slots; a request's slot is freed the moment it stops."""

    def __init__(self, model, tokenizer, slots: int, max_len: int):
        self.decoder = decode.Decoder(model, decode.fit_rows(model, slots, max_len), max_len)
        self.tokenizer, self.stops = tokenizer, stop_token_ids(tokenizer, model)
        self.progress = _RowProgress([], tokenizer, self.stops)
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.owner: dict[int, Job] = {}
        self.stats = {
            "engine": "slots",
            "slots": self.decoder.rows,
            "requests": 0,
            "in_flight": 0,
            "max_in_flight": 0,
            "cancelled": 0,
            "steps": 0,
        }
        # capture a single request's steps, and on a GPU the prefills of common widths, now, not on a request
        hi = prompt_ids(tokenizer, [{"role": "user", "content": "hi"}])
        for temperature in (0.0, 0.7):
            self.decoder.prefill([hi], [temperature], [0.9])
            self.decoder.step()
            self.decoder.release_all()
        for rows in (1, 2, 4, 8) if self.decoder.graphs is not None else ():
            for width in (100, 200, 400) if rows <= self.decoder.rows else ():
                if width < max_len // 2:
                    self.decoder.prefill([(hi * 512)[:width]] * rows)
                    self.decoder.release_all()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="chatforge-slots", daemon=True)
        self.thread.start()

    def waiting(self) -> int:
        return self.queue.qsize() + len(self.owner)

    def _loop(self) -> None:
        while not self.closed:
            self._admit(block=not self.owner)
            if self.owner:
                try:
                    toks = self.decoder.step()
                except Exception as e:  # a failed step fails its requests, not the server
                    self._fail(e)
                    continue
                self.stats["steps"] += 1
                for slot, job in list(self.owner.items()):
                    self._advance(slot, job, toks[slot])

    def _admit(self, block: bool) -> None:
        jobs = []
        while len(jobs) < len(self.decoder.free):
            try:
                job = self.queue.get(timeout=0.5) if block and not jobs else self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.closed = True
                break
            self.stats["requests"] += 1
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                job.finish("cancelled")
            elif len(job.ids) + 1 >= self.decoder.max_len:
                job.finished = "error"
                job.emit(
                    (
                        "error",
                        f"prompt of {len(job.ids)} tokens does not fit the engine's {self.decoder.max_len}-token slots",
                    )
                )
            else:
                jobs.append(job)
        if not jobs:
            return
        try:
            slots, first = self.decoder.prefill(
                [j.ids for j in jobs], [j.temperature for j in jobs], [j.top_p for j in jobs]
            )
        except Exception as e:
            for j in jobs:
                j.finished = "error"
                j.emit(("error", f"generation failed: {e}"))
            return
        for slot, job, tok in zip(slots, jobs, first):
            self.owner[slot] = job
            self._advance(slot, job, tok)
        self.stats["in_flight"] = len(self.owner)
        self.stats["max_in_flight"] = max(self.stats["max_in_flight"], len(self.owner))

    def _advance(self, slot: int, job: Job, tok: int) -> None:
        self.progress._advance(job, tok)
        if job.finished is None and self.decoder.room(slot) <= 0:
            job.finish("length", self.progress._text(job))
        if job.finished is not None:
            self.stats["cancelled"] += job.finished == "cancelled"
            del self.owner[slot]
            self.decoder.release(slot)
            self.stats["in_flight"] = len(self.owner)

    def _fail(self, e: Exception) -> None:
        log.exception("generation failed")
        for slot, job in list(self.owner.items()):
            job.finished = "error"
            job.emit(("error", f"generation failed: {e}"))
            del self.owner[slot]
            self.decoder.release(slot)
        self.stats["in_flight"] = 0


def make_engine(model, tokenizer, kind: str = "auto", max_batch: int = 8, window_s: float = 0.02, max_len: int = 2048):
    """The slots engine where the model allows it (`auto`), else continuous batching (falling back to
    static batches where paged attention cannot run), or the kind asked for.

    max_batch: requests decoded together (slots, static batches); max_len: prompt + reply per slot.

    Raises:
        ChatforgeError: an unknown kind, or slots for a model they cannot run.
    """
    if kind not in ENGINES:
        raise ChatforgeError(f"unknown engine {kind!r}: use {', '.join(ENGINES)}")
    if kind == "slots" or (kind == "auto" and decode.supports(model)):
        if not decode.supports(model):
            raise ChatforgeError(
                f"engine slots: {type(decode.inner_model(model)).__name__} is not Llama-shaped "
                f"({', '.join(sorted(decode.SUPPORTED))}); use continuous or static"
            )
        return SlotEngine(model, tokenizer, max_batch, max_len)
    if kind in ("continuous", "auto"):
        try:
            return ContinuousEngine(model, tokenizer)
        except Exception as e:  # a model the paged attention cannot run: fall back, loudly
            log.warning("continuous batching unavailable (%s); using static batches", e)
    return BatchEngine(model, tokenizer, max_batch, window_s)
