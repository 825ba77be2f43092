"""Text generation for chat: batched greedy/sampled answers and token streaming.

Llama-shaped models decode with chatforge/inference/decode.py (own KV-cache slots, the step as a CUDA graph on a
GPU); other models with `model.generate`."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from chatforge.inference import decode
from chatforge.models.chat_tokens import prompt_ids
from chatforge.models.load import stop_token_ids


def _sampling(temperature: float, top_p: float) -> dict:
    if temperature and temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


@torch.inference_mode()
def generate_batch(
    model,
    tokenizer,
    conversations: list[list[dict]],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    batch_size: int | None = None,
) -> list[str]:
    """Answer many conversations at once (left-padded batches); returns the decoded replies.

    batch_size: conversations per generate call (default 64 on a GPU, where a decoding step costs
    about the same for 1 or 64 rows; 16 on a CPU)."""
    device = next(model.parameters()).device
    batch_size = batch_size or (64 if device.type == "cuda" else 16)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = stop_token_ids(tokenizer, model)
    if decode.supports(model):  # a finished row takes the next conversation; one captured step for all
        rows = decode.generate(
            model,
            [prompt_ids(tokenizer, c) for c in conversations],
            max_new_tokens,
            stops,
            rows=batch_size,
            temperature=temperature,
            top_p=top_p,
        )
        return [tokenizer.decode(r, skip_special_tokens=True).strip() for r in rows]
    replies = []
    for start in range(0, len(conversations), batch_size):
        chunk = [prompt_ids(tokenizer, c) for c in conversations[start : start + batch_size]]
        width = max(map(len, chunk))
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk], device=device)
        with decode.no_plan_attention():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                eos_token_id=stops,
                pad_token_id=pad,
                **_sampling(temperature, top_p),
            )
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            replies.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return replies


def stream_reply(
    model,
    tokenizer,
    messages: list[dict],
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    stop_event: threading.Event | None = None,
) -> Iterator[str]:
    """Yield the reply's text piece by piece as it is generated."""
    if decode.supports(model):
        yield from _stream_decoded(model, tokenizer, messages, max_new_tokens, temperature, top_p, stop_event)
        return
    from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return bool(stop_event and stop_event.is_set())

    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    stops = stop_token_ids(tokenizer, model)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=stops,
        pad_token_id=tokenizer.pad_token_id or stops[0],
        streamer=streamer,
        stopping_criteria=StoppingCriteriaList([_Stop()]),
        **_sampling(temperature, top_p),
    )
    errors = []

    def run():
        try:
            with torch.inference_mode(), decode.no_plan_attention():
                model.generate(**kwargs)
        except Exception as e:  # surface the worker's error in the caller
            errors.append(e)
            streamer.end()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    for piece in streamer:
        if piece:
            yield piece
    worker.join()
    if errors:
        raise errors[0]


class ReplyText:
    """A reply decoded as its tokens arrive: the newest tokens beside a few of context (a token's text
    can depend on the one before), not the whole reply again at every token: 9.8 instead of 27 us per
    token over 128-token replies (SmolLM2's tokenizer, this project's CPU)."""

    def __init__(self, tokenizer, tokens: list[int] | None = None):
        self.tokenizer, self.tokens, self.text = tokenizer, tokens if tokens is not None else [], ""
        self._start = self._done = 0  # context start, decoded up to (token indices)

    def add(self, token: int) -> str:
        """Append a token; returns the text so far, in whole characters."""
        self.tokens.append(token)
        before, after = self._tail()
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._start, self._done = self._done, len(self.tokens)
        return self.text

    def final(self) -> str:
        """The whole reply; a half character at its end shows as U+FFFD, as a whole decode has it."""
        if self._done == len(self.tokens):
            return self.text
        before, after = self._tail()
        return self.text + after[len(before) :]

    def _tail(self) -> tuple[str, str]:
        decode_ = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        return decode_(self.tokens[self._start : self._done]), decode_(self.tokens[self._start :])


@torch.inference_mode()
def _stream_decoded(model, tokenizer, messages, max_new_tokens, temperature, top_p, stop_event):
    """stream_reply on a kept Decoder (one slot): text pieces as soon as they decode to whole characters."""
    ids = prompt_ids(tokenizer, messages)
    stops = set(stop_token_ids(tokenizer, model))
    reply, sent = ReplyText(tokenizer), 0
    with decode.borrowed(model, 1, len(ids) + max_new_tokens + 1) as dec:
        (slot,), (tok,) = dec.prefill([ids], [temperature or 0.0], [top_p])
        while tok not in stops and not (stop_event and stop_event.is_set()):
            text = reply.add(tok)
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)
            if len(reply.tokens) >= max_new_tokens:
                break
            tok = dec.step()[slot]
    text = reply.final()
    if len(text) > sent:
        yield text[sent:]
