"""Encode conversations for training: render them with the chat template, and mask the loss so only the
assistant's replies (sft) or every token (pretrain) are trained; fit a sample to max_length."""

from __future__ import annotations

from chatforge.data.readers import Record
from chatforge.files import ChatforgeError
from chatforge.models.chat_templates import require
from chatforge.models.chat_tokens import encode_rendered, template_specials

IGNORE = -100  # label of tokens that carry no loss


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:

    require(tokenizer, "the model")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def trained_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render a conversation; return the text and the character spans that carry loss.

    A span is one assistant reply plus its end-of-turn marker, found by rendering the
    conversation up to each reply with and without it, so any chat template works.
    """
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = render(tokenizer, messages[: i + 1])
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise ChatforgeError(
                "the chat template does not render conversations incrementally; cannot locate assistant replies"
            )
        reply = upto[len(prefix) :].rstrip()
        spans.append((len(prefix), len(prefix) + len(reply)))
    return full, spans


def encode_sft(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels: labels equal ids on assistant replies and IGNORE elsewhere. Special-token
    text inside a message stays text (chat_tokens); other conversations tokenise as one rendering.

    Raises:
        ChatforgeError: the template cannot be followed reply by reply, or rewrites special-token text.
    """
    text, spans = trained_spans(tokenizer, messages)
    # Slow tokenizers have no offsets: pieces between span edges are encoded one by one.
    cuts = () if getattr(tokenizer, "is_fast", False) else tuple(e for span in spans for e in span)
    ids, starts = encode_rendered(tokenizer, text, template_specials(tokenizer, messages, text), cuts)
    return ids, [tok if any(a <= s < b for a, b in spans) else IGNORE for tok, s in zip(ids, starts)]


def encode_record(tokenizer, rec: Record) -> tuple[list[int], list[int]]:
    """encode_sft of a record; an error names the record's file and line."""
    try:
        return encode_sft(tokenizer, rec.messages)
    except ChatforgeError as e:
        raise ChatforgeError(f"{rec.source}: {e}") from None


def encode_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Continued pretraining: loss on every token, EOS closing the document."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id] + ids
    ids.append(tokenizer.eos_token_id)
    return ids, list(ids)


def fit_length(ids, labels, max_length: int, overflow: str, source: str) -> list[tuple[list, list]]:
    """Apply the overflow policy to one encoded sample; returns the pieces to keep (none: dropped).

    Policies: error, drop, truncate (keep the first max_length tokens), split (pretraining: cut a
    long document into max_length pieces, each its own sample).

    Raises:
        ChatforgeError: the sample is too long and the policy is 'error'.
    """
    if len(ids) <= max_length:
        return [(ids, labels)]
    if overflow == "error":
        raise ChatforgeError(
            f"{source}: sample has {len(ids)} tokens, more than max_length "
            f"{max_length} (raise max_length, or set overflow=drop or truncate)"
        )
    if overflow == "drop":
        return []
    if overflow == "split":
        pieces = [(ids[i : i + max_length], labels[i : i + max_length]) for i in range(0, len(ids), max_length)]
    else:
        pieces = [(ids[:max_length], labels[:max_length])]
    # a piece needs a trained token after its first (the first token is never a target)
    return [(i, lab) for i, lab in pieces if lab[1:].count(IGNORE) < len(lab) - 1]


def encode_texts(tokenizer, texts: list[str]) -> list[tuple[list[int], list[int]]]:
    """encode_text for many documents at once (fast tokenizers encode a batch on all cores)."""
    if not getattr(tokenizer, "is_fast", False):
        return [encode_text(tokenizer, t) for t in texts]
    bos = (
        [tokenizer.bos_token_id]
        if (tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False))
        else []
    )
    out = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids = bos + ids + [tokenizer.eos_token_id]
        out.append((ids, list(ids)))
    return out
