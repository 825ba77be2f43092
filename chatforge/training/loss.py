"""The training loss: summed cross-entropy over trained tokens, with a chunked linear + cross-entropy so the
vocabulary-wide logits (92,544 columns for InternLM2) are never materialised for the whole batch, only for
`chunk_rows` tokens at a time."""

from __future__ import annotations

import contextlib
from typing import get_args

import torch
import torch.nn.functional as F

from chatforge.config import FusedLoss
from chatforge.data.dataset import IGNORE
from chatforge.files import ChatforgeError
from chatforge.training.speed_plan import Plan, default_chunk_rows, lm_parts


def _ce_chunk(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor):
    """Summed CE of one chunk and the gradient of that sum w.r.t. the logits (in h's dtype)."""
    logits = (h @ w.t()).float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = y != IGNORE
    safe = torch.where(valid, y, 0)
    target = logits.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target, 0.0).sum()
    w_valid = valid[:, None].to(logits.dtype)
    grad = torch.exp(logits - lse[:, None]) * w_valid  # softmax - one_hot(target), on trained rows
    grad = grad.scatter_add(1, safe[:, None], -w_valid)
    return loss, grad.to(h.dtype)


_compiled_chunk = None


def _chunk_fn(device_type: str, compiled: bool):
    """The chunk step, compiled on CUDA when the run compiles (fuses up-cast, softmax, one-hot and
    down-cast: one pass)."""
    global _compiled_chunk
    if device_type != "cuda" or not compiled:
        return _ce_chunk
    if _compiled_chunk is None:
        _compiled_chunk = torch.compile(_ce_chunk)  # a second shape makes it dynamic: two compilations at most
    return _compiled_chunk


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum(CE(hidden @ weight.T, labels)) computed chunk by chunk; gradients are made in the forward.

    Own code, pure torch, so it also runs on CPU and needs no extra package. On an H200 it matched
    Liger-Kernel's fused kernel for a frozen head (11.7 vs 11.4 ms) and trailed it for a trained one
    (24.9 vs 21.6 ms), using more memory (docs/speed.md); both avoid the full (tokens x vocab) logits.
    Peak extra memory: chunk_rows x vocab x ~12 bytes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_rows: int, compiled: bool = True):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        step = _chunk_fn(hidden.device.type, compiled)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        w = weight.detach()
        for s in range(0, hidden.size(0), chunk_rows):
            h = hidden[s : s + chunk_rows].detach()
            loss, g = step(h, w.to(h.dtype), labels[s : s + chunk_rows])
            total += loss
            if need_h:
                grad_h[s : s + chunk_rows] = (g @ w.to(g.dtype)).to(hidden.dtype)
            if need_w:
                grad_w += (g.t() @ h.to(g.dtype)).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    backend: str = "chunked",
    chunk_rows: int | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` against `labels` (IGNORE = no loss), in fp32.

    Args:
        hidden: (tokens, hidden) activations, already aligned with `labels`.
        weight: (vocab, hidden) output-layer weight.
        labels: (tokens,) target ids.
        backend: chunked (own), liger (Liger-Kernel's fused kernel) or plain (full logits).
        chunk_rows: tokens per chunk for `chunked`; default from the vocabulary size.
        compiled: compile `chunked`'s chunk step on CUDA.
    Raises:
        ChatforgeError: an unknown backend, or liger without Liger-Kernel installed.
    """
    if backend == "plain":
        logits = (hidden @ weight.t()).float()
        return F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum")
    if backend == "chunked":
        return ChunkedLinearCrossEntropy.apply(
            hidden, weight, labels, chunk_rows or default_chunk_rows(weight.size(0)), compiled
        )
    if backend == "liger":
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError:
            raise ChatforgeError("fused_loss liger needs Liger-Kernel: pip install liger-kernel") from None
        out = liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, reduction="sum")
        return (out[0] if isinstance(out, tuple) else out).float()
    *first, last = get_args(FusedLoss)
    raise ChatforgeError(f"unknown fused_loss {backend!r}: use {', '.join(first)} or {last}")


def shifted_targets(labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Each position's target: the next position's label; IGNORE at each row's end and, in packed rows,
    before every sample's first token (no sample is trained to predict the next one)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    if position_ids is not None:
        targets = torch.where(F.pad(position_ids[:, 1:], (0, 1), value=0) == 0, IGNORE, targets)
    return targets


def rows_cap(trained: int, positions: int, multiple: int) -> int:
    """How many output-layer rows a batch of `positions` with `trained` targets gets: whole multiples of
    `multiple`, at least one, at most every position."""
    return min(positions, -(-max(1, trained) // multiple) * multiple)


def loss_rows(batch: dict, multiple: int = 1, cap: int | None = None) -> torch.Tensor | None:
    """The flattened positions that have a target, for the output layer: made on the CPU with the batch, so
    the GPU gets a fixed count with no sync. Padded to a multiple of `multiple` (the chunk size of compiled
    runs: a few shapes, whole chunks), or cut or padded to `cap` rows, with the batch's last position, which
    never has a target; None where that would be every position.

    Why: only trained positions need the vocabulary-wide output layer and its cross-entropy. In packed
    Huatuo rows that is about 55% of the positions; the output layer of InternLM2 (92,544 columns) is
    about a tenth of a LoRA step's matmul work (docs/speed.md)."""
    targets = shifted_targets(batch["labels"], batch.get("position_ids")).reshape(-1)
    rows = (targets != IGNORE).nonzero().squeeze(1)
    n = targets.numel()
    cap = cap or rows_cap(rows.numel(), n, multiple)
    if cap == n:
        return None
    return F.pad(rows[:cap], (0, max(0, cap - rows.numel())), value=n - 1)


def loss_sum(model, batch: dict, plan: Plan | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE over trained tokens and their count (a 0-dim tensor, so no GPU sync), for plain and
    packed batches.

    Packed batches (position_ids restarting per sample, cu_seqlens) never train a token to predict
    the next sample's first token.
    """
    plan = plan or Plan()
    ids = batch["input_ids"]
    # Targets shifted left with IGNORE at each row's end: the hidden states keep the batch's full width
    # (no slice); the output layer sees the batch's loss_rows, a count fixed on the CPU.
    pos = batch.get("position_ids")
    labels = shifted_targets(batch["labels"], pos)
    kwargs = {"input_ids": ids, "attention_mask": batch.get("attention_mask"), "use_cache": False}
    if pos is not None:
        kwargs["position_ids"] = pos
    cu = batch.get("cu_seqlens")
    if cu is not None and plan.attention == "varlen":
        width = ids.size(1)  # an upper bound, constant per shape: no recompiles per batch
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=width, max_length_k=width)
        if ids.is_cuda:  # the varlen kernel runs (CPU: sdpa with the block mask transformers builds)
            # An empty 4-D mask counts as prepared: transformers skips finding the packed samples in the position
            # ids (a GPU sync, which a CUDA graph cannot hold) and building a block mask varlen never reads.
            kwargs["attention_mask"] = ids.new_empty((ids.size(0), 1, 0, 0), dtype=torch.bool)
    cast = torch.autocast(ids.device.type, dtype=torch.bfloat16) if plan.autocast else contextlib.nullcontext()
    parts = lm_parts(model) if plan.loss != "plain" else None
    with cast:
        if parts is None:
            logits = model(**kwargs).logits.float()
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
            )
        else:
            decoder, head = parts
            hidden = decoder(**kwargs).last_hidden_state
            if plan.autocast:
                hidden = hidden.to(torch.bfloat16)
            weight = head.weight if not plan.autocast else head.weight.to(torch.bfloat16)
            hidden, targets = hidden.reshape(-1, hidden.size(-1)), labels.reshape(-1)
            rows = batch.get("loss_rows")  # only rows with a target meet the output layer (the trainer's batches)
            if rows is None and ids.device.type == "cpu" and not plan.compile:  # other callers, on the CPU
                rows = loss_rows(batch)  # (on a GPU, nonzero would wait for it)
            if rows is not None:
                hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)
            loss = linear_cross_entropy_sum(
                hidden, weight, targets, backend=plan.loss, chunk_rows=plan.chunk_rows or None, compiled=plan.compile
            )
    return loss, (labels != IGNORE).sum()
