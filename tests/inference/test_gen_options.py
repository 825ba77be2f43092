"""bench/gen_options.py on CPU, tiny: every setup this device runs answers, greedy rows equal plain generate's."""

import json

from conftest import bench_module


def test_generation_options_bench_runs_and_checks_greedy_equality(tmp_path, capsys):
    gen_options, check = bench_module("gen_options"), bench_module("internlm2_gpu_check")
    SHAPE_TINY, write_checkpoint = check.SHAPE_TINY, check.write_checkpoint

    model = write_checkpoint(tmp_path / "il2", dict(SHAPE_TINY, max_position_embeddings=256))
    out = tmp_path / "gen.json"
    assert (
        gen_options.main(
            [
                "--model",
                str(model),
                "--device",
                "cpu",
                "--batches",
                "2",
                "--prompt-tokens",
                "12",
                "--new-tokens",
                "6",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = json.loads(out.read_text())
    assert [(r["setup"], r["batch"]) for r in rows] == [
        ("generate", 2),
        ("continuous", 2),
        ("decode", 2),
        ("decode+reuse", 2),
    ], rows
    for r in rows:
        assert "error" not in r and r["tokens"] == 6 * r["batch"], r
        assert r["greedy_equal_rows"] == f"{r['batch']}/{r['batch']}", r
    assert "| continuous | 2 |" in capsys.readouterr().out
