"""Export a model to one GGUF file for llama.cpp, Ollama and LM Studio, with the `gguf` package's writer.

Nothing is compiled or downloaded. Tensors get llama.cpp's names from gguf's own name map; for the
`llama` and `internlm2` architectures the query and key rows are reordered for llama.cpp's RoPE, which
rotates adjacent pairs where Hugging Face rotates the two halves of each head (for Qwen2 llama.cpp
rotates halves too). InternLM2 is written as llama.cpp's `internlm2` architecture, the layout
llama.cpp's own converter writes: its fused wqkv split into q, k and v (as chatforge loads it anyway)
and its sentencepiece vocabulary with scores. The file is written tensor by tensor (one tensor in
memory besides the model) to a temporary name and renamed into place.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from tqdm.auto import tqdm

from chatforge.export.ollama import modelfile_text
from chatforge.files import ChatforgeError, atomic_path, write_text
from chatforge.models import internlm2
from chatforge.models.gguf_read import rope_rows, tensor_names
from chatforge.models.gguf_vocab import write_vocab
from chatforge.models.internlm2 import originals, tokenizer_pieces
from chatforge.models.load import display_name, load_model, load_tokenizer, local_folder, parse_dtype, read_config

logging.getLogger("gguf").setLevel(logging.WARNING)  # the writer logs its endianness at INFO

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", internlm2.ARCH: "internlm2"}
DTYPE_NAMES = {
    "f32": "f32",
    "fp32": "f32",
    "float32": "f32",
    "f16": "f16",
    "fp16": "f16",
    "float16": "f16",
    "bf16": "bf16",
    "bfloat16": "bf16",
    "q8_0": "q8_0",
    "auto": "f16",
}
ROPE_PAIRS = ("llama", "internlm2")  # llama.cpp rotates adjacent pairs for these architectures


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its names, shape, GGUF type, and the heads its rows are reordered by (0: none)."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    qtype: int
    heads: int = 0

    @property
    def nbytes(self) -> int:

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def gguf_dtype(name: str | None) -> str:
    """The canonical name of a GGUF dtype (f16 when `name` is None or auto).

    Raises:
        ChatforgeError: a dtype this exporter does not write.
    """
    key = (name or "auto").lower()
    if key not in DTYPE_NAMES:
        raise ChatforgeError(f"unknown GGUF dtype {name!r}: use f16, bf16, f32 or q8_0")
    return DTYPE_NAMES[key]


def _qtype(name: str):

    q = gguf.GGMLQuantizationType
    return {"f32": q.F32, "f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[name]


def _file_type(name: str):

    f = gguf.LlamaFileType
    return {"f32": f.ALL_F32, "f16": f.MOSTLY_F16, "bf16": f.MOSTLY_BF16, "q8_0": f.MOSTLY_Q8_0}[name]


def architecture(folder: Path) -> tuple[str, Path | None]:
    """The GGUF architecture of a model folder, and its InternLM2 files (tokenizer.model) if any.

    Raises:
        ChatforgeError: an architecture this exporter does not write.
    """

    source = originals(folder)  # an InternLM2 folder, or a native one exported from InternLM2
    if source is not None:
        return "internlm2", source
    arch = (read_config(folder).get("architectures") or ["none"])[0]
    if arch not in ARCHITECTURES:
        raise ChatforgeError(f"{folder}: GGUF export does not support {arch}; supported: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch], None


def plan(model, arch: str, qtype) -> list[Entry]:
    """The file's tensors in order: 2-D weights in `qtype` (Q8_0 rows need whole 32-value blocks, else
    F16), 1-D norms and biases in F32 as llama.cpp keeps them; a tied output layer is left out."""

    q = gguf.GGMLQuantizationType
    config = model.config
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    names = tensor_names(state, arch, config.num_hidden_layers)
    heads = {
        ".self_attn.q_proj.": config.num_attention_heads,
        ".self_attn.k_proj.": config.num_key_value_heads or config.num_attention_heads,
    }
    entries = []
    for hf_name, tensor in state.items():
        kind = qtype if tensor.dim() == 2 else q.F32
        if kind == q.Q8_0 and tensor.shape[-1] % gguf.GGML_QUANT_SIZES[q.Q8_0][0]:
            kind = q.F16
        reorder = next((n for part, n in heads.items() if part in hf_name), 0) if arch in ROPE_PAIRS else 0
        entries.append(Entry(names[hf_name], hf_name, tuple(tensor.shape), kind, reorder))
    return entries


def tensor_data(tensor: torch.Tensor, entry: Entry) -> np.ndarray:
    """One tensor as the bytes GGUF stores (rows reordered for RoPE where the entry says)."""

    q = gguf.GGMLQuantizationType
    t = tensor.detach().to("cpu", torch.float32)
    if entry.heads:
        t = rope_rows(t, entry.heads)
    if entry.qtype == q.F32:
        return t.contiguous().numpy()
    if entry.qtype == q.F16:
        return t.to(torch.float16).contiguous().numpy()
    if entry.qtype == q.BF16:
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    return gguf.quants.quantize(t.contiguous().numpy(), entry.qtype)


def write_hparams(writer, config, arch: str) -> list[str]:
    """Add the model's shape and RoPE to a GGUFWriter; returns notes on what GGUF cannot say.

    Raises:
        ChatforgeError: an activation, RoPE scaling or attention window llama.cpp would not reproduce.
    """

    if getattr(config, "hidden_act", "silu") != "silu":
        raise ChatforgeError(f"activation {config.hidden_act!r} is not exported: {arch} in llama.cpp uses silu")
    if getattr(config, "use_sliding_window", False):
        raise ChatforgeError("sliding-window attention is not exported: llama.cpp's qwen2 attends to the whole context")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    if head_dim * heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = dict(getattr(config, "rope_parameters", None) or {})
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    kind, notes = rope.get("rope_type", "default"), []
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "dynamic":  # InternLM2: NTK scaling that starts only past the trained length
        notes.append(
            f"dynamic RoPE scaling has no GGUF form; exact up to the trained length, "
            f"{config.max_position_embeddings} tokens (context_length)"
        )
    elif kind != "default":
        raise ChatforgeError(f"RoPE type {kind!r} is not exported: supported are default, linear and dynamic")
    return notes


def _check_space(out: Path, need: int) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < need + (64 << 20):
        raise ChatforgeError(f"{out.parent}: {out.name} needs {need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free")


def write_file(
    path: Path, arch: str, title: str, dtype: str, model, tokenizer, pieces, entries: list[Entry], progress: bool = True
) -> tuple[list[str], dict]:
    """Write the GGUF file at `path`: metadata and tokenizer first, then the tensors one at a time.

    Returns the notes on what GGUF cannot say and what was written of the tokenizer.
    """

    writer = gguf.GGUFWriter(path, arch)
    try:
        writer.add_type("model")
        writer.add_name(title)
        writer.add_file_type(_file_type(dtype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        notes = write_hparams(writer, model.config, arch)
        vocab = write_vocab(writer, tokenizer, model.config.vocab_size, pieces)
        for e in entries:
            writer.add_tensor_info(e.gguf_name, e.shape, np.float32, e.nbytes, raw_dtype=e.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        state = model.state_dict()
        with tqdm(
            total=sum(e.nbytes for e in entries),
            unit="B",
            unit_scale=True,
            desc=f"write {path.name}",
            disable=not progress,
        ) as bar:
            for e in entries:
                writer.write_tensor_data(tensor_data(state[e.hf_name], e))
                bar.update(e.nbytes)
    finally:
        writer.close()
    return notes, vocab


def export_gguf(
    model_spec: str, out: str | Path, dtype: str = "f16", ollama: bool = False, progress: bool = True
) -> dict:
    """Write `model_spec` (a merged model, alias or .gguf) as one GGUF file at `out`.

    Args:
        dtype: f16 (default), bf16, f32 or q8_0 for the 2-D weights; norms and biases stay f32.
        ollama: also write an Ollama `Modelfile` beside the file (template, stop tokens, system prompt).

    Raises:
        ChatforgeError: an adapter folder (merge it first), an architecture, dtype or tokenizer GGUF
            cannot hold, too little disk space, or a failed write (nothing is left at `out`).
    """

    name, out = gguf_dtype(dtype), Path(out)
    if out.suffix != ".gguf":
        raise ChatforgeError(f"{out}: the output of --format gguf is a file ending in .gguf")
    started = time.perf_counter()
    folder = local_folder(model_spec)  # an adapter folder stops here: merge it first
    arch, originals = architecture(folder)
    tokenizer = load_tokenizer(folder)
    modelfile = None
    if ollama:
        modelfile = modelfile_text(tokenizer, out.name)  # a template Ollama cannot take fails before writing
    config = read_config(folder)
    model = load_model(
        folder, dtype=parse_dtype(config.get("torch_dtype") or config.get("dtype") or "float32"), device="cpu"
    )
    entries = plan(model, arch, _qtype(name))
    _check_space(out, sum(e.nbytes for e in entries))
    try:
        with atomic_path(out) as tmp:
            notes, vocab = write_file(
                tmp,
                arch,
                display_name(model_spec),
                name,
                model,
                tokenizer,
                tokenizer_pieces(originals) if originals else None,
                entries,
                progress,
            )
    except OSError as e:
        reason = e.strerror or f"{e} (is the disk full?)"  # numpy's short-write error carries no errno
        raise ChatforgeError(f"cannot write {out}: {reason}; nothing was left there") from e
    report = {
        "model": str(folder),
        "out": str(out),
        "format": "gguf",
        "architecture": arch,
        "dtype": name,
        "bytes": out.stat().st_size,
        "tensors": len(entries),
        "tokenizer": vocab,
        "notes": notes,
    }
    if modelfile is not None:
        report["modelfile"] = str(write_text(out.with_name("Modelfile"), modelfile))
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report
