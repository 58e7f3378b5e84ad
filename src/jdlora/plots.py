"""Plots worth seeing, saved as PNG (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .compress import SweepPoint


def plot_sweep(points: Sequence[SweepPoint], path: str | Path, *, title: str = "", target: float | None = None,
               chosen: SweepPoint | None = None) -> Path:
    """Adapter error against parameters saved, one line per Sigma kind and rank (the paper's Figure 5).

    The error is the one the automatic settings judge by (:attr:`SweepPoint.quantile_error`: the worst
    adapter by default), on a log scale; each point is labelled with its cluster count, so a line
    runs from 1 cluster (most saved) to many. ``target`` is drawn as a dashed line and ``chosen``
    as a star: settings below the line keep the adapters' skills, the star is the cheapest of them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.8), dpi=120)
    for kind in sorted({p.sigma_kind for p in points}):
        for rank in sorted({p.rank for p in points if p.sigma_kind == kind}):
            row = sorted((p for p in points if p.sigma_kind == kind and p.rank == rank), key=lambda p: p.clusters)
            xs, ys = [p.saved_ratio for p in row], [max(_error(p), 1e-6) for p in row]
            ax.plot(xs, ys, marker="o" if kind == "full" else "s", linestyle="-" if kind == "full" else "--",
                    label=f"JD-{kind.capitalize()} rank {rank}")
            for p, x, y in zip(row, xs, ys):
                ax.annotate(str(p.clusters), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", label=f"target {target}")
    if chosen is not None:
        ax.plot([chosen.saved_ratio], [max(_error(chosen), 1e-6)], marker="*", markersize=16, color="black",
                linestyle="none", label=f"chosen: {chosen.label()}")
    ax.set_yscale("log")
    ax.set_xlabel("parameters saved (1 - stored / LoRA parameters)")
    worst = all(p.quantile_error is not None for p in points)
    ax.set_ylabel("adapter error (worst adapter)" if worst else "mean adapter error")
    ax.set_title(title or "Error against parameters saved (labels: clusters)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def _error(p: SweepPoint) -> float:
    return p.quantile_error if p.quantile_error is not None else p.mean_adapter_error
