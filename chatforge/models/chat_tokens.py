"""Conversations to token ids in which message text stays text.

A chat template renders a conversation to text that holds its own special tokens (`<|im_start|>`,
`<|im_end|>`, ...). Tokenising that text again would also turn special-token text written *inside a
message* into real control tokens, so a user could forge a system turn. Here the template's own
special tokens are found by rendering the suspicious messages as placeholders, and message text is
tokenised with special tokens split into plain pieces. A conversation whose messages hold no
special-token text is tokenised exactly as before (one call over the whole rendering).

Self-contained apart from chatforge's error class: `chatforge app` copies this file beside the app.py
it generates, so a deployed app keeps message text as text too.
"""

from __future__ import annotations

import re
import secrets
import weakref

try:
    from chatforge.files import ChatforgeError
except ImportError:  # shipped beside an app that `chatforge app` generated, where chatforge is not installed
    ChatforgeError = ValueError


_PATTERNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> (added tokens, pattern)


def special_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching any of the tokenizer's special tokens (longest first), or None if it has none."""
    added = tokenizer.added_tokens_decoder
    cached = _PATTERNS.get(tokenizer)
    if cached is None or cached[0] != len(added):  # built once per tokenizer (again if tokens are added)
        names = sorted({t.content for t in added.values() if t.special}, key=len, reverse=True)
        cached = _PATTERNS[tokenizer] = (len(added), re.compile("|".join(map(re.escape, names))) if names else None)
    return cached[1]


def template_specials(
    tokenizer, messages: list[dict], text: str, add_generation_prompt: bool = False
) -> list[tuple[int, int]] | None:
    """Where in `text` (the template's rendering of `messages`) the template's own special tokens are.

    Returns None when no message holds special-token text: then every special token in `text` is the
    template's, and ordinary tokenisation is exact.

    Raises:
        ChatforgeError: a message holds special-token text and the template changes message text (so it
            cannot be located in the rendering).
    """
    pattern = special_pattern(tokenizer)
    forged = [
        i
        for i, m in enumerate(messages)
        if pattern and isinstance(m.get("content"), str) and pattern.search(m["content"])
    ]
    if not forged:
        return None
    nonce = secrets.token_hex(8)
    holder = re.compile(f"\ue000{nonce}:(\\d+)\ue001")
    shown = [dict(m, content=f"\ue000{nonce}:{i}\ue001") if i in forged else m for i, m in enumerate(messages)]
    rendered = tokenizer.apply_chat_template(shown, tokenize=False, add_generation_prompt=add_generation_prompt)
    filled, spans, pos = [], [], 0
    for k, piece in enumerate(holder.split(rendered)):
        if k % 2:  # a placeholder: the message's own text
            piece = messages[int(piece)]["content"]
        else:
            spans += [(pos + m.start(), pos + m.end()) for m in pattern.finditer(piece)]
        filled.append(piece)
        pos += len(piece)
    if "".join(filled) != text:
        found = pattern.search(messages[forged[0]]["content"])[0]
        raise ChatforgeError(
            f"message {forged[0]} holds special-token text ({found!r}) and this chat template "
            f"rewrites message text, so it cannot be kept as plain text"
        )
    return spans


_TEXT_ONLY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fast tokenizer -> text-only backend copy


def text_only_backend(tokenizer):
    """A copy of a fast tokenizer's backend that reads special-token text as plain text. A copy, because
    `split_special_tokens=True` switches the shared backend per call, which races with other threads
    tokenising at the same time (seen: 5 forged prompts in 600 on a server's worker threads)."""
    backend = _TEXT_ONLY.get(tokenizer)
    if backend is None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.encode_special_tokens = True
        _TEXT_ONLY[tokenizer] = backend
    return backend


def encode_rendered(
    tokenizer, text: str, specials: list[tuple[int, int]] | None, cuts: tuple[int, ...] = ()
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation, and the character where each token starts.

    Args:
        specials: from template_specials; None tokenises `text` as a whole (all its special tokens are
            the template's), else only these spans become special tokens and the rest is plain text.
        cuts: positions no token may cross (for tokenizers without offsets, whose tokens are then
            dated to the start of their piece).
    """
    fast = getattr(tokenizer, "is_fast", False)
    edges = sorted({0, len(text), *cuts, *(e for span in specials or () for e in span)})
    special_at = dict(specials or ())
    ids: list[int] = []
    starts: list[int] = []
    for a, b in zip(edges, edges[1:]):
        if special_at.get(a) == b:
            ids.append(tokenizer.convert_tokens_to_ids(text[a:b]))
            starts.append(a)
            continue
        if fast and specials is not None:
            enc = text_only_backend(tokenizer).encode_batch([text[a:b]], add_special_tokens=False)[0]
            ids += enc.ids
            starts += [a + s for s, _ in enc.offsets]
        elif fast:
            enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            starts += [a + s for s, _ in enc["offset_mapping"]]
        else:  # the Python backend takes split_special_tokens per call
            part = tokenizer.encode(
                text[a:b], add_special_tokens=False, **({"split_special_tokens": True} if specials is not None else {})
            )
            ids += part
            starts += [a] * len(part)
    return ids, starts


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The prompt's token ids: the template's special tokens are real, message text is only text.

    Raises:
        ChatforgeError: a message holds special-token text the template would rewrite.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    specials = template_specials(tokenizer, messages, text, True)
    if specials is None:  # no special-token text in any message: the whole rendering at once
        return tokenizer.encode(text, add_special_tokens=False)
    return encode_rendered(tokenizer, text, specials)[0]
