"""`chatforge data convert` and `chatforge data check`: convert formats, inspect a data set before training."""

from __future__ import annotations

import json
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Literal, get_args

from chatforge.config import DataSource, TrainConfig, load_recipe
from chatforge.data import dataset, encode, readers
from chatforge.files import ChatforgeError, atomic_path, write_json
from chatforge.models.load import load_tokenizer
from chatforge.plots import histogram

Target = Literal["conversation", "messages"]  # what `chatforge data convert` writes
FORMATS = get_args(Target)


# ---------------------------------------------------------------- convert


def to_conversation(messages: list[dict], where: str) -> dict:
    """The seed's XTuner shape: {"conversation": [{"system"?, "input", "output"}, ...]}.

    Raises:
        ChatforgeError: the messages do not alternate user/assistant after an optional system message.
    """
    msgs = list(messages)
    system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
    turns = []
    for i in range(0, len(msgs), 2):
        pair = msgs[i : i + 2]
        if [m["role"] for m in pair] != ["user", "assistant"]:
            raise ChatforgeError(
                f"{where}: cannot write as 'conversation': expected user/assistant turns, "
                f"got {', '.join(m['role'] for m in pair)} at message {i + 1}"
            )
        turn = {"input": pair[0]["content"], "output": pair[1]["content"]}
        if system and not turns:
            turn = {"system": system, **turn}
        turns.append(turn)
    return {"conversation": turns}


def convert(src: str | Path, dest: str | Path, to: str = "conversation", strict: bool = False) -> dict:
    """Convert any readable conversation file to the seed's conversation format or OpenAI messages.

    Streams both files. A .json destination gets a JSON array (one record per line), anything else
    JSONL. Broken records are reported with file:line and skipped, unless strict.

    Raises:
        ChatforgeError: unknown target format, missing input, or (strict) the first broken record;
            nothing is written then.
    """
    if to not in FORMATS:
        raise ChatforgeError(f"--to {to!r}: use one of {', '.join(FORMATS)}")
    skipped: list[str] = []
    on_error = None if strict else skipped.append
    array = str(dest).endswith(".json")
    converted = 0
    with atomic_path(dest) as tmp, open(tmp, "w", encoding="utf-8") as out:
        out.write("[\n" if array else "")
        for rec in readers.iter_records(src, on_error):
            try:
                obj = to_conversation(rec.messages, rec.source) if to == "conversation" else {"messages": rec.messages}
            except ChatforgeError as e:
                if strict:
                    raise
                skipped.append(str(e))
                continue
            line = json.dumps(obj, ensure_ascii=False)
            out.write(((",\n" if converted else "") + "    " + line) if array else line + "\n")
            converted += 1
        out.write("\n]\n" if array else "")
    reasons = Counter(s.split(": ", 1)[1].split(" (")[0] if ": " in s else s for s in skipped)
    return {
        "input": str(src),
        "output": str(dest),
        "format": to,
        "converted": converted,
        "skipped": len(skipped),
        "skipped_by_reason": dict(reasons.most_common()),
        "skipped_lines": skipped,
    }


# ---------------------------------------------------------------- check

OVERFLOW_FATE = {
    "error": "training stops at the first one (overflow: error)",
    "drop": "they are dropped (overflow: drop)",
    "truncate": "they are cut to max_length; their tail carries no loss (overflow: truncate)",
    "split": "they are cut into max_length pieces, each its own sample (overflow: split)",
}


def render_marked(tokenizer, ids: list[int], labels: list[int], color: bool = False) -> str:
    """The sample's text with the trained (loss) tokens marked, like XTuner's log-dataset."""
    start, end = ("\033[1;32m", "\033[0m") if color else ("«", "»")
    parts, run, trained = [], [], None
    for tok, lab in zip(ids + [None], labels + [None]):
        state = lab is not None and lab != encode.IGNORE
        if tok is None or (trained is not None and state != trained):
            text = tokenizer.decode(run)
            parts.append(f"{start}{text}{end}" if trained else text)
            run = []
        run.append(tok)
        trained = state
    return "".join(parts)


SHOWN_TOKENS, SHOWN_CHARS = 1000, 500  # of the rendered sample, of each problem listed in a report


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text`, cut to `limit` characters with a note of how many more there were."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text) - limit} more characters)"


def percentile(sorted_values: list[int], q: float) -> int:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def check(
    path: str | Path,
    recipe: str | None = None,
    out_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    color: bool = False,
) -> dict:
    """Inspect a data file as a recipe would train on it.

    Reports the record count, broken records (file:line), token-length statistics and a histogram
    PNG, how many samples exceed max_length and what the recipe's overflow policy does to them,
    padding with and without packing, exact duplicates, and one rendered sample with trained tokens
    marked. Writes lengths.png and check.json to out_dir (default: runs/data-check-<name>).

    Raises:
        ChatforgeError: missing file or recipe, a tokenizer that cannot render conversations.
    """

    cfg = load_recipe(recipe, overrides) if recipe else TrainConfig(data=[DataSource(path=str(path))])
    tokenizer = load_tokenizer(cfg.model, cfg.chat_template)
    held = next((s.holdout_last for s in cfg.data if Path(s.path).resolve() == Path(path).resolve()), 0)
    broken: list[str] = []
    if cfg.task == "pretrain":
        records = readers.iter_text_documents(path, broken.append)
    else:
        records = readers.iter_records(path, broken.append)
    lengths, trained, keys, first = [], [], Counter(), {}
    sample = None
    for rec in records:
        if cfg.system is not None and cfg.task != "pretrain" and not any(m["role"] == "system" for m in rec.messages):
            rec.messages.insert(0, {"role": "system", "content": cfg.system})
        if cfg.task == "pretrain":
            ids, labels = encode.encode_text(tokenizer, rec.messages[0]["content"])
        else:
            ids, labels = encode.encode_record(tokenizer, rec)
        lengths.append(len(ids))
        trained.append(sum(x != encode.IGNORE for x in labels[1:]))
        key = readers.record_key(rec)
        keys[key] += 1
        first.setdefault(key, rec.source)
        if sample is None:
            sample = (rec.source, ids, labels)
    if not lengths:
        raise ChatforgeError(f"{path}: no readable records" + (f" (first problem: {broken[0]})" if broken else ""))
    srt = sorted(lengths)
    over = [n for n in lengths if n > cfg.max_length]
    fits = [n for n in lengths if n <= cfg.max_length]
    dups = {first[k]: c for k, c in keys.items() if c > 1}
    report = {
        "file": str(path),
        "recipe": recipe,
        "model": cfg.model,
        "task": cfg.task,
        "records": len(lengths),
        "broken_records": len(broken),
        "broken": [clip(b) for b in broken[:20]],
        "held_out_by_recipe": held,
        "tokens": {
            "total": sum(lengths),
            "trained": sum(trained),
            "min": srt[0],
            "mean": round(sum(srt) / len(srt), 1),
            "median": statistics.median(srt),
            "p90": percentile(srt, 0.9),
            "p99": percentile(srt, 0.99),
            "max": srt[-1],
        },
        "max_length": cfg.max_length,
        "over_max_length": len(over),
        "over_max_length_fate": OVERFLOW_FATE[cfg.overflow] if over else "",
        "padding": padding_report(fits, cfg.max_length),
        "duplicates": {
            "records_repeated": len(dups),
            "extra_copies": sum(c - 1 for c in dups.values()),
            "examples": dict(list(dups.items())[:5]),
        },
    }
    out = Path(out_dir or f"runs/data-check-{Path(path).stem}")
    report["histogram"] = str(
        histogram(lengths, out / "lengths.png", title=f"token lengths — {Path(path).name}", limit=cfg.max_length)
    )
    write_json(out / "check.json", report)
    src, ids, labels = sample
    shown = render_marked(tokenizer, ids[:SHOWN_TOKENS], labels[:SHOWN_TOKENS], color=color)
    if len(ids) > SHOWN_TOKENS:
        shown += f"… (cut: the first {SHOWN_TOKENS} of {len(ids)} tokens shown)"
    report["sample"] = {
        "source": src,
        "tokens": len(ids),
        "trained_tokens": sum(x != encode.IGNORE for x in labels[1:]),
        "rendered": shown,
    }
    return report


def _padding(lengths: list[int], batch_size: int) -> int:
    """Padding tokens when consecutive items are batched and padded to the longest of their batch."""
    return sum(
        max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size)
    ) - sum(lengths)


def padding_report(lengths: list[int], max_length: int, batch_sizes=(4, 8)) -> dict:
    """Padding of shuffled samples batched and padded to their longest (as `collate` does), vs packed
    sequences batched the same way (as `collate_packed` does), vs packed rows padded to max_length
    (fixed shapes, e.g. for compiled GPU kernels)."""

    if not lengths:
        return {}
    order = lengths[:]
    random.Random(0).shuffle(order)
    real = sum(order)
    samples = (dataset.Sample([0] * n, [0] * n, "") for n in order)
    rows = [sum(len(s.input_ids) for s in p) for p in dataset.pack(samples, max_length, open_bins=256)]
    random.Random(1).shuffle(rows)  # training draws packed rows in a seeded random order
    return {
        "real_tokens": real,
        "batch_padding_tokens": {bs: _padding(order, bs) for bs in batch_sizes},
        "packed_sequences": len(rows),
        "packed_batch_padding_tokens": {bs: _padding(rows, bs) for bs in (1,) + tuple(batch_sizes[:1])},
        "packing_padding_tokens": len(rows) * max_length - real,
        "packing_fill": round(real / (len(rows) * max_length), 4),
    }


def format_check(r: dict) -> str:
    t, p = r["tokens"], r["padding"]
    lines = [f"{r['file']}: {r['records']} records ({r['task']}, tokenizer of {r['model']})"]
    if r["broken_records"]:
        lines.append(f"broken records skipped here ({r['broken_records']}; training would stop at the first):")
        lines += [f"  {b}" for b in r["broken"]]
    if r["held_out_by_recipe"]:
        lines.append(f"held out by the recipe: the last {r['held_out_by_recipe']} records (never trained on)")
    lines.append(
        f"tokens per sample: min {t['min']}, mean {t['mean']}, median {t['median']}, p90 {t['p90']}, "
        f"p99 {t['p99']}, max {t['max']}; {t['total']} in all, {t['trained']} trained"
    )
    lines.append(
        f"longer than max_length {r['max_length']}: {r['over_max_length']}"
        + (f" — {r['over_max_length_fate']}" if r["over_max_length"] else "")
    )
    if p:
        share = lambda n: f"{n} ({n / p['real_tokens']:.1%})"  # noqa: E731
        plain = ", ".join(f"{share(n)} in batches of {bs}" for bs, n in p["batch_padding_tokens"].items())
        packed = ", ".join(f"{share(n)} in batches of {bs}" for bs, n in p["packed_batch_padding_tokens"].items())
        lines.append(
            f"padding tokens (samples that fit max_length, shuffled), padded to the longest of the batch: "
            f"{plain}; packed into {p['packed_sequences']} sequences ({p['packing_fill']:.1%} of "
            f"{r['max_length']} used): {packed}; {share(p['packing_padding_tokens'])} if every "
            f"sequence is padded to {r['max_length']}"
        )
    d = r["duplicates"]
    lines.append(
        f"exact duplicates: {d['records_repeated']} records repeated, {d['extra_copies']} extra copies"
        + (" (first seen at " + ", ".join(f"{k} ×{v}" for k, v in d["examples"].items()) + ")" if d["examples"] else "")
    )
    lines.append(f"histogram: {r['histogram']}")
    s = r["sample"]
    lines.append(f"\nsample {s['source']} ({s['tokens']} tokens, {s['trained_tokens']} trained, marked «»):")
    lines.append(s["rendered"])
    return "\n".join(lines)
