"""Choosing rank, clusters and Sigma kind automatically (paper section 6.4, Appendix F, Figure 5).

The paper picks rank n/2 + 7 (or 16 with the fewest clusters whose error on a middle module is below
0.5). On our quality study (docs/quality.md) that kept only 92-94% of LoRA's task score: a pooled
error of 0.5 is far too generous, and a pooled error hides the adapters that lose their skill. So
:func:`choose_settings` judges a setting by each adapter's own relative error on a middle module (the
worst adapter, or the ``error_quantile`` of them) against ``target_error`` (default calibrated on the
study), and among the settings that meet it takes the cheapest to serve: fewest parameters stored,
then least work per token. It searches Sigma kinds, cluster counts 1, 2, 4, ... and ranks by
doubling, and stops looking where a setting would store as many parameters as the LoRAs themselves.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

import torch

from .module import ModuleCompression, compress_module
from .settings import CompressionSettings, SigmaKind
from .stack import LoraStack


# Tolerances of the search's trials, relative to the final compression's.
SEARCH_TOL_FACTOR = 10.0


def original_parameters(ranks: Iterable[int], d_out: int, d_in: int) -> int:
    """Parameters of the uncompressed LoRAs of one module: ``sum_i r_i (d_out + d_in)``."""
    return sum(ranks) * (d_out + d_in)


def saved_ratio(original: int, compressed: int) -> float:
    """The paper's total parameter saved ratio ``1 - compressed / original`` (Figure 2)."""
    return 1.0 - compressed / original if original else 0.0


def stored_parameters(n: int, d_out: int, d_in: int, rank: int, clusters: int, sigma_kind: SigmaKind) -> int:
    """Parameters of one compressed module: ``clusters`` pairs of bases and ``n`` Sigmas."""
    return clusters * rank * (d_out + d_in) + n * (rank * rank if sigma_kind == "full" else rank)


def token_work(d_out: int, d_in: int, rank: int, sigma_kind: SigmaKind) -> int:
    """Multiply-adds per token of one adapted module: ``x V`` (d_in r), Sigma (r^2 or r), ``U h`` (r d_out).

    The same for any number of clusters (a token uses its own cluster's bases); a rank-r_i LoRA costs
    ``r_i (d_in + d_out)``.
    """
    return rank * (d_in + d_out) + (rank * rank if sigma_kind == "full" else rank)


@dataclass
class SweepPoint:
    """One setting tried on one module: its errors and its cost.

    Attributes:
        rank, clusters, sigma_kind: the setting (rank as used: clamped to what the module can use).
        error: pooled relative error. mean_adapter_error: mean of the per-adapter errors.
        quantile_error: the per-adapter error at ``error_quantile`` (1.0: the worst adapter).
        parameters: parameters stored for this module. saved_ratio: ``1 - parameters / LoRA parameters``.
        token_work: multiply-adds per token (:func:`token_work`). seconds: time to compress.
    """

    rank: int
    clusters: int
    sigma_kind: str
    error: float
    mean_adapter_error: float
    saved_ratio: float
    seconds: float
    quantile_error: float | None = None
    parameters: int | None = None
    token_work: int | None = None

    def cost(self) -> tuple[int, int]:
        """What serving it costs: parameters stored, then work per token (smaller is cheaper)."""
        return (self.parameters or 0, self.token_work or 0)

    def label(self) -> str:
        return f"JD-{self.sigma_kind.capitalize()} rank {self.rank}, {self.clusters} cluster(s)"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SweepPoint:
        """Reads :meth:`to_dict`, and the points earlier manifests stored (``sigma`` for the kind)."""
        data = {("sigma_kind" if k == "sigma" else k): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class AutoChoice:
    """What the automatic settings chose, and why (stored in the manifest as ``choice``).

    Attributes:
        module: the module the settings were tried on.
        target_error: the per-adapter error the setting had to stay under; error_quantile: which adapter
            (1.0: the worst).
        met: whether the chosen setting meets the target.
        reason: one sentence for people: what was chosen, why, and (when nothing met the target) what
            it would take.
        tried: how many settings were tried.
    """

    module: str
    target_error: float
    error_quantile: float
    met: bool
    reason: str
    tried: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AutoChoice:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def evaluate_setting(
    stack: LoraStack, ranks: list[int], settings: CompressionSettings
) -> tuple[SweepPoint, ModuleCompression]:
    """Compresses ``stack`` with one resolved setting and measures it. ``ranks``: the adapters' LoRA ranks."""
    start = time.perf_counter()
    result = compress_module(stack, settings)
    errors = result.adapter_errors.double().cpu()
    parameters = result.num_parameters()
    point = SweepPoint(
        rank=result.rank,
        clusters=result.num_clusters,
        sigma_kind=result.sigma_kind,
        error=result.error,
        mean_adapter_error=result.mean_adapter_error,
        saved_ratio=saved_ratio(original_parameters(ranks, stack.d_out, stack.d_in), parameters),
        seconds=time.perf_counter() - start,
        quantile_error=torch.quantile(errors, settings.error_quantile).item(),
        parameters=parameters,
        token_work=token_work(stack.d_out, stack.d_in, result.rank, result.sigma_kind),
    )
    return point, result


def cluster_counts(num_adapters: int) -> list[int]:
    """1, 2, 4, ... up to n (the exponentially growing counts of section 6.4)."""
    counts, k = [], 1
    while k < num_adapters:
        counts.append(k)
        k *= 2
    return counts + [num_adapters]


def rank_ladder(stack: LoraStack) -> list[int]:
    """2, 4, 8, ... up to the largest rank the module can use (its stacked rank, at most min(d))."""
    top = max(1, min(stack.d_out, stack.d_in, stack.n * stack.r_max))
    ladder, r = [], 2
    while r < top:
        ladder.append(r)
        r *= 2
    return ladder + [top]


def sweep(
    stack: LoraStack, ranks: list[int], grid: Iterable[tuple[int, int]], settings: CompressionSettings
) -> list[SweepPoint]:
    """Evaluates every ``(rank, clusters)`` of ``grid`` with ``settings``' other fields (Figure 5's data)."""
    return [evaluate_setting(stack, ranks, settings.replace(rank=r, clusters=k))[0] for r, k in grid]


def choose_settings(
    stack: LoraStack, ranks: list[int], settings: CompressionSettings, *, module: str = "", progress=None
) -> tuple[CompressionSettings, AutoChoice, list[SweepPoint]]:
    """Resolves the ``"auto"`` fields of ``settings`` on one module: the cheapest setting that meets the target.

    A setting meets the target when the per-adapter relative error at ``settings.error_quantile``
    (1.0: the worst adapter) is at most ``settings.target_error``. Cost: parameters stored, then
    multiply-adds per token. The search, per Sigma kind, walks cluster counts 1, 2, 4, ... n; for each
    it looks for the smallest rank on the doubling ladder that meets the target (downwards from the
    previous count's rank, as more clusters never need a higher rank), refined once between the last
    failing and the first passing rank; it skips settings that cost more than the best found and
    stops where a setting would store as many parameters as the LoRAs.

    Returns:
        The resolved settings, the :class:`AutoChoice` (what and why), and every point tried. When no
        setting meets the target, the one with the lowest error within the budget is used, with a
        warning that says so and what it would take.
    """
    kinds: list[SigmaKind] = ["full", "diag"] if settings.sigma_kind == "auto" else [settings.sigma_kind]
    counts = cluster_counts(stack.n) if settings.clusters == "auto" else [settings.clusters]
    ladder = rank_ladder(stack)
    if settings.rank != "auto":  # ranks beyond what the module can use are that rank (Proposition 1)
        ladder = [min(settings.rank, ladder[-1])]
    budget = original_parameters(ranks, stack.d_out, stack.d_in)
    target, q = settings.target_error, settings.error_quantile
    # Each trial needs its error to a few percent, not to the final tolerance: the search runs with looser
    # ones (its errors are then slightly higher than the final compression's, erring on the safe side).
    trial_settings = settings.replace(tol=settings.tol * SEARCH_TOL_FACTOR, ftol=settings.ftol * SEARCH_TOL_FACTOR)
    points: list[SweepPoint] = []
    tried: dict[tuple, SweepPoint] = {}

    def evaluate(kind: SigmaKind, clusters: int, rank: int) -> SweepPoint:
        key = (kind, min(clusters, stack.n), rank)
        if key not in tried:
            tried[key] = evaluate_setting(stack, ranks, trial_settings.replace(rank=rank, clusters=clusters,
                                                                               sigma_kind=kind))[0]
            points.append(tried[key])
            if progress is not None:
                progress.update(1)
        return tried[key]

    def passes(p: SweepPoint | None) -> bool:
        return p is not None and p.quantile_error <= target

    def check(kind: SigmaKind, clusters: int, rank: int) -> SweepPoint | None:
        """The point, or None when it cannot pass: JD-Diag's optimum is never below JD-Full's at the same
        rank and clusters (``U diag(s) V^T`` is ``Q_U (R_U diag(s) R_V^T) Q_V^T``, a full Sigma on orthonormal
        bases), nor is a lower rank's; so a diagonal setting is skipped where JD-Full failed."""
        if kind == "diag" and any(p.sigma_kind == "full" and p.clusters == min(clusters, stack.n) and
                                  p.rank >= rank and not passes(p) for p in points):
            return None
        return evaluate(kind, clusters, rank)

    best: SweepPoint | None = None

    def affordable(kind: SigmaKind, clusters: int, rank: int) -> bool:
        params = stored_parameters(stack.n, stack.d_out, stack.d_in, rank, clusters, kind)
        cost = (params, token_work(stack.d_out, stack.d_in, rank, kind))
        # A fixed rank and cluster count are the user's choice: tried whatever they cost.
        fixed = len(ladder) == 1 and len(counts) == 1
        return fixed or (params < budget and (best is None or cost < best.cost()))

    for kind in kinds:
        ceiling = None  # the rank index that passed with fewer clusters: more clusters never need more
        for clusters in counts:
            if not affordable(kind, clusters, ladder[0]):
                break  # costs only grow with the cluster count
            if ceiling is None:  # bisect the affordable part of the ladder for the smallest passing rank
                top = 0
                while top + 1 < len(ladder) and affordable(kind, clusters, ladder[top + 1]):
                    top += 1
                lo, hi, p = 0, top, None
                while lo <= hi:
                    mid = (lo + hi) // 2
                    trial = check(kind, clusters, ladder[mid])
                    if passes(trial):
                        i, p, hi = mid, trial, mid - 1
                    else:
                        lo = mid + 1
                if p is None:
                    continue
            else:  # downwards from the rank that passed with fewer clusters, while the ranks pass
                i = ceiling
                while i > 0 and not affordable(kind, clusters, ladder[i]):
                    i -= 1
                p = check(kind, clusters, ladder[i])
                if not passes(p):
                    continue
                while i > 0:
                    lower = check(kind, clusters, ladder[i - 1])
                    if not passes(lower):
                        break
                    i, p = i - 1, lower
            ceiling = i
            if i > 0:  # one refinement between the failing rank below and this one
                mid = (ladder[i - 1] + ladder[i]) // 2
                if ladder[i - 1] < mid < ladder[i] and affordable(kind, clusters, mid):
                    finer = check(kind, clusters, mid)
                    if passes(finer):
                        p = finer
            if best is None or p.cost() < best.cost():
                best = p
            if i == 0:
                break  # the lowest rank passes: more clusters only cost more
    if not points:  # even the fewest clusters store more than the LoRAs at the rank asked for: try it anyway
        forced = check(kinds[0], counts[0], ladder[0] if len(ladder) == 1 else ladder[-1])
        best = forced if passes(forced) else None
    where = f" on {module}" if module else ""
    if best is not None:
        chosen, met = best, True
        reason = (f"{chosen.label()}: the cheapest of {len(points)} settings tried{where} whose "
                  f"{_which(q)} adapter error is <= {target} ({chosen.quantile_error:.3f}; "
                  f"{chosen.saved_ratio:.1%} of the parameters saved, {chosen.token_work:,} multiply-adds per "
                  "token per module).")
        if chosen.saved_ratio <= 0:
            reason += " It stores more parameters than the LoRAs: serving them uncompressed is cheaper."
    else:
        chosen, met = min(points, key=lambda p: (p.quantile_error, p.cost())), False
        reason = (f"No setting storing fewer parameters than the LoRAs keeps the {_which(q)} adapter error"
                  f"{where} at most {target} (best tried: {chosen.quantile_error:.3f} with {chosen.label()}, "
                  f"{chosen.saved_ratio:.1%} saved; {len(points)} settings tried). Using it. To keep the "
                  f"skills, serve these adapters uncompressed (or as per-adapter SVD), or accept "
                  f"target_error={math.ceil(chosen.quantile_error * 100) / 100:.2f}.")
        warnings.warn(reason, stacklevel=3)
    resolved = settings.replace(rank=chosen.rank, clusters=chosen.clusters, sigma_kind=chosen.sigma_kind)
    choice = AutoChoice(module=module, target_error=target, error_quantile=q, met=met, reason=reason,
                        tried=len(points))
    return resolved, choice, points


def _which(quantile: float) -> str:
    return "worst" if quantile >= 1 else f"{quantile:.0%}-quantile"
