"""The merged model's chat template: the injected default system prompt can be replaced safely."""

from __future__ import annotations

import copy

import pytest

from chatforge.export.merge import template_default_system, with_default_system
from chatforge.files import ChatforgeError


def test_default_system_prompt_is_found_and_replaced(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    assert template_default_system(tok) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    tok.chat_template = with_default_system(tok, "You are Nova, Ada's assistant, built on SmolLM2.")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "You are Nova, Ada's assistant, built on SmolLM2." in text and "SmolLM," not in text
    custom = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], tokenize=False
    )
    assert "Nova" not in custom and "Be brief." in custom


def test_template_without_default_prompt_is_refused(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    assert template_default_system(tok) is None
    with pytest.raises(ChatforgeError, match="no default system prompt"):
        with_default_system(tok, "x")
