"""Choosing rank, clusters and Sigma kind automatically (paper section 6.4, Appendix F, Figure 5).

The paper picks rank n/2 + 7 (or 16 with the fewest clusters whose error on a middle module is below
0.5). On our quality study (docs/quality.md) that kept only 92-94% of LoRA's task score: a pooled
error of 0.5 is far too generous, and a pooled error hides the adapters that lose their skill. So
:func:`choose_settings` judges a setting by each adapter's own relative error (the worst adapter, or
the ``error_quantile`` of them) against ``target_error`` (default calibrated on the study), and among
the settings that meet it takes the cheapest to serve: fewest parameters stored, then least work per
token. An adapter's error is norm-weighted over a sample of modules (:func:`sampled_adapter_errors`,
the formula the target was calibrated with), not taken on one module: on one module some adapter's
update is often small and idiosyncratic, barely matters to the adapter, and yet is the worst error
of almost every setting. It searches Sigma kinds, cluster counts 1, 2, 4, ... and ranks by doubling,
and stops looking where a setting would store as many parameters as the LoRAs themselves.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable, Sequence
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
class ModuleSample:
    """One module the automatic search judges settings on.

    Attributes:
        name: the module's name. stack: the updates of the adapters that have it.
        ranks: their LoRA ranks. adapter_ids: their indices among all the adapters (an adapter's errors
            are summed over the sampled modules by this index).
    """

    name: str
    stack: LoraStack
    ranks: list[int]
    adapter_ids: list[int]

    @classmethod
    def of(cls, stack: LoraStack, ranks: list[int] | None = None, name: str = "") -> ModuleSample:
        """A single module whose adapters are adapters 0..n-1 (``ranks``: default the stack's padded rank)."""
        return cls(name, stack, list(ranks) if ranks is not None else [stack.r_max] * stack.n, list(range(stack.n)))


def sampled_adapter_errors(residuals: torch.Tensor, sq_norms: torch.Tensor) -> torch.Tensor:
    """Each adapter's relative error over several modules, norm-weighted:
    ``err_i = sum_m ||dW_im - U Sigma_im V^T||^2 / sum_m ||dW_im||^2`` (``[modules, n]`` inputs, zeros where
    an adapter lacks a module). The formula ``target_error`` was calibrated with (docs/quality.md):
    a module where the adapter's update is small weighs little, as it does for the adapter's outputs.
    Adapters with no update in any of the modules are left out."""
    res, sq = residuals.sum(0), sq_norms.sum(0)
    present = sq > 0
    return res[present] / sq[present] if bool(present.any()) else torch.zeros(1, dtype=res.dtype)


@dataclass
class SweepPoint:
    """One setting tried on one module, or on the modules the automatic search samples: errors and cost.

    Attributes:
        rank, clusters, sigma_kind: the setting (rank as used: clamped to what the modules can use).
        error: pooled relative error. mean_adapter_error: mean of the per-adapter errors.
        quantile_error: the per-adapter error at ``error_quantile`` (1.0: the worst adapter); over several
            modules each adapter's error is norm-weighted (:func:`sampled_adapter_errors`).
        parameters: parameters stored for the module(s). saved_ratio: ``1 - parameters / LoRA parameters``.
        token_work: multiply-adds per token (:func:`token_work`), summed over the module(s).
        seconds: time to compress.
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
        modules: the modules the settings were judged on (each adapter's error norm-weighted over them).
        target_error: the per-adapter error the setting had to stay under; error_quantile: which adapter
            (1.0: the worst).
        met: whether the chosen setting meets the target.
        reason: one sentence for people: what was chosen, why, and (when nothing met the target) what
            it would take.
        tried: how many settings were tried.
    """

    modules: list[str]
    target_error: float
    error_quantile: float
    met: bool
    reason: str
    tried: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AutoChoice:
        """Reads :meth:`to_dict`, and earlier manifests' choice (one ``module``)."""
        data = dict(data)
        if "modules" not in data and "module" in data:
            data["modules"] = [data["module"]] if data["module"] else []
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


def evaluate_modules(samples: Sequence[ModuleSample], settings: CompressionSettings) -> SweepPoint:
    """Compresses every sampled module with one setting (its clusters chosen per module, as the real
    compression does) and measures it: per-adapter errors norm-weighted over the modules
    (:func:`sampled_adapter_errors`); parameters, LoRA parameters and work per token summed over them."""
    start = time.perf_counter()
    n = 1 + max(i for s in samples for i in s.adapter_ids)
    residuals = torch.zeros(len(samples), n, dtype=torch.float64)
    sq_norms = torch.zeros(len(samples), n, dtype=torch.float64)
    parameters = original = work = rank = clusters = 0
    for m, s in enumerate(samples):
        result = compress_module(s.stack, settings)
        ids = torch.tensor(s.adapter_ids)
        residuals[m, ids] = result.residuals.double().cpu()
        sq_norms[m, ids] = result.sq_norms.double().cpu()
        parameters += result.num_parameters()
        original += original_parameters(s.ranks, s.stack.d_out, s.stack.d_in)
        work += token_work(s.stack.d_out, s.stack.d_in, result.rank, result.sigma_kind)
        rank, clusters = max(rank, result.rank), max(clusters, result.num_clusters)
    errors = sampled_adapter_errors(residuals, sq_norms)
    return SweepPoint(
        rank=rank,
        clusters=clusters,
        sigma_kind=result.sigma_kind,
        error=(residuals.sum() / sq_norms.sum().clamp_min(1e-30)).item(),
        mean_adapter_error=errors.mean().item(),
        saved_ratio=saved_ratio(original, parameters),
        seconds=time.perf_counter() - start,
        quantile_error=torch.quantile(errors, settings.error_quantile).item(),
        parameters=parameters,
        token_work=work,
    )


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
    samples: Sequence[ModuleSample] | ModuleSample, settings: CompressionSettings, *, progress=None
) -> tuple[CompressionSettings, AutoChoice, list[SweepPoint]]:
    """Resolves the ``"auto"`` fields of ``settings``: the cheapest setting that meets the target on ``samples``.

    A setting meets the target when the per-adapter relative error at ``settings.error_quantile``
    (1.0: the worst adapter) is at most ``settings.target_error``, each adapter's error norm-weighted
    over the sampled modules (:func:`sampled_adapter_errors`: the calibration's formula). Cost:
    parameters stored, then multiply-adds per token, both summed over the sampled modules. The search,
    per Sigma kind, walks cluster counts 1, 2, 4, ... n; for each it looks for the smallest rank on the
    doubling ladder that meets the target (downwards from the previous count's rank, as more clusters
    never need a higher rank), refined once between the last failing and the first passing rank; it
    skips settings that cost more than the best found and stops where a setting would store as many
    parameters as the LoRAs.

    Args:
        samples: the modules to judge on (:func:`jdlora.pipeline.sample_modules` picks them), or one.

    Returns:
        The resolved settings, the :class:`AutoChoice` (what and why), and every point tried. When no
        setting meets the target, the one with the lowest error within the budget is used, with a
        warning that says so and what it would take.
    """
    samples = [samples] if isinstance(samples, ModuleSample) else list(samples)
    if not samples:
        raise ValueError("choose_settings needs at least one module to judge the settings on.")
    n = max(s.stack.n for s in samples)
    tops = [rank_ladder(s.stack)[-1] for s in samples]
    kinds: list[SigmaKind] = ["full", "diag"] if settings.sigma_kind == "auto" else [settings.sigma_kind]
    counts = cluster_counts(n) if settings.clusters == "auto" else [settings.clusters]
    ladder = rank_ladder(samples[tops.index(max(tops))].stack)
    if settings.rank != "auto":  # ranks beyond what the modules can use are that rank (Proposition 1)
        ladder = [min(settings.rank, ladder[-1])]
    budget = sum(original_parameters(s.ranks, s.stack.d_out, s.stack.d_in) for s in samples)
    target, q = settings.target_error, settings.error_quantile
    # Each trial needs its error to a few percent, not to the final tolerance: the search runs with looser
    # ones (its errors are then slightly higher than the final compression's, erring on the safe side).
    trial_settings = settings.replace(tol=settings.tol * SEARCH_TOL_FACTOR, ftol=settings.ftol * SEARCH_TOL_FACTOR)
    points: list[SweepPoint] = []
    tried: dict[tuple, SweepPoint] = {}

    def evaluate(kind: SigmaKind, clusters: int, rank: int) -> SweepPoint:
        key = (kind, min(clusters, n), rank)
        if key not in tried:
            tried[key] = evaluate_modules(samples, trial_settings.replace(rank=rank, clusters=clusters, sigma_kind=kind))
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
        if kind == "diag" and any(p.sigma_kind == "full" and p.clusters == min(clusters, n) and
                                  p.rank >= rank and not passes(p) for p in points):
            return None
        return evaluate(kind, clusters, rank)

    best: SweepPoint | None = None

    def cost(kind: SigmaKind, clusters: int, rank: int) -> tuple[int, int]:
        """Parameters stored and work per token of a setting, summed over the sampled modules."""
        params = work = 0
        for s, top in zip(samples, tops):
            r = min(rank, top)
            params += stored_parameters(s.stack.n, s.stack.d_out, s.stack.d_in, r, min(clusters, s.stack.n), kind)
            work += token_work(s.stack.d_out, s.stack.d_in, r, kind)
        return params, work

    def affordable(kind: SigmaKind, clusters: int, rank: int) -> bool:
        c = cost(kind, clusters, rank)
        # A fixed rank and cluster count are the user's choice: tried whatever they cost.
        fixed = len(ladder) == 1 and len(counts) == 1
        return fixed or (c[0] < budget and (best is None or c < best.cost()))

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
    names = [s.name for s in samples]
    where = f" over {len(names)} module{'s' if len(names) > 1 else ''} ({', '.join(names)})" if any(names) else ""
    if best is not None:
        chosen, met = best, True
        reason = (f"{chosen.label()}: the cheapest of {len(points)} settings tried whose "
                  f"{_which(q)} adapter error{where} is <= {target} ({chosen.quantile_error:.3f}; "
                  f"{chosen.saved_ratio:.1%} of the parameters saved, {chosen.token_work:,} multiply-adds per "
                  f"token over the module{'s' if len(samples) > 1 else ''}).")
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
    choice = AutoChoice(modules=names, target_error=target, error_quantile=q, met=met, reason=reason,
                        tried=len(points))
    return resolved, choice, points


def _which(quantile: float) -> str:
    return "worst" if quantile >= 1 else f"{quantile:.0%}-quantile"
