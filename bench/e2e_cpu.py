"""Wall time of each stage of `chatforge assistant` and peak memory, on this machine.

    python3 bench/e2e_cpu.py [--name "Clement Wu"] [--out DIR] [overrides ...]

Prints a table: stage, seconds; then peak resident memory of the process, the load average and the eval table.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default="Clement Wu")
    ap.add_argument("--out", help="run folder (default: a temporary one)")
    ap.add_argument("overrides", nargs="*", help="recipe overrides, key=value")
    a = ap.parse_args()

    import torch

    from chatforge.pipeline import assistant

    out = a.out or tempfile.mkdtemp(prefix="chatforge-e2e-")
    t0 = time.perf_counter()
    result = assistant(a.name, out=out, overrides=a.overrides, progress=False)
    wall = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"\n## chatforge assistant on {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print("| stage | seconds |\n|---|---|")
    for stage, seconds in result["times"].items():
        print(f"| {stage} | {seconds:.1f} |")
    print(f"| wall (incl. imports) | {wall:.1f} |")
    print(f"\npeak RSS: {peak_gib:.2f} GiB")
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} (other jobs slow every stage)")
    print(result["eval"]["table"])
    print(f"run folder: {out}")


if __name__ == "__main__":
    main()
