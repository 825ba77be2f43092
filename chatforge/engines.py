"""The generation engines behind `chatforge serve`: requests are *batched*, never mixed.

- `continuous` (default): transformers' continuous batching; a request joins the running batch at
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
from dataclasses import dataclass, field
from typing import Callable

import torch

from .files import ChatforgeError
from .generate import prompt_ids
from .models import stop_token_ids

log = logging.getLogger(__name__)


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
    request_id: str = ""  # the continuous engine's id for it

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
        self.stats = {"engine": "static", "batches": 0, "requests": 0, "max_batch_seen": 0, "busy": False,
                      "cancelled": 0}
        self.lock = threading.Lock()  # one generate at a time (also shared with direct callers)
        self.thread = threading.Thread(target=self._loop, name="chatforge-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def waiting(self) -> int:
        return self.queue.qsize()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def cancel(self, job: Job) -> None:
        """Stop `job` at its next token (or before it starts); a finished job is left alone."""
        job.cancelled.set()

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
        config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=256,
                                  eos_token_id=self.stops, pad_token_id=pad)
        self.manager = model.init_continuous_batching(
            generation_config=config, continuous_batching_config=ContinuousBatchingConfig(per_request_processors=True))
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
        self.manager.add_request(job.ids, request_id=rid, max_new_tokens=job.max_new_tokens, streaming=True,
                                 eos_token_id=self.stops, temperature=max(job.temperature, 1e-4), top_p=job.top_p)

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
            for tok in out.generated_tokens[job.seen:]:
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


def make_engine(model, tokenizer, kind: str = "continuous", max_batch: int = 8, window_s: float = 0.02):
    """A continuous engine (falling back to static batches where paged attention cannot run) or a static one.

    Raises:
        ChatforgeError: an unknown kind.
    """
    if kind == "continuous":
        try:
            return ContinuousEngine(model, tokenizer)
        except Exception as e:  # a model the paged attention cannot run: fall back, loudly
            log.warning("continuous batching unavailable (%s); using static batches", e)
    elif kind != "static":
        raise ChatforgeError(f"unknown engine {kind!r}: use continuous or static")
    return BatchEngine(model, tokenizer, max_batch, window_s)
