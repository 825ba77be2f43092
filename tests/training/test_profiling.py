"""The step profiler's GPU timeline arithmetic (chatforge/training/profiling.py)."""

import pytest

from chatforge.training.profiling import _union, timeline
from conftest import bench_module


def test_union_merges_overlaps_and_gaps():
    assert _union([]) == 0
    assert _union([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25


def test_timeline_splits_compute_communication_and_idle():
    kernels = [
        ("ampere_gemm", 0, 40),
        ("ncclDevKernel_AllGather", 30, 60),
        ("triton_fused", 70, 90),
        ("ncclKernel_ReduceScatter", 85, 95),
    ]
    t = timeline(kernels, wall_us=100)
    assert t["busy"] == pytest.approx(85)  # 0-60 and 70-95
    assert t["idle"] == pytest.approx(15)
    assert t["compute_busy"] == pytest.approx(60) and t["compute_kernel_sum"] == pytest.approx(60)
    assert t["comm_busy"] == pytest.approx(40)
    assert t["comm_exposed"] == pytest.approx(25)  # 40-60 and 90-95 hide behind nothing


def test_gpu_gaps_books_late_launches_to_the_cpu_call_and_the_rest_to_waiting():
    gaps = bench_module("gpu_gaps")
    op = lambda name, ts, dur: {"ph": "X", "cat": "cpu_op", "name": name, "tid": 1, "ts": ts, "dur": dur}
    launch = lambda ts, c, cat="cuda_runtime": {
        "ph": "X",
        "cat": cat,
        "name": "launch",
        "tid": 1,
        "ts": ts,
        "dur": 1,
        "args": {"correlation": c},
    }
    kernel = lambda name, ts, c: {
        "ph": "X",
        "cat": "kernel",
        "name": name,
        "tid": 7,
        "ts": ts,
        "dur": 10,
        "args": {"correlation": c},
    }
    events = [
        op("layer", 0, 100),
        op("aten::mm", 10, 5),
        launch(11, 1),
        op("aten::add", 50, 5),
        launch(51, 2, "cuda_driver"),
        launch(52, 3),
        kernel("k1", 20, 1),
        kernel("k2", 60, 2),
        kernel("k3", 80, 3),
    ]
    report = gaps.analyse(events)
    assert "GPU window 0.07 ms: busy 0.03 ms, idle 0.04 ms" in report
    assert "| layer > aten::add | 1 | 0.03 |" in report  # k2 launched after k1 ended: the CPU was late
    assert "| k3 | 1 | 0.01 |" in report  # k3 was launched in time and still waited
