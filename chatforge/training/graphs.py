"""One micro-batch's forward and backward replayed as a CUDA graph (recipe key `cuda_graphs`).

Why: with compiled layers and packed rows of one width, the LoRA loop on an H200 is bound by the host.
Launching the ~3,000 kernels of a 4-row micro-batch from Python takes longer than the GPU takes to run
them (docs/speed.md). A graph launches them all in one call. torch.cuda.graph does the capture; this
file does what training needs around it:
- fixed input buffers, one graph per batch shape (packed runs have one or two);
- gradients accumulated in place into tensors kept for the whole run, since a graph writes the
  addresses it was captured with;
- the step's loss scale (1 / trained tokens) as a device value;
- eager runs instead, where a capture fails.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("chatforge")


def shape_key(batch: dict) -> tuple:
    """The graph a batch replays: its tensors' names, shapes and dtypes (the loss reads tensors only)."""
    return tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor))


def _without_rows(key: tuple) -> tuple:
    return tuple(entry for entry in key if entry[0] != "loss_rows")


@contextlib.contextmanager
def plain_rope(model, width: int):
    """Dynamic NTK RoPE (InternLM2's) reads the batch's largest position on the host in every forward, which a
    graph cannot hold. Within the model's original context it is plain RoPE, so it is captured as that;
    rows wider than that context are not captured (RuntimeError: the run stays eager)."""

    def plain(kind):
        return "default" if "dynamic" in kind else kind

    changed = []
    for m in model.modules():
        kind = getattr(m, "rope_type", None)  # a name, or one per layer type
        per_layer = isinstance(kind, dict)
        if not any(isinstance(k, str) and "dynamic" in k for k in (kind.values() if per_layer else [kind])):
            continue
        if width > getattr(m, "original_max_seq_len", 0):
            raise RuntimeError(f"rows of {width} tokens pass dynamic RoPE's original context")
        changed.append((m, kind))
        m.rope_type = {n: plain(k) for n, k in kind.items()} if per_layer else plain(kind)
    try:
        yield
    finally:
        for m, kind in changed:
            m.rope_type = kind


class MicroBatchGraphs:
    """Forward and backward of `engine(batch)` (summed loss, trained tokens), captured per batch shape.

    Args:
        engine: the loss function of one micro-batch (trainer.token_loss_sum bound to the model).
        params: the trained parameters; their gradients become tensors kept by this object.
        model: the model the engine runs.
    """

    def __init__(self, engine, params: list[torch.Tensor], model):
        self.engine, self.params, self.model = engine, params, model
        self.graphs: dict[tuple, tuple] = {}  # shape key -> (graph, input buffers, loss buffer)
        self.grads: list[torch.Tensor] = []
        self.scale = torch.zeros((), dtype=torch.float32, device=params[0].device)
        self.pool, self.stream = None, None
        self.failed = ""  # why the run went eager, if a capture failed

    def _attach(self) -> None:
        """Point every parameter's .grad at its kept tensor (the optimizer step sets them to None)."""
        if not self.grads:
            self.grads = [torch.zeros_like(p) for p in self.params]
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                p.grad = g

    def _run_eager(self, batch: dict) -> torch.Tensor:
        loss_sum, _ = self.engine(batch)
        (loss_sum * self.scale).backward()
        return loss_sum.detach()

    def _capture(self, batch: dict) -> None:
        """Warm up on a side stream (compilation, library handles), then record one micro-batch. Both
        add to the kept gradients; accumulate() zeroes them after. A shape that differs from a captured one
        in the output layer's row count alone (loss_rows) skips the warm-up: it runs the same compiled code,
        and a warm-up outside the graphs' pool would add its activations to the memory reserved (27.6
        against 16.6 GiB with three row counts on the medical LoRA recipe, H200)."""
        key = shape_key(batch)
        inputs = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        static = {**batch, **inputs}
        # Warm-up and capture on one stream: autograd keeps each parameter's gradient-accumulation node,
        # made on the stream of its first forward, and one on another stream would sync the capture away.
        side = self.stream = self.stream or torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        if _without_rows(key) not in {_without_rows(k) for k in self.graphs}:
            with torch.cuda.stream(side):
                self._run_eager(static)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.empty_cache()  # the warm-up's freed activations: the graph's pool takes their place
        graph = torch.cuda.CUDAGraph()
        self.pool = self.pool or torch.cuda.graph_pool_handle()  # one graph runs at a time; outputs are
        # copied right after each replay, so the graphs can share their memory
        width = batch["input_ids"].size(-1)
        with (
            plain_rope(self.model, width),
            torch.cuda.graph(graph, pool=self.pool, stream=side, capture_error_mode="thread_local"),
        ):
            loss = self._run_eager(static)
        self.graphs[key] = (graph, inputs, loss)

    def capture(self, batches: list[dict]) -> None:
        """Capture the batches' shapes that have no graph yet. Their runs add to the kept gradients, which
        accumulate() zeroes before a step."""
        self._attach()
        new = {} if self.failed else {shape_key(b): b for b in batches}
        for b in [b for k, b in new.items() if k not in self.graphs]:
            try:
                self._capture(b)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # a host sync or an op CUDA cannot capture: the rest of the run is eager
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                log.warning("training step not captured as a CUDA graph (%s); running it eagerly", self.failed)
                self.graphs = {}
                break

    def accumulate(self, batches: list[dict], n_trained: int) -> torch.Tensor:
        """Forward and backward of one step's micro-batches, gradients scaled by 1 / n_trained and summed
        into the parameters' .grad; returns the summed loss (a tensor: no GPU sync)."""
        self.capture(batches)
        keys = [shape_key(b) for b in batches]
        torch._foreach_zero_(self.grads)
        self.scale.fill_(1.0 / max(1, n_trained))
        losses = []
        for k, b in zip(keys, batches):
            entry = self.graphs.get(k)
            if entry is None:
                losses.append(self._run_eager(b))
                continue
            graph, inputs, loss = entry
            for k, t in inputs.items():
                t.copy_(b[k], non_blocking=True)
            graph.replay()
            losses.append(loss.clone())  # before another graph of the shared pool runs
        return torch.stack(losses).sum()

    def status(self) -> str:
        """For metrics.json: how many batch shapes replay as graphs, or why the run stayed eager."""
        return f"eager: capture failed ({self.failed})" if self.failed else f"{len(self.graphs)} shape(s) replayed"
