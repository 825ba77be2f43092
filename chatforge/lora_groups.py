"""LoRA projections that read the same input run their A matrices as one matmul.

q/k/v read the same normalised hidden states, and so do gate/up. PEFT runs one thin x @ A.T per
projection (rank 64 against 2,048 columns: bound by reading x), and in backward one more read of x
for A's gradient and one hidden-wide write for x's gradient. With a group's A matrices concatenated
each of these runs once per group: 9 fewer of the 42 LoRA matmuls of a Llama layer. Own code, as PEFT
has no such path; measured in docs/speed.md.

The groups are found by running the model once on two tokens and seeing which adapted projections
receive the very same tensor, so no architecture is assumed (a fused qkv projection simply has no
partner). The grouped path runs only where it computes what PEFT computes: one active
adapter, vanilla LoRA on linear layers, no dropout, not merged; otherwise PEFT's own forward runs.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


class Group:
    """Adapted projections fed the same tensor, in call order; holds the group's x @ A.T between
    the first member's call and the last one's."""

    def __init__(self, members: list):
        self.members = members
        self.u = None

    def adapter(self) -> str | None:
        """The adapter the grouped path can run now, or None (PEFT's forward runs instead)."""
        names = self.members[0].active_adapters
        if len(names) != 1:
            return None
        name = names[0]
        for m in self.members:
            if (m.disable_adapters or m.merged or name not in m.lora_A or name in getattr(m, "lora_variant", {})
                    or not isinstance(m.lora_A[name], torch.nn.Linear)
                    or not isinstance(m.lora_dropout[name], torch.nn.Identity)):
                return None
        return name


def _grouped_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    group = self._chatforge_group
    name = group.adapter() if not args and not kwargs else None
    if name is None or (self is not group.members[0] and group.u is None):
        group.u = None
        return type(self).forward(self, x, *args, **kwargs)
    a = self.lora_A[name]
    if self is group.members[0]:
        xa = self._cast_input_dtype(x, a.weight.dtype) if hasattr(self, "_cast_input_dtype") else x
        group.u = F.linear(xa, torch.cat([m.lora_A[name].weight for m in group.members]))
    start = 0
    for m in group.members:
        if m is self:
            break
        start += m.lora_A[name].out_features
    u = group.u[..., start:start + a.out_features]
    if self is group.members[-1]:
        group.u = None
    result = self.base_layer(x)
    return (result + self.lora_B[name](u) * self.scaling[name]).to(result.dtype)


def lora_linears(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")
            and any(isinstance(a, torch.nn.Linear) for a in m.lora_A.values())]


def find_groups(model) -> list[list]:
    """Adapted linear layers that receive the very same input tensor in one forward (two tokens)."""
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
    return [members for _, members in seen if len(members) > 1]


def apply(model) -> int:
    """Give the members of every shared-input group the grouped forward; returns the group count."""
    groups = find_groups(model)
    for members in groups:
        group = Group(members)
        for m in members:
            m._chatforge_group = group
            m.forward = types.MethodType(_grouped_forward, m)
    return len(groups)
