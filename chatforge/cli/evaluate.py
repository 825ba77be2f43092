"""`chatforge eval`: identity accuracy and general retention, or scores on a data set."""

from __future__ import annotations

from chatforge.cli.common import TEMPLATE_HELP
from chatforge.evaluation import evaluate, evaluate_data


def eval_model(a):
    if a.data:
        result = evaluate_data(
            a.model,
            a.data,
            base=a.base,
            holdout_last=a.holdout_last,
            generate=a.generate,
            out_dir=a.out,
            max_new_tokens=a.max_new_tokens,
            limit=a.limit,
            chat_template=a.chat_template,
        )
    else:
        result = evaluate(
            a.model,
            base=a.base,
            eval_file=a.eval_set,
            owner=a.name,
            out_dir=a.out,
            max_new_tokens=a.max_new_tokens,
            chat_template=a.chat_template,
        )
    print(result["table"])


def add_commands(sub) -> None:
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
    s.set_defaults(func=eval_model)
