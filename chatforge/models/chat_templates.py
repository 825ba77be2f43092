"""Chat templates for models that have none (base checkpoints, many GGUF files) or the wrong one.

`--chat-template NAME|FILE` (recipe key `chat_template`) takes a built-in name or a file: a Jinja
template, or a JSON file with a `chat_template` key (e.g. another model's tokenizer_config.json).
A template's end-of-turn marker that the tokenizer does not know as one token is replaced by the
tokenizer's EOS token, so generation stops where training put the end of each reply.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatforge.files import ChatforgeError

END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
)  # markers that end an assistant turn

_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_QWEN2_DEFAULT = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
)
_LLAMA3 = (
    "{{ bos_token or '' }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_GEMMA = (
    "{{ bos_token or '' }}{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set turns = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + ((system + '\n\n') if (loop.first and system) else '') + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# name -> (Jinja template, its end-of-turn marker)
BUILTIN = {
    "chatml": (_CHATML, "<|im_end|>"),
    "qwen2": (_QWEN2_DEFAULT + _CHATML, "<|im_end|>"),
    "internlm2": ("{{ bos_token or '' }}" + _CHATML, "<|im_end|>"),
    "llama3": (_LLAMA3, "<|eot_id|>"),
    "gemma": (_GEMMA, "<end_of_turn>"),
}
OPTION = "--chat-template NAME|FILE (recipe key chat_template)"


def read_template_file(path: Path) -> str:
    """The template in a Jinja file, or under `chat_template` in a JSON file.

    Raises:
        ChatforgeError: unreadable file, or no template in it.
    """
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json":
            text = json.loads(text).get("chat_template") or ""
            if isinstance(text, list):  # named templates: take the default one
                text = next((t["template"] for t in text if t.get("name") == "default"), "")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError) as e:
        raise ChatforgeError(f"--chat-template {path}: unreadable template file: {e}") from None
    if not isinstance(text, str) or not text.strip():
        raise ChatforgeError(f"--chat-template {path}: the file holds no chat template")
    return text


def saved_template(folder: Path) -> str | None:
    """The template a training run saved beside its weights (chat_template.jinja or tokenizer_config.json)."""
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if (folder / name).is_file():
            try:
                return read_template_file(folder / name)
            except ChatforgeError:
                continue
    return None


def apply(tokenizer, name_or_file: str) -> None:
    """Give the tokenizer a built-in or file template, in place.

    Raises:
        ChatforgeError: neither a built-in name nor a readable template file; a built-in template on a
            tokenizer with neither its end-of-turn token nor an EOS token.
    """
    if name_or_file.lower() in BUILTIN:
        template, end = BUILTIN[name_or_file.lower()]
        if end not in tokenizer.get_vocab():
            if tokenizer.eos_token is None:
                raise ChatforgeError(
                    f"--chat-template {name_or_file}: the tokenizer knows neither {end} nor an "
                    f"EOS token to end a turn with"
                )
            template = template.replace(end, tokenizer.eos_token.replace("'", "\\'"))
        tokenizer.chat_template = template
        return
    path = Path(name_or_file).expanduser()
    if not path.is_file():
        raise ChatforgeError(
            f"--chat-template {name_or_file!r}: neither a built-in template ({', '.join(BUILTIN)}) nor a file"
        )
    tokenizer.chat_template = read_template_file(path)


def require(tokenizer, model: str) -> None:
    """Raises:
    ChatforgeError: the tokenizer has no chat template (a base model); the message names the option.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatforgeError(f"{model} has no chat template; pass {OPTION}, built-in: {', '.join(BUILTIN)}")
