"""Plots worth seeing, saved as PNG (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .compress import SweepPoint


def plot_sweep(points: Sequence[SweepPoint], path: str | Path, *, title: str = "", normalize: bool = True) -> Path:
    """Reconstruction error against parameters saved, one line per rank (the paper's Figure 5).

    Each point is labelled with its cluster count.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for rank in sorted({p.rank for p in points}):
        row = sorted((p for p in points if p.rank == rank), key=lambda p: p.clusters)
        xs, ys = [p.saved_ratio for p in row], [p.objective(normalize) for p in row]
        ax.plot(xs, ys, marker="o", label=f"rank {rank} ({row[0].sigma})")
        for p, x, y in zip(row, xs, ys):
            ax.annotate(str(p.clusters), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("total parameter saved ratio")
    ax.set_ylabel("reconstruction error" + (" (mean per adapter)" if normalize else " (pooled)"))
    ax.set_title(title or "Error against parameters saved (labels: clusters)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
