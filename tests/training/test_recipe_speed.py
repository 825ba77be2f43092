"""The benchmark of record on CPU, tiny: `chatforge train` (its CLI, the shipped medical recipe) and the
Hugging Face Trainer on the very same batches of alpaca records give the same per-step losses; the other
shipped recipes run on their kind of data."""

import json
import sys
from pathlib import Path

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def medical_records(tmp_path) -> Path:
    """Alpaca records of three lengths."""
    pairs = [
        ("一位患者持续咳嗽两周，应该做哪些检查？", "建议进行胸部X线检查和血常规检查。"),
        ("高血压患者饮食上需要注意什么？", "减少盐的摄入，多吃蔬菜水果，戒烟限酒。"),
        ("What should I do for a mild fever?", "Rest, drink fluids, and see a doctor if it lasts."),
    ]
    data = tmp_path / "alpaca.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": q * (1 + i % 3), "input": "", "output": a * (1 + i % 2)}, ensure_ascii=False)
            + "\n"
            for i, (q, a) in enumerate(pairs * 6)
        ),
        encoding="utf-8",
    )
    return data


def run_bench(tmp_path, *args: str) -> tuple[dict, Path]:
    """bench/recipe_speed.py on a tiny InternLM2 checkpoint and medical_records; its results and the model."""
    import recipe_speed
    from internlm2_gpu_check import SHAPE_TINY, write_checkpoint

    model = write_checkpoint(tmp_path / "il2", SHAPE_TINY)
    data, out = medical_records(tmp_path), tmp_path / "results.json"
    assert recipe_speed.main(["--model", str(model), "--data", str(data), "--json", str(out), *args]) == 0
    return json.loads(out.read_text()), model


def test_parity_scenario_matches_the_trainer_step_by_step(tmp_path, capsys):
    results, _ = run_bench(tmp_path, "--set", "max_length=256", "parity_lora_3_b4")
    result = results["parity_lora_3_b4"]
    assert "error" not in result, result
    assert result["steps"] == 3 and result["max_diff_pct"] < 0.01, result  # fp32 on both sides
    assert len(set(result["chatforge"])) == 3  # three different batches
    assert "parity_lora_3_b4" in capsys.readouterr().out


def test_recipe_scenarios_run_shipped_recipes_on_their_kind_of_data(tmp_path):
    """`recipe:NAME:STEPS`: a shipped recipe through `chatforge train` with the data a user gives it: identity
    conversations made by `chatforge data identity` (replay answers from the recipe's model), raw text."""
    names = ["recipe:internlm2_chat_1_8b_identity_lora:2", "recipe:internlm2_1_8b_full_custom_pretrain:2"]
    results, model = run_bench(tmp_path, "--set", "max_length=1024", "--set", "batch_size=2", *names)
    for name in names:
        r = results[name]
        assert "error" not in r, r
        assert r["steps"] == 2 and r["real_tokens"] > 0 and r["recipe"] == name.split(":")[1], r
        assert f"model={model}" in r["command"] and "max_length=1024" in r["command"]
    assert "identity" in results[names[0]]["command"] and "pretrain.jsonl" in results[names[1]]["command"]
