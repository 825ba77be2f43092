"""`chatforge data identity|convert|check`: make and inspect training data."""

from __future__ import annotations

import json
import sys

from chatforge.cli.common import TEMPLATE_HELP
from chatforge.data.identity import IdentitySpec, write_identity_data
from chatforge.data.tools import FORMATS, check, convert, format_check
from chatforge.models.load import DEFAULT_MODEL, display_name, load_model, load_tokenizer, reference_dtype


def identity(a):
    spec = IdentitySpec(
        owner=a.name, assistant=a.assistant_name, base=a.base_name or display_name(a.model), seed=a.seed
    )
    model = tok = None
    if not a.no_replay:
        tok = load_tokenizer(a.model, a.chat_template, for_chat=True)
        model = load_model(a.model, dtype=reference_dtype(a.model))
    print(json.dumps(write_identity_data(spec, a.out, replay_model=model, tokenizer=tok), ensure_ascii=False))


def convert_file(a):
    report = convert(a.input, a.output, to=a.to, strict=a.strict)
    lines = report.pop("skipped_lines")
    print(json.dumps(report, ensure_ascii=False, indent=2))
    for line in lines[: a.show]:
        print(f"skipped {line}", file=sys.stderr)
    if len(lines) > a.show:
        print(f"... and {len(lines) - a.show} more skipped", file=sys.stderr)


def check_file(a):
    report = check(a.file, recipe=a.recipe, out_dir=a.out, overrides=a.overrides, color=sys.stdout.isatty())
    print(json.dumps(report, ensure_ascii=False, indent=2) if a.json else format_check(report))


def add_commands(sub) -> None:
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
    s.set_defaults(func=identity)
    s = d.add_parser(
        "convert",
        help="convert a data file: alpaca, ShareGPT, messages, conversation -> "
        "conversation (the seed's format) or messages",
    )
    s.add_argument("input")
    s.add_argument("output", help=".json: a JSON array; otherwise JSONL")
    s.add_argument("--to", choices=FORMATS, default="conversation")
    s.add_argument("--strict", action="store_true", help="stop at the first broken record (default: skip it)")
    s.add_argument("--show", type=int, default=20, help="how many skipped lines to list")
    s.set_defaults(func=convert_file)
    s = d.add_parser(
        "check",
        help="inspect a data file as a recipe would train on it (lengths, overflow, duplicates, a rendered sample)",
    )
    s.add_argument("file")
    s.add_argument("--recipe", help="recipe for model, task, max_length, overflow (default: the default model)")
    s.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    s.add_argument("--out", help="folder for lengths.png and check.json (default: runs/data-check-NAME)")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=check_file)
