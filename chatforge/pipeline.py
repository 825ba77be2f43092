"""One command from a name to a merged, evaluated assistant: data -> train -> merge -> eval."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from chatforge.config import load_recipe
from chatforge.data.identity import IdentitySpec, write_identity_data
from chatforge.evaluation import evaluate
from chatforge.export.gguf import export_gguf, gguf_dtype
from chatforge.export.merge import merge, template_default_system
from chatforge.files import write_json, write_text
from chatforge.models.internlm2 import declares_internlm2
from chatforge.models.load import (
    DEFAULT_MODEL,
    display_name,
    load_model,
    load_tokenizer,
    local_folder,
    read_config,
    reference_dtype,
)
from chatforge.training.trainer import train


def slug(text: str) -> str:
    s = re.sub(r"[^\w]+", "-", text.lower(), flags=re.UNICODE).strip("-")
    return s or "assistant"


def recipe_for(model: str) -> str:
    """The shipped identity recipe that fits a model (InternLM2 or the SmolLM2 default)."""

    il2 = declares_internlm2(read_config(local_folder(model)))
    return "internlm2_chat_1_8b_identity_qlora" if il2 else "smollm2_135m_identity_lora"


def assistant(
    name: str,
    model: str = DEFAULT_MODEL,
    assistant_name: str = "",
    out: str | None = None,
    recipe: str | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
    gguf: str | None = None,
    chat_template: str | None = None,
) -> dict:
    """Run data -> train -> merge -> eval; returns the stage times and the eval result.

    Args:
        gguf: a GGUF dtype (f16, bf16, f32, q8_0): end by exporting merged/<name>-<dtype>.gguf and its
            Ollama Modelfile.
        chat_template: a built-in name or file for a model without a chat template (or to replace its
            own); the merged model keeps it.
    Raises:
        ChatforgeError: from any stage, with the stage's own message.
    """

    gguf = gguf and gguf_dtype(gguf)  # a wrong dtype fails now, not after training
    run = Path(out or f"runs/assistant-{slug(name)}")
    times: dict[str, float] = {}

    t = time.perf_counter()
    tokenizer = load_tokenizer(model, chat_template, for_chat=True)
    base_model = load_model(model, dtype=reference_dtype(model))
    spec = IdentitySpec(owner=name, assistant=assistant_name, base=display_name(model))
    data_file = run / "data" / "identity.jsonl"
    counts = write_identity_data(spec, data_file, replay_model=base_model, tokenizer=tokenizer)
    del base_model
    times["data"] = time.perf_counter() - t
    print(
        f"[data] {counts['identity']} identity + {counts['replay']} replay + {counts['multi-turn']} two-turn "
        f"conversations -> {data_file} "
        f"({times['data']:.0f} s)",
        flush=True,
    )

    t = time.perf_counter()
    cfg = load_recipe(
        recipe or recipe_for(model),
        [f"model={model}", f"data={data_file}", f"output_dir={run / 'train'}"] + list(overrides or []),
    )
    cfg.chat_template = chat_template or cfg.chat_template
    adapter = train(cfg, progress=progress)
    times["train"] = time.perf_counter() - t
    print(f"[train] adapter -> {adapter} ({times['train']:.0f} s)", flush=True)

    t = time.perf_counter()
    merged = run / "merged"
    # A named assistant replaces the template's injected default prompt ("... named SmolLM"), which would
    # contradict its answers; an unnamed one keeps it ("<owner>'s assistant, built on SmolLM2" agrees).
    rename = assistant_name and template_default_system(tokenizer)
    report = merge(
        adapter,
        merged,
        base=model,
        chat_template=chat_template,
        default_system=(f"You are {assistant_name}, {name}'s assistant, built on {spec.base}." if rename else None),
    )
    times["merge"] = time.perf_counter() - t
    print(f"[merge] {merged} (max logit diff {report['max_logit_diff']:.2e}, {times['merge']:.0f} s)", flush=True)

    t = time.perf_counter()
    result = evaluate(
        str(merged),
        base=model,
        eval_file=str(data_file.with_name("identity.eval.json")),
        out_dir=run,
        chat_template=chat_template,
    )
    times["eval"] = time.perf_counter() - t
    if gguf:
        t = time.perf_counter()
        exported = export_gguf(
            str(merged), merged / f"{slug(name)}-{gguf}.gguf", dtype=gguf, ollama=True, progress=progress
        )
        times["gguf"] = time.perf_counter() - t
        print(
            f"[gguf] {exported['out']} ({exported['bytes'] / 2**20:.0f} MiB) and {exported['modelfile']} "
            f"({times['gguf']:.0f} s)",
            flush=True,
        )
    times["total"] = sum(times.values())
    write_json(run / "timings.json", {k: round(v, 1) for k, v in times.items()})
    summary = "\n".join(f"| {k} | {v:.0f} s |" for k, v in times.items())
    write_text(
        run / "README.md",
        f"# Assistant of {name}\n\n{result['table']}\n| stage | time |\n|---|---|\n"
        f"{summary}\n\nChat with it: `chatforge chat {merged}`\n",
    )
    print(f"\n{result['table']}\nstage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()))
    print(f"\nchat with it:  chatforge chat {merged}")
    if gguf:
        tag = re.sub(r"[^a-z0-9_.-]", "", slug(name)).strip("-._") or "assistant"  # Ollama's model names are ASCII
        print(f"run it locally:  cd {merged} && ollama create {tag} -f Modelfile && ollama run {tag}")
    return {"run": str(run), "merged": str(merged), "times": times, "eval": result, "data": counts, "merge": report}


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(assistant("Clement Wu")["times"], indent=2))
