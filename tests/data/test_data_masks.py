"""Chat rendering and loss masks: exactly the assistant replies carry loss, token by token."""

from __future__ import annotations

import json

import pytest

from chatforge.data.encode import IGNORE, encode_sft
from chatforge.data.readers import read_conversations, to_messages
from chatforge.files import ChatforgeError

CONV = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


class SlowView:
    """The same tokenizer seen without offsets, to exercise the piecewise encoding path."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)


def trained_runs(ids, labels):
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    return runs + ([cur] if cur else [])


def test_mask_covers_exactly_the_assistant_replies(smol_tokenizer):
    tok = smol_tokenizer
    ids, labels = encode_sft(tok, CONV)
    text = tok.apply_chat_template(CONV, tokenize=False)
    assert ids == tok.encode(text, add_special_tokens=False)  # the whole rendering, untouched
    runs = trained_runs(ids, labels)
    replies = [m["content"] for m in CONV if m["role"] == "assistant"]
    assert [tok.decode(r) for r in runs] == [r + "<|im_end|>" for r in replies]
    # token by token: every trained token lies inside a reply or is its end marker
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for run, reply in zip(runs, replies):
        assert run[-1] == im_end
        assert run[:-1] == tok.encode(reply, add_special_tokens=False)


def test_piecewise_path_gives_the_same_labels(smol_tokenizer):
    assert encode_sft(SlowView(smol_tokenizer), CONV) == encode_sft(smol_tokenizer, CONV)


def test_default_system_prompt_is_rendered_but_not_trained(smol_tokenizer):
    conv = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A helper."}]
    ids, labels = encode_sft(smol_tokenizer, conv)
    assert "SmolLM" in smol_tokenizer.decode(ids)
    assert [smol_tokenizer.decode(r) for r in trained_runs(ids, labels)] == ["A helper.<|im_end|>"]


def test_seed_format_and_messages_normalise_alike(tmp_path):
    seed = tmp_path / "assistant.json"
    seed.write_text(
        json.dumps([{"conversation": [{"system": "S", "input": "Q", "output": "A"}]}] * 2, ensure_ascii=False, indent=4)
    )
    msgs = tmp_path / "m.jsonl"
    msgs.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ]
            }
        )
        + "\n"
    )
    a, b = read_conversations(seed), read_conversations(msgs)
    assert len(a) == 2 and a[0].messages == b[0].messages
    assert a[1].source.endswith(":11")  # the line where the second record of the indented array opens


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"messages": [{"role": "user", "content": "hi"}\n', r"bad\.jsonl:2: invalid JSON"),
        ('{"messages": []}\n', r"bad\.jsonl:2: empty conversation"),
        ('{"conversation": [{"input": "q"}]}\n', r"bad\.jsonl:2: missing field 'conversation\[0\]\.output'"),
        (
            '{"messages": [{"role": "user", "content": 3}]}\n',
            r"bad\.jsonl:2: field 'messages\[0\]\.content' must be text",
        ),
        ('{"prompt": "x"}\n', r"bad\.jsonl:2: unknown record shape"),
    ],
)
def test_broken_records_name_file_and_line(tmp_path, content, message):
    bad = tmp_path / "bad.jsonl"
    good = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    bad.write_text(good + content)
    with pytest.raises(ChatforgeError, match=message):
        read_conversations(bad)


def test_invalid_utf8_and_missing_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    # line 1 is valid: records are streamed, so the first broken line is the one reported
    bad.write_bytes(b'{"instruction": "q", "output": "a"}\n{"messages": "\xff\xfe"}\n')
    with pytest.raises(ChatforgeError, match=r"bad\.jsonl:2: invalid UTF-8"):
        read_conversations(bad)
    with pytest.raises(ChatforgeError, match="data file not found"):
        read_conversations(tmp_path / "nope.jsonl")


def test_alpaca_and_sharegpt():
    a = to_messages({"instruction": "Translate", "input": "hello", "output": "bonjour"}, "x:1")
    assert a == [{"role": "user", "content": "Translate\nhello"}, {"role": "assistant", "content": "bonjour"}]
    s = to_messages({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "x:1")
    assert s[1] == {"role": "assistant", "content": "a"}
