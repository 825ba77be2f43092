"""Built-in and file chat templates for models that have none."""

from __future__ import annotations

import copy
import json

import pytest

from chatforge.config import load_recipe
from chatforge.data.encode import encode_sft, trained_spans
from chatforge.files import ChatforgeError
from chatforge.models.chat_templates import BUILTIN, apply, require

TALK = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "I am Ada's assistant."},
    {"role": "user", "content": "2 + 2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture
def bare(smol_tokenizer):
    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    return tok


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_templates_train_each_reply_and_its_end(bare, name):
    apply(bare, name)
    text, spans = trained_spans(bare, TALK)
    assert [text[a:b].split("<")[0].strip() for a, b in spans] == ["I am Ada's assistant.", "4"]
    end = BUILTIN[name][1] if BUILTIN[name][1] in bare.get_vocab() else bare.eos_token
    assert all(text[a:b].endswith(end) for a, b in spans), (name, [text[a:b] for a, b in spans])
    ids, labels = encode_sft(bare, TALK)
    assert labels.count(bare.convert_tokens_to_ids(end)) == 2  # the model learns to stop after each reply


def test_unknown_end_of_turn_marker_becomes_eos(bare):
    apply(bare, "llama3")
    assert "<|eot_id|>" not in bare.chat_template and bare.eos_token in bare.chat_template
    prompt = bare.apply_chat_template(TALK[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_qwen2_template_injects_its_default_system_prompt(bare):
    apply(bare, "qwen2")
    assert "You are a helpful assistant." in bare.apply_chat_template(TALK[1:2], tokenize=False)
    assert "helpful" not in bare.apply_chat_template(TALK[:2], tokenize=False)


def test_template_files(bare, tmp_path):
    jinja = tmp_path / "t.jinja"
    jinja.write_text(BUILTIN["chatml"][0])
    apply(bare, str(jinja))
    assert bare.chat_template == BUILTIN["chatml"][0]
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"chat_template": [{"name": "default", "template": "{{ messages[0]['content'] }}"}]}))
    apply(bare, str(cfg))
    assert bare.chat_template == "{{ messages[0]['content'] }}"
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ChatforgeError, match="holds no chat template"):
        apply(bare, str(tmp_path / "empty.json"))


def test_missing_template_names_the_option(bare):
    with pytest.raises(ChatforgeError, match=r"--chat-template NAME\|FILE .*chatml, qwen2"):
        require(bare, "base-model")
    with pytest.raises(ChatforgeError, match="neither a built-in template"):
        apply(bare, "vicuna")
    with pytest.raises(ChatforgeError, match="--chat-template"):
        trained_spans(bare, TALK)


def test_recipe_key_chat_template():
    assert load_recipe("smollm2_135m_identity_lora", ["chat_template=gemma"]).chat_template == "gemma"
    with pytest.raises(ChatforgeError, match="chat_template"):
        load_recipe("smollm2_135m_identity_lora", ["chat_template=[1]"])
