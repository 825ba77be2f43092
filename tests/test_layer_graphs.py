"""CPU checks of chatforge's CUDA-graph glue (chatforge/layer_graphs.py).

The capture itself needs a GPU; it is measured by bench/train_speed.py (graphs=1) on the device.
Here torch.cuda.make_graphed_callables is replaced by a stand-in that records its samples and
returns the flattened layers, so what is checked is chatforge's part: flattening the layers'
keyword arguments, each layer's sample requires_grad, routing and fallback, kept gradients.
"""
import pytest
import torch

from chatforge import fastpath as fp
from chatforge import layer_graphs
from chatforge.files import ChatforgeError
from test_fastpath import batch_with_padding, tiny_llama


def lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(tiny_llama(layers=3), LoraConfig(r=4, target_modules="all-linear",
                                                             init_lora_weights=False))


@pytest.fixture
def stand_in(monkeypatch):
    seen = {"samples": None, "replays": 0}

    def make_graphed_callables(callables, samples):
        seen["samples"] = samples

        def replay(c):
            def f(*tensors):
                seen["replays"] += 1
                return c(*tensors)
            return f
        return tuple(replay(c) for c in callables)

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", make_graphed_callables)
    monkeypatch.setattr(layer_graphs.LayerGraphs, "_can_capture", lambda self, leaves: True)
    return seen


def loss_and_grads(model, batch):
    loss, _ = fp.loss_sum(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_graphed_layers_route_and_match_plain_layers(stand_in):
    b = batch_with_padding()
    ref_loss, ref_grads = loss_and_grads(lora_model(), b)
    model = fp.apply(lora_model(), fp.Plan(cuda_graphs=True))
    assert not fp.keeps_grads(model)  # nothing captured yet
    loss, grads = loss_and_grads(model, b)
    assert stand_in["replays"] == 3 and fp.keeps_grads(model)
    # layer 0 gets the frozen embeddings' output; later layers get outputs of layers with adapters
    assert [s[0].requires_grad for s in stand_in["samples"]] == [False, True, True]
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for n, g in ref_grads.items():
        assert torch.allclose(grads[n], g, rtol=1e-5, atol=1e-7), n
    # a second micro-batch accumulates into the kept gradients
    loss_and_grads(model, b)
    for n, g in ref_grads.items():
        assert torch.allclose(model.get_parameter(n).grad, 2 * g, rtol=1e-5, atol=1e-7), n


def test_other_shapes_no_grad_and_eval_fall_back(stand_in):
    b = batch_with_padding()
    model = fp.apply(lora_model(), fp.Plan(cuda_graphs=True))
    loss_and_grads(model, b)
    assert stand_in["replays"] == 3
    short = {k: v[:, :-2] for k, v in b.items()}
    ref = lora_model()
    assert fp.loss_sum(model, short)[0].item() == pytest.approx(fp.loss_sum(ref, short)[0].item(), rel=1e-6)
    with torch.no_grad():
        fp.loss_sum(model, b)
    model.eval()
    fp.loss_sum(model, b)
    assert stand_in["replays"] == 3  # none of these replayed a graph


def test_graph_keys_resolve_and_refuse_what_cannot_work():
    model = tiny_llama()
    assert not fp.make_plan(model, device="cpu", method="lora", seq=64, global_batch=2).cuda_graphs
    with pytest.raises(ChatforgeError, match="cuda_graphs true needs a CUDA GPU"):
        fp.make_plan(model, device="cpu", method="lora", seq=64, global_batch=2, cuda_graphs=True)
    from chatforge.config import TrainConfig
    from chatforge.distributed import Parallel

    par = Parallel(rank=0, world=2, strategy="fsdp2")
    assert par.plan_config(TrainConfig(batch_size=2), 1).cuda_graphs is False
    with pytest.raises(ChatforgeError, match="cuda_graphs true does not work with strategy fsdp2"):
        par.plan_config(TrainConfig(batch_size=2, cuda_graphs=True), 1)
    assert Parallel(rank=0, world=2, strategy="ddp").plan_config(TrainConfig(batch_size=2), 1).cuda_graphs == "auto"


def test_graph_buffers_count_in_the_memory_estimate():
    shape = fp.Shape(2048, 24, 16, 8, 8192, 92544)
    plain = fp.estimate_bytes(shape, 0, 8192, 0, True, "chunked")
    graphed = fp.estimate_bytes(shape, 0, 8192, 0, True, "chunked", graphs=True)
    assert graphed - plain == 3 * 24 * 8192 * 2048 * 2
    assert fp.estimate_bytes(shape, 0, 8192, 4, True, "chunked", graphs=True) == \
        fp.estimate_bytes(shape, 0, 8192, 4, True, "chunked")  # checkpointed runs are never graphed
