"""PNG plots for run folders (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from chatforge.files import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_curve(rows: list[dict], path: str | Path, title: str = "training loss") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows if "loss" in r]
    ax.plot(steps, [r["loss"] for r in rows if "loss" in r], label="train loss")
    evals = [r for r in rows if "eval_loss" in r]
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def histogram(values: list[int], path: str | Path, title: str, limit: int | None = None) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(values, bins=50)
    if limit:
        ax.axvline(limit, color="red", linestyle="--", label=f"max_length {limit}")
        ax.legend()
    ax.set_xlabel("tokens")
    ax.set_ylabel("samples")
    ax.set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
