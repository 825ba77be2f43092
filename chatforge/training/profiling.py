"""Where a training step's time goes: torch.profiler over a few steps, summarised per rank.

Recipe key `profile_steps: N` profiles N steps after `PROFILE_START` warm-up steps (compilation done)
and writes `profile/rank{R}.txt` into the run folder. Besides the profiler's own table, it reports
the GPU timeline: busy, idle (the GPU waiting for the CPU), compute, communication (NCCL kernels),
and communication not hidden behind compute.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from chatforge.files import write_text

PROFILE_START = 3


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def timeline(kernels: list[tuple[str, float, float]], wall_us: float) -> dict:
    """Busy, idle, compute, communication and exposed-communication microseconds of GPU kernels.

    Args:
        kernels: (name, start µs, end µs) of every GPU kernel in the window.
        wall_us: the window's length.
    """
    comm = [(s, e) for n, s, e in kernels if "nccl" in n.lower()]
    compute = [(s, e) for n, s, e in kernels if "nccl" not in n.lower()]
    busy, compute_busy = _union(comm + compute), _union(compute)
    return {
        "wall": wall_us,
        "busy": busy,
        "idle": max(0.0, wall_us - busy),
        "compute_busy": compute_busy,
        "compute_kernel_sum": sum(e - s for s, e in compute),
        "comm_busy": _union(comm),
        "comm_exposed": busy - compute_busy,
    }


class StepProfiler:
    """Profiles steps [PROFILE_START, PROFILE_START + count) of a run; no-op when count is 0."""

    def __init__(self, folder: Path, count: int, rank: int = 0):
        self.folder, self.count, self.rank = folder, count, rank
        self.prof, self.t0 = None, 0.0

    def before(self, step: int) -> None:
        if self.count <= 0 or step != PROFILE_START:
            return

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self.prof = profile(activities=acts)
        self._sync()
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def after(self, step: int) -> None:
        """Call with the number of steps done; ends the window after `count` steps."""
        if self.prof is None or step != PROFILE_START + self.count:
            return
        self._sync()
        wall = (time.perf_counter() - self.t0) * 1e6
        self.prof.__exit__(None, None, None)
        events = self.prof.events()
        kernels = [
            (e.name, e.time_range.start, e.time_range.end)
            for e in events  # GPU work, not the ranges
            if e.device_type == torch.autograd.DeviceType.CUDA and not e.is_user_annotation
        ]  # named around it
        stats = timeline(kernels, wall)
        lines = [f"rank {self.rank}: {self.count} steps profiled after {PROFILE_START}; per step, ms:"]
        lines += [f"  {k:<20} {v / self.count / 1000:9.2f}" for k, v in stats.items()]
        table = self.prof.key_averages().table(
            sort_by="cuda_time_total" if kernels else "cpu_time_total", row_limit=30, max_name_column_width=70
        )
        write_text(self.folder / "profile" / f"rank{self.rank}.txt", "\n".join(lines) + "\n\n" + table)
        self.prof = None

    @staticmethod
    def _sync() -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()


# ---------------------------------------------------------------- the run's speed, as a user sees it


def compilations() -> int:
    """Frames torch.compile has compiled so far in this process (each recompilation counts)."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


class RunMeter:
    """Real (non-padding) tokens per second over a whole run and after its warm-up, peak memory and
    compilations: the figures `chatforge train` prints and writes to `metrics.json`.

    Warm-up: the first `max(5, steps // 20)` steps (compilation happens there when shapes are stable).
    Recompilations: compilations after the first step, i.e. caused by a new shape or guard.
    """

    def __init__(self, steps: int, start_step: int = 0):
        self.warm = min(max(5, steps // 20), max(0, steps - start_step - 1))
        self.start = time.perf_counter()
        self.compiled_at_start = compilations()
        self.after_first: int | None = None
        self.marks: list[tuple[float, int]] = []  # (seconds since start, real tokens so far) per step read
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def step_done(self, tokens_so_far: int) -> float:
        """Record a step whose loss was just read; returns the seconds since the run's start."""
        elapsed = time.perf_counter() - self.start
        self.marks.append((elapsed, tokens_so_far))
        if self.after_first is None:
            self.after_first = compilations()
        return elapsed

    def summary(self) -> dict:
        if not self.marks:
            return {}
        seconds, tokens = self.marks[-1]
        out = {
            "steps": len(self.marks),
            "real_tokens": tokens,
            "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
            "warmup_steps": self.warm,
        }
        if self.warm and len(self.marks) > self.warm:
            t0, n0 = self.marks[self.warm - 1]
            out["tokens_per_s_after_warmup"] = round((tokens - n0) / max(seconds - t0, 1e-9), 1)
        now = compilations()
        out["compilations"] = now - self.compiled_at_start
        out["recompilations"] = now - (self.after_first or now)
        if torch.cuda.is_available():
            out["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
            out["device"] = torch.cuda.get_device_name()
        return out

    @staticmethod
    def describe(m: dict) -> str:
        if not m:
            return "no steps run"
        text = (
            f"{m['steps']} steps, {m['real_tokens']:,} real tokens in {m['seconds']:.1f} s: "
            f"{m['tokens_per_s']:,.0f} tokens/s"
        )
        if "tokens_per_s_after_warmup" in m:
            text += f" ({m['tokens_per_s_after_warmup']:,.0f} after {m['warmup_steps']} warm-up steps)"
        if "peak_gib" in m:
            text += f", peak {m['peak_gib']:.1f} GiB"
        text += f", {m['compilations']} compilations ({m['recompilations']} after step 1)"
        return text + (f", CUDA graphs: {m['cuda_graphs']}" if "cuda_graphs" in m else "")
