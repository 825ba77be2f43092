"""Data formats, streaming readers, the converter, `data check`, held-out split, weighted mixing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chatforge.config import DataSource, TrainConfig
from chatforge.data import dataset, encode, readers
from chatforge.data.tools import check, convert
from chatforge.files import ChatforgeError
from conftest import ROOT, run_cli

HUATUO = ROOT.parent / "shared" / "data" / "huatuo" / "llama_data.jsonl"
Q, A = "What is 2+2?", "4"
MSGS = [{"role": "system", "content": "S"}, {"role": "user", "content": Q}, {"role": "assistant", "content": A}]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "record",
    [
        {"conversation": [{"system": "S", "input": Q, "output": A}]},
        {"messages": MSGS},
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": Q},
                {"from": "gpt", "value": A},
            ]
        },
        {"instruction": Q, "input": "", "output": A, "system": "S"},
    ],
)
@pytest.mark.parametrize("layout", ["jsonl", "array", "indented array"])
def test_every_format_in_jsonl_and_arrays(tmp_path, record, layout):
    if layout == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", [record] * 3)
    else:
        path = tmp_path / "d.json"
        path.write_text(json.dumps([record] * 3, indent=4 if layout == "indented array" else None))
    recs = readers.read_conversations(path)
    assert [r.messages for r in recs] == [MSGS] * 3
    if layout == "jsonl":
        assert [r.source for r in recs] == [f"{path}:{i}" for i in (1, 2, 3)]


def test_alpaca_history_and_input():
    msgs = readers.to_messages(
        {"instruction": "Sum", "input": "1 2", "output": "3", "history": [["hi", "hello"]]}, "x:1"
    )
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant"]
    assert msgs[2]["content"] == "Sum\n1 2"


def test_json_array_streams_across_chunks_with_lines(tmp_path):
    """Tiny chunks force every record, string and multi-byte character across chunk edges."""
    rows = [{"instruction": f"问题{i} é", "output": "答" * (i % 5 + 1)} for i in range(40)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    with open(path, "rb") as f:
        reader = readers._ArrayReader(path, f, chunk=7)
        got = []
        reader.peek()
        reader.advance(reader.pos + 1)
        decoder = json.JSONDecoder()
        while reader.peek() != "]":
            if reader.peek() == ",":
                reader.advance(reader.pos + 1)
                reader.peek()
            got.append((reader.line, reader.value(decoder)))
    assert [v for _, v in got] == rows
    assert [line for line, _ in got] == [2 + 4 * i for i in range(40)]  # each record spans 4 lines
    assert [line for line, _ in readers.iter_json_records(path)] == [2 + 4 * i for i in range(40)]


@pytest.mark.parametrize(
    "content, message",
    [
        (b'[{"instruction": "q", "output": "a"},\n {"instruction": "q", "output": "a"}\n', r"a\.json:3: .*truncated"),
        (b'[{"instruction": "q", "output": "a"}\n {"instruction": "q"}]', r"a\.json:2: invalid JSON: expected ','"),
        (b'[{"instruction": "q", "output": "\xff"}]', r"a\.json:1: invalid UTF-8"),
    ],
)
def test_broken_json_arrays_name_the_line(tmp_path, content, message):
    path = tmp_path / "a.json"
    path.write_bytes(content)
    with pytest.raises(ChatforgeError, match=message):
        readers.read_conversations(path)


def test_raw_text_formats(tmp_path):
    txt = tmp_path / "book.txt"
    txt.write_text("First doc\nstill first.\n\n\nSecond doc.\n\nThird.")
    docs = list(readers.iter_text_documents(txt))
    assert [d.messages[0]["content"] for d in docs] == ["First doc\nstill first.", "Second doc.", "Third."]
    assert [d.source.rsplit(":", 1)[1] for d in docs] == ["1", "5", "7"]
    assert len(list(readers.iter_text_documents(txt, whole_file=True))) == 1
    folder = tmp_path / "books"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.txt").write_text(f"book {i}\n\nchapter two")
    assert len(list(readers.iter_text_documents(folder))) == 3  # one document per file
    jl = write_jsonl(tmp_path / "t.jsonl", [{"text": "alpha"}, {"text": "beta"}])
    arr = tmp_path / "t.json"
    arr.write_text(json.dumps([{"text": "alpha"}, {"text": "beta"}]))
    assert [d.messages for d in readers.iter_text_documents(jl)] == [
        d.messages for d in readers.iter_text_documents(arr)
    ]
    write_jsonl(jl, [{"text": "alpha"}, {"txt": "beta"}])
    with pytest.raises(ChatforgeError, match=r"t\.jsonl:2: missing field 'text'"):
        list(readers.iter_text_documents(jl))


def test_pretrain_samples_eos_every_token_split_and_pack(tmp_path, smol_tokenizer):
    tok = smol_tokenizer
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 300}, {"text": "short text"}])
    cfg = TrainConfig(task="pretrain", data=[DataSource(path=str(path))], max_length=128, overflow="split")
    stats: dict = {}
    samples = list(dataset.iter_samples(cfg.data[0], cfg, tok, stats))
    assert stats["split"] == 1 and all(len(s.input_ids) <= 128 for s in samples)
    assert all(s.labels == s.input_ids for s in samples)  # loss on every token
    assert samples[-1].input_ids[-1] == tok.eos_token_id and tok.decode(samples[-1].input_ids[:-1]) == "short text"
    packs = list(dataset.pack(samples, 128))
    batch = dataset.collate_packed(packs, tok.pad_token_id)
    assert int((batch["input_ids"] == tok.eos_token_id).sum()) >= 2  # EOS closes each document
    cfg.overflow = "error"
    with pytest.raises(ChatforgeError, match=r"t\.jsonl:1: sample has \d+ tokens, more than max_length 128"):
        list(dataset.iter_samples(cfg.data[0], cfg, tok))


def test_holdout_last_is_never_trained_and_weights_mix(tmp_path, smol_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(20)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"b{i}", "output": "y"} for i in range(10)])
    cfg = TrainConfig(
        data=[DataSource(path=str(a), weight=2, holdout_last=5), DataSource(path=str(b), weight=0.5)],
        seed=3,
        max_length=128,
    )
    samples, stats = dataset.build_dataset(cfg, smol_tokenizer)
    lines = [s.source.split(":")[-1] for s in samples if s.source.startswith(str(a))]
    assert len(lines) == 30 and set(lines) == {str(i) for i in range(1, 16)}  # 15 kept, each twice
    assert [r.source.split(":")[-1] for r in readers.holdout_records(a, 5)] == ["16", "17", "18", "19", "20"]
    from_b = [s.source for s in samples if s.source.startswith(str(b))]
    assert len(from_b) == 5 and len(set(from_b)) == 5  # a seeded half, no repeats
    again, _ = dataset.build_dataset(cfg, smol_tokenizer)
    assert [s.source for s in again] == [s.source for s in samples]  # reproducible by seed
    cfg.seed = 4
    other, _ = dataset.build_dataset(cfg, smol_tokenizer)
    assert [s.source for s in other] != [s.source for s in samples]
    assert stats["sources"][0]["held_out"] == 5 and stats["sources"][1]["used"] == 5


BROKEN = (
    b'{"instruction": "q1", "output": "a1"}\n'
    b'{"instruction": "q2"}\n'
    b'{"instruction": 7, "output": "a3"}\n'
    b'{"instruction": "q4", "output": "\xff\xfe"}\n'
    b'{"messages": [{"role": "user", "content": "q5"}, {"role": "assistant", "content": "a5"}]}\n'
    b'{"instruction": "q6", "output": "a'
)


def test_convert_reports_and_skips_broken_records(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(BROKEN)
    r = convert(src, tmp_path / "out.json", to="conversation")
    assert r["converted"] == 2 and r["skipped"] == 4
    joined = "\n".join(r["skipped_lines"])
    for line, why in [
        (2, "missing field 'output'"),
        (3, "'instruction' must be text"),
        (4, "invalid UTF-8"),
        (6, "truncated"),
    ]:
        assert f"in.jsonl:{line}: " in joined and why in joined
    out = json.loads((tmp_path / "out.json").read_text())
    assert out == [
        {"conversation": [{"input": "q1", "output": "a1"}]},
        {"conversation": [{"input": "q5", "output": "a5"}]},
    ]
    r = convert(src, tmp_path / "out.jsonl", to="messages")
    assert readers.read_conversations(tmp_path / "out.jsonl")[1].messages[0] == {"role": "user", "content": "q5"}
    with pytest.raises(ChatforgeError, match=r"in\.jsonl:2: missing field 'output'"):
        convert(src, tmp_path / "strict.jsonl", strict=True)
    assert not (tmp_path / "strict.jsonl").exists()  # nothing half-written


def test_convert_and_check_cli(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(BROKEN)
    p = run_cli("data", "convert", src, tmp_path / "o.jsonl", timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["converted"] == 2 and "in.jsonl:4: invalid UTF-8" in p.stderr
    rows = [{"instruction": "hi", "output": "hello"}] * 2 + [{"instruction": "long " * 300, "output": "ok"}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    p = run_cli(
        "data",
        "check",
        tmp_path / "c.jsonl",
        "max_length=128",
        "overflow=drop",
        "--recipe",
        "smollm2_135m_identity_lora",
        "--out",
        tmp_path / "chk",
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert "3 records" in p.stdout and "longer than max_length 128: 1 — they are dropped" in p.stdout
    assert "1 records repeated, 1 extra copies" in p.stdout and "«hello<|im_end|>»" in p.stdout
    assert (tmp_path / "chk" / "lengths.png").stat().st_size > 1000


def test_check_counts_duplicates_and_marks_trained_tokens(tmp_path):
    rows = [{"messages": MSGS}, {"messages": MSGS}, {"instruction": "x", "output": "y"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    r = check(path, out_dir=tmp_path / "out")
    assert r["records"] == 3 and r["duplicates"]["extra_copies"] == 1
    assert r["duplicates"]["examples"] == {f"{path}:1": 2}
    assert r["sample"]["rendered"].count("«") == 1 and "«4<|im_end|>»" in r["sample"]["rendered"]
    assert r["over_max_length"] == 0 and r["tokens"]["max"] < 100


def test_converter_on_huatuo(tmp_path):
    if not HUATUO.is_file():
        pytest.skip(f"Huatuo data absent: {HUATUO} (the shared folder ../shared is not mounted)")
    r = convert(HUATUO, tmp_path / "huatuo.json", to="conversation")
    assert r["converted"] == 8658 and r["skipped"] == 0
    first = json.loads(HUATUO.open(encoding="utf-8").readline())
    out = readers.iter_json_records(tmp_path / "huatuo.json")
    line, rec = next(out)
    # exactly what the seed's hand-written converter makes of the first line
    assert line == 2 and rec == {"conversation": [{"input": first["instruction"], "output": first["output"]}]}
    assert len(readers.holdout_records(tmp_path / "huatuo.json", 500)) == 500


def test_eval_on_a_data_set_reports_rouge_and_reference_loss(tmp_path, tiny_llama, smol_tokenizer):
    import math

    import torch
    from transformers import AutoModelForCausalLM

    from chatforge.evaluation import evaluate_data

    rows = [{"instruction": f"问题 {i}", "output": f"答案是 {i}"} for i in range(6)]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    r = evaluate_data(str(tiny_llama), str(path), holdout_last=4, generate=2, max_new_tokens=4, out_dir=tmp_path / "ev")
    assert r["counts"]["records"] == 4 and r["counts"]["generated"] == 2
    s = r["scores"][tiny_llama.name]  # a column named after the model
    assert 0.0 <= s["ROUGE-L"] <= 1.0
    # the reference loss is the mean CE over exactly the reply tokens of the last 4 records
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    total = count = 0
    for rec in readers.holdout_records(path, 4):
        ids, labels = encode.encode_sft(smol_tokenizer, rec.messages)
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1]
        lab = torch.tensor(labels[1:])
        total += float(torch.nn.functional.cross_entropy(logits, lab, ignore_index=encode.IGNORE, reduction="sum"))
        count += int((lab != encode.IGNORE).sum())
    assert s["reference loss per token"] == pytest.approx(total / count, rel=1e-4)
    assert math.log(len(smol_tokenizer)) == pytest.approx(s["reference loss per token"], rel=0.1)  # random model
    answers = [json.loads(x) for x in (tmp_path / "ev" / "eval_answers.jsonl").read_text().splitlines()]
    assert [a["source"].rsplit(":", 1)[1] for a in answers] == ["3", "4"]


def test_a_huge_record_is_refused_without_being_read_whole(tmp_path):
    huge = {"messages": [{"role": "user", "content": "x" * ((8 << 20) + 10)}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": MSGS}, huge, {"messages": MSGS}])
    with pytest.raises(ChatforgeError, match=r"d\.jsonl:2: record is larger than 8 MiB"):
        readers.read_conversations(path)
    skipped: list[str] = []
    assert len(list(readers.iter_records(path, skipped.append))) == 2 and len(skipped) == 1  # the next line still reads
    array = tmp_path / "d.json"
    array.write_text(json.dumps([{"messages": MSGS}, huge], indent=1))
    with pytest.raises(ChatforgeError, match=r"d\.json:\d+: record is larger than 8 MiB"):
        readers.read_conversations(array)
    text = tmp_path / "d.txt"
    text.write_text("a short document\n\n" + ("many words " * 100_000 + "\n") * 9)
    with pytest.raises(ChatforgeError, match=r"d\.txt:3: record is larger than 8 MiB"):
        list(readers.iter_text_documents(text))


def test_check_prints_a_long_sample_cut_short(tmp_path):
    from chatforge.data.tools import format_check

    long = {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "word " * 5000}]}
    r = check(write_jsonl(tmp_path / "d.jsonl", [long]), out_dir=tmp_path / "out", overrides=None)
    assert r["sample"]["tokens"] > 5000 and "the first 1000 of" in r["sample"]["rendered"]
    assert len(format_check(r)) < 10_000
