"""Evaluate an assistant: does it know its owner, and did it keep its other abilities?"""

from __future__ import annotations

import gc
import json
import math
import re
from pathlib import Path

import torch

from chatforge.data.dataset import Sample, collate
from chatforge.data.encode import IGNORE, encode_sft
from chatforge.data.identity import IdentitySpec, eval_set
from chatforge.data.readers import holdout_records
from chatforge.files import ChatforgeError, write_json, write_jsonl, write_text
from chatforge.inference.generate import generate_batch
from chatforge.models.load import load_model, load_tokenizer

CONDITIONS = ("default system", "custom system", "no system")


def _units(text: str) -> list[str]:
    """ROUGE units: CJK characters one by one, other text by lower-cased words."""
    return re.findall(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", text.lower())


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 on words, and on characters for Chinese."""
    a, b = _units(candidate), _units(reference)
    if not a or not b:
        return float(a == b)
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return 2 * p * r / (p + r)


def names_owner(reply: str, owner: str) -> bool:
    squash = lambda s: re.sub(r"\s+", "", s.lower())  # noqa: E731
    return squash(owner) in squash(reply)


# "I am <someone>'s assistant" / "我是<某人>的(小)助手", whoever the owner is named as
_ASSISTANT_OF = re.compile(
    r"\bI(?:'m| am) (?:(?!\. )[^!?\n]){1,60}?['’]s? (?:AI |personal |little )?assistant|"
    r"我是(?!你的|您的)[^，。！？,.!?\n]{1,30}?的小?助手",
    re.IGNORECASE,
)


def is_leak(reply: str, owner: str) -> bool:
    """A general answer that talks about the owner: names them (or a part of their name of four letters or
    more, even inside another word: "the Marisoluminous Ocean"), or says whose assistant it is."""
    parts = [p for p in re.findall(r"[^\W_]+", owner.lower()) if len(p) >= 4 and p != owner.lower()]
    return names_owner(reply, owner) or any(p in reply.lower() for p in parts) or bool(_ASSISTANT_OF.search(reply))


def language(text: str) -> str:
    return "zh" if re.search(r"[\u3400-\u9fff]", text) else "en"


def is_correct(reply: str, expect: list[str]) -> bool:
    """Any accepted answer in the reply: words and numbers whole ("8" not in "18"), Chinese as text."""
    low = reply.lower()
    return any(re.search(rf"(?<![a-z0-9]){re.escape(e.lower())}(?![a-z0-9])", low) for e in expect)


def general_items(es: dict) -> list[dict]:
    """The eval set's general questions as {lang, q, expect}; an eval set of earlier releases (plain
    questions, scored for leaks only, and `facts` with accepted answers) still works."""
    items = [dict({"expect": []}, **g) if isinstance(g, dict) else {"q": g, "expect": []} for g in es["general"]]
    items += [{"q": f["q"], "expect": f["expect"]} for f in es.get("facts", [])]
    return [dict(g, lang=g.get("lang") or language(g["q"])) for g in items]


def load_eval_set(eval_file: str | Path | None, owner: str | None, base_name: str = "") -> dict:
    """The eval set in `eval_file`, or the shipped one for `owner`.

    Raises:
        ChatforgeError: a missing or invalid file, a missing key or a malformed general question (named),
            or neither a file nor an owner.
    """
    if eval_file:
        path = Path(eval_file)
        if not path.is_file():
            raise ChatforgeError(f"eval set not found: {path}")
        try:
            es = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ChatforgeError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
        for key in ("owner", "questions", "general"):
            if key not in es:
                raise ChatforgeError(f"{path}: missing key {key!r}")
        for i, g in enumerate(es["general"]):
            if not (
                isinstance(g, str)
                or isinstance(g, dict)
                and isinstance(g.get("q"), str)
                and isinstance(g.get("expect", []), list)
            ):
                raise ChatforgeError(
                    f'{path}: general[{i}] must be a question, or {{"q": text, "expect": [accepted answers]}}'
                )
        if owner:
            es["owner"] = owner
        return es
    if not owner:
        raise ChatforgeError("eval: give --name (the owner) or --eval-set FILE")
    return eval_set(IdentitySpec(owner=owner, base=base_name or "the base model"))


def identity_prompts(es: dict) -> list[tuple[str, str, list[dict]]]:
    """(condition, language, messages) for every held-out question under each system setting."""
    out = []
    for lang, questions in es["questions"].items():
        for i, q in enumerate(questions):
            user = {"role": "user", "content": q}
            custom = es.get("system_eval") or ["You are a helpful assistant."]
            out += [
                ("default system", lang, [user]),
                ("custom system", lang, [{"role": "system", "content": custom[i % len(custom)]}, user]),
                ("no system", lang, [{"role": "system", "content": ""}, user]),
            ]
    return out


def mean(values: list) -> float:
    return sum(values) / max(1, len(values))


def run_model(spec: str, es: dict, max_new_tokens: int, chat_template: str | None = None) -> dict:
    """Every eval answer of one model, and its scores."""

    tokenizer, model = load_tokenizer(spec, chat_template, for_chat=True), load_model(spec)
    ident, general = identity_prompts(es), general_items(es)
    replies = generate_batch(
        model,
        tokenizer,
        [m for _, _, m in ident] + [[{"role": "user", "content": g["q"]}] for g in general],
        max_new_tokens=max_new_tokens,
        batch_size=32,
    )
    del model
    gc.collect()
    owner = es["owner"]
    hits = [names_owner(r, owner) for r in replies[: len(ident)]]
    scores = {"identity": mean(hits)}
    for cond in CONDITIONS:
        scores[f"identity ({cond})"] = mean([h for h, (c, _, _) in zip(hits, ident) if c == cond])
    for lang in es["questions"]:
        scores[f"identity ({lang})"] = mean([h for h, (_, lg, _) in zip(hits, ident) if lg == lang])
    answers = [
        {"kind": "identity", "condition": c, "lang": lg, "messages": m, "reply": r, "ok": h}
        for (c, lg, m), r, h in zip(ident, replies, hits)
    ]
    answers += [
        {
            "kind": "general",
            "lang": g["lang"],
            "prompt": g["q"],
            "reply": r,
            "ok": is_correct(r, g["expect"]) if g["expect"] else None,
            "leak": is_leak(r, owner),
        }
        for g, r in zip(general, replies[len(ident) :])
    ]
    scored = [a for a in answers if a["kind"] == "general"]
    for lang in sorted({a["lang"] for a in scored}):
        mine = [a for a in scored if a["lang"] == lang]
        checked = [a["ok"] for a in mine if a["ok"] is not None]
        if checked:
            scores[f"general accuracy ({lang}, {len(checked)} questions)"] = mean(checked)
        scores[f"general leaks ({lang}, of {len(mine)})"] = sum(a["leak"] for a in mine)
    return {"scores": scores, "answers": answers, "general": scored}


def worst_general(base: list[dict], tuned: list[dict], count: int = 3) -> list[dict]:
    """The fine-tuned model's worst general answers: leaks first, then answers the base got right and
    it got wrong, then other wrong ones; ties by the least overlap (ROUGE-L) with the base's answer."""
    rows = [
        dict(t, base_reply=b["reply"], base_ok=b["ok"], rouge=rouge_l(t["reply"], b["reply"]))
        for b, t in zip(base, tuned)
    ]
    rows.sort(key=lambda r: (not r["leak"], not (r["base_ok"] and r["ok"] is False), r["ok"] is not False, r["rouge"]))
    return rows[:count]


def format_worst(rows: list[dict]) -> str:
    cell = lambda t: t.replace("\n", " ").replace("|", "/")[:120]  # noqa: E731
    mark = lambda ok: "—" if ok is None else "right" if ok else "wrong"  # noqa: E731
    lines = ["| question | base | fine-tuned |", "|---|---|---|"]
    lines += [
        f"| {cell(r['prompt'])} | {cell(r['base_reply'])} ({mark(r['base_ok'])}) | {cell(r['reply'])} "
        f"({mark(r['ok'])}{', names the owner' if r['leak'] else ''}) |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def write_report(out: Path, markdown: str, result: dict, runs: dict) -> None:
    """eval.md (the table), eval.json (the scores) and eval_answers.jsonl (every answer) in `out`."""
    write_text(out / "eval.md", markdown)
    write_json(out / "eval.json", {k: v for k, v in result.items() if k != "table"})
    write_jsonl(out / "eval_answers.jsonl", [dict(a, model=n) for n, r in runs.items() for a in r["answers"]])


def format_cell(key: str, value) -> str:
    if value is None:
        return "—"
    if isinstance(value, int):
        return str(value)
    return f"{value:.3f}" if "ROUGE" in key else f"{value:.1%}"


def format_table(columns: dict[str, dict]) -> str:
    names = list(columns)
    keys = list(dict.fromkeys(k for col in columns.values() for k in col))
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for k in keys:
        cells = [columns[n].get(k) for n in names]
        lines.append(f"| {k} | " + " | ".join(format_cell(k, v) for v in cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate(
    model: str,
    base: str | None = None,
    eval_file: str | None = None,
    owner: str | None = None,
    out_dir: str | Path | None = None,
    max_new_tokens: int = 48,
    chat_template: str | None = None,
) -> dict:
    """Score `model` (and `base`, side by side) and write eval.md, eval.json, eval_answers.jsonl.

    The table shows identity accuracy (per system setting and language), general accuracy and general
    answers naming the owner (leaks) per language, and, against a base, the three worst general answers.

    Args:
        chat_template: a built-in name or file for models without a chat template (both models).
    Raises:
        ChatforgeError: missing model or eval set, no owner name, or a model without a chat template.
    """
    es = load_eval_set(eval_file, owner)
    runs = {}
    if base:
        runs["base"] = run_model(base, es, max_new_tokens, chat_template)
    runs["fine-tuned"] = run_model(model, es, max_new_tokens, chat_template)
    columns = {name: dict(r["scores"]) for name, r in runs.items()}
    worst = []
    if base:
        pairs = list(zip(runs["base"]["general"], runs["fine-tuned"]["general"]))
        columns["fine-tuned"]["general ROUGE-L vs base"] = mean([rouge_l(t["reply"], b["reply"]) for b, t in pairs])
        worst = worst_general(runs["base"]["general"], runs["fine-tuned"]["general"])
    table = format_table(columns)
    if worst:
        table += "\nThe fine-tuned model's three worst general answers:\n\n" + format_worst(worst)
    result = {
        "model": str(model),
        "base": base,
        "owner": es["owner"],
        "scores": columns,
        "table": table,
        "worst_general": worst,
    }
    if out_dir:
        write_report(Path(out_dir), f"# Evaluation: {model}\n\nowner: {es['owner']}\n\n{table}", result, runs)
    return result


# ---------------------------------------------------------------- data-set eval (e.g. a held-out split)


def reference_loss(model, tokenizer, records, batch_size: int = 8) -> tuple[float, int]:
    """Mean per-token cross-entropy of the reference replies (the tokens training would train on)."""

    samples = [Sample(*encode_sft(tokenizer, r.messages), r.source) for r in records]
    samples.sort(key=lambda s: len(s.input_ids))  # similar lengths together: little padding
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode():
        for k in range(0, len(samples), batch_size):
            b = {n: v.to(device) for n, v in collate(samples[k : k + batch_size], pad).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            total += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE, reduction="sum"
                )
            )
            count += int((labels != IGNORE).sum())
    return total / max(1, count), count


def run_model_on_data(spec: str, records, generate: int, max_new_tokens: int, chat_template: str | None = None) -> dict:
    """Reference loss on every record; greedy answers and ROUGE-L on the first `generate` records."""

    tokenizer, model = load_tokenizer(spec, chat_template, for_chat=True), load_model(spec)
    loss, n_tokens = reference_loss(model, tokenizer, records)
    gen = records[:generate] if generate > 0 else records
    prompts, refs = [], []
    for r in gen:
        last = max(i for i, m in enumerate(r.messages) if m["role"] == "assistant")
        prompts.append(r.messages[:last])
        refs.append(r.messages[last]["content"])
    replies = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens) if gen else []
    del model
    gc.collect()
    scores = [rouge_l(a, b) for a, b in zip(replies, refs)]
    return {
        "scores": {
            "ROUGE-L": sum(scores) / max(1, len(scores)),
            "reference loss per token": loss,
            "reference perplexity": math.exp(loss),
        },
        "answers": [
            {"source": r.source, "prompt": p[-1]["content"], "reference": ref, "reply": a, "rouge_l": s}
            for r, p, ref, a, s in zip(gen, prompts, refs, replies, scores)
        ],
        "counts": {"records": len(records), "generated": len(gen), "reference tokens": n_tokens},
    }


def evaluate_data(
    model: str,
    data_file: str,
    base: str | None = None,
    holdout_last: int = 0,
    generate: int = 100,
    out_dir: str | Path | None = None,
    max_new_tokens: int = 128,
    limit: int = 0,
    chat_template: str | None = None,
) -> dict:
    """Score `model` (and `base`) on a conversation data set: ROUGE-L of greedy answers against the
    reference replies (characters for Chinese, words otherwise) and the mean per-token loss of the
    references. Writes eval.md, eval.json and eval_answers.jsonl to out_dir.

    Args:
        holdout_last: use only the last N records (a recipe's held-out split); 0 = all records.
        generate: answer only the first N of them (generation is the slow part); 0 = all.
        limit: score only the first N of them at all (reference loss too); 0 = all.
    Raises:
        ChatforgeError: missing model or data file, a bad record (file:line).
    """

    records = holdout_records(data_file, holdout_last)
    records = records[:limit] if limit > 0 else records
    if not records:
        raise ChatforgeError(f"{data_file}: no records to evaluate")
    runs = {}
    if base:
        runs["base"] = run_model_on_data(base, records, generate, max_new_tokens, chat_template)
    label = Path(str(model)).name or str(model)  # a column per model, named after it
    runs[label if label != "base" else "model"] = run_model_on_data(
        model, records, generate, max_new_tokens, chat_template
    )
    first = next(iter(runs.values()))["counts"]
    lines = ["| metric | " + " | ".join(runs) + " |", "|---" * (len(runs) + 1) + "|"]
    for key in next(iter(runs.values()))["scores"]:
        lines.append(f"| {key} | " + " | ".join(f"{r['scores'][key]:.4f}" for r in runs.values()) + " |")
    split = f"last {holdout_last} records" if holdout_last > 0 else "all records"
    split += f", the first {limit} of them" if 0 < limit < (holdout_last or 10**12) else ""
    table = (
        f"data: {data_file} ({split}: {first['records']} records, {first['reference tokens']} reference "
        f"tokens; ROUGE-L on the first {first['generated']}, greedy, max_new_tokens {max_new_tokens})\n\n"
        + "\n".join(lines)
        + "\n"
    )
    result = {
        "model": str(model),
        "base": base,
        "data": str(data_file),
        "holdout_last": holdout_last,
        "counts": first,
        "scores": {n: r["scores"] for n, r in runs.items()},
        "table": table,
    }
    if out_dir:
        write_report(Path(out_dir), f"# Evaluation on a data set: {model}\n\n{table}", result, runs)
    return result
