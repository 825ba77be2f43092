"""The `chatforge` command: a thin layer of subcommands over the library's entry functions."""

from __future__ import annotations

import argparse
import json
import sys

from .files import ChatforgeError
from .engines import ENGINES
from .models import DEFAULT_MODEL

TEMPLATE_HELP = ("chat template for a model without one (or to replace its own): chatml, llama3, internlm2, "
                 "qwen2, gemma, or a .jinja / tokenizer_config.json file")


def cmd_data_identity(a):
    from .identity import IdentitySpec, write_identity_data
    from .models import display_name, load_model, load_tokenizer

    spec = IdentitySpec(owner=a.name, assistant=a.assistant_name, base=a.base_name or display_name(a.model),
                        seed=a.seed)
    model = tok = None
    if not a.no_replay:
        tok, model = load_tokenizer(a.model, a.chat_template, for_chat=True), load_model(a.model)
    print(json.dumps(write_identity_data(spec, a.out, replay_model=model, tokenizer=tok), ensure_ascii=False))


def cmd_data_convert(a):
    from .datatools import convert

    report = convert(a.input, a.output, to=a.to, strict=a.strict)
    lines = report.pop("skipped_lines")
    print(json.dumps(report, ensure_ascii=False, indent=2))
    for line in lines[:a.show]:
        print(f"skipped {line}", file=sys.stderr)
    if len(lines) > a.show:
        print(f"... and {len(lines) - a.show} more skipped", file=sys.stderr)


def cmd_data_check(a):
    from .datatools import check, format_check

    report = check(a.file, recipe=a.recipe, out_dir=a.out, overrides=a.overrides, color=sys.stdout.isatty())
    print(json.dumps(report, ensure_ascii=False, indent=2) if a.json else format_check(report))


def cmd_recipes(a):
    from .config import copy_recipe, list_recipes

    if a.action == "list":
        for name in list_recipes(a.arg):
            print(name)
    elif a.action == "copy":
        if not a.arg or not a.dest:
            raise ChatforgeError("usage: chatforge recipes copy NAME DIR")
        print(copy_recipe(a.arg, a.dest))


def cmd_train(a):
    from . import distributed
    from .config import load_recipe

    overrides = list(a.overrides) + ([f"strategy={a.strategy}"] if a.strategy else []) + (
        [f"chat_template={a.chat_template}"] if a.chat_template else [])
    cfg = load_recipe(a.recipe, overrides)  # a bad recipe fails here, before any process starts
    if (a.gpus or a.nnodes) and not distributed.in_launched_rank():
        world = (a.gpus or 1) * (a.nnodes or distributed.slurm_nodes().get("nnodes") or 1)
        distributed.Parallel(world=world).shard(list(range(cfg.batch_size * cfg.grad_accum)))  # splits evenly?
        args = ["train", a.recipe, *overrides] + ["--resume"] * a.resume + ["--no-progress"] * a.no_progress \
            + ["--allow-changes"] * a.allow_changes
        rc = distributed.launch(args, a.gpus or 1, nnodes=a.nnodes, node_rank=a.node_rank,
                                master_addr=a.master_addr, master_port=a.master_port)
        if rc:
            raise ChatforgeError(f"training stopped: torchrun exited with status {rc} (the failing rank's "
                                 f"error is printed above)")
        return
    from torch.distributed.elastic.multiprocessing.errors import record

    from .train import train

    final = record(train)(cfg, resume=a.resume, progress=not a.no_progress,  # record: torchrun shows the traceback
                          allow_changes=a.allow_changes)
    if distributed.rank_env()[0] == 0:
        print(final)


def cmd_merge(a):
    from .export import merge

    report = merge(a.adapter, a.out, base=a.base, max_shard_size=a.max_shard_size, dtype=a.dtype, fmt=a.format,
                   default_system=a.default_system, chat_template=a.chat_template)
    print(json.dumps(report, indent=2))


def cmd_convert(a):
    if (a.format or ("gguf" if str(a.out).endswith(".gguf") else "hf")) == "gguf":
        from .gguf_export import export_gguf

        print(json.dumps(export_gguf(a.model, a.out, dtype=a.dtype, ollama=a.ollama), indent=2, ensure_ascii=False))
        return
    from .internlm2 import convert

    print(json.dumps(convert(a.model, a.out, fmt=a.format or "hf", dtype=a.dtype, max_shard_size=a.max_shard_size),
                     indent=2))


def cmd_chat(a):
    from .serve import chat

    chat(a.model, system=a.system, temperature=a.temperature, top_p=a.top_p, max_new_tokens=a.max_new_tokens,
         chat_template=a.chat_template)


def cmd_eval(a):
    from .evaluate import evaluate, evaluate_data

    if a.data:
        result = evaluate_data(a.model, a.data, base=a.base, holdout_last=a.holdout_last, generate=a.generate,
                               out_dir=a.out, max_new_tokens=a.max_new_tokens, limit=a.limit,
                               chat_template=a.chat_template)
        print(result["table"])
        return
    result = evaluate(a.model, base=a.base, eval_file=a.eval_set, owner=a.name, out_dir=a.out,
                      max_new_tokens=a.max_new_tokens, chat_template=a.chat_template)
    print(result["table"])


def cmd_assistant(a):
    from .pipeline import assistant

    assistant(a.name, model=a.model, assistant_name=a.assistant_name, out=a.out, recipe=a.recipe,
              overrides=a.overrides, progress=not a.no_progress, gguf=a.gguf, chat_template=a.chat_template)


def cmd_web(a):
    from .web import serve_web

    serve_web(a.model, compare=a.compare, host=a.host, port=a.port, dtype=a.dtype, auth_file=a.auth_file,
              chat_template=a.chat_template)


def cmd_serve(a):
    from .api import API_KEY_ENV, Limits, serve_api

    if a.api_key is not None:
        raise ChatforgeError(f"--api-key would show the key to every user of this machine (ps); put it in "
                             f"${API_KEY_ENV} or in a file given with --api-key-file")
    limits = Limits(max_tokens=a.max_tokens_limit, max_body_bytes=a.max_body_bytes, max_context=a.max_context,
                    max_batch=a.max_batch, engine=a.engine, max_prompt_tokens=a.max_prompt_tokens,
                    request_timeout_s=a.request_timeout, max_connections=a.max_connections)
    serve_api(a.model, host=a.host, port=a.port, api_key_file=a.api_key_file, model_name=a.model_name,
              limits=limits, dtype=a.dtype, chat_template=a.chat_template)


def cmd_publish(a):
    from .publish import publish

    report = publish(a.model_dir, a.repo, message=a.message, branch=a.branch, title=a.title, token_env=a.token_env)
    print(json.dumps({k: v for k, v in report.items() if k != "output"}, indent=2))


def cmd_app(a):
    from .app import write_app

    print(write_app(a.model_repo, a.out_dir, title=a.title, branch=a.branch))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chatforge", description="Turn a small open chat model into your own assistant.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="make and inspect training data").add_subparsers(dest="data_command", required=True)
    s = d.add_parser("identity", help="write identity conversations (plus replay and an eval set)")
    s.add_argument("--name", required=True, help="the owner: 'I am <name>'s assistant'")
    s.add_argument("--assistant-name", default="", help="the assistant's own name (optional)")
    s.add_argument("--base-name", default="", help="the base model's name in answers (default: from the model)")
    s.add_argument("--model", default=DEFAULT_MODEL, help="base model that writes the replay answers")
    s.add_argument("--out", default="data/identity.jsonl")
    s.add_argument("--no-replay", action="store_true", help="identity only, no general conversations")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=cmd_data_identity)
    s = d.add_parser("convert", help="convert a data file: alpaca, ShareGPT, messages, conversation -> "
                                     "conversation (the seed's format) or messages")
    s.add_argument("input")
    s.add_argument("output", help=".json: a JSON array; otherwise JSONL")
    s.add_argument("--to", choices=["conversation", "messages"], default="conversation")
    s.add_argument("--strict", action="store_true", help="stop at the first broken record (default: skip it)")
    s.add_argument("--show", type=int, default=20, help="how many skipped lines to list")
    s.set_defaults(func=cmd_data_convert)
    s = d.add_parser("check", help="inspect a data file as a recipe would train on it (lengths, overflow, "
                                   "duplicates, a rendered sample)")
    s.add_argument("file")
    s.add_argument("--recipe", help="recipe for model, task, max_length, overflow (default: the default model)")
    s.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    s.add_argument("--out", help="folder for lengths.png and check.json (default: runs/data-check-NAME)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=cmd_data_check)

    s = sub.add_parser("recipes", help="list or copy the shipped recipes (xtuner list-cfg / copy-cfg)")
    s.add_argument("action", choices=["list", "copy"])
    s.add_argument("arg", nargs="?", help="pattern (list) or recipe name (copy)")
    s.add_argument("dest", nargs="?", help="folder to copy into")
    s.set_defaults(func=cmd_recipes)

    s = sub.add_parser("train", help="fine-tune with a recipe: chatforge train RECIPE [key=value ...]")
    s.add_argument("recipe", help="a recipe file or the name of a shipped recipe")
    s.add_argument("overrides", nargs="*", help="key=value overrides, dotted for sections (lora.r=8)")
    s.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    s.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue although the recipe's training keys differ from the checkpoint's")
    s.add_argument("--no-progress", action="store_true")
    g = s.add_argument_group("several GPUs or machines (docs/distributed.md)")
    g.add_argument("--gpus", type=int, help="processes (GPUs) on this machine, launched through torchrun")
    g.add_argument("--nnodes", type=int, help="machines in the job (default 1, or SLURM's count)")
    g.add_argument("--node-rank", type=int, help="this machine's number, 0 .. nnodes-1 (default: SLURM's)")
    g.add_argument("--master-addr", help="address of the machine with node-rank 0")
    g.add_argument("--master-port", type=int, help="a free TCP port on that machine (default 29500)")
    g.add_argument("--strategy", choices=["auto", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"],
                   help="overrides the recipe's strategy key")
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("merge", help="merge a LoRA adapter into a standalone model folder")
    s.add_argument("adapter")
    s.add_argument("out")
    s.add_argument("--base", help="base model (default: the one the adapter names)")
    s.add_argument("--max-shard-size", default="2GB")
    s.add_argument("--dtype", default="auto", help="auto (the base's), fp32, bf16 or fp16")
    s.add_argument("--default-system", help="replace the system prompt the chat template injects by default")
    s.add_argument("--format", choices=["hf", "internlm2"], default="hf",
                   help="hf: native layout; internlm2: an InternLM2 base's original layout (fused wqkv)")
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=cmd_merge)

    s = sub.add_parser("convert", help="convert a checkpoint between InternLM2's layout and the native (hf) one, "
                                       "or to one GGUF file for llama.cpp, Ollama and LM Studio")
    s.add_argument("model", help="an InternLM2 folder, a native folder exported from one, or (gguf) any merged model")
    s.add_argument("out", help="a folder, or a .gguf file")
    s.add_argument("--format", choices=["hf", "internlm2", "gguf"], help="default: gguf for OUT.gguf, else hf")
    s.add_argument("--dtype", default="auto", help="auto (the source's; gguf: f16), fp32, bf16 or fp16; gguf: "
                                                   "f16, bf16, f32 or q8_0")
    s.add_argument("--ollama", action="store_true", help="gguf: also write an Ollama Modelfile beside it")
    s.add_argument("--max-shard-size", default="2GB")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("chat", help="chat with a model in the terminal")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    s.add_argument("--system", help="system prompt (default: the chat template's)")
    s.add_argument("--temperature", type=float, default=0.7)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--max-new-tokens", type=int, default=256)
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("eval", help="identity accuracy and general retention, before/after")
    s.add_argument("model")
    s.add_argument("--base", help="base model to compare with")
    s.add_argument("--eval-set", help="the .eval.json written beside identity data")
    s.add_argument("--name", help="the owner (default: from the eval set)")
    s.add_argument("--out", default=None, help="folder for eval.md / eval.json")
    s.add_argument("--max-new-tokens", type=int, default=48)
    s.add_argument("--data", help="score on a conversation data set instead: ROUGE-L and reference loss")
    s.add_argument("--holdout-last", type=int, default=0, help="with --data: only its last N records")
    s.add_argument("--generate", type=int, default=100, help="with --data: answer the first N (0 = all)")
    s.add_argument("--limit", type=int, default=0, help="with --data: score only the first N records (0 = all)")
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("assistant", help="one command: identity data -> LoRA -> merge -> eval")
    s.add_argument("--name", required=True, help="the owner: 'I am <name>'s assistant'")
    s.add_argument("--assistant-name", default="")
    s.add_argument("--model", default=DEFAULT_MODEL)
    s.add_argument("--out", help="run folder (default: runs/assistant-<name>)")
    s.add_argument("--recipe", help="identity recipe (default: the one for the model)")
    s.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--gguf", nargs="?", const="f16", metavar="DTYPE",
                   help="end with merged/NAME-DTYPE.gguf and an Ollama Modelfile (f16 default, bf16, f32, q8_0)")
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=cmd_assistant)

    s = sub.add_parser("web", help="chat in the browser (Gradio); --compare BASE shows before/after side by side")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    s.add_argument("--compare", metavar="BASE", help="a second model answering the same messages")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--dtype", default="auto")
    s.add_argument("--auth-file", help="file whose first line is USER:PASSWORD for the page's login (default: "
                                       "$CHATFORGE_WEB_AUTH; neither: no login, allowed on a loopback host only)")
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=cmd_web)

    s = sub.add_parser("serve", help="OpenAI-compatible HTTP API: /v1/chat/completions, /v1/models, /health")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key-file", help="file whose first line is the required Bearer key (default: "
                                          "$CHATFORGE_API_KEY; neither: open, allowed on a loopback host only)")
    s.add_argument("--api-key", help=argparse.SUPPRESS)  # refused: `ps` would show it
    s.add_argument("--model-name", help="the model id clients use (default: the model's name)")
    s.add_argument("--max-tokens-limit", type=int, default=1024, help="largest max_tokens a request may ask")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20)
    s.add_argument("--max-context", type=int, default=0, help="prompt+completion tokens (0: the model's)")
    s.add_argument("--max-prompt-tokens", type=int, default=4096, help="longest prompt in tokens (0: the context)")
    s.add_argument("--request-timeout", type=float, default=300, help="seconds a request may take in all")
    s.add_argument("--max-connections", type=int, default=64, help="open connections (more get 503)")
    s.add_argument("--max-batch", type=int, default=32, help="requests decoded together (slots, static batches)")
    s.add_argument("--engine", choices=ENGINES, default="auto",
                   help="slots (own KV-cache slots, CUDA graphs; Llama-shaped models), continuous (transformers' "
                        "continuous batching), static (batches of waiting requests); auto: slots where they run")
    s.add_argument("--dtype", default="auto")
    s.add_argument("--chat-template", metavar="NAME|FILE", help=TEMPLATE_HELP)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("publish", help="model card + git-lfs push of a model folder to a model repo")
    s.add_argument("model_dir")
    s.add_argument("--repo", required=True, help="git URL of the model repo (token: $CHATFORGE_HUB_TOKEN)")
    s.add_argument("--message", help="commit message")
    s.add_argument("--branch", default="main")
    s.add_argument("--title", help="model card title (default: the run's name)")
    s.add_argument("--token-env", default="CHATFORGE_HUB_TOKEN", help="environment variable with the token")
    s.set_defaults(func=cmd_publish)

    s = sub.add_parser("app", help="write a deployable Gradio app (Hugging Face Space / OpenXLab) for a model repo")
    s.add_argument("out_dir")
    s.add_argument("--model-repo", required=True, help="git URL the app clones the model from")
    s.add_argument("--title", default="", help="app title (default: from the repo name)")
    s.add_argument("--branch", default="main")
    s.set_defaults(func=cmd_app)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging

    import warnings

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("transformers", "peft", "accelerate", "httpx", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # libraries' deprecation notices
    from transformers.utils import logging as hf_logging

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


if __name__ == "__main__":
    sys.exit(main())
