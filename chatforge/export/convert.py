"""Convert a checkpoint between InternLM2's layout and the native (hf) one, checked on a probe batch."""

from __future__ import annotations

from pathlib import Path

from chatforge.files import ChatforgeError, atomic_path
from chatforge.models import internlm2
from chatforge.models.checks import masked_logits, probe_batch
from chatforge.models.internlm2 import ORIGINALS, originals, save_hf, save_internlm2
from chatforge.models.load import load_model, load_tokenizer, local_folder, parse_dtype, read_config


def convert(
    model_spec: str, out: str | Path, fmt: str = "hf", dtype: str = "auto", max_shard_size: str = "2GB"
) -> dict:
    """Convert a checkpoint between InternLM2's layout and the native one, without training.

    Raises:
        ChatforgeError: unknown format, a model with no InternLM2 files to go back to, or a
            converted model whose logits differ from the source's.
    """
    internlm2.check_layout(fmt)
    folder = local_folder(model_spec)
    source = originals(folder)
    if fmt == "internlm2" and source is None:
        raise ChatforgeError(
            f"{folder}: no InternLM2 config and tokenizer to write back "
            f"(neither an InternLM2 folder nor one with an {ORIGINALS}/ folder)"
        )
    conf = read_config(folder)
    want = parse_dtype(dtype if dtype != "auto" else (conf.get("torch_dtype") or conf.get("dtype") or "float32"), "cpu")
    model = load_model(folder, dtype=want, device="cpu")
    tokenizer = load_tokenizer(folder)
    out = Path(out)
    with atomic_path(out, is_dir=True) as tmp:
        if fmt == "internlm2":
            files = save_internlm2(model, tmp, source, want, max_shard_size)
        else:
            save_hf(model, tokenizer, tmp, source, max_shard_size)
            files = sorted(p.name for p in tmp.glob("*.safetensors"))
        batch = probe_batch(tokenizer)
        reloaded = load_model(tmp, dtype=want, device="cpu")
        diff = float((masked_logits(reloaded, batch) - masked_logits(model, batch)).abs().max())
        if diff != 0.0:
            raise ChatforgeError(f"convert check failed: logits differ by {diff:.3g}; nothing was written to {out}")
    return {
        "model": str(folder),
        "out": str(out),
        "format": fmt,
        "dtype": str(want).replace("torch.", ""),
        "shards": files,
        "max_logit_diff": diff,
    }
