"""Where the GPU waits: idle gaps of a torch.profiler Chrome trace, by what the CPU was doing.

    python3 bench/gpu_gaps.py trace.json[.gz]

For every gap between GPU kernels (or copies) it finds the CPU call that launched the next kernel.
When that launch came after the gap began, the GPU was waiting for the CPU (launch-bound); the
gap is booked to the outermost CPU operation around the launch. Otherwise it waited for something
else (a synchronisation, an event). Prints the busy/idle split and the gaps grouped both ways.
"""

from __future__ import annotations

import bisect
import gzip
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from chatforge.training.profiling import _union  # noqa: E402

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return [e for e in data.get("traceEvents", data) if e.get("ph") == "X"]


def cpu_ranges(events: list[dict]) -> dict:
    """Per CPU thread: (starts, ranges) of all cpu_op / user_annotation ranges, and of the outermost."""
    by_tid = defaultdict(list)
    for e in events:
        if e.get("cat") in ("cpu_op", "user_annotation"):
            by_tid[e["tid"]].append(e)
    out = {}
    for tid, evs in by_tid.items():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        top, end = [], float("-inf")
        for e in evs:
            if e["ts"] >= end:
                top.append(e)
                end = e["ts"] + e["dur"]
        out[tid] = (([e["ts"] for e in top], top), ([e["ts"] for e in evs], evs))
    return out


def enclosing(ranges: dict, tid, ts: float, innermost: bool = False) -> str:
    """Name of the outermost (or innermost) CPU range around `ts` on thread `tid`."""
    starts, evs = ranges.get(tid, (([], []), ([], [])))[1 if innermost else 0]
    i = bisect.bisect_right(starts, ts) - 1
    for j in range(i, max(-1, i - 5000), -1):
        if evs[j]["ts"] + evs[j]["dur"] >= ts:
            return evs[j]["name"][:60]
        if not innermost:
            break
    return "(no profiled op)"


def analyse(events: list[dict], min_gap_us: float = 2.0) -> str:
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not gpu:
        return "no GPU events in the trace"
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    ranges = cpu_ranges(events)
    end = gpu[0]["ts"]
    waits_cpu, waits_other = defaultdict(lambda: [0.0, 0]), defaultdict(lambda: [0.0, 0])
    for e in gpu:
        s, t = e["ts"], e["ts"] + e["dur"]
        gap = s - end
        if gap > min_gap_us:
            launch = launches.get(e.get("args", {}).get("correlation"))
            if launch is not None and launch["ts"] > end:
                key = (
                    f"{enclosing(ranges, launch['tid'], launch['ts'])} > "
                    f"{enclosing(ranges, launch['tid'], launch['ts'], innermost=True)}"
                )
                waits_cpu[key][0] += gap
                waits_cpu[key][1] += 1
            else:
                waits_other[e["name"][:70]][0] += gap
                waits_other[e["name"][:70]][1] += 1
        end = max(end, t)
    wall, busy = end - gpu[0]["ts"], _union([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    syncs = defaultdict(float)
    for e in events:
        if e.get("cat") == "cuda_runtime" and "ynchronize" in e["name"]:
            syncs[e["name"]] += e["dur"]
    lines = [
        f"GPU window {wall / 1000:.2f} ms: busy {busy / 1000:.2f} ms, idle {(wall - busy) / 1000:.2f} ms",
        "CPU waiting in synchronize calls: "
        + (", ".join(f"{k} {v / 1000:.2f} ms" for k, v in syncs.items()) or "none"),
        "",
        "GPU waiting for the CPU to launch, by the CPU operations (outermost > innermost) of the late launch:",
        "| CPU operations | gaps | idle ms |",
        "|---|---|---|",
    ]
    for k, (us, n) in sorted(waits_cpu.items(), key=lambda kv: -kv[1][0])[:25]:
        lines.append(f"| {k} | {n} | {us / 1000:.2f} |")
    lines += [
        "",
        "Other gaps (launched in time; waiting on a dependency or event), by the next kernel:",
        "| next kernel | gaps | idle ms |",
        "|---|---|---|",
    ]
    for k, (us, n) in sorted(waits_other.items(), key=lambda kv: -kv[1][0])[:10]:
        lines.append(f"| {k} | {n} | {us / 1000:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(analyse(load(sys.argv[1])))
