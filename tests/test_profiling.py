"""The step profiler's GPU timeline arithmetic (chatforge/profiling.py)."""
import pytest

from chatforge.profiling import _union, timeline


def test_union_merges_overlaps_and_gaps():
    assert _union([]) == 0
    assert _union([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25


def test_timeline_splits_compute_communication_and_idle():
    kernels = [("ampere_gemm", 0, 40), ("ncclDevKernel_AllGather", 30, 60), ("triton_fused", 70, 90),
               ("ncclKernel_ReduceScatter", 85, 95)]
    t = timeline(kernels, wall_us=100)
    assert t["busy"] == pytest.approx(85)  # 0-60 and 70-95
    assert t["idle"] == pytest.approx(15)
    assert t["compute_busy"] == pytest.approx(60) and t["compute_kernel_sum"] == pytest.approx(60)
    assert t["comm_busy"] == pytest.approx(40)
    assert t["comm_exposed"] == pytest.approx(25)  # 40-60 and 90-95 hide behind nothing
