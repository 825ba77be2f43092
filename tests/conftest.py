"""Shared fixtures: the real default model (dequantised once) and a tiny random llama."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from chatforge.cli.main import set_environment

set_environment()  # the defaults `chatforge` sets, for tests that call the library directly
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each (and their children),
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # as OpenMP threads fighting for cores run many times slower
ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    """A script of bench/ imported as a module (its writers and helpers serve the tests too)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pytest_collection_modifyitems(config, items):
    """The real-model tests first: under two workers (pyproject's addopts) their minutes run beside the rest."""
    items.sort(key=lambda item: "test_real_model.py" not in item.nodeid)


@pytest.fixture(scope="session")
def smol_folder() -> Path:
    from chatforge.models.load import DEFAULT_MODEL, local_folder

    return local_folder(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def smol_tokenizer(smol_folder):
    from chatforge.models.load import load_tokenizer

    return load_tokenizer(str(smol_folder))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smol_tokenizer) -> Path:
    """A 2-layer random llama with the default model's tokenizer and chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=smol_tokenizer.bos_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def cli_env(**extra) -> dict:
    """The environment of a `python -m chatforge` child: this checkout first on the path (then any
    PYTHONPATH already set, e.g. carried wheels on the GPU machine), no hub."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", **extra)


def run_cli(*args, cwd=None, timeout=600, input=None) -> subprocess.CompletedProcess:
    """Run `python -m chatforge ARGS` and capture its output."""
    env = cli_env()
    return subprocess.run(
        [sys.executable, "-m", "chatforge", *map(str, args)],
        cwd=cwd,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def call_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """`chatforge ARGS` in this process, output captured: for commands that stop before loading a model,
    without the seconds of a new interpreter importing torch."""
    from chatforge.cli import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    try:
        os.chdir(cwd or here)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse
                code = e.code
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def nf4_linear(dense, compute_dtype=None):
    """A bitsandbytes NF4 (double-quantised) copy of `dense`, quantised on the CPU."""
    import bitsandbytes as bnb
    import torch

    layer = bnb.nn.Linear4bit(
        dense.in_features,
        dense.out_features,
        bias=dense.bias is not None,
        compute_dtype=compute_dtype or torch.float32,
        quant_type="nf4",
        compress_statistics=True,
    )
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # bitsandbytes quantises on the move to a device
