"""The speed plan of a training run: GPU speed levers, each chosen automatically ("auto") and each switchable,
from the model's shape and a memory model. The levers live beside it: loss.py, attention.py, patches.py.

- a chunked linear + cross-entropy: the vocabulary-wide logits (92,544 columns for InternLM2) are
  never materialised for the whole batch, only for `chunk_rows` tokens at a time;
- bf16 autocast with fp32 LoRA weights (PEFT's per-layer input up-casting switched off);
- regional torch.compile (each decoder layer, compiled once and reused for all layers);
- selective activation checkpointing (only as many layers as the memory budget needs);
- a memory-budget micro-batch chooser (the optimizer step keeps its samples: accumulation is exact);
- varlen attention for packed batches (cu_seqlens), so packed samples never attend to each other;
- LoRA projections fed the same input (q/k/v, gate/up) share one A matmul (lora_groups.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import get_args

import torch

from chatforge.config import FusedLoss, Nf4Matmul
from chatforge.files import ChatforgeError
from chatforge.training.attention import varlen_available

GIB = 2**30


# ---------------------------------------------------------------- model parts


def base_of(model):
    """The transformers model under a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def lm_parts(model):
    """(decoder, output layer) when the loss can skip the full logits; None for unusual heads."""
    base = base_of(model)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = getattr(base, "model", None)
    cfg = getattr(base, "config", None)
    special = any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale", "output_multiplier"))
    if (
        type(head) is not torch.nn.Linear
        or head.bias is not None
        or decoder is None
        or special
        or not hasattr(decoder, "layers")
    ):
        return None
    return decoder, head


def varlen_misses(model, seq: int) -> str:
    """What of this model's attention the varlen kernel, called plainly causal (attention.py), would not compute
    over rows of `seq` tokens: logit softcapping (Gemma 2), a sliding window shorter than the rows (Gemma 3's
    local layers, Mistral v0.1 past 4,096). Empty where it computes it all; such models attend through sdpa,
    whose masks transformers builds with the window."""
    cfg = getattr(base_of(model), "config", None)
    if getattr(cfg, "attn_logit_softcapping", None):
        return f"attention logit softcapping ({cfg.attn_logit_softcapping})"
    window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
    if window and window < seq:
        return f"a sliding window of {window} tokens, shorter than max_length {seq}"
    return ""


def decoder_layers(model):
    base = base_of(model)
    layers = getattr(getattr(base, "model", None), "layers", None)
    return list(layers) if layers is not None else []


# ---------------------------------------------------------------- memory model and the chooser


def default_chunk_rows(vocab: int, target_bytes: int = 512 * 2**20) -> int:
    """Rows per chunk so that one chunk's fp32 logits take about `target_bytes` (a power of two)."""
    rows = max(1, target_bytes // (4 * vocab))
    return max(64, 2 ** int(math.log2(rows)))


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int


def shape_of(model) -> Shape:
    c = base_of(model).config
    heads = c.num_attention_heads
    return Shape(
        c.hidden_size,
        c.num_hidden_layers,
        heads,
        getattr(c, "num_key_value_heads", None) or heads,
        c.intermediate_size,
        c.vocab_size,
    )


# Saved activations per token and layer, in bytes, for a bf16 Llama-layout layer with flash attention:
# 6 hidden-wide (layer input, attention input, q, attention output, MLP input, norm) + 2 kv-wide (k, v)
# + 3 ffn-wide (gate, up, their product) tensors of 2 bytes. The factors scale this count to the peaks
# measured on an H200 (torch 2.11; InternLM2-1.8B shape, docs/speed.md): compiled LoRA/full runs
# came out within 4% of the count; eager keeps more (fp32 norm copies), 1.4 is a safe upper figure.
ACT_FACTOR = {"compiled": 1.0, "eager": 1.4}
RESERVE_BYTES = int(0.5 * GIB)  # allocator slack and library workspaces (max_memory_allocated counts)
# Fixed cost of one micro-batch (Python, launches, per-call dequantisation) in token-equivalents: a
# micro-batch of T tokens runs at 1 / (1 + OVERHEAD / T) of the ideal rate. bitsandbytes NF4 layers
# measured ~5x slower per token than bf16 LoRA at one 2,048-token sequence (H200), hence its large figure;
# the plain-torch NF4 path (nf4.py) dequantises each weight ~3 times per micro-batch, a fixed cost too
# (a rough figure, not fitted: with it the chooser took micro-batch 8 / 24 checkpointed layers at 8 GiB,
# 40.5k tokens/s, against 39.3k for micro-batch 4 / 20 layers; H200, docs/speed.md).
OVERHEAD_TOKENS = {"compiled": 1024, "eager": 4096, "nf4": 8192, "nf4_torch": 2048}


def act_bytes_per_token(shape: Shape, compiled: bool, dropout_bytes: float = 0.0) -> float:
    """Activation bytes a layer keeps per token; `dropout_bytes`: what LoRA dropout keeps per element of each
    adapted projection's input (PEFT: a dropped-out copy, 2; lora_groups.py: nothing)."""
    kv = shape.hidden // shape.heads * shape.kv_heads
    per_layer = 2 * (6 * shape.hidden + 2 * kv + 3 * shape.ffn)
    per_layer += dropout_bytes * (6 * shape.hidden + shape.ffn)
    return per_layer * ACT_FACTOR["compiled" if compiled else "eager"]


def is_quantized(model) -> bool:
    return any(p.element_size() == 1 and not p.requires_grad for p in model.parameters())


def static_bytes(model, loss: str = "chunked") -> int:
    """Weights, gradients and AdamW states (same dtype as each trainable parameter), plus the fp32
    output-layer gradient the chunked loss accumulates when that layer trains."""
    total = 0
    for p in model.parameters():
        b = p.numel() * p.element_size()
        total += b * (4 if p.requires_grad else 1)
        if not p.requires_grad and p.element_size() == 1:  # 4-bit: absmax and double-quant tables
            total += b // 16
    parts = lm_parts(model)
    if loss == "chunked" and parts is not None and parts[1].weight.requires_grad:
        total += parts[1].weight.numel() * 4
    return total


def estimate_bytes(
    shape: Shape,
    static: int,
    tokens: int,
    ckpt_layers: int,
    compiled: bool,
    loss: str,
    dropout_bytes: float = 0.0,
    chunk_rows: int = 0,
) -> int:
    """Peak GPU bytes of one training micro-batch of `tokens` tokens."""
    a = act_bytes_per_token(shape, compiled, dropout_bytes)
    kept = (shape.layers - ckpt_layers) * a + ckpt_layers * 2 * shape.hidden
    recompute = a if ckpt_layers else 0.0
    if loss == "plain":
        head = tokens * shape.vocab * 12.0
    else:
        rows = chunk_rows or default_chunk_rows(shape.vocab)
        head = min(rows, tokens) * shape.vocab * 12.0 + tokens * shape.hidden * 6.0
    return int(static + tokens * (kept + recompute) + head + 4 * tokens * shape.hidden * 2 + RESERVE_BYTES)


def relative_cost(shape: Shape, tokens: int, ckpt_layers: int, overhead_tokens: int, recompute: float) -> float:
    """Time per token relative to the ideal: recomputation and the fixed cost per micro-batch."""
    return (1 + recompute * ckpt_layers / shape.layers) * (1 + overhead_tokens / tokens)


def choose_micro_batch(
    shape: Shape,
    static: int,
    seq: int,
    global_batch: int,
    budget: int,
    compiled: bool,
    loss: str,
    dropout_bytes: float = 0.0,
    checkpointing: str | bool = "auto",
    chunk_rows: int = 0,
    overhead_tokens: int = 1024,
    recompute: float = 0.5,
) -> tuple[int, int]:
    """(micro-batch, checkpointed layers) for the memory budget, cheapest by `relative_cost`.

    For each micro-batch dividing the global batch (no odd-sized last micro-batch) it takes the fewest
    checkpointed layers that fit, then the pair with the lowest time per token (recomputing a layer
    costs `recompute` of its time: 1/2 for LoRA, 1/3 for full training). Checkpointing true: every
    layer; false: none (the smallest micro-batch is taken even if it does not fit; the plan's estimate
    says so).
    """
    divisors = [m for m in range(global_batch, 0, -1) if global_batch % m == 0]
    if checkpointing is True:
        options = [shape.layers]
    elif checkpointing is False:
        options = [0]
    else:
        options = range(0, shape.layers + 1)
    best = None
    for m in divisors:
        k = next(
            (
                k
                for k in options
                if estimate_bytes(shape, static, m * seq, k, compiled, loss, dropout_bytes, chunk_rows) <= budget
            ),
            None,
        )
        if k is None:
            continue
        cost = relative_cost(shape, m * seq, k, overhead_tokens, recompute)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, m, k)
    return (best[1], best[2]) if best else (1, options[-1])


# ---------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The speed settings of one run (what `auto` resolved to)."""

    seq: int = 0  # the widest row the memory plan budgets for
    micro_batch: int = 0  # 0: the recipe's batch_size
    checkpoint_layers: int = 0
    compile: bool = False
    loss: str = "chunked"  # chunked | liger | plain
    chunk_rows: int = 0
    attention: str = "sdpa"  # sdpa | varlen
    nf4_matmul: str = ""  # QLoRA only: torch (nf4.py, compilable) | bitsandbytes
    lora_groups: bool = False  # LoRA: one A matmul per group of projections with the same input
    cuda_graphs: bool = False  # each micro-batch's forward and backward replayed as a CUDA graph (graphs.py)
    autocast: bool = False
    budget_gib: float = 0.0
    estimate_gib: float = 0.0

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self).items())


def _auto(value, default):
    return default if value in (None, "auto") else value


def device_budget(device: str, value) -> int:
    """Bytes the run may use: the recipe's memory_budget_gib, else 92% of the card's free memory (with what
    torch's allocator holds in reserve, such as a replay model's freed weights)."""
    if value not in (None, "auto"):
        return int(float(value) * GIB)
    if device != "cuda":
        return 1 << 62
    free, _total = torch.cuda.mem_get_info()
    return int(0.92 * (free + torch.cuda.memory_reserved()))


# torch.compile pays for itself only on long runs: compiling the decoder layer takes some 15-30 s on an
# H200 and saves about a third of the step time (docs/speed.md). `compile: auto` compiles when the
# run's model FLOPs (4 x linear parameters per token for adapters, 6 for full training) reach this:
# about 30 s of eager training at ~300 TFLOP/s, so short runs (tests, identity demos) start at once.
COMPILE_MIN_FLOPS = 1e16


def linear_params(shape: Shape) -> int:
    kv = shape.hidden // shape.heads * shape.kv_heads
    return (
        shape.layers * (2 * shape.hidden**2 + 2 * shape.hidden * kv + 3 * shape.hidden * shape.ffn)
        + shape.vocab * shape.hidden
    )


def worth_compiling(shape: Shape, method: str, run_tokens: float) -> bool:
    return (6 if method == "full" else 4) * linear_params(shape) * run_tokens >= COMPILE_MIN_FLOPS


def make_plan(
    model,
    *,
    device: str,
    method: str,
    seq: int,
    global_batch: int,
    micro_batch="auto",
    checkpointing="auto",
    compile="auto",
    fused_loss="auto",
    attention="auto",
    memory_budget_gib="auto",
    packing: bool = False,
    lora_dropout: float = 0.0,
    nf4_matmul="auto",
    lora_groups="auto",
    cuda_graphs="auto",
    run_tokens: float = float("inf"),
) -> Plan:
    """Resolve the `auto` speed keys for this model, device and data shape.

    Args:
        run_tokens: tokens the whole run trains on (`compile: auto` compiles long runs only).
    Raises:
        ChatforgeError: an explicit choice the environment cannot run (liger missing, varlen on CPU).
    """
    cuda = device == "cuda"
    plan = Plan(seq=seq)
    # bf16 autocast where fp32 LoRA weights meet 16-bit base weights (QLoRA computes in bf16); an fp32
    # base (dtype: fp32) trains in fp32 throughout
    half = next(model.parameters()).dtype in (torch.bfloat16, torch.float16)
    plan.autocast = cuda and (method == "qlora" or method == "lora" and half)
    shape = shape_of(model)
    plan.compile = bool(_auto(compile, cuda and worth_compiling(shape, method, run_tokens)))
    # With dropout the grouped path recomputes its masks (lora_groups.py): worth it once compiled, where
    # the hash fuses into one kernel; eager runs keep PEFT's dropout.
    plan.lora_groups = bool(_auto(lora_groups, method in ("lora", "qlora") and (lora_dropout == 0 or plan.compile)))
    dropout_bytes = 2.0 if lora_dropout and not plan.lora_groups else 0.0
    # chunked: the backend measured in full training runs (docs/speed.md); liger is selectable and may win.
    plan.loss = _auto(fused_loss, "chunked" if lm_parts(model) is not None else "plain")
    if plan.loss not in get_args(FusedLoss):
        raise ChatforgeError(f"recipe key 'fused_loss': {plan.loss!r} is not one of {', '.join(get_args(FusedLoss))}")
    if plan.loss == "liger" and not cuda:
        raise ChatforgeError("fused_loss liger runs on CUDA only")
    budget = device_budget(device, memory_budget_gib)
    plan.budget_gib = round(budget / GIB, 2) if budget < 1 << 60 else 0.0
    static = static_bytes(model, plan.loss)
    overhead = OVERHEAD_TOKENS["compiled" if plan.compile else "eager"]
    if is_quantized(model):
        plan.nf4_matmul = _auto(nf4_matmul, "torch")
        if plan.nf4_matmul not in get_args(Nf4Matmul):
            *first, last = get_args(Nf4Matmul)
            raise ChatforgeError(f"nf4_matmul {plan.nf4_matmul!r}: use {', '.join(first)} or {last}")
        overhead = OVERHEAD_TOKENS["nf4_torch" if plan.nf4_matmul == "torch" else "nf4"]
    # CUDA graphs need a few fixed batch shapes (the trainer then pads packed rows to max_length and unpacked
    # ones to power-of-two widths, each sample its own varlen segment: no padding mask, whose checks sync) and
    # gradients kept between steps (small for adapters; a full run's would add the model's size to the peak).
    # auto: LoRA, compiled or eager (a short eager run of a small model is bound by launching its kernels:
    # docs/speed.md). QLoRA takes `true`: its graphs ran on an H200 (31,168 tokens/s on Huatuo), but never beside
    # graph-free QLoRA in one invocation, so no measured gain makes them the default.
    # varlen's flash kernel computes in bf16/fp16 only: an fp32 run (dtype: fp32) attends through sdpa
    misses = varlen_misses(model, seq)
    why_not_varlen = (
        "needs a CUDA GPU and torch.nn.attention.varlen (torch >= 2.10)"
        if not (cuda and varlen_available())
        else f"cannot compute this model's {misses}: use attention=sdpa"
        if misses
        else "computes in bf16 or fp16: not with dtype fp32 (use attention=sdpa)"
        if not (half or plan.autocast)
        else ""
    )
    graphable = cuda and method in ("lora", "qlora") and plan.nf4_matmul != "bitsandbytes"
    plan.cuda_graphs = bool(_auto(cuda_graphs, graphable and method == "lora" and not why_not_varlen))
    if plan.cuda_graphs and not graphable:
        raise ChatforgeError("recipe key 'cuda_graphs': true needs CUDA, method lora or qlora and nf4_matmul torch")
    want_varlen = _auto(attention, "varlen" if (packing or plan.cuda_graphs) and not why_not_varlen else "sdpa")
    if want_varlen == "varlen" and why_not_varlen:
        raise ChatforgeError(f"attention varlen {why_not_varlen}")
    plan.attention = want_varlen
    rc = 1 / 3 if method == "full" else 1 / 2
    if not cuda:  # no budget to fit: the recipe's batch_size, checkpointing only when asked
        plan.micro_batch = 0 if micro_batch in (None, "auto") else int(micro_batch)
        plan.checkpoint_layers = shape.layers if checkpointing is True else 0
        return plan
    if micro_batch not in (None, "auto"):  # the micro-batch is fixed: only checkpointing can make it fit
        plan.micro_batch = int(micro_batch)
        fits = [
            k
            for k in range(shape.layers + 1)
            if estimate_bytes(shape, static, plan.micro_batch * seq, k, plan.compile, plan.loss, dropout_bytes)
            <= budget
        ]
        plan.checkpoint_layers = {True: shape.layers, False: 0}.get(checkpointing, fits[0] if fits else shape.layers)
    else:
        plan.micro_batch, plan.checkpoint_layers = choose_micro_batch(
            shape,
            static,
            seq,
            global_batch,
            budget,
            plan.compile,
            plan.loss,
            dropout_bytes,
            checkpointing if checkpointing in (True, False) else "auto",
            overhead_tokens=overhead,
            recompute=rc,
        )
    need = estimate_bytes(
        shape, static, plan.micro_batch * seq, plan.checkpoint_layers, plan.compile, plan.loss, dropout_bytes
    )
    plan.estimate_gib = round(need / GIB, 2)
    if need > budget:
        logging.getLogger("chatforge").warning(
            "memory budget %.1f GiB is below the estimated %.1f GiB of micro-batch %d with %d checkpointed "
            "layers: the run may run out of GPU memory (lower max_length or use qlora)",
            budget / GIB,
            need / GIB,
            plan.micro_batch,
            plan.checkpoint_layers,
        )
    return plan


def plan_for_recipe(model, cfg, device: str, run_tokens: float = float("inf"), seq: int | None = None) -> Plan:
    """make_plan from a TrainConfig (step = batch_size x grad_accum).

    Args:
        seq: the widest row the data makes (default max_length); short unpacked samples (identity data) then
            budget for their own width, not max_length's: bigger micro-batches, no needless checkpointing.
    """
    return make_plan(
        model,
        device=device,
        method=cfg.method,
        seq=seq or cfg.max_length,
        run_tokens=run_tokens,
        global_batch=cfg.batch_size * cfg.grad_accum,
        micro_batch=cfg.micro_batch,
        checkpointing=cfg.gradient_checkpointing,
        compile=cfg.compile,
        fused_loss=cfg.fused_loss,
        attention=cfg.attention,
        memory_budget_gib=cfg.memory_budget_gib,
        packing=cfg.packing,
        lora_dropout=cfg.lora.dropout if cfg.method != "full" else 0.0,
        nf4_matmul=cfg.nf4_matmul,
        lora_groups=cfg.lora_groups,
        cuda_graphs=cfg.cuda_graphs,
    )
