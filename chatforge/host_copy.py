"""Reading GPU values on the host without waiting for later work."""

from __future__ import annotations

from collections.abc import Callable

import torch


def copy_to_host(t: torch.Tensor, into: torch.Tensor | None = None) -> Callable[[], torch.Tensor]:
    """Start copying `t` to pinned host memory (`into`'s first elements if given) behind the work queued so
    far; the returned function waits for that copy alone and gives the host tensor. `float(t)` or
    `t.tolist()` instead waits for everything queued before the read, holding the GIL: a training step's
    time mark came out one step late, and a server's event loop could not stream during a decoding step.
    On the CPU the function returns `t` itself."""
    if not t.is_cuda:
        return lambda: t
    host = into.view(-1)[: t.numel()] if into is not None else torch.empty(t.numel(), dtype=t.dtype, pin_memory=True)
    host = host.view(t.shape)
    host.copy_(t, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> torch.Tensor:
        copied.synchronize()
        return host

    return wait
