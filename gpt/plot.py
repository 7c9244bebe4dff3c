"""The loss curve of a run as a PNG (matplotlib, imported when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path

from gpt.run_state import read_metrics
from tokenizers_bpe.fileio import atomic_write


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """The loss curve (training loss and validation loss against step) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for _, r in read_metrics(metrics_path):
        if not isinstance(r.get("step"), int):
            continue
        if isinstance(r.get("loss"), (int, float)):
            train.append((r["step"], r["loss"]))
        if isinstance(r.get("val_loss"), (int, float)):
            val.append((r["step"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_write(png_path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
