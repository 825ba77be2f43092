"""InternLM2 checkpoints on transformers' native Llama classes: no remote code.

InternLM2 is Llama with other tensor names and one fused projection `attention.wqkv`, laid out
along its output dimension as (kv_heads, q_per_kv + 2, head_dim): per key/value group, the
group's query heads, then its key head, then its value head. Loading splits it into q/k/v
shard by shard into a model built without memory (peak ~ one model plus one shard); exporting
fuses it back, bit for bit. The tokenizer is built from `tokenizer.model` with sentencepiece
and `tokenizers` (fast, so offsets work), the special tokens taken by id.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Literal, get_args

import sentencepiece as spm
import torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
from tokenizers.models import BPE
from tqdm.auto import tqdm

from chatforge.files import ChatforgeError, write_json

log = logging.getLogger(__name__)

ARCH = "InternLM2ForCausalLM"
Layout = Literal["hf", "internlm2"]  # a checkpoint's layout: native (transformers' Llama) or InternLM2's own
META = "\u2581"  # sentencepiece's visible space
ORIGINALS = "internlm2"  # in a native (hf) export: the InternLM2 files kept for the way back
# Tool/chat markers by id (vocab 92544); old revisions name them [UNUSED_TOKEN_141..146].
SPECIAL_BY_ID = {
    92538: "<|plugin|>",
    92539: "<|interpreter|>",
    92540: "<|action_end|>",
    92541: "<|action_start|>",
    92542: "<|im_end|>",
    92543: "<|im_start|>",
}
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pth|pt)$|.*\.index\.json$")
LAYER_RENAMES = {  # InternLM2 name inside a layer -> native Llama name
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_RENAMES = {
    "model.tok_embeddings.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "model.norm.weight": "model.norm.weight",
}


# ---------------------------------------------------------------- config


def check_layout(fmt: str) -> None:
    """Check a layout name (merge --format, convert --format).

    Raises:
        ChatforgeError: `fmt` is not one of Layout's values.
    """
    if fmt not in get_args(Layout):
        raise ChatforgeError(f"unknown format {fmt!r}: use {' or '.join(get_args(Layout))}")


def declares_internlm2(config: dict) -> bool:
    """Whether a model config (config.json's contents) names InternLM2's architecture."""
    return ARCH in (config.get("architectures") or [])


def is_internlm2(folder: str | Path) -> bool:
    path = Path(folder) / "config.json"
    try:
        return declares_internlm2(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError):
        return False


def read_config(folder: Path) -> dict:
    """The InternLM2 config.json of a folder.

    Raises:
        ChatforgeError: unreadable, another architecture, or a field this loader cannot honour.
    """
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatforgeError(f"unreadable model config {path}: {e}") from e
    arch = cfg.get("architectures") or []
    if ARCH not in arch:
        raise ChatforgeError(f"{path}: architecture {arch or 'none'} is not {ARCH}")
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(key), int):
            raise ChatforgeError(f"{path}: field {key!r} missing or not an integer")
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if cfg["hidden_size"] % heads or heads % kv:
        raise ChatforgeError(
            f"{path}: hidden_size {cfg['hidden_size']}, {heads} heads and {kv} key/value heads do not divide evenly"
        )
    scaling = cfg.get("rope_scaling")
    if scaling and (scaling.get("type") or scaling.get("rope_type")) not in ("dynamic", "linear"):
        raise ChatforgeError(f"{path}: field 'rope_scaling': type {scaling!r} is not dynamic or linear")
    return cfg


def llama_config(cfg: dict, dtype: torch.dtype | None = None):
    """The native LlamaConfig equal to an InternLM2 config (dynamic/linear RoPE scaling carried over)."""
    from transformers import LlamaConfig

    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        rope.update(rope_type=scaling.get("type") or scaling.get("rope_type"), factor=float(scaling["factor"]))
    out = LlamaConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        hidden_act=cfg.get("hidden_act", "silu"),
        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        bos_token_id=cfg.get("bos_token_id", 1),
        eos_token_id=cfg.get("eos_token_id", 2),
        pad_token_id=cfg.get("pad_token_id"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("bias", False)),
        rope_parameters=rope,
        initializer_range=cfg.get("initializer_range", 0.02),
    )
    out.architectures = ["LlamaForCausalLM"]
    if dtype is not None:
        out.dtype = dtype
    return out


def _groups(cfg: dict) -> tuple[int, int, int]:
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or heads
    return kv, heads // kv, cfg["hidden_size"] // heads


# ---------------------------------------------------------------- tensor names


def to_native(name: str, tensor: torch.Tensor, cfg: dict) -> dict[str, torch.Tensor]:
    """One InternLM2 tensor as native tensors ({} for buffers the native model recomputes).

    Raises:
        ChatforgeError: a tensor name this layout does not have.
    """
    if name in TOP_RENAMES:
        return {TOP_RENAMES[name]: tensor}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) == "attention.wqkv":
        kv, q_per_kv, head_dim = _groups(cfg)
        grouped = tensor.reshape(kv, q_per_kv + 2, head_dim, *tensor.shape[1:])
        prefix = f"model.layers.{m.group(1)}.self_attn"
        return {
            f"{prefix}.q_proj.{m.group(3)}": grouped[:, :q_per_kv].reshape(-1, *tensor.shape[1:]).clone(),
            f"{prefix}.k_proj.{m.group(3)}": grouped[:, -2].reshape(-1, *tensor.shape[1:]).clone(),
            f"{prefix}.v_proj.{m.group(3)}": grouped[:, -1].reshape(-1, *tensor.shape[1:]).clone(),
        }
    if m and m.group(2) in LAYER_RENAMES:
        return {f"model.layers.{m.group(1)}.{LAYER_RENAMES[m.group(2)]}.{m.group(3)}": tensor}
    if name.endswith("rotary_emb.inv_freq"):  # old .bin checkpoints saved this buffer
        return {}
    raise ChatforgeError(f"unexpected tensor {name!r} in an InternLM2 checkpoint")


def to_internlm2(state: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """Native tensors back to InternLM2 names, q/k/v fused per key/value group."""
    kv, q_per_kv, head_dim = _groups(cfg)
    back_top = {v: k for k, v in TOP_RENAMES.items()}
    back_layer = {v: k for k, v in LAYER_RENAMES.items()}
    out = {}
    for name, t in state.items():
        if name in back_top:
            if name == "lm_head.weight" and cfg.get("tie_word_embeddings"):
                continue
            out[back_top[name]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None:
            raise ChatforgeError(f"tensor {name!r} has no InternLM2 counterpart")
        layer, part, kind = m.groups()
        if part in ("self_attn.k_proj", "self_attn.v_proj"):
            continue
        if part == "self_attn.q_proj":
            rest = t.shape[1:]
            q = t.reshape(kv, q_per_kv, head_dim, *rest)
            k = state[f"model.layers.{layer}.self_attn.k_proj.{kind}"].reshape(kv, 1, head_dim, *rest)
            v = state[f"model.layers.{layer}.self_attn.v_proj.{kind}"].reshape(kv, 1, head_dim, *rest)
            out[f"model.layers.{layer}.attention.wqkv.{kind}"] = torch.cat([q, k, v], 1).reshape(-1, *rest)
        elif part in back_layer:
            out[f"model.layers.{layer}.{back_layer[part]}.{kind}"] = t
        else:
            raise ChatforgeError(f"tensor {name!r} has no InternLM2 counterpart")
    return out


# ---------------------------------------------------------------- weights


def shard_files(folder: Path) -> list[Path]:
    """The weight files of a folder, from its index when there is one.

    Raises:
        ChatforgeError: no weights, an unreadable index, or a shard the index names that is missing.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if not index.is_file():
            continue
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise ChatforgeError(f"unreadable weight index {index}: {e}") from e
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ChatforgeError(
                f"{folder}: shard {missing[0]} named in {index_name} is missing"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        return [folder / n for n in names]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    raise ChatforgeError(f"{folder}: no weights (model.safetensors, pytorch_model.bin or their .index.json)")


def read_shard(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # safetensors and pickle raise many kinds of errors on a broken file
        raise ChatforgeError(f"unreadable weight file {path}: {e}") from e


def native_shards(folder: Path, cfg: dict, dtype: torch.dtype | None):
    """Yield each shard's tensors already renamed, split and cast (one shard in memory at a time)."""

    files = shard_files(folder)
    for path in tqdm(files, desc="load InternLM2", unit="shard", disable=len(files) < 2):
        converted = {}
        for name, tensor in read_shard(path).items():
            try:
                parts = to_native(name, tensor, cfg)
            except RuntimeError as e:  # a fused wqkv that does not split as config.json says
                raise ChatforgeError(
                    f"{path}: tensor {name} {tuple(tensor.shape)} does not fit {folder / 'config.json'}: {e}"
                ) from None
            for new, t in parts.items():
                converted[new] = t.to(dtype) if dtype is not None else t
        yield path, converted


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32, quantization_config=None):
    """Load an InternLM2 folder as a native LlamaForCausalLM on the CPU (or quantised, for QLoRA).

    Without quantization the model is built without memory and filled shard by shard, so the
    peak is one model plus one shard. With a quantization config (QLoRA) transformers quantises
    while placing the weights: the converted bf16/fp32 weights are held once on the CPU, the
    quantised copy lives on the GPU.

    Raises:
        ChatforgeError: another architecture, missing or unreadable shards, missing or extra tensors.
    """
    from accelerate import init_empty_weights
    from transformers import GenerationConfig, LlamaForCausalLM

    folder = Path(folder)
    cfg = read_config(folder)
    config = llama_config(cfg, dtype)
    if quantization_config is not None:
        state = {}
        for _path, part in native_shards(folder, cfg, dtype):
            state.update(part)
        with init_empty_weights():
            expected = set(LlamaForCausalLM(config).state_dict())
        _check_keys(folder, config, expected, set(state))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            model = LlamaForCausalLM.from_pretrained(
                None,
                config=config,
                state_dict=state,
                dtype=dtype,
                quantization_config=quantization_config,
                device_map=device,
            )
        except Exception as e:
            raise ChatforgeError(f"cannot quantise the model in {folder}: {e}") from e
        del state
    else:
        with init_empty_weights():  # parameters on the meta device; buffers (RoPE) real
            model = LlamaForCausalLM(config)
        expected, loaded = set(model.state_dict()), set()
        for path, part in native_shards(folder, cfg, dtype):
            try:
                result = model.load_state_dict(part, strict=False, assign=True)
            except RuntimeError as e:  # a shape that does not fit config.json
                raise ChatforgeError(f"{path}: tensors do not fit {folder / 'config.json'}: {e}") from None
            if result.unexpected_keys:
                raise ChatforgeError(f"{path}: tensor {result.unexpected_keys[0]} does not fit the config")
            loaded |= set(part)
        _check_keys(folder, config, expected, loaded)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
    model.config.name_or_path = str(folder)
    gen = folder / "generation_config.json"
    model.generation_config = (
        GenerationConfig.from_pretrained(folder) if gen.is_file() else GenerationConfig.from_model_config(model.config)
    )
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
    if cfg["vocab_size"] > 92542 and 92542 not in eos:
        eos.append(92542)  # <|im_end|> ends a chat turn
    model.generation_config.eos_token_id = eos
    return model


def _check_keys(folder: Path, config, expected: set[str], names: set[str]) -> None:
    if config.tie_word_embeddings:
        expected = expected - {"lm_head.weight"}
    missing = sorted(expected - names)
    if missing:
        raise ChatforgeError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s), e.g. {missing[0]}")


# ---------------------------------------------------------------- tokenizer


def _sp_processor(path: Path):

    if not path.is_file():
        raise ChatforgeError(f"{path.parent}: tokenizer.model is missing")
    sp = spm.SentencePieceProcessor()
    try:
        sp.load(str(path))
    except Exception as e:
        raise ChatforgeError(f"{path} is not a sentencepiece model: {e}") from None
    return sp


def _bpe_merges(vocab: dict[str, int], score: dict[str, float], skip: set[str]) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece BPE model: every split of a piece into two pieces, ranked as
    sentencepiece ranks them (higher piece score first). transformers has a private helper for
    this that moved between versions, so it is written out here."""
    merges = []
    for piece in vocab:
        if piece in skip or len(piece) < 2:
            continue
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab and left not in skip and right not in skip:
                merges.append((score[piece], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in merges]


# sentencepiece's piece types; GGUF's token types use the same numbers
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclasses.dataclass(frozen=True)
class Pieces:
    """A sentencepiece vocabulary as InternLM2 uses it: piece names (chat markers named), scores,
    piece types, sentencepiece's normalisation and its unk/bos/eos ids (-1: none)."""

    names: tuple[str, ...]
    scores: tuple[float, ...]
    kinds: tuple[int, ...]
    dummy_prefix: bool
    squeeze: bool
    unk: int
    bos: int
    eos: int


@functools.lru_cache(maxsize=4)
def _read_pieces(path: str, stamp: tuple, renames: tuple) -> Pieces:
    """The pieces of a tokenizer.model with the special tokens named (cached per file state)."""
    sp = _sp_processor(Path(path))
    n = sp.get_piece_size()
    names, kinds = [], []
    for i in range(n):
        names.append(sp.id_to_piece(i))
        kinds.append(
            CONTROL
            if sp.is_control(i)
            else UNKNOWN
            if sp.is_unknown(i)
            else UNUSED
            if sp.is_unused(i)
            else BYTE
            if sp.is_byte(i)
            else NORMAL
        )
    for i, name in renames:
        if i < n:
            names[i] = name
            kinds[i] = UNKNOWN if kinds[i] == UNKNOWN else CONTROL
    for i, name in SPECIAL_BY_ID.items():
        if i < n and (kinds[i] != CONTROL or names[i].startswith("[UNUSED_TOKEN_")):
            names[i], kinds[i] = name, CONTROL
    if len(set(names)) != n:
        raise ChatforgeError(f"{path}: duplicate token names after naming the special tokens")
    # sentencepiece's own normalisation, read off its behaviour (its options are not exposed)
    first = sp.encode("a", out_type=str)
    return Pieces(
        tuple(names),
        tuple(sp.get_score(i) for i in range(n)),
        tuple(kinds),
        dummy_prefix=bool(first) and first[0].startswith(META),
        squeeze=sp.decode(sp.encode("a  b")) == "a b",
        unk=sp.unk_id(),
        bos=sp.bos_id(),
        eos=sp.eos_id(),
    )


@functools.lru_cache(maxsize=4)
def _tables(pieces: Pieces) -> tuple:
    """Vocabulary, BPE merges and special ids of a sentencepiece vocabulary."""
    vocab = {name: i for i, name in enumerate(pieces.names)}
    special = {i for i, kind in enumerate(pieces.kinds) if kind == CONTROL} | (
        {pieces.unk, pieces.bos, pieces.eos} - {-1}
    )
    skip = {i for i, kind in enumerate(pieces.kinds) if kind in (UNKNOWN, UNUSED, BYTE)}
    merges = _bpe_merges(vocab, dict(zip(pieces.names, pieces.scores)), {pieces.names[i] for i in special | skip})
    return vocab, merges, sorted(special)


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as e:
        raise ChatforgeError(f"unreadable {path}: {e}") from e


def _text(value, default):
    return value.get("content", default) if isinstance(value, dict) else (value or default)


def tokenizer_pieces(folder: str | Path) -> Pieces:
    """The sentencepiece vocabulary of an InternLM2 folder, special tokens named as its tokenizer_config says.

    Raises:
        ChatforgeError: tokenizer.model missing or not sentencepiece, or an unreadable tokenizer_config.json.
    """
    folder = Path(folder)
    tcfg = _tokenizer_config(folder)
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise ChatforgeError(f"{folder}: tokenizer.model is missing")
    renames = tuple(sorted((int(k), _text(v, "")) for k, v in (tcfg.get("added_tokens_decoder") or {}).items()))
    st = model_file.stat()
    return _read_pieces(str(model_file), (st.st_mtime_ns, st.st_size), renames)


def build_tokenizer(
    pieces: Pieces,
    bos: str | None = None,
    eos: str | None = None,
    pad: str | None = None,
    add_bos: bool = True,
    add_eos: bool = False,
    chat_template: str = CHAT_TEMPLATE,
    max_length: int = 32768,
):
    """A fast tokenizer that encodes as sentencepiece does with `pieces` (BPE with byte fallback).

    Args:
        bos, eos, pad: token names (default: sentencepiece's bos and eos; pad: eos).
    """
    from transformers import PreTrainedTokenizerFast

    vocab, merges, special = _tables(pieces)
    names = pieces.names
    steps = [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")] if pieces.squeeze else []
    steps += [normalizers.Prepend(META)] if pieces.dummy_prefix else []
    steps += [normalizers.Replace(" ", META)]
    unk = names[pieces.unk] if pieces.unk >= 0 else None
    backend = Tokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    backend.normalizer = normalizers.Sequence(steps)
    backend.decoder = decoders.Sequence(
        [decoders.Replace(META, " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if pieces.dummy_prefix else [])
    )
    backend.add_special_tokens([AddedToken(names[i], special=True, normalized=False) for i in special])
    bos = bos or (names[pieces.bos] if pieces.bos >= 0 else "<s>")
    eos = eos or (names[pieces.eos] if pieces.eos >= 0 else "</s>")
    pad = pad or eos
    extra = [names[i] for i in special if names[i] not in (bos, eos, pad, unk)]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        unk_token=unk,
        pad_token=pad,
        additional_special_tokens=extra,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        chat_template=chat_template,
        model_max_length=max_length,
    )
    tok.update_post_processor()
    return tok


def load_tokenizer(folder: str | Path):
    """A fast tokenizer equal to InternLM2's own, with its chat template, built without remote code.

    Raises:
        ChatforgeError: tokenizer.model missing or not sentencepiece, or an unreadable tokenizer_config.json.
    """
    folder = Path(folder)
    tcfg = _tokenizer_config(folder)
    pieces = tokenizer_pieces(folder)
    bos, eos = _text(tcfg.get("bos_token"), None), _text(tcfg.get("eos_token"), None)
    return build_tokenizer(
        pieces,
        bos=bos,
        eos=eos,
        pad=_text(tcfg.get("pad_token"), None),
        add_bos=tcfg.get("add_bos_token", True),
        add_eos=tcfg.get("add_eos_token", False),
        max_length=tcfg.get("model_max_length", 32768),
    )


# ---------------------------------------------------------------- export


def originals(folder: str | Path) -> Path | None:
    """The folder of original InternLM2 files behind a model folder, if any."""
    folder = Path(folder)
    if is_internlm2(folder):
        return folder
    if is_internlm2(folder / ORIGINALS):
        return folder / ORIGINALS
    return None


def copy_originals(source: Path, dest: Path) -> list[str]:
    """Copy every file of an InternLM2 folder but its weights (config, tokenizer, remote code)."""
    dest.mkdir(parents=True, exist_ok=True)
    kept = []
    for f in sorted(source.iterdir()):
        if f.is_file() and not WEIGHT_FILE.fullmatch(f.name):
            shutil.copy2(f, dest / f.name)
            kept.append(f.name)
    return kept


def save_internlm2(
    model, out: Path, source: Path, dtype: torch.dtype | None = None, max_shard_size: str = "2GB"
) -> list[str]:
    """Write `model` (native layout) into folder `out` in the original InternLM2 layout.

    Weights get the InternLM2 names and the fused wqkv; the other files of `source` (config,
    tokenizer, remote code) are copied, config.json changed only in torch_dtype when it differs.

    Raises:
        ChatforgeError: the model does not fit the InternLM2 config of `source`.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    cfg = read_config(source)
    state = {k: v.detach().to("cpu", dtype) if dtype else v.detach().cpu() for k, v in model.state_dict().items()}
    weights = to_internlm2(state, cfg)
    del state
    copy_originals(source, out)
    for stale in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        (out / stale).unlink(missing_ok=True)
    split = split_torch_state_dict_into_shards(
        weights, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        save_file({n: weights[n].contiguous() for n in names}, out / filename, metadata={"format": "pt"})
    if split.is_sharded:
        total = sum(t.numel() * t.element_size() for t in weights.values())
        write_json(
            out / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": split.tensor_to_filename},
        )
    name = str(next(iter(weights.values())).dtype).replace("torch.", "")
    if cfg.get("torch_dtype") != name:
        cfg["torch_dtype"] = name
        write_json(out / "config.json", cfg)
    return sorted(split.filename_to_tensors)


def save_hf(model, tokenizer, out: Path, source: Path | None, max_shard_size: str = "2GB") -> None:
    """Write the native layout (chat template on the tokenizer); keep InternLM2's files in out/internlm2."""
    model.save_pretrained(out, max_shard_size=max_shard_size, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if source is not None:
        copy_originals(source, out / ORIGINALS)
