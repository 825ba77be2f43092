"""LoRA projections that read the same input run their A matrices as one matmul.

q/k/v read the same normalised hidden states, and so do gate/up. PEFT runs one thin x @ A.T per
projection (rank 64 against 2,048 columns: bound by reading x), and in backward one more read of x
for A's gradient and one hidden-wide write for x's gradient. With a group's A matrices concatenated
each of these runs once per group: 9 fewer of the 42 LoRA matmuls of a Llama layer. Own code, as PEFT
has no such path; measured in docs/speed.md.

The groups are found by running the model once on two tokens and seeing which adapted projections
receive the very same tensor, so no architecture is assumed (a fused qkv projection simply has no
partner; it forms a group of one). The grouped path runs only where it computes what PEFT computes: one
active adapter, vanilla LoRA on linear layers, not merged; otherwise PEFT's own forward runs.

LoRA dropout (XTuner's recipes use 0.1): PEFT draws a mask per projection and keeps it, and the dropped
input, for the backward pass: up to 5 bytes per input element and projection once compiled, 3.2 GiB of a
16.5 GiB peak at 4,096 tokens per micro-batch (InternLM2-1.8B, H200). Here each projection's mask is a hash
of (a per-projection key, a counter that moves every forward, the element's index), recomputed in the
backward pass from the input the group keeps anyway: no memory beyond dropout-free LoRA, and checkpointed
layers recompute the very same masks. Same distribution as PEFT's (independent masks, kept with probability
1 - p, scaled by 1 / (1 - p)); other random numbers, as any compiled dropout has.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B97F4A7C15 % (1 << 62)


def _mix(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) in int64 arithmetic."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & M32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & M32
    return h ^ (h >> 16)


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """_mix in int32: products wrap mod 2**32 as uint32 ones do, right shifts are masked to be logical."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * 0x7FEB352D
    h = h ^ ((h >> 15) & 0x1FFFF)
    h = h * (0x846CA68B - (1 << 32))
    return h ^ ((h >> 16) & 0xFFFF)


def _signed32(v: torch.Tensor) -> torch.Tensor:
    """The low 32 bits of an int64 value, as the int32 with those bits."""
    return (((v & M32) ^ 0x80000000) - 0x80000000).to(torch.int32)


def keep_mask64(x: torch.Tensor, key: torch.Tensor, p: float) -> torch.Tensor:
    """The elements dropout keeps: a hash of (key, element index) at or above p, in int64 arithmetic."""
    idx = torch.arange(x.numel(), device=x.device, dtype=torch.int64).view(x.shape)
    h = _mix(_mix((idx ^ key) & M32) ^ ((key >> 32) & M32))
    return (h & 0xFFFFFF) >= int(p * (1 << 24))


def keep_mask(x: torch.Tensor, key: torch.Tensor, p: float) -> torch.Tensor:
    """keep_mask64, bit for bit; below 2**31 elements in int32 (half the integer work on a GPU)."""
    if x.numel() >= 2**31:
        return keep_mask64(x, key, p)
    idx = torch.arange(x.numel(), device=x.device, dtype=torch.int32).view(x.shape)
    h = _mix32(_mix32(idx ^ _signed32(key)) ^ _signed32(key >> 32))
    return (h & 0xFFFFFF) >= int(p * (1 << 24))


def hash_dropout(x: torch.Tensor, key: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout whose mask is a function of (key, element index): the same key gives the same mask."""
    return torch.where(keep_mask(x, key, p), x * (1.0 / (1.0 - p)), 0.0)


def _dropped_a(x: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor, p: float, sizes: tuple) -> torch.Tensor:
    return torch.cat([F.linear(hash_dropout(x, keys[i], p), w) for i, w in enumerate(weight.split(sizes))], -1)


def dropped_a(x: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor, p: float, sizes: tuple) -> torch.Tensor:
    """x @ A_i.T for each member i of a group, x dropped out by member i's mask; backward keeps only x and the
    weights and hashes the masks again. Measured against keeping the masks as bits (one hash per element, a
    selective-checkpoint policy): in the LoRA recipe on an H200 the recomputed int32 hash was faster,
    55,238 against 53,594 tokens/s, and the int64 hash 53,467 (docs/speed.md)."""
    return checkpoint(_dropped_a, x, weight, keys, p, sizes, use_reentrant=False)


class Clock:
    """The dropout counter: a device tensor moved on in place before each decoder forward (a CUDA graph
    replays that add). A micro-batch's backward pass and checkpoint recomputation come before the next
    forward's tick, so they draw the masks their forward drew."""

    def __init__(self, device):
        self.value = torch.tensor(torch.initial_seed() % (1 << 31), dtype=torch.int64, device=device)

    def tick(self, *_):
        self.value.add_(1)


class Group:
    """Adapted projections fed the same tensor, in call order; holds the group's x @ A.T between
    the first member's call and the last one's."""

    def __init__(self, members: list, clock: Clock, first_key: int):
        self.members = members
        self.u = None
        self.clock = clock
        device = members[0].lora_A[members[0].active_adapters[0]].weight.device
        self.keys = torch.tensor(
            [(first_key + i) * GOLDEN % (1 << 62) for i in range(len(members))], dtype=torch.int64, device=device
        )

    def dropout(self, name: str) -> float:
        """The members' dropout probability now (0 in eval mode or without dropout)."""
        d = self.members[0].lora_dropout[name]
        return d.p if isinstance(d, torch.nn.Dropout) and d.training else 0.0

    def adapter(self) -> str | None:
        """The adapter the grouped path can run now, or None (PEFT's forward runs instead)."""
        names = self.members[0].active_adapters
        if len(names) != 1:
            return None
        name = names[0]
        drops = set()
        for m in self.members:
            d = m.lora_dropout[name] if name in m.lora_dropout else None
            if (
                m.disable_adapters
                or m.merged
                or name not in m.lora_A
                or name in getattr(m, "lora_variant", {})
                or not isinstance(m.lora_A[name], torch.nn.Linear)
                or not isinstance(d, (torch.nn.Identity, torch.nn.Dropout))
            ):
                return None
            drops.add((d.p, d.training) if isinstance(d, torch.nn.Dropout) else (0.0, False))
        return name if len(drops) == 1 else None


def _grouped_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    group = self._chatforge_group
    name = group.adapter() if not args and not kwargs else None
    if name is None or (self is not group.members[0] and group.u is None):
        group.u = None
        return type(self).forward(self, x, *args, **kwargs)
    a = self.lora_A[name]
    if self is group.members[0]:
        xa = self._cast_input_dtype(x, a.weight.dtype) if hasattr(self, "_cast_input_dtype") else x
        weight = torch.cat([m.lora_A[name].weight for m in group.members]) if len(group.members) > 1 else a.weight
        p = group.dropout(name)
        if p > 0:  # the masks are recomputed in backward from (keys, counter), not kept
            keys = group.clock.value * 1000003 + group.keys
            sizes = tuple(m.lora_A[name].out_features for m in group.members)
            group.u = dropped_a(xa, weight, keys, p, sizes)
        else:
            group.u = F.linear(xa, weight)
    start = 0
    for m in group.members:
        if m is self:
            break
        start += m.lora_A[name].out_features
    u = group.u[..., start : start + a.out_features]
    if self is group.members[-1]:
        group.u = None
    result = self.base_layer(x)
    return (result + self.lora_B[name](u) * self.scaling[name]).to(result.dtype)


def lora_linears(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [
        m
        for m in model.modules()
        if isinstance(m, LoraLayer)
        and hasattr(m, "base_layer")
        and any(isinstance(a, torch.nn.Linear) for a in m.lora_A.values())
    ]


def find_groups(model) -> list[list]:
    """Adapted linear layers grouped by the input tensor they receive in one forward (two tokens);
    a projection whose input no other reads is a group of one."""
    seen: list[tuple[torch.Tensor, list]] = []  # the tensors are kept, so identities stay unique

    def record(module, args):
        for tensor, members in seen:
            if tensor is args[0]:
                members.append(module)
                return
        seen.append((args[0], [module]))

    hooks = [m.register_forward_pre_hook(record) for m in lora_linears(model)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[0, 1]], device=device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [members for _, members in seen]


def apply(model) -> int:
    """Give every adapted projection the grouped forward; returns the count of groups of two or more."""
    groups = find_groups(model)
    if not groups:
        return 0
    clock = Clock(next(model.parameters()).device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # the decoder runs once per forward whether the loss calls it directly or through the whole model
    getattr(base, "model", base).register_forward_pre_hook(clock.tick)
    first_key = 1
    for members in groups:
        group = Group(members, clock, first_key)
        first_key += len(members)
        for m in members:
            m._chatforge_group = group
            m.forward = types.MethodType(_grouped_forward, m)
    return sum(len(g) > 1 for g in groups)
