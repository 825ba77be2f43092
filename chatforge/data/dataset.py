"""The training set: read each data source, encode and fit its samples, mix the sources by weight, pack
samples into max_length rows, and collate batches."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from chatforge.data.encode import IGNORE, encode_record, encode_texts, fit_length
from chatforge.data.readers import OnError, Record, drop_last, iter_records, iter_text_documents
from chatforge.files import ChatforgeError


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    source: str


def read_source(src, cfg, on_error: OnError | None = None) -> Iterator[Record]:
    """Records of one data source of a recipe (streamed, held-out tail removed), with the recipe's
    system prompt applied to conversations that have none."""
    if cfg.task == "pretrain":
        records = iter_text_documents(src.path, on_error, whole_file=src.format == "document")
    else:
        records = iter_records(src.path, on_error)
    for rec in drop_last(records, getattr(src, "holdout_last", 0)):
        if cfg.system is not None and cfg.task != "pretrain" and not any(m["role"] == "system" for m in rec.messages):
            rec.messages.insert(0, {"role": "system", "content": cfg.system})
        yield rec


def iter_samples(
    src, cfg, tokenizer, stats: dict | None = None, on_error: OnError | None = None, batch: int = 64
) -> Iterator[Sample]:
    """Tokenised samples of one data source, streamed, after the overflow policy.

    stats (if given) counts: records, dropped, truncated, split, tokens, trained_tokens.
    """
    stats = stats if stats is not None else {}
    for key in ("records", "dropped", "truncated", "split", "tokens", "trained_tokens"):
        stats.setdefault(key, 0)
    pending: list[Record] = []

    def emit(recs):
        if cfg.task == "pretrain":
            encoded = encode_texts(tokenizer, [r.messages[0]["content"] for r in recs])
        else:
            encoded = [encode_record(tokenizer, r) for r in recs]
        for rec, (ids, labels) in zip(recs, encoded):
            stats["records"] += 1
            pieces = fit_length(ids, labels, cfg.max_length, cfg.overflow, rec.source)
            if not pieces:
                stats["dropped"] += 1
            elif len(ids) > cfg.max_length:
                stats["split" if cfg.overflow == "split" else "truncated"] += 1
            for i, lab in pieces:
                stats["tokens"] += len(i)
                stats["trained_tokens"] += len(lab) - 1 - lab[1:].count(IGNORE)
                yield Sample(i, lab, rec.source)

    for rec in read_source(src, cfg, on_error):
        pending.append(rec)
        if len(pending) >= batch:
            yield from emit(pending)
            pending = []
    yield from emit(pending)


def build_dataset(cfg, tokenizer) -> tuple[list[Sample], dict]:
    """Read, tokenise and mix every data source of a recipe; returns samples and statistics.

    A source's weight sets how often it is used: 2 = every sample twice, 0.5 = a seeded half,
    2.5 = twice plus a seeded half. The final order is shuffled by the recipe's seed.

    Raises:
        ChatforgeError: bad records (file:line), a source without usable samples, a too-long sample
            under overflow=error.
    """
    rng = random.Random(cfg.seed)
    samples: list[Sample] = []
    stats: dict = {"sources": [], "dropped": 0, "truncated": 0, "split": 0}
    for src in cfg.data:
        if src.weight <= 0:
            raise ChatforgeError(f"{src.path}: weight must be above 0, got {src.weight}")
        st: dict = {}
        part = list(iter_samples(src, cfg, tokenizer, st))
        if not part:
            raise ChatforgeError(f"{src.path}: no usable samples")
        whole, frac = divmod(src.weight, 1.0)
        picked = part * int(whole) + rng.sample(part, round(frac * len(part)))
        if not picked:
            picked = rng.sample(part, 1)
        samples += picked
        for key in ("dropped", "truncated", "split"):
            stats[key] += st[key]
        stats["sources"].append(
            {
                "path": src.path,
                "records": st["records"],
                "samples": len(part),
                "used": len(picked),
                "held_out": getattr(src, "holdout_last", 0),
                "tokens": st["tokens"],
                "trained_tokens": st["trained_tokens"],
            }
        )
    rng.shuffle(samples)
    return samples, stats


# ---------------------------------------------------------------- packing


def pack(samples: Iterable[Sample], max_length: int, open_bins: int = 64) -> Iterator[list[Sample]]:
    """Group samples into sequences of at most max_length tokens, never splitting a sample.

    Online best fit: each sample goes into the open sequence it fills best; when `open_bins`
    sequences are open and none has room, the fullest is emitted. Streams with memory bounded
    by open_bins * max_length tokens. A sample longer than max_length is an error (apply the
    overflow policy first).
    """
    bins: list[list] = []  # [used tokens, samples]
    for s in samples:
        n = len(s.input_ids)
        if n > max_length:
            raise ChatforgeError(f"{s.source}: sample has {n} tokens, more than max_length {max_length}")
        best = None
        for b in bins:
            if b[0] + n <= max_length and (best is None or b[0] > best[0]):
                best = b
        if best is None:
            if len(bins) >= open_bins:
                full = max(bins, key=lambda b: b[0])
                bins.remove(full)
                yield full[1]
            best = [0, []]
            bins.append(best)
        best[0] += n
        best[1].append(s)
        if best[0] == max_length:
            bins.remove(best)
            yield best[1]
    for b in sorted(bins, key=lambda b: -b[0]):
        yield b[1]


# ---------------------------------------------------------------- batching


def bucket_width(longest: int, max_length: int, smallest: int = 64) -> int:
    """The padded width of a batch whose longest sample has `longest` tokens: the next power of two
    (at least `smallest`, at most max_length), so compiled code sees a handful of shapes."""
    width = smallest
    while width < longest:
        width *= 2
    return max(longest, min(width, max_length))


def collate(samples: list[Sample], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch (to its longest sample, or to `width`); padded positions get no attention and
    no loss."""
    width = max(width or 0, max(len(s.input_ids) for s in samples))
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def collate_packed(
    packs: list[list[Sample]], pad_id: int, width: int | None = None, segments: int | None = None
) -> dict:
    """A batch of packed sequences: several samples per row, no attention across them.

    Keys: input_ids, labels, position_ids (restarting at 0 for every sample, which makes
    transformers build a block-causal mask for sdpa/eager when attention_mask is None),
    attention_mask (None), cu_seqlens (int32 boundaries over the flattened batch, for varlen
    attention kernels; the padding tail of a row is a segment of its own), max_seqlen (int) and
    num_tokens (real tokens). The first token of every sample carries no loss, so no sample is
    trained to predict across a boundary.

    Args:
        width: pad every row to this many tokens (default: the fullest row).
        segments: pad cu_seqlens with empty segments to this many (a fixed shape for compiled code).
    """
    width = max(width or 0, max(sum(len(s.input_ids) for s in p) for p in packs))
    ids = torch.full((len(packs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(packs), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(packs), width), dtype=torch.long)
    cu, longest, real = [0], 0, 0
    for row, p in enumerate(packs):
        off = 0
        for s in p:
            n = len(s.input_ids)
            ids[row, off : off + n] = torch.tensor(s.input_ids)
            labels[row, off + 1 : off + n] = torch.tensor(s.labels[1:])
            pos[row, off : off + n] = torch.arange(n)
            off += n
            cu.append(row * width + off)
            longest = max(longest, n)
        real += off
        if off < width:
            pos[row, off:] = torch.arange(width - off)
            cu.append((row + 1) * width)
            longest = max(longest, width - off)
    if segments is not None and len(cu) - 1 < segments:
        cu += [cu[-1]] * (segments + 1 - len(cu))  # empty segments: no work in varlen kernels
    return {
        "input_ids": ids,
        "labels": labels,
        "position_ids": pos,
        "attention_mask": None,
        "cu_seqlens": torch.tensor(cu, dtype=torch.int32),
        "max_seqlen": longest,
        "num_tokens": real,
    }


def _members(unit) -> list[Sample]:
    return unit if isinstance(unit, list) else [unit]


def real_tokens(unit: Sample | list[Sample]) -> int:
    """Tokens of a training unit (a sample, or a packed list of samples), padding excluded."""
    return sum(len(s.input_ids) for s in _members(unit))


def trained_count(unit: Sample | list[Sample]) -> int:
    """Tokens a unit trains on, as collate and collate_packed label them (a sample's first token is
    never a target)."""
    return sum(sum(1 for t in s.labels[1:] if t != IGNORE) for s in _members(unit))


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens of a batch from collate or collate_packed."""
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return int(batch["num_tokens"])


def to_device(batch: dict, device) -> dict:
    """The batch on `device`. To a GPU through pinned memory, asynchronously: a pageable copy would
    wait for the GPU's queue, so preparing the next batch during a step would stall it."""
    pin = torch.device(device).type == "cuda"
    return {
        k: (v.pin_memory().to(device, non_blocking=True) if pin else v.to(device)) if isinstance(v, torch.Tensor) else v
        for k, v in batch.items()
    }
