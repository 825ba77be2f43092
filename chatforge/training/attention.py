"""Packing-aware attention: a varlen kernel (cu_seqlens) for packed batches, so packed samples never attend
to each other; registered in transformers' AttentionInterface under ATTENTION_NAME."""

from __future__ import annotations

import inspect

import torch

ATTENTION_NAME = "chatforge_varlen"


_VARLEN: tuple = ()  # (varlen_attn, its parameter names), looked up once outside compiled code


def _varlen_call():
    global _VARLEN
    if not _VARLEN:
        from torch.nn.attention.varlen import varlen_attn

        _VARLEN = (varlen_attn, frozenset(inspect.signature(varlen_attn).parameters))
    return _VARLEN


def varlen_attention(
    module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs
):
    """Attention for transformers' AttentionInterface: varlen kernel when cu_seqlens come, else sdpa.

    query/key/value: (batch, heads, seq, dim). Returns (batch, seq, heads, dim), None.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.device.type != "cuda":  # CPU: sdpa with transformers' block-causal mask
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    fn, params = _varlen_call()
    b, hq, s, d = query.shape
    hk = key.size(1)
    q = query.transpose(1, 2).reshape(b * s, hq, d)
    k = key.transpose(1, 2).reshape(b * s, hk, d)
    v = value.transpose(1, 2).reshape(b * s, hk, d)
    extra = {"scale": scaling}
    if hk != hq:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(hq // hk, dim=1), v.repeat_interleave(hq // hk, dim=1)
    if "is_causal" in params:
        extra["is_causal"] = True
    else:
        extra["window_size"] = (-1, 0)
    cu = cu.to(torch.int32)
    mx = int(kwargs.get("max_length_q") or s)
    out = fn(q, k, v, cu, cu, mx, mx, **extra)
    return out.reshape(b, s, hq, d), None


def register_attention() -> str:
    """Register the varlen attention under ATTENTION_NAME (masks as sdpa builds them)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if torch.cuda.is_available():
        _varlen_call()
    AttentionInterface.register(ATTENTION_NAME, varlen_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME


def varlen_available() -> bool:
    try:
        _varlen_call()
    except ImportError:
        return False
    return torch.cuda.is_available()
