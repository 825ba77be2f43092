"""`chatforge`: the parser of every command group, the process's environment defaults, and error handling."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

import torch

from chatforge.cli import assistant, chat, data, evaluate, export, hub, train
from chatforge.files import ChatforgeError

GROUPS = (data, train, export, chat, evaluate, assistant, hub)
ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1",  # never reach for a hub; a missing path fails fast
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",  # read when CUDA starts: less fragmentation
    "GRADIO_ANALYTICS_ENABLED": "False",  # chatforge web: no calls home
}


def set_environment() -> None:
    """chatforge's defaults for the libraries it drives; a variable already set wins."""
    for name, value in ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if not torch.cuda.is_available():  # else DeepSpeed, imported by peft when installed, warns on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatforge", description="Turn a small open chat model into your own assistant.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    set_environment()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # bitsandbytes (imported by peft) asks on a CPU for `kernels`, a package that downloads kernels from a hub
    for noisy in ("transformers", "peft", "accelerate", "httpx", "DeepSpeed", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notices
    from transformers.utils import logging as hf_logging  # after set_environment: the hub reads it on import

    hf_logging.disable_progress_bar()  # per-tensor loading bars; chatforge shows its own progress
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ChatforgeError as e:
        print(f"chatforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
