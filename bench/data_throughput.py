"""Data pipeline throughput and memory: tokenising + packing, streamed.

1. Huatuo (../shared/data/huatuo/llama_data.jsonl): records/s and tokens/s of read + chat template +
   loss mask + packing, and the padding saved by packing.
2. A synthetic raw-text corpus (JSONL {"text": ...}, default 1 GB) for continued pretraining:
   documents/s, tokens/s and peak memory (ru_maxrss) of read + tokenise + split + pack, each size in
   its own process, so peak memory can be compared across corpus sizes (it must not grow).

    python3 bench/data_throughput.py [--sizes-mb 64 1024] [--max-length 512] [--skip-huatuo]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
HUATUO = ROOT.parent / "shared" / "data" / "huatuo" / "llama_data.jsonl"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_huatuo(max_length: int) -> dict:
    from chatforge.config import DataSource, TrainConfig
    from chatforge.data import dataset
    from chatforge.data.tools import padding_report
    from chatforge.models.load import load_tokenizer

    tok = load_tokenizer(None)
    cfg = TrainConfig(data=[DataSource(path=str(HUATUO))], max_length=max_length, overflow="drop")
    stats: dict = {}
    t0 = time.perf_counter()
    packs = sum(1 for _ in dataset.pack(dataset.iter_samples(cfg.data[0], cfg, tok, stats), max_length, open_bins=256))
    dt = time.perf_counter() - t0
    lengths = []
    for s in dataset.iter_samples(cfg.data[0], cfg, tok):
        lengths.append(len(s.input_ids))
    return {
        "records": stats["records"],
        "seconds": round(dt, 2),
        "records_per_s": round(stats["records"] / dt, 1),
        "tokens_per_s": round(stats["tokens"] / dt),
        "tokens": stats["tokens"],
        "dropped": stats["dropped"],
        "packed_sequences": packs,
        "max_length": max_length,
        "padding": padding_report(lengths, max_length),
    }


def corpus_words() -> list[str]:
    """Whole words of the default tokenizer's vocabulary (about one token per word, like real text)."""
    import re

    from chatforge.models.load import load_tokenizer

    vocab = load_tokenizer(None).get_vocab()
    return sorted(t[1:] for t in vocab if t.startswith("Ġ") and re.fullmatch(r"[a-z]{2,12}", t[1:]))


def write_corpus(path: Path, size_mb: int, words: list[str], seed: int = 0) -> int:
    """Synthetic documents of 50-2,000 words (Zipf-weighted vocabulary words), JSONL {"text": ...}."""
    rng = random.Random(seed)
    rng.shuffle(words)
    weights = [1 / (rank + 10) for rank in range(len(words))]
    # a pool of distinct documents, written in random order (drawing every word anew is slow)
    pool = [
        json.dumps({"text": " ".join(rng.choices(words, weights, k=rng.randint(50, 2000)))}) + "\n" for _ in range(2000)
    ]
    target, written, docs = size_mb << 20, 0, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            line = rng.choice(pool)
            f.write(line)
            written += len(line.encode())
            docs += 1
    return docs


def bench_corpus(path: str, max_length: int) -> dict:
    """Run in a child process: stream the corpus through tokenising + packing, report peak memory."""
    from chatforge.config import DataSource, TrainConfig
    from chatforge.data import dataset
    from chatforge.models.load import load_tokenizer

    tok = load_tokenizer(None)
    base = peak_rss_mb()
    cfg = TrainConfig(task="pretrain", data=[DataSource(path=path)], max_length=max_length, overflow="split")
    stats: dict = {}
    t0 = time.perf_counter()
    rows = filled = 0
    for p in dataset.pack(dataset.iter_samples(cfg.data[0], cfg, tok, stats, batch=256), max_length, open_bins=64):
        rows += 1
        filled += sum(len(s.input_ids) for s in p)
        if rows % 20_000 == 0:  # memory as the run goes: it must stay flat
            print(
                f"  {stats['records']} documents, {stats['tokens']} tokens, {time.perf_counter() - t0:.0f} s, "
                f"peak RSS {peak_rss_mb():.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    dt = time.perf_counter() - t0
    return {
        "corpus_mb": round(os.path.getsize(path) / 2**20),
        "documents": stats["records"],
        "seconds": round(dt, 1),
        "documents_per_s": round(stats["records"] / dt, 1),
        "tokens": stats["tokens"],
        "tokens_per_s": round(stats["tokens"] / dt),
        "mb_per_s": round(os.path.getsize(path) / 2**20 / dt, 2),
        "packed_sequences": rows,
        "packing_fill": round(filled / (rows * max_length), 4),
        "rss_after_setup_mb": round(base),
        "peak_rss_mb": round(peak_rss_mb()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=int, nargs="+", default=[64, 1024])
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--skip-huatuo", action="store_true")
    ap.add_argument("--corpus-dir", help="where to write the synthetic corpora (default: a temp folder)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(bench_corpus(a.child, a.max_length)))
        return
    if not a.skip_huatuo:
        if HUATUO.is_file():
            print("huatuo", json.dumps(bench_huatuo(a.max_length), ensure_ascii=False), flush=True)
        else:
            print(f"huatuo: skipped, {HUATUO} is absent", flush=True)
    words = corpus_words()
    with tempfile.TemporaryDirectory(dir=a.corpus_dir) as tmp:
        for mb in a.sizes_mb:
            path = Path(tmp) / f"corpus_{mb}mb.jsonl"
            t0 = time.perf_counter()
            write_corpus(path, mb, words)
            made = time.perf_counter() - t0
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(path), "--max-length", str(a.max_length)],
                stdout=subprocess.PIPE,
                text=True,
                check=True,
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["corpus_written_s"] = round(made, 1)
            print("corpus", json.dumps(result), flush=True)
            path.unlink()


if __name__ == "__main__":
    main()
