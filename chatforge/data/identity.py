"""Identity data: teach a model whose assistant it is, without forgetting everything else.

The seed lesson repeats two question/answer pairs 3,750 times, which makes the model answer
every prompt with its identity. Here instead: many question phrasings (Chinese and English)
with several answer variants, under three system-prompt settings (the template's default,
custom prompts, and an empty one), mixed in each language about 1:1 with "replay" conversations
(the base model's own answers to general prompts, under the same system settings) and with
two-turn conversations (a general exchange before or after the identity one), so that no
language's general questions drift toward the identity answer. Disjoint sets of identity and
general questions are kept for evaluation.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from chatforge.files import ChatforgeError, write_json, write_jsonl
from chatforge.inference.generate import generate_batch
from chatforge.models.load import ALIASES, DEFAULT_MODEL

LANGS = ("en", "zh")


def load_asset(name: str) -> dict:
    return json.loads((resources.files("chatforge") / "assets" / name).read_text(encoding="utf-8"))


def normalise(question: str) -> str:
    return re.sub(r"[\s\W_]+", "", question.lower())


REPLAY_RATIO = 1.0  # general conversations per identity conversation, in each language
MULTI_TURN_RATIO = 0.25  # two-turn conversations (general + identity) per identity conversation


@dataclass
class IdentitySpec:
    owner: str
    assistant: str = ""  # the assistant's own name, optional
    base: str = ALIASES[DEFAULT_MODEL].display
    eval_fraction: float = 0.25
    seed: int = 0
    extra_system: list = field(default_factory=list)  # e.g. the base model's tool default prompt

    def __post_init__(self):
        if not self.owner.strip():
            raise ChatforgeError("identity: --name must not be empty")


def split_questions(spec: IdentitySpec) -> dict[str, dict[str, list[str]]]:
    """Split each language's questions into disjoint train and eval sets (deterministic)."""
    asset = load_asset("identity.json")
    out = {"train": {}, "eval": {}}
    for lang in LANGS:
        seen, questions = set(), []
        for q in asset[f"questions_{lang}"]:
            if normalise(q) not in seen:
                seen.add(normalise(q))
                questions.append(q)
        random.Random(spec.seed).shuffle(questions)
        n_eval = max(1, round(len(questions) * spec.eval_fraction))
        out["eval"][lang], out["train"][lang] = questions[:n_eval], questions[n_eval:]
    return out


def answers(spec: IdentitySpec, lang: str) -> list[str]:
    asset = load_asset("identity.json")
    mes = [m for m in asset[f"me_{lang}"] if spec.assistant or "{assistant}" not in m]
    out = []
    for template in asset[f"answers_{lang}"]:
        for me in mes:
            me_text = me.format(owner=spec.owner, assistant=spec.assistant)
            out.append(template.format(me=me_text, owner=spec.owner, base=spec.base))
    return out


def system_settings(spec: IdentitySpec) -> list[str | None]:
    """None: no system message (the template's default applies); "": an empty one; else custom."""
    return [None, ""] + load_asset("identity.json")["system_train"] + list(spec.extra_system)


def with_system(system: str | None, messages: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system is not None else []) + messages


def identity_conversations(spec: IdentitySpec, per_question: int = 3) -> list[dict]:
    rng = random.Random(spec.seed + 1)
    systems = system_settings(spec)
    rows = []
    for lang, questions in split_questions(spec)["train"].items():
        pool = answers(spec, lang)
        for q in questions:
            for system in rng.sample(systems, min(per_question, len(systems))):
                rows.append(
                    {"messages": with_system(system, exchange(q, rng.choice(pool))), "kind": "identity", "lang": lang}
                )
    return rows


_LOOP = re.compile(r"(.{1,16}?)\1{3,}", re.DOTALL)  # a piece said four times or more in a row


def trim_reply(text: str, at_limit: bool = True) -> str:
    """Cut a reply where it starts to repeat itself (12 characters or more of one piece said again and
    again), and then, or if it hit the token limit, back to its last full sentence."""
    loop = next((m for m in _LOOP.finditer(text) if m.end() - m.start() >= 12), None)
    if loop:
        text = text[: loop.start() + len(loop.group(1))]
    if not (loop or at_limit):
        return text.strip()
    cut = max(text.rfind(c) for c in ".!?。！？\n")
    return text[: cut + 1].strip() if cut > len(text) // 3 else text.strip()


def base_answers(model, tokenizer, max_new_tokens: int = 64) -> dict[str, list[tuple[str, str]]]:
    """The base model's own greedy answers to each language's replay prompts, whatever their quality
    (one language per batch: English answers end early, Chinese ones often run to the limit). An answer
    that only repeats the question is left out: trained on, it teaches the model to echo."""

    general = load_asset("general.json")
    prompts = [(lang, p) for lang in LANGS for p in general[f"replay_{lang}"]]
    replies = generate_batch(
        model,
        tokenizer,
        [[{"role": "user", "content": p}] for _, p in prompts],
        max_new_tokens=max_new_tokens,
        batch_size=30,
    )
    out = {lang: [] for lang in LANGS}
    for (lang, p), r in zip(prompts, replies):
        reply = trim_reply(r, len(tokenizer.encode(r, add_special_tokens=False)) >= max_new_tokens - 1)
        if normalise(reply) and normalise(reply) not in normalise(p):
            out[lang].append((p, reply))
    return out


def exchange(question: str, reply: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]


def replay_conversations(spec: IdentitySpec, pairs: list[tuple[str, str]], count: int) -> list[dict]:
    """`count` general conversations cycling through (prompt, base answer) pairs, under the same
    system settings as the identity data (default, empty and custom prompts), so no prompt marks either."""
    rng = random.Random(spec.seed + 2)
    systems = system_settings(spec)
    return [
        {"messages": with_system(rng.choice(systems), exchange(*pairs[i % len(pairs)])), "kind": "replay"}
        for i in range(count)
        if pairs
    ]


def multi_turn_conversations(spec: IdentitySpec, lang: str, pairs: list[tuple[str, str]], count: int) -> list[dict]:
    """Two-turn conversations in one language: a general exchange then the identity question, or the
    identity exchange then a general question (so neither turn order teaches a leak)."""
    rng = random.Random(spec.seed + 4)
    systems, pool = system_settings(spec), answers(spec, lang)
    questions = split_questions(spec)["train"][lang]
    rows = []
    for i in range(count if pairs else 0):
        general = exchange(*rng.choice(pairs))
        ident = exchange(rng.choice(questions), rng.choice(pool))
        turns = general + ident if i % 2 == 0 else ident + general
        rows.append({"messages": with_system(rng.choice(systems), turns), "kind": "multi-turn"})
    return rows


def eval_set(spec: IdentitySpec) -> dict:
    """What `chatforge eval` needs: the owner, held-out identity questions, eval system prompts, and
    held-out general questions with accepted answers (`general`: {lang, q, expect})."""
    return {
        "owner": spec.owner,
        "assistant": spec.assistant,
        "base": spec.base,
        "questions": split_questions(spec)["eval"],
        "system_eval": load_asset("identity.json")["system_eval"],
        "general": load_asset("general.json")["eval"],
    }


def eval_path(train_path: str | Path) -> Path:
    p = Path(train_path)
    return p.with_name(p.name.rsplit(".", 1)[0] + ".eval.json")


def write_identity_data(
    spec: IdentitySpec,
    out: str | Path,
    replay_model=None,
    tokenizer=None,
    replay_ratio: float = REPLAY_RATIO,
    multi_turn_ratio: float = MULTI_TURN_RATIO,
) -> dict:
    """Write the training file (messages JSONL) and its eval set beside it; returns counts.

    Per language, replay conversations number `replay_ratio` times the identity ones and two-turn
    conversations `multi_turn_ratio` times, so general prompts weigh as much in Chinese as in English.
    """
    rows = identity_conversations(spec)
    counts = {"identity": len(rows), "replay": 0, "multi-turn": 0}
    if replay_model is not None:
        pairs = base_answers(replay_model, tokenizer)
        for lang in LANGS:
            n = sum(r["lang"] == lang for r in rows[: counts["identity"]])
            rows += replay_conversations(spec, pairs[lang], round(n * replay_ratio))
            rows += multi_turn_conversations(spec, lang, pairs[lang], round(n * multi_turn_ratio))
        for kind in ("replay", "multi-turn"):
            counts[kind] = sum(r["kind"] == kind for r in rows)
    random.Random(spec.seed + 3).shuffle(rows)
    write_jsonl(out, rows)
    write_json(eval_path(out), eval_set(spec))
    return dict(counts, path=str(out), eval=str(eval_path(out)))
