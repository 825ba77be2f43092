"""CUDA graphs of the decoder layers' training passes: one replay per layer instead of ~100 launches.

LoRA training is bound by the CPU launching kernels, not by the GPU (docs/speed.md: on an H200 the
CPU spent 305 ms launching a step the GPU ran in 267 ms). `torch.cuda.make_graphed_callables`
captures each layer's (compiled) forward and backward once, in training order and in one shared
memory pool, so that later passes are graph replays.

The capture is the library's. What is ours is the glue. A decoder layer is called with keyword
arguments (position embeddings as a tuple, masks, flags), and these are flattened into the
positional tensors the capture needs. A call whose arguments differ from the captured ones falls
back to the layer's plain forward: another shape, no gradient, or generation with a cache.

Limits: a captured layer must run forward then backward, once per micro-batch, as training does.
Gradients of the captured parameters stay allocated (zeroed, not freed, between steps): the backward
graph writes them into fixed buffers, and autograd would otherwise adopt such a buffer as `.grad`,
which the next micro-batch's replay would overwrite.
"""

from __future__ import annotations

import logging

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger("chatforge")


def _describe(leaves: list, spec) -> tuple:
    """What must match for a call to reuse a capture: the argument structure, tensor shapes, dtypes,
    devices and requires_grad, the values of everything else, and the gradient mode."""
    return tuple((tuple(x.shape), x.dtype, x.device, x.requires_grad) if isinstance(x, torch.Tensor) else ("v", x)
                 for x in leaves) + (spec, torch.is_grad_enabled())


class _Positional(torch.nn.Module):
    """A layer called with positional tensors only (what make_graphed_callables captures)."""

    def __init__(self, layer, forward, spec, leaves: list):
        super().__init__()
        self.layer = layer  # registered: its parameters are the graph's parameters
        self._forward, self._spec, self._leaves = forward, spec, list(leaves)
        self._slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]

    def forward(self, *tensors):
        leaves = list(self._leaves)
        for i, t in zip(self._slots, tensors):
            leaves[i] = t
        args, kwargs = tree_unflatten(leaves, self._spec)
        return self._forward(*args, **kwargs)


class LayerGraphs:
    """Routes each decoder layer's calls to its graph replay once captured, else to its forward.

    Capture happens at the first call of layer 0 in training with gradients on: the other layers
    receive arguments of the same kind, so layer 0's arguments are the sample for all of them.
    """

    def __init__(self, layers: list, forwards: list):
        self.layers, self.forwards = layers, forwards
        self.graphed: list | None = None
        self.signatures: list = []
        self.failed = False

    @property
    def active(self) -> bool:
        return self.graphed is not None

    def call(self, index: int, *args, **kwargs):
        if not self.failed:
            leaves, spec = tree_flatten((args, kwargs))
            if self.graphed is None and index == 0 and self._can_capture(leaves):
                self._capture(leaves, spec)
            if (self.graphed is not None and self.layers[index].training
                    and _describe(leaves, spec) == self.signatures[index]):
                return self.graphed[index](*[x for x in leaves if isinstance(x, torch.Tensor)])
        return self.forwards[index](*args, **kwargs)

    def _can_capture(self, leaves: list) -> bool:
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        return (torch.is_grad_enabled() and self.layers[0].training and bool(tensors)
                and all(t.is_cuda for t in tensors) and not torch.cuda.is_current_stream_capturing()
                and not (torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled()))

    def _capture(self, leaves: list, spec) -> None:
        slots = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
        hidden = slots[0]  # the first positional argument: the residual stream
        wrappers, samples, signatures = [], [], []
        needs_grad = leaves[hidden].requires_grad
        for layer, forward in zip(self.layers, self.forwards):
            sample = [x.detach().clone() if isinstance(x, torch.Tensor) else x for x in leaves]
            sample[hidden].requires_grad_(needs_grad)
            wrappers.append(_Positional(layer, forward, spec, sample))
            samples.append(tuple(sample[i] for i in slots))
            signatures.append(_describe(sample, spec))
            needs_grad = needs_grad or any(p.requires_grad for p in layer.parameters())
        try:
            graphed = torch.cuda.make_graphed_callables(tuple(wrappers), tuple(samples))
        except Exception as e:  # an op that cannot be captured: train on, ungraphed
            self.failed = True
            torch.cuda.synchronize()
            log.warning("CUDA graphs of the decoder layers failed (%s: %s); training without them",
                        type(e).__name__, str(e).splitlines()[0][:300])
            return
        for layer in self.layers:  # see the module docstring: gradients stay allocated
            for p in layer.parameters():
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)
        self.graphed, self.signatures = list(graphed), signatures
        log.info("captured CUDA graphs of %d decoder layers", len(self.layers))


def install(layers: list, forwards: list) -> LayerGraphs:
    """Route `layers[i]`'s calls through a LayerGraphs built on `forwards[i]` (their forwards so far)."""
    import functools

    graphs = LayerGraphs(layers, forwards)
    for i, layer in enumerate(layers):
        layer.forward = functools.partial(graphs.call, i)
    return graphs
