"""The loss curve of a run as a PNG (matplotlib, imported when a plot is drawn)."""

from __future__ import annotations

import logging
from pathlib import Path

from gpt.run_state import read_metrics
from tokenizers_bpe.fileio import atomic_write

log = logging.getLogger(__name__)
_matplotlib_failed = False  # a warning is given once; the run goes on without plots


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """The loss curve (training loss and validation loss against step) as a PNG. The plot is an extra:
    where matplotlib cannot be loaded (its native libraries, which a memory limit such as ulimit -v can
    keep from being mapped: an ImportError traceback ended the run at its first evaluation), a warning
    says so once and no plot is drawn."""
    global _matplotlib_failed
    if _matplotlib_failed:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        _matplotlib_failed = True
        log.warning(f"{png_path.name} is not drawn: matplotlib cannot be loaded ({e}); the run goes on without it")
        return

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
