"""An Ollama Modelfile for an exported GGUF: FROM, the chat template as a Go TEMPLATE, stop tokens, SYSTEM.

Ollama does not run Jinja, so the chat template is translated by rendering it: each role's text before
and after its content (found with marker contents), the text that opens the assistant's reply, and a
BOS the template prints. The translation is checked against the Jinja template on conversations with
and without a system prompt; a template that is not one prefix and one suffix per role (tool calls,
branches on the content) is refused rather than approximated.
"""

from __future__ import annotations

from chatforge.export.merge import template_default_system
from chatforge.files import ChatforgeError
from chatforge.models.gguf_vocab import adds_special
from chatforge.models.load import stop_token_ids

ROLES = ("system", "user", "assistant")


def _render(tokenizer, messages: list[dict], generation: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    except Exception as e:  # jinja raises many kinds of errors
        raise ChatforgeError(f"the chat template cannot be rendered for Ollama: {e}") from None


def role_parts(tokenizer) -> tuple[str, dict[str, tuple[str, str]], str]:
    """The text before the first message, each role's (prefix, suffix), and the generation prompt.

    Raises:
        ChatforgeError: the template does not render each message as prefix + content + suffix.
    """
    marks = {role: f"\x01{role}\x01" for role in ROLES}
    chat = [{"role": role, "content": marks[role]} for role in ROLES]
    texts = [_render(tokenizer, chat[:n]) for n in range(1, len(chat) + 1)]
    bos = tokenizer.bos_token or ""
    head = bos if bos and "bos_token" in (tokenizer.chat_template or "") and texts[0].startswith(bos) else ""
    parts, done = {}, head
    for role, text in zip(ROLES, texts):
        if not text.startswith(done) or text[len(done) :].count(marks[role]) != 1:
            raise ChatforgeError(
                f"the chat template does not render a {role} message as prefix + content + suffix: "
                f"Ollama's TEMPLATE cannot express it"
            )
        parts[role] = tuple(text[len(done) :].split(marks[role]))
        done = text
    prompt = _render(tokenizer, chat[:2], generation=True)
    if not prompt.startswith(texts[1]):
        raise ChatforgeError("the chat template's generation prompt is not appended to the conversation")
    return head, parts, prompt[len(texts[1]) :]


def simulate(head: str, parts: dict, generation: str, messages: list[dict]) -> str:
    """What the Go template renders for `messages` (the Modelfile's SYSTEM arrives as a system message)."""
    return head + "".join(parts[m["role"]][0] + m["content"] + parts[m["role"]][1] for m in messages) + generation


def go_template(tokenizer) -> str:
    """The chat template as an Ollama TEMPLATE over .Messages, checked against the Jinja original.

    Raises:
        ChatforgeError: a template that cannot be translated, or whose translation renders differently.
    """

    head, parts, generation = role_parts(tokenizer)
    default = template_default_system(tokenizer)
    system = [{"role": "system", "content": default}] if default else []
    turns = [
        {"role": "user", "content": "Hi! 你好"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Who are you?"},
    ]
    custom = [{"role": "system", "content": "Be brief."}] + turns
    for given, sent in ((turns, system + turns), (custom, custom)):  # what Jinja gets, what Ollama renders
        if simulate(head, parts, generation, sent) != _render(tokenizer, given, generation=True):
            raise ChatforgeError(
                "the chat template renders differently from its Ollama translation; write the "
                "Modelfile's TEMPLATE by hand"
            )
    literal = [head, generation] + [p for pair in parts.values() for p in pair]
    if any("{{" in p or '"""' in p for p in literal):
        raise ChatforgeError(
            "the chat template's text contains '{{' or '\"\"\"', which a Modelfile TEMPLATE cannot hold"
        )
    if head and adds_special(tokenizer)[0]:
        head = ""  # llama.cpp adds BOS itself when the GGUF says so
    branches = "{{ else if".join(
        f' eq .Role "{role}" }}}}{pre}{{{{ .Content }}}}{post}' for role, (pre, post) in parts.items()
    )
    return f"{head}{{{{ range .Messages }}}}{{{{ if{branches}{{{{ end }}}}{{{{ end }}}}{generation}"


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def modelfile_text(tokenizer, gguf_name: str) -> str:
    """An Ollama Modelfile for the GGUF `gguf_name` in the same folder.

    Raises:
        ChatforgeError: the chat template cannot be translated, or a text a Modelfile cannot quote.
    """

    template = go_template(tokenizer)
    system = template_default_system(tokenizer)
    lines = [
        "# Made with chatforge: ollama create NAME -f Modelfile && ollama run NAME",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{template}"""',
    ]
    if system:
        if '"""' in system:
            raise ChatforgeError('the default system prompt contains \'"""\', which a Modelfile cannot quote')
        lines.append(f'SYSTEM """{system}"""')
    lines += [f'PARAMETER stop "{_quote(tokenizer.convert_ids_to_tokens(i))}"' for i in stop_token_ids(tokenizer)]
    return "\n".join(lines) + "\n"
