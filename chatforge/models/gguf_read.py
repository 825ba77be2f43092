"""Read GGUF files that transformers' GGUF loader does not: llama.cpp's `internlm2` architecture.

transformers reads `llama` and `qwen2` GGUFs itself; for `internlm2` it has no entry. The tensors are
Llama's under llama.cpp's names (q/k/v split, q/k rows in llama.cpp's RoPE order), so the file is read
into transformers' native Llama classes, as chatforge loads InternLM2 anyway, and its sentencepiece
vocabulary is built into InternLM2's tokenizer. The header is parsed here from a memory map (the gguf
package's reader takes seconds per 100k-token vocabulary); tensors are dequantised by the gguf package.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import gguf
import numpy as np
import torch

from chatforge.files import ChatforgeError
from chatforge.models.gguf_vocab import read_sentencepiece
from chatforge.models.internlm2 import llama_config

READERS = ("internlm2",)  # architectures read here rather than by transformers
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
REQUIRED = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")


class Header:
    """A GGUF file's metadata and tensor table, parsed from a memory map that `tensor` reads from."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0
        magic, version, n_tensors, n_keys = self._take("4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"not a GGUF v2/v3 file (starts with {magic!r}, version {version})")
        self.metadata = {self._string(): self._value(self._take("I")[0]) for _ in range(n_keys)}
        self.tensors = {}  # name -> (shape in numpy order, ggml type, offset in the data section)
        for _ in range(n_tensors):
            name = self._string()
            (dims,) = self._take("I")
            shape = tuple(reversed(self._take(f"{dims}Q")))
            self.tensors[name] = (shape, *self._take("IQ"))
        align = self.metadata.get("general.alignment", 32)
        self.data_start = (self.pos + align - 1) // align * align

    def _take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.map, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def _string(self) -> str:
        (n,) = self._take("Q")
        self.pos += n
        return self.map[self.pos - n : self.pos].decode("utf-8")

    def _value(self, kind: int):
        if kind in SCALARS:
            return self._take(SCALARS[kind])[0]
        if kind == STRING:
            return self._string()
        if kind == ARRAY:
            sub, n = self._take("IQ")
            if sub == STRING:
                return [self._string() for _ in range(n)]
            if sub in SCALARS:
                return list(self._take(f"{n}{SCALARS[sub]}"))
        raise ValueError(f"metadata value of GGUF type {kind} at byte {self.pos}")

    def tensor(self, name: str) -> np.ndarray:
        """One tensor dequantised to float32, in numpy (row-major) shape."""

        shape, kind, offset = self.tensors[name]
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
        rows = int(np.prod(shape[:-1]))
        raw = np.frombuffer(self.map, np.uint8, rows * shape[-1] // block * size, self.data_start + offset)
        values = gguf.quants.dequantize(raw.reshape(rows, -1), gguf.GGMLQuantizationType(kind))
        return np.array(values, dtype=np.float32).reshape(shape)


def read_header(path: str | Path) -> Header:
    """Parse a GGUF file's header.

    Raises:
        ChatforgeError: not a readable GGUF file.
    """
    try:
        return Header(path)
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise ChatforgeError(f"unreadable GGUF file {path}: {e}") from e


def gguf_architecture(path: str | Path) -> str:
    """`general.architecture` of a GGUF file.

    Raises:
        ChatforgeError: not a readable GGUF file, or one that names no architecture.
    """
    arch = read_header(path).metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ChatforgeError(f"unreadable GGUF file {path}: no general.architecture")
    return arch


def _config(path, meta: dict, arch: str, tensor_names) -> dict:
    """The InternLM2 config.json fields the file states (chatforge's InternLM2 loader takes this form)."""
    key = lambda name, default=None: meta.get(f"{arch}.{name}", default)  # noqa: E731
    needed = ["tokenizer.ggml.tokens"] + [f"{arch}.{k}" for k in REQUIRED]
    missing = [k for k in needed if k not in meta]
    if missing:
        raise ChatforgeError(f"{path}: GGUF metadata lacks {', '.join(missing)}")
    cfg = {
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": key("embedding_length"),
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": key("attention.head_count"),
        "num_key_value_heads": key("attention.head_count_kv"),
        "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": key("rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if key("rope.scaling.type") == "linear":
        cfg["rope_scaling"] = {"type": "linear", "factor": key("rope.scaling.factor")}
    return {k: v for k, v in cfg.items() if v is not None}


def rope_rows(weight: torch.Tensor, heads: int, to_gguf: bool = True) -> torch.Tensor:
    """Reorder q/k rows between Hugging Face's RoPE (the halves of each head) and llama.cpp's (adjacent pairs)."""
    half = weight.shape[0] // heads // 2
    rest = weight.shape[1:]
    split = (heads, 2, half, *rest) if to_gguf else (heads, half, 2, *rest)
    return weight.reshape(split).transpose(1, 2).reshape(weight.shape)


def tensor_names(names, arch: str, layers: int) -> dict[str, str]:
    """Hugging Face tensor name -> llama.cpp's name in `arch`, from the gguf package's name map.

    Raises:
        ChatforgeError: a tensor the architecture has no name for.
    """

    table = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), layers)
    out = {}
    for name in names:
        out[name] = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if out[name] is None:
            raise ChatforgeError(f"tensor {name} has no llama.cpp name in the {arch} architecture")
    return out


def load_internlm2(path: str | Path, dtype: torch.dtype = torch.float32):
    """An `internlm2` GGUF as (tokenizer, native LlamaForCausalLM), weights dequantised to `dtype`.

    Raises:
        ChatforgeError: another architecture, or tensors missing or not fitting the file's own metadata.
    """
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    header = read_header(path)
    meta, arch = header.metadata, header.metadata.get("general.architecture")
    if arch not in READERS:
        raise ChatforgeError(f"{path}: architecture {arch!r} is read by transformers, not here")
    cfg = _config(path, meta, arch, header.tensors)
    config = llama_config(cfg, dtype)
    with init_empty_weights():
        model = LlamaForCausalLM(config)
    wanted = [n for n in model.state_dict() if not (config.tie_word_embeddings and n == "lm_head.weight")]
    heads = {".attn_q.": config.num_attention_heads, ".attn_k.": config.num_key_value_heads}
    state = {}
    for hf_name, gguf_name in tensor_names(wanted, arch, config.num_hidden_layers).items():
        if gguf_name not in header.tensors:
            raise ChatforgeError(f"{path}: tensor {gguf_name} is missing")
        values = torch.from_numpy(header.tensor(gguf_name))
        n = next((n for part, n in heads.items() if part in gguf_name), 0)
        state[hf_name] = (rope_rows(values, n, to_gguf=False) if n else values).to(dtype)
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a shape that does not fit the metadata
        raise ChatforgeError(f"{path}: tensors do not fit the file's metadata: {e}") from None
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    stops = {meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot")} - {None}
    model.generation_config.eos_token_id = sorted(stops)
    return read_sentencepiece(meta, path), model
