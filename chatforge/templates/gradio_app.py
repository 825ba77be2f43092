"""A Gradio chat for a model kept in a git + git-lfs model repo (Hugging Face Space, OpenXLab, or local).

On first start the model is fetched with `git clone` and `git lfs pull` into ./model, then served
with plain transformers. Run it locally with `python app.py` (http://127.0.0.1:7860).
Settings (environment): MODEL_REPO, MODEL_BRANCH, MODEL_DIR, MODEL_REPO_TOKEN (private repos),
TRUST_REMOTE_CODE=1 (models that need their own code), GRADIO_SERVER_NAME / GRADIO_SERVER_PORT.
"""

import os
import shutil
import subprocess
import threading
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model comes from MODEL_REPO only
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import torch  # noqa: E402
from chat_tokens import prompt_ids  # noqa: E402  (beside this file: a message cannot forge a chat role)
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer  # noqa: E402

TITLE = os.environ.get("APP_TITLE", "__TITLE__")
MODEL_REPO = os.environ.get("MODEL_REPO", "__MODEL_REPO__")
MODEL_BRANCH = os.environ.get("MODEL_BRANCH", "__BRANCH__")
MODEL_DIR = Path(os.environ.get("MODEL_DIR", Path(__file__).resolve().parent / "model"))


def git_env() -> dict:
    """No prompts; a private repo's token reaches git (and git-lfs) through a credential helper."""
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0", GIT_LFS_SKIP_SMUDGE="1")
    if os.environ.get("MODEL_REPO_TOKEN"):
        n = int(env.get("GIT_CONFIG_COUNT", "0") or 0)
        env.update(
            {
                f"GIT_CONFIG_KEY_{n}": "credential.helper",
                f"GIT_CONFIG_VALUE_{n}": '!f() { test "$1" = get || exit 0; echo username=user; '
                'echo "password=$MODEL_REPO_TOKEN"; }; f',
                "GIT_CONFIG_COUNT": str(n + 1),
            }
        )
    return env


def fetch_model() -> Path:
    """Clone the model repo and pull its LFS files once; a half-finished fetch is never used."""
    if (MODEL_DIR / "config.json").is_file():
        return MODEL_DIR
    partial = MODEL_DIR.with_name(MODEL_DIR.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    print(f"fetching the model from {MODEL_REPO} ...", flush=True)
    subprocess.run(
        ["git", "clone", "--depth", "1", "--branch", MODEL_BRANCH, MODEL_REPO, str(partial)], env=git_env(), check=True
    )
    subprocess.run(["git", "lfs", "install", "--local"], cwd=partial, env=git_env(), check=True)
    subprocess.run(["git", "lfs", "pull"], cwd=partial, env=git_env(), check=True)
    partial.rename(MODEL_DIR)
    return MODEL_DIR


folder = fetch_model()
trust = os.environ.get("TRUST_REMOTE_CODE") == "1"
device = "cuda" if torch.cuda.is_available() else "cpu"
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
model = (
    AutoModelForCausalLM.from_pretrained(
        folder,
        trust_remote_code=trust,
        dtype=torch.bfloat16 if device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32,
    )
    .to(device)
    .eval()
)
end_ids = sorted(
    {
        i
        for i in [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        if isinstance(i, int) and i != tokenizer.unk_token_id
    }
)


def text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text") or ""
    return "".join(text_of(c) for c in content or [])


def respond(message, history, system, temperature, top_p, max_new_tokens):
    messages = [{"role": "system", "content": system}] if system.strip() else []
    messages += [{"role": m["role"], "content": text_of(m["content"])} for m in history]
    messages.append({"role": "user", "content": text_of(message)})
    try:
        ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
    except ValueError as e:  # special-token text the template would rewrite
        raise gr.Error(str(e)) from None
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=int(max_new_tokens),
        streamer=streamer,
        eos_token_id=end_ids,
        pad_token_id=tokenizer.pad_token_id or end_ids[0],
        **sampling,
    )
    threading.Thread(target=lambda: model.generate(**kwargs), daemon=True).start()
    reply = ""
    for piece in streamer:
        reply += piece
        yield reply


demo = gr.ChatInterface(
    respond,
    title=TITLE,
    api_name="chat",
    additional_inputs=[
        gr.Textbox("", label="System prompt (empty: the model's default)"),
        gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p"),
        gr.Slider(8, 1024, value=256, step=8, label="Max new tokens"),
    ],
)

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1).launch(ssr_mode=False)
