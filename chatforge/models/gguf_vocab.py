"""Tokenizers in GGUF: what llama.cpp reads under `tokenizer.ggml.*` and `tokenizer.chat_template`, and back.

Two kinds are written. Byte-level BPE (`gpt2`: SmolLM2, Llama 3, Qwen2) comes from the tokenizer's own
tokenizer.json: vocabulary, merges, and the pre-tokenizer by llama.cpp's name for it. Sentencepiece
(`llama`: InternLM2) comes from tokenizer.model's pieces with their scores and types, as llama.cpp's
converter writes them. Both carry the token types (added special tokens as control tokens), the
BOS/EOS/UNK/PAD ids, the end-of-turn token and the chat template as the tokenizer has it.
"""

from __future__ import annotations

import json

from chatforge.files import ChatforgeError
from chatforge.models.chat_templates import END_OF_TURN_TOKENS
from chatforge.models.internlm2 import CONTROL, NORMAL, UNUSED, USER_DEFINED, Pieces, build_tokenizer

SENTENCEPIECE, BYTE_LEVEL = "llama", "gpt2"  # llama.cpp's names for the two tokenizer models


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for the way a byte-level BPE tokenizer splits text before merging.

    Args:
        spec: the tokenizer.json of the tokenizer (its `pre_tokenizer` and `normalizer` are read).

    Raises:
        ChatforgeError: a split that neither llama.cpp nor transformers' GGUF reader would reproduce.
    """
    try:  # the split patterns transformers' GGUF reader knows, by llama.cpp's names
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:  # older transformers: only the splits named below
        GGUF_PRE_TOKENIZER_SPLITS = {}
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # Qwen2's NFC changes nothing in composed text
        raise ChatforgeError(f"the tokenizer's {normalizer} normalizer has no GGUF form")
    if steps and steps[-1].get("add_prefix_space"):
        raise ChatforgeError("the tokenizer adds a space in front of the text, which llama.cpp's BPE does not")
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, known in GGUF_PRE_TOKENIZER_SPLITS.items():
            if known == regex and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
                return name
    raise ChatforgeError(
        f"the tokenizer's pre-tokenizer {kinds} has no llama.cpp name: supported are GPT-2's, "
        f"SmolLM's and the split patterns of {', '.join(sorted(GGUF_PRE_TOKENIZER_SPLITS))}"
    )


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes a turn with (e.g. <|im_end|>), if the vocabulary has one."""
    vocab, template = tokenizer.get_vocab(), tokenizer.chat_template or ""
    return next((vocab[t] for t in END_OF_TURN_TOKENS if t in vocab and t in template), None)


def adds_special(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds BOS in front and EOS at the end, read off the tokenizer's behaviour."""
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    bos = tokenizer.bos_token_id is not None and full[:1] == [tokenizer.bos_token_id] != plain[:1]
    eos = tokenizer.eos_token_id is not None and full[-1:] == [tokenizer.eos_token_id] != plain[-1:]
    return bool(bos), bool(eos)


def _byte_level(tokenizer, n_vocab: int) -> dict:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ChatforgeError(
            f"the tokenizer is {model.get('type')} without a byte-level decoder: GGUF export "
            f"takes byte-level BPE tokenizers (SmolLM2, Llama 3, Qwen2) and InternLM2's sentencepiece"
        )
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    tokens, types = [f"[PAD{i}]" for i in range(n_vocab)], [UNUSED] * n_vocab
    for text, i in tokenizer.get_vocab().items():
        if i >= n_vocab:
            raise ChatforgeError(f"token {text!r} has id {i}, beyond the model's {n_vocab} embeddings")
        tokens[i] = text
        types[i] = NORMAL if i not in added else CONTROL if added[i].get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return {"model": BYTE_LEVEL, "pre": pre_tokenizer_name(spec), "tokens": tokens, "types": types, "merges": merges}


def _sentencepiece(pieces: Pieces, n_vocab: int) -> dict:
    n = len(pieces.names)
    if n > n_vocab:
        raise ChatforgeError(f"the tokenizer has {n} pieces, more than the model's {n_vocab} embeddings")
    pad = range(n, n_vocab)
    # control tokens score -1000 as in llama.cpp's converter: its merging by score never builds one from text
    scores = [-1000.0 if kind == CONTROL else score for kind, score in zip(pieces.kinds, pieces.scores)]
    return {
        "model": SENTENCEPIECE,
        "pre": "default",
        "tokens": list(pieces.names) + [f"[PAD{i}]" for i in pad],
        "scores": scores + [-1000.0] * len(pad),
        "types": list(pieces.kinds) + [UNUSED] * len(pad),
        "space_prefix": pieces.dummy_prefix,
        "squeeze": pieces.squeeze,
    }


def write_vocab(writer, tokenizer, n_vocab: int, pieces: Pieces | None = None) -> dict:
    """Add the tokenizer to a GGUFWriter; returns what was written (model, pre, ids).

    Args:
        n_vocab: the model's embedding rows; the token list is padded to it with unused tokens.
        pieces: a sentencepiece vocabulary (InternLM2); without it the tokenizer must be byte-level BPE.

    Raises:
        ChatforgeError: a tokenizer GGUF cannot hold, or one larger than the model's vocabulary.
    """
    vocab = _sentencepiece(pieces, n_vocab) if pieces is not None else _byte_level(tokenizer, n_vocab)
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["types"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
        writer.add_add_space_prefix(vocab["space_prefix"])
        writer.add_remove_extra_whitespaces(vocab["squeeze"])
    if vocab.get("merges"):
        writer.add_token_merges(vocab["merges"])
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
        "eot": end_of_turn_id(tokenizer),
    }
    for key, add in (
        ("bos", writer.add_bos_token_id),
        ("eos", writer.add_eos_token_id),
        ("unk", writer.add_unk_token_id),
        ("pad", writer.add_pad_token_id),
        ("eot", writer.add_eot_token_id),
    ):
        if ids[key] is not None:
            add(ids[key])
    add_bos, add_eos = adds_special(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
    return {"model": vocab["model"], "pre": vocab["pre"], **ids}


def read_sentencepiece(meta: dict, path):
    """The tokenizer of a GGUF with a sentencepiece vocabulary (as written above), built as InternLM2's is.

    Args:
        meta: the file's metadata (key -> value); `path` names the file in errors.

    Raises:
        ChatforgeError: the file holds another kind of tokenizer.
    """

    def field(key, default=None):
        return meta.get(f"tokenizer.{key}", default)

    model = field("ggml.model")
    if model != SENTENCEPIECE:
        raise ChatforgeError(f"{path}: tokenizer {model!r} is not sentencepiece ({SENTENCEPIECE!r})")
    names = tuple(field("ggml.tokens"))
    ids = {k: field(f"ggml.{k}_token_id", -1) for k in ("unknown", "bos", "eos", "padding")}
    pieces = Pieces(
        names,
        tuple(field("ggml.scores")),
        tuple(field("ggml.token_type")),
        dummy_prefix=bool(field("ggml.add_space_prefix", True)),
        squeeze=bool(field("ggml.remove_extra_whitespaces", False)),
        unk=ids["unknown"],
        bos=ids["bos"],
        eos=ids["eos"],
    )
    name = {k: names[i] if i >= 0 else None for k, i in ids.items()}
    return build_tokenizer(
        pieces,
        bos=name["bos"],
        eos=name["eos"],
        pad=name["padding"],
        add_bos=bool(field("ggml.add_bos_token", True)),
        add_eos=bool(field("ggml.add_eos_token", False)),
        chat_template=field("chat_template"),
    )
