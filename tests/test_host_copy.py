"""Host reads of device values: the values, the order, None kept (on a GPU too: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

from chatforge.host_copy import copy_to_host
from chatforge.training.trainer import read_later

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
    ),
]


@pytest.mark.parametrize("device", DEVICES)
def test_copy_to_host_gives_the_values_into_a_kept_buffer(device):
    into = torch.zeros(8, dtype=torch.long, pin_memory=device == "cuda")
    t = torch.arange(5, device=device) * 3
    got = copy_to_host(t, into if device == "cuda" else None)()
    assert got.device.type == "cpu" and got.tolist() == [0, 3, 6, 9, 12]
    if device == "cuda":
        assert got.data_ptr() == into.data_ptr()
        big = torch.randn(64, 32, device=device)
        torch.testing.assert_close(copy_to_host(big)(), big.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_read_later_reads_the_values_queued_before_it(device):
    loss = torch.tensor(2.5, device=device)
    read = read_later([loss, None, 3, torch.tensor([1.25], device=device)])
    if device == "cuda":
        loss += 1  # queued after the copy: not seen
    assert read() == [2.5, None, 3.0, 1.25]
