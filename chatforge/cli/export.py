"""`chatforge merge` and `chatforge convert`: a trained adapter to a standalone model, and between formats."""

from __future__ import annotations

import json
from typing import get_args

from chatforge.cli.common import TEMPLATE_HELP
from chatforge.export.convert import convert as convert_layout
from chatforge.export.gguf import export_gguf
from chatforge.export.merge import merge as merge_adapter
from chatforge.models.internlm2 import Layout


def merge(a):
    report = merge_adapter(
        a.adapter,
        a.out,
        base=a.base,
        max_shard_size=a.max_shard_size,
        dtype=a.dtype,
        fmt=a.format,
        default_system=a.default_system,
        chat_template=a.chat_template,
    )
    print(json.dumps(report, indent=2))


def convert(a):
    if (a.format or ("gguf" if str(a.out).endswith(".gguf") else "hf")) == "gguf":
        print(json.dumps(export_gguf(a.model, a.out, dtype=a.dtype, ollama=a.ollama), indent=2, ensure_ascii=False))
        return
    print(
        json.dumps(
            convert_layout(a.model, a.out, fmt=a.format or "hf", dtype=a.dtype, max_shard_size=a.max_shard_size),
            indent=2,
        )
    )


def add_commands(sub) -> None:
    s = sub.add_parser("merge", help="merge a LoRA adapter into a standalone model folder")
    s.add_argument("adapter")
    s.add_argument("out")
    s.add_argument("--base", help="base model (default: the one the adapter names)")
    s.add_argument("--max-shard-size", default="2GB")
    s.add_argument("--dtype", default="auto", help="auto (the base's), fp32, bf16 or fp16")
    s.add_argument("--default-system", help="replace the system prompt the chat template injects by default")
    s.add_argument(
        "--format",
        choices=get_args(Layout),
        default="hf",
        help="hf: native layout; internlm2: an InternLM2 base's original layout (fused wqkv)",
    )
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=merge)

    s = sub.add_parser(
        "convert",
        help="convert a checkpoint between InternLM2's layout and the native (hf) one, "
        "or to one GGUF file for llama.cpp, Ollama and LM Studio",
    )
    s.add_argument("model", help="an InternLM2 folder, a native folder exported from one, or (gguf) any merged model")
    s.add_argument("out", help="a folder, or a .gguf file")
    s.add_argument("--format", choices=[*get_args(Layout), "gguf"], help="default: gguf for OUT.gguf, else hf")
    s.add_argument(
        "--dtype",
        default="auto",
        help="auto (the source's; gguf: f16), fp32, bf16 or fp16; gguf: f16, bf16, f32 or q8_0",
    )
    s.add_argument("--ollama", action="store_true", help="gguf: also write an Ollama Modelfile beside it")
    s.add_argument("--max-shard-size", default="2GB")
    s.set_defaults(func=convert)
