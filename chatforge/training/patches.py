"""Apply a speed plan to a model in place: attention, autocast casting, the NF4 matmul, LoRA groups,
activation checkpointing and regional compilation; and the context generation between steps runs in."""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from chatforge.training import lora_groups, nf4
from chatforge.training.attention import ATTENTION_NAME, register_attention
from chatforge.training.speed_plan import Plan, base_of, decoder_layers

COMPILE_BACKEND = "inductor"  # tests count recompilations with "aot_eager" (same guards, no code generation)


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_indices(layers: int, count: int) -> list[int]:
    """Which layers to checkpoint: `count` of them, spread evenly."""
    if count <= 0:
        return []
    return sorted({int(i * layers / count) for i in range(count)})


def apply(model, plan: Plan):
    """Apply a plan to a model in place: attention, autocast casting, checkpointing, compilation."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    base = base_of(model)
    if plan.lora_groups:  # before the autocast setting below: its probe forward runs as PEFT does
        lora_groups.apply(model)
    if plan.attention == "varlen":
        register_attention()
        base.set_attn_implementation(ATTENTION_NAME)
    if plan.autocast:  # fp32 LoRA weights, bf16 matmuls: autocast casts, PEFT must not up-cast inputs
        for m in model.modules():
            if isinstance(m, BaseTunerLayer):
                m.cast_input_dtype_enabled = False
    if plan.nf4_matmul == "torch":
        nf4.patch(model)
    # Checkpointing wraps the compiled forward, not the other way round: a checkpoint traced inside a
    # compiled region leaves recomputation to the compiler's partitioner, which kept most activations
    # (H200, QLoRA micro-batch 8, all 24 layers checkpointed: 25.5 GiB peak where 7.2 were estimated;
    # saved-tensor counts on CPU showed the same). Outside, the compiled layer is simply run again.
    if plan.compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        embed = base.get_input_embeddings()
        if embed is not None and not embed.weight.requires_grad:
            # The first layer's input then requires grad like every other layer's, so the compiled
            # layer has one graph, not a second one for layer 0 (costs layer 0's input gradient).
            base.enable_input_require_grads()
    layers = decoder_layers(model)
    ckpt = set(checkpoint_indices(len(layers), plan.checkpoint_layers))
    for i, layer in enumerate(layers):
        if plan.compile or i in ckpt:  # else the class's forward stays (no bound method stored on the module)
            forward = (
                torch.compile(layer.forward, dynamic=False, backend=COMPILE_BACKEND) if plan.compile else layer.forward
            )
            layer.forward = functools.partial(_checkpointed, forward) if i in ckpt else forward
    return model


@contextlib.contextmanager
def inference(model, plan: Plan):
    """Generation between training steps: compiled layers run eagerly (other shapes), and in the
    training's dtypes (bf16 autocast when fp32 LoRA weights meet bf16 base weights)."""
    device = next(model.parameters()).device.type
    stance = getattr(torch.compiler, "set_stance", None)
    with (
        stance("force_eager") if stance else contextlib.nullcontext(),
        (
            torch.autocast(device, dtype=torch.bfloat16, cache_enabled=False)
            if plan.autocast
            else contextlib.nullcontext()
        ),
    ):  # no cast cache: a captured decoding step outlives the context
        yield
