"""Identity data: teach a model whose assistant it is, without forgetting everything else.

The seed lesson repeats two question/answer pairs 3,750 times, which makes the model answer
every prompt with its identity. Here instead: many question phrasings (Chinese and English)
with several answer variants, under three system-prompt settings (the template's default,
custom prompts, and an empty one), mixed about 1:1 with "replay" conversations: the base
model's own answers to general prompts. A disjoint set of questions is kept for evaluation.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .files import ChatforgeError, write_json, write_jsonl


def load_asset(name: str) -> dict:
    return json.loads((resources.files("chatforge") / "assets" / name).read_text(encoding="utf-8"))


def normalise(question: str) -> str:
    return re.sub(r"[\s\W_]+", "", question.lower())


@dataclass
class IdentitySpec:
    owner: str
    assistant: str = ""  # the assistant's own name, optional
    base: str = "SmolLM2-135M-Instruct"
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
    for lang in ("en", "zh"):
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
                msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": rng.choice(pool)}]
                rows.append({"messages": with_system(system, msgs), "kind": "identity"})
    return rows


def trim_reply(text: str) -> str:
    """Cut a reply that hit the token limit back to its last full sentence."""
    cut = max(text.rfind(c) for c in ".!?。！？\n")
    return text[: cut + 1].strip() if cut > len(text) // 3 else text.strip()


def replay_conversations(model, tokenizer, count: int, seed: int = 0, max_new_tokens: int = 96) -> list[dict]:
    """The base model's own greedy answers to general prompts, to train alongside the identity."""
    from .generate import generate_batch

    prompts = load_asset("general.json")["replay"]
    convs = [[{"role": "user", "content": p}] for p in prompts]
    replies = generate_batch(model, tokenizer, convs, max_new_tokens=max_new_tokens)
    base = [(p, trim_reply(r)) for p, r in zip(prompts, replies) if r.strip()]
    rng = random.Random(seed + 2)
    settings = [None, None, ""]  # mostly as the model is used: the template's default prompt
    return [{"messages": with_system(rng.choice(settings), [{"role": "user", "content": p},
                                                             {"role": "assistant", "content": r}]),
             "kind": "replay"} for p, r in (base[i % len(base)] for i in range(count))]


def eval_set(spec: IdentitySpec) -> dict:
    """What `chatforge eval` needs: the owner, held-out questions, eval system prompts, general prompts."""
    general = load_asset("general.json")
    return {"owner": spec.owner, "assistant": spec.assistant, "base": spec.base,
            "questions": split_questions(spec)["eval"],
            "system_eval": load_asset("identity.json")["system_eval"],
            "general": general["eval"], "facts": general["facts"]}


def eval_path(train_path: str | Path) -> Path:
    p = Path(train_path)
    return p.with_name(p.name.rsplit(".", 1)[0] + ".eval.json")


def write_identity_data(spec: IdentitySpec, out: str | Path, replay_model=None, tokenizer=None,
                        replay_ratio: float = 1.0) -> dict:
    """Write the training file (messages JSONL) and its eval set beside it; returns counts."""
    rows = identity_conversations(spec)
    n_replay = round(len(rows) * replay_ratio) if replay_model is not None else 0
    if n_replay:
        rows += replay_conversations(replay_model, tokenizer, n_replay, seed=spec.seed)
    random.Random(spec.seed + 3).shuffle(rows)
    write_jsonl(out, rows)
    write_json(eval_path(out), eval_set(spec))
    return {"identity": len(rows) - n_replay, "replay": n_replay, "path": str(out),
            "eval": str(eval_path(out))}
