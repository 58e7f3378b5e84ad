"""Choosing rank and cluster count (paper section 6.4 and Appendix F, Figure 5)."""

from __future__ import annotations

import operator
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from ..errors import SettingsError

from .clustering import SigmaKind
from .module import ModuleCompression, compress_module
from .stack import LoraStack

DEFAULT_TARGET_ERROR = 0.5
# Section 6.4: JD-Full alone up to this many adapters, clustering beyond.
MAX_ADAPTERS_WITHOUT_CLUSTERS = 100
CLUSTERED_RANK = 16


def check_rank(value, name: str = "rank") -> int | str:
    """``value`` as an int if it is a whole number >= 1, or ``"auto"``; used for ``rank`` and ``clusters``.

    Raises:
        SettingsError: anything else (0, -1, "16", 2.5, True), naming the argument and what it accepts.
    """
    if isinstance(value, str) and value == "auto":
        return value
    try:
        number = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        number = None
    if number is None or number < 1:
        raise SettingsError(f"{name}={value!r} is not allowed: pass a whole number >= 1 (e.g. {name}=16, not "
                            f"{name}='16') or {name}='auto'.")
    return number


def auto_rank(num_adapters: int) -> int:
    """Section 6.4: rank about ``n / 2 + 7`` up to 100 adapters, rank 16 (with clusters) beyond."""
    if num_adapters > MAX_ADAPTERS_WITHOUT_CLUSTERS:
        return CLUSTERED_RANK
    return round(num_adapters / 2 + 7)


def original_parameters(ranks: Iterable[int], d_out: int, d_in: int) -> int:
    """Parameters of the uncompressed LoRAs of one module: ``sum_i r_i (d_out + d_in)``."""
    return sum(ranks) * (d_out + d_in)


def saved_ratio(original: int, compressed: int) -> float:
    """The paper's total parameter saved ratio ``1 - compressed / original`` (Figure 2)."""
    return 1.0 - compressed / original if original else 0.0


@dataclass
class SweepPoint:
    """One setting tried on one module: its error and the parameters it saves."""

    rank: int
    clusters: int
    sigma: str
    error: float
    mean_adapter_error: float
    saved_ratio: float
    seconds: float

    def objective(self, normalize: bool) -> float:
        """The error the setting is judged by: the one the JD minimizes under this weighting."""
        return self.mean_adapter_error if normalize else self.error

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_setting(
    stack: LoraStack, ranks: list[int], rank: int, clusters: int, *, sigma: SigmaKind = "full", **kwargs
) -> tuple[SweepPoint, ModuleCompression]:
    """Compresses ``stack`` with one setting and measures it. ``ranks`` are the adapters' LoRA ranks."""
    start = time.perf_counter()
    result = compress_module(stack, rank, clusters, sigma=sigma, **kwargs)
    point = SweepPoint(
        rank=result.rank,
        clusters=result.num_clusters,
        sigma=sigma,
        error=result.error,
        mean_adapter_error=result.mean_adapter_error,
        saved_ratio=saved_ratio(original_parameters(ranks, stack.d_out, stack.d_in), result.num_parameters()),
        seconds=time.perf_counter() - start,
    )
    return point, result


def cluster_counts(num_adapters: int) -> list[int]:
    """1, 2, 4, ... up to n (the exponentially growing counts of section 6.4)."""
    counts, k = [], 1
    while k < num_adapters:
        counts.append(k)
        k *= 2
    return counts + [num_adapters]


def choose_clusters(
    stack: LoraStack,
    ranks: list[int],
    rank: int,
    *,
    target: float = DEFAULT_TARGET_ERROR,
    sigma: SigmaKind = "full",
    normalize: bool = True,
    **kwargs,
) -> tuple[int, list[SweepPoint]]:
    """The fewest clusters (1, 2, 4, ...) whose error on this module is below ``target`` (section 6.4).

    The error compared with ``target`` is the one the compression optimizes: the mean per-adapter
    relative error when ``normalize`` is on, the pooled error otherwise.

    Returns:
        The chosen count and every point tried. When no count reaches the target, the count with
        the lowest error is returned with a warning.
    """
    points = []
    for k in cluster_counts(stack.n):
        point, _ = evaluate_setting(stack, ranks, rank, k, sigma=sigma, normalize=normalize, **kwargs)
        points.append(point)
        if point.objective(normalize) < target:
            return k, points
    best = min(points, key=lambda p: p.objective(normalize))
    warnings.warn(
        f"No cluster count reaches error {target} at rank {rank} (best: {best.objective(normalize):.3f} with "
        f"{best.clusters} clusters); using {best.clusters}. A higher rank lowers the error.",
        stacklevel=2,
    )
    return best.clusters, points


def sweep(
    stack: LoraStack,
    ranks: list[int],
    settings: Iterable[tuple[int, int]],
    *,
    sigma: SigmaKind = "full",
    **kwargs,
) -> list[SweepPoint]:
    """Evaluates every ``(rank, clusters)`` in ``settings`` (the data of the paper's Figure 5)."""
    return [evaluate_setting(stack, ranks, r, k, sigma=sigma, **kwargs)[0] for r, k in settings]
