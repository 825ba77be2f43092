"""Merge a LoRA adapter into its base model and write a standalone Hugging Face folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from chatforge.files import ChatforgeError, atomic_path, write_json
from chatforge.models import internlm2
from chatforge.models.chat_templates import require, saved_template
from chatforge.models.checks import masked_logits, probe_batch
from chatforge.models.load import load_model, load_tokenizer, local_folder, parse_dtype, read_config, stop_token_ids

log = logging.getLogger(__name__)


def read_adapter_config(adapter: Path) -> dict:
    path = adapter / "adapter_config.json"
    if not path.is_file():
        raise ChatforgeError(f"not a LoRA adapter: {path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ChatforgeError(f"unreadable adapter config {path}: {e}") from e


def template_default_system(tokenizer) -> str | None:
    """The system prompt the chat template injects when a conversation has none, if any."""
    user = [{"role": "user", "content": "x"}]
    marker = "\x00SYSTEM\x00"
    plain = tokenizer.apply_chat_template(user, tokenize=False)
    marked = tokenizer.apply_chat_template([{"role": "system", "content": marker}] + user, tokenize=False)
    head, _, tail = marked.partition(marker)
    if plain.startswith(head) and plain.endswith(tail) and len(plain) > len(head) + len(tail):
        return plain[len(head) : len(plain) - len(tail)]
    return None


def with_default_system(tokenizer, prompt: str) -> str:
    """The chat template with its injected default system prompt replaced by `prompt`.

    Raises:
        ChatforgeError: the template injects no default system prompt to replace.
    """
    current = template_default_system(tokenizer)
    template = tokenizer.chat_template
    if not current or current not in template:
        raise ChatforgeError("the chat template injects no default system prompt to replace")
    return template.replace(current, prompt.replace("'", "\\'"))


def merge(
    adapter: str | Path,
    out: str | Path,
    base: str | None = None,
    max_shard_size: str = "2GB",
    dtype: str = "auto",
    tolerance: float | None = None,
    fmt: str = "hf",
    default_system: str | None = None,
    chat_template: str | None = None,
) -> dict:
    """Merge `adapter` into its base model and save a standalone model folder at `out`.

    The merged weights are checked before the folder is moved into place, on a probe batch in fp32:
    the merge must give the logits of base+adapter, and the saved model, reloaded, those of the merged
    weights rounded to the output dtype (`max_logit_diff` reports how far rounding moved them). `fmt` "hf" writes the
    native layout; "internlm2" writes an InternLM2 base's original layout (fused wqkv, its
    config, tokenizer and remote-code files), for tools that expect it (LMDeploy, the seed's apps).

    The merged folder keeps the chat template: `chat_template` (a built-in name or file) if given, else
    the base model's, else the one training saved beside the adapter (a base model without one).

    `default_system` replaces the system prompt the chat template injects when a conversation has
    none (e.g. SmolLM2's "You are ... named SmolLM"), so a renamed assistant never contradicts it.

    Raises:
        ChatforgeError: not an adapter, missing base model, a format the base cannot take,
            or a logits check that fails.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = Path(adapter)
    adapter_config = read_adapter_config(adapter)  # a clear error if this is no adapter
    base = base or adapter_config.get("base_model_name_or_path")
    if not base:
        raise ChatforgeError(f"{adapter}: the adapter names no base model; pass --base")
    internlm2.check_layout(fmt)
    originals = internlm2.originals(local_folder(base))
    if fmt == "internlm2" and originals is None:
        raise ChatforgeError(f"--format internlm2 needs an InternLM2 base model; {base} is not one")
    tokenizer = load_tokenizer(base, chat_template)
    if not tokenizer.chat_template:
        tokenizer.chat_template = saved_template(adapter)
    require(tokenizer, str(base))
    if default_system is not None:
        tokenizer.chat_template = with_default_system(tokenizer, default_system)
    model = load_model(base, dtype=torch.float32, device="cpu")  # merge in fp32 on the CPU
    config = read_config(local_folder(base))
    out_dtype = parse_dtype(
        dtype if dtype != "auto" else (config.get("torch_dtype") or config.get("dtype") or "float32"), "cpu"
    )
    peft_model = PeftModel.from_pretrained(model, adapter)
    batch = probe_batch(tokenizer)
    expected = masked_logits(peft_model, batch)  # base + adapter, fp32
    merged = peft_model.merge_and_unload()
    scale = max(1.0, float(expected.abs().max()))
    merge_diff = float((masked_logits(merged, batch) - expected).abs().max())
    if not merge_diff <= 1e-3 * scale:  # the merge itself, in fp32: equal to rounding
        raise ChatforgeError(
            f"merge check failed: the merged weights give logits {merge_diff:.3g} away from "
            f"base+adapter in fp32; nothing was written to {out}"
        )
    with torch.no_grad():  # the weights as out_dtype holds them; buffers (rotary tables) stay fp32, as on reload
        for p in merged.parameters():
            p.copy_(p.to(out_dtype))
    intended = masked_logits(merged, batch)
    merged.to(out_dtype)
    merged.generation_config.eos_token_id = stop_token_ids(tokenizer, merged)
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    # The saved folder must give exactly the logits of the weights it was meant to hold: the merged
    # weights rounded to out_dtype, computed in fp32. Rounding itself moves logits (a 16-bit copy of
    # any model does), so it is reported, not judged; a wrong layout, config or shard is caught.
    tolerance = 1e-4 * scale if tolerance is None else tolerance
    out = Path(out)
    with atomic_path(out, is_dir=True) as tmp:
        if fmt == "internlm2":
            internlm2.save_internlm2(merged, tmp, originals, out_dtype, max_shard_size)
        else:
            merged.save_pretrained(tmp, max_shard_size=max_shard_size, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            if originals is not None:  # kept for `chatforge convert --format internlm2` later
                internlm2.copy_originals(originals, tmp / internlm2.ORIGINALS)
        del merged
        reloaded = (
            internlm2.load_model(tmp, dtype=torch.float32)
            if fmt == "internlm2"
            else AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        )
        got = masked_logits(reloaded, batch)
        diff = float((got - intended).abs().max())
        if not diff <= tolerance:
            raise ChatforgeError(
                f"merge check failed: the saved model's logits differ from the merged weights' "
                f"by {diff:.3g} (tolerance {tolerance:.3g}); nothing was written to {out}"
            )
        report = {
            "adapter": str(adapter),
            "base": str(base),
            "format": fmt,
            "dtype": str(out_dtype).replace("torch.", ""),
            "max_logit_diff": float((got - expected).abs().max()),  # saved model vs base+adapter
            "merge_diff": merge_diff,
            "reload_diff": diff,
            "tolerance": tolerance,
            "shards": sorted(p.name for p in tmp.glob("*.safetensors")),
        }
        write_json(tmp / "chatforge_merge.json", report)
    return report
