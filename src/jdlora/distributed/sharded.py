"""One module whose adapters do not fit one worker: the adapters sharded across Ray actors.

Every quantity the clustered JD needs from the d-dimensional factors is a sum over adapters or a
per-adapter value:

- the QR iteration of Appendix A.2 (equations 14-17): ``X = sum_i B_i (A_i V) Sigma_i^T`` and
  ``Y = sum_i A_i^T (B_i^T U) Sigma_i``, both ``d x r``, and the kept energy ``sum_i ||Sigma_i||^2``;
- the random start (:func:`~jdlora.compress.jd.range_init`): ``sum_i B_i G_i`` and ``sum_i A_i^T H_i``;
- the cluster assignment (Appendix A.3, step 2): per adapter, ``[n, C]`` errors;
- the k-means seeding on the single-cluster Sigma_i: ``r^2`` numbers per adapter (a kilobyte at
  r = 16, against ``r (d_out + d_in)`` factor values), gathered on the coordinator.

So each :class:`ShardActor` holds its adapters' factors and their Sigma_i; the coordinator (a Ray
task, :func:`compress_module_sharded`) holds only ``d x r`` bases and per-adapter vectors, sums
the shards' terms, orthonormalizes, and runs the same control flow as
:func:`~jdlora.compress.clustering.jd_cluster` (CPU path: one JD per cluster) and
:func:`~jdlora.compress.module.compress_module`. The result equals the single-process one up to
the order of floating-point sums. A cluster small enough for the span reduction of
:func:`~jdlora.compress.jd.jd_full` (``n_j * r_max`` at most ``d / 2``: at most ``d^2`` factor
values) is gathered and solved by that very function.

Supported: JD-Full with the QR solver (the one for large n; the eigen solver needs
``n * r_max < d``). JD-Diag is not sharded.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import ray
import torch
from torch import Tensor

from ..compress import CompressionSettings, LoraStack, ModuleCompression
from ..compress.clustering import _fill_empty_clusters, assignment_errors, kmeans, reassign
from ..compress.jd import (
    _REDUCE_FACTOR,
    _residuals_of_projection,
    jd_full,
    residuals,
    sigma_full,
    subspace_change,
)
from ..compress.stack import times, times_transposed

# jd_cluster's defaults for the settling rounds (the sharded loop runs the same control flow).
_SETTLE_FACTOR, _SETTLE_MOVES, _STOP_MOVES = 100.0, 0.05, 0.005


class ShardActor:
    """One shard of a module: its adapters' factors (normalized as in ``compress_module``) and Sigma_i.

    A *view* is the shard's members of one cluster (all of them for the single-cluster JD); the JD
    methods below run on the current view and keep its iteration state here, so only ``d x r``
    bases and scalars travel.
    """

    def __init__(self, sources, module: str, ids: list[int], r_max: int, dtype: torch.dtype, device: str,
                 normalize: bool):
        from ..pipeline import read_stack

        self.cpu_start = time.process_time()
        stack, _ = read_stack([sources[i] for i in ids], module, dtype=dtype, device=device)
        if stack.r_max < r_max:  # pad to the module's r_max: the single-process stack's layout
            pad = (0, 0, 0, r_max - stack.r_max)
            stack = LoraStack(torch.nn.functional.pad(stack.A, pad), Bt=torch.nn.functional.pad(stack.Bt, pad))
        self.raw_sq_norms = stack.sq_norms()
        norms = self.raw_sq_norms.sqrt()
        scale = torch.where(norms > 0, 1 / norms, torch.ones_like(norms)) if normalize else torch.ones_like(norms)
        self.scale = scale
        self.work = stack.scaled(scale) if normalize else stack
        self.r_max = r_max
        self.final_sigma: dict[int, Tensor] = {}
        self.final_res: dict[int, Tensor] = {}
        self.view = self.work

    def vectors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(raw ||dW_i||^2, normalization scale, normalized ||dW_i||^2, rank bound r_i)`` per adapter."""
        return self.raw_sq_norms.cpu(), self.scale.cpu(), self.work.sq_norms().cpu(), self.work.row_counts().cpu()

    def usage(self) -> tuple[int, int, float]:
        """``(pid, peak RSS in bytes, CPU seconds spent on this shard)``."""
        from .engine import worker_peak

        return (*worker_peak(), time.process_time() - self.cpu_start)

    # ----- the views and the random start ---------------------------------------------------------

    def set_view(self, rows: Tensor | None) -> int:
        self.view = self.work if rows is None else self.work.subset(rows.to(self.work.A.device))
        return self.view.n

    def init_terms(self, g_u: Tensor, g_v: Tensor) -> tuple[Tensor, Tensor]:
        """``(sum_i B_i G_i, sum_i A_i^T H_i)`` over the view: this shard's part of ``range_init``."""
        v = self.view
        g_u, g_v = g_u.to(v.B), g_v.to(v.A)
        return (v.sum_B(g_u.reshape(v.n, self.r_max, -1)).cpu(), v.sum_At(g_v.reshape(v.n, self.r_max, -1)).cpu())

    # ----- the QR iteration of Appendix A.2 on the view (jd._qr_iterations, one stack) --------------

    def _per_adapter(self, X: Tensor) -> Tensor:
        return X.reshape(self.view.n, self.r_max, X.shape[-1])

    def start(self, U: Tensor, V: Tensor) -> float:
        v = self.view
        U, V = U.to(v.A), V.to(v.A)
        self.AV = times(v.A.reshape(-1, v.d_in), V)
        self.sigma = self._per_adapter(times(v.Bt.reshape(-1, v.d_out), U)).mT @ self._per_adapter(self.AV)  # eq. 6
        self.best_sigma = self.sigma
        return self.sigma.double().square().sum().item()

    def x_term(self, accept_last: bool | None = None) -> Tensor:
        """``sum_i B_i (A_i V) Sigma_i^T`` over the view (equations 14, 16).

        ``accept_last``: first :meth:`accept` the previous iteration (saves a round trip per iteration).
        """
        if accept_last is not None:
            self.accept(accept_last)
        v = self.view
        X = (self._per_adapter(self.AV) @ self.sigma.mT).reshape(-1, self.sigma.shape[-1])
        return times_transposed(v.Bt.reshape(-1, v.d_out), X).cpu()

    def y_term(self, U_new: Tensor) -> Tensor:
        """``sum_i A_i^T (B_i^T U) (U^T B_i A_i V)`` over the view (equations 15, 17)."""
        v = self.view
        self.BtU = self._per_adapter(times(v.Bt.reshape(-1, v.d_out), U_new.to(v.A)))
        Y = (self.BtU @ (self.BtU.mT @ self._per_adapter(self.AV))).reshape(-1, U_new.shape[1])
        return times_transposed(v.A.reshape(-1, v.d_in), Y).cpu()

    def step(self, V_new: Tensor) -> float:
        v = self.view
        self.AV_new = times(v.A.reshape(-1, v.d_in), V_new.to(v.A))
        self.sigma_new = self.BtU.mT @ self._per_adapter(self.AV_new)  # equation 6
        return self.sigma_new.double().square().sum().item()

    def accept(self, improved: bool) -> None:
        if improved:
            self.best_sigma = self.sigma_new
        self.AV, self.sigma = self.AV_new, self.sigma_new

    def finish(self, cluster: int, U: Tensor, V: Tensor, accept_last: bool | None = None) -> float:
        """Keeps the view's best Sigma_i as cluster ``cluster``'s; returns the sum of its residuals."""
        if accept_last is not None:
            self.accept(accept_last)
        v = self.view
        res = _residuals_of_projection(v.sq_norms()[None], U.to(v.A)[None], V.to(v.A)[None], self.best_sigma[None])[0]
        self.final_sigma[cluster], self.final_res[cluster] = self.best_sigma, res
        return res.double().sum().item()

    # ----- gathered views, assignment, assembly -------------------------------------------------------

    def view_factors(self) -> tuple[Tensor, Tensor]:
        return self.view.A.cpu(), self.view.Bt.cpu()

    def set_final(self, cluster: int, sigma: Tensor, res: Tensor) -> None:
        self.final_sigma[cluster], self.final_res[cluster] = sigma.to(self.work.A), res.to(self.work.A)

    def sigma_of(self, cluster: int) -> Tensor:
        return self.final_sigma[cluster].cpu()

    def assignment_errors(self, bases: list[tuple[Tensor, Tensor]]) -> Tensor:
        bases = [(U.to(self.work.A), V.to(self.work.A)) for U, V in bases]
        return assignment_errors(self.work, bases, "full").cpu()

    def gather(self, assignment: Tensor, r: int) -> tuple[Tensor, Tensor]:
        """Sigma_i (padded to rank r) and residual of each adapter, from its cluster's JD (``_gather``)."""
        n = self.work.n
        sigmas = self.work.A.new_zeros(n, r, r)
        res = self.work.A.new_zeros(n)
        for j in assignment.unique().tolist():
            members = (assignment == j).nonzero().flatten()
            k = self.final_sigma[j].shape[-1]
            sigmas[members, :k, :k] = self.final_sigma[j]
            res[members] = self.final_res[j]
        return sigmas.cpu(), res.cpu()

    def reproject(self, rows: Tensor, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        """Optimal Sigma_i and residual of ``rows`` on the bases ``(U, V)`` (``_keep_last_moves``)."""
        sub = self.work.subset(rows.to(self.work.A.device))
        U, V = U.to(self.work.A), V.to(self.work.A)
        sig = sigma_full(sub, U, V)
        return sig.cpu(), residuals(sub, U, V, sig).cpu()


@dataclass
class _ClusterJD:
    """What the coordinator keeps of one cluster's JD: its bases and the sum of its residuals."""

    U: Tensor
    V: Tensor
    residual_sum: float

    @property
    def rank(self) -> int:
        return self.U.shape[1]


class _Shards:
    """The coordinator's handle on a module's shard actors: calls on all of them (or some), sums, gathers."""

    def __init__(self, actors: list, sizes: list[int], r_max: int, d_out: int, d_in: int, dtype: torch.dtype):
        self.actors, self.sizes, self.r_max, self.d_out, self.d_in, self.dtype = actors, sizes, r_max, d_out, d_in, dtype
        self.offsets = [sum(sizes[:s]) for s in range(len(sizes))]
        self.n = sum(sizes)

    def call(self, method: str, *args, actors: list | None = None) -> list:
        return ray.get([getattr(a, method).remote(*args) for a in (self.actors if actors is None else actors)])

    def call_each(self, method: str, per_shard: list[tuple], actors: list | None = None) -> list:
        actors = self.actors if actors is None else actors
        return ray.get([getattr(a, method).remote(*args) for a, args in zip(actors, per_shard)])

    def local(self, rows: Tensor) -> list[Tensor]:
        """Global adapter indices (ascending) -> each shard's local rows."""
        return [rows[(rows >= o) & (rows < o + s)] - o for o, s in zip(self.offsets, self.sizes)]

    def holding(self, rows: Tensor) -> tuple[list, list[Tensor]]:
        """The actors holding some of ``rows``, and their local rows (shards without any are left out)."""
        pairs = [(a, local) for a, local in zip(self.actors, self.local(rows)) if len(local)]
        return [a for a, _ in pairs], [local for _, local in pairs]


def compress_module_sharded(shards: _Shards, settings: CompressionSettings) -> ModuleCompression:
    """``compress_module`` (JD-Full, QR solver) on a sharded module; the normalization was applied by the shards."""
    parts = shards.call("vectors")
    raw_sq_norms, scale, sq_norms, row_counts = (torch.cat([p[i] for p in parts]) for i in range(4))
    U, V, sigma, cluster, res, history = _jd_cluster(shards, settings, sq_norms, row_counts)
    restore = (1 / scale).to(sigma)
    return ModuleCompression(U=U, V=V, sigma=sigma * restore[:, None, None], cluster=cluster,
                             sq_norms=raw_sq_norms, residuals=res * restore.square(), history=history)


def _jd_cluster(shards: _Shards, settings: CompressionSettings, sq_norms: Tensor, row_counts: Tensor):
    """:func:`~jdlora.compress.clustering.jd_cluster` (CPU path), step for step, on the shards."""
    n = shards.n
    rank, tol, ftol = settings.rank, settings.tol, settings.ftol
    clusters = max(1, min(settings.clusters, n))
    total = sq_norms.sum()
    everyone = torch.arange(n)
    single = _jd_full(shards, everyone, 0, settings, row_counts, sq_norms, init=None)
    history = [single.residual_sum / total.item()]
    if clusters == 1:
        zeros = torch.zeros(n, dtype=torch.long)
        sigma, res = _gather(shards, zeros, single.rank)
        return single.U[None], single.V[None], sigma, zeros, res, history
    features = torch.cat(shards.call("sigma_of", 0)).reshape(n, -1)
    cluster = kmeans(features / features.norm(dim=1, keepdim=True).clamp_min(1e-30), clusters, seed=settings.seed)
    bases = [(single.U, single.V)] * clusters
    results: list[_ClusterJD | None] = [None] * clusters
    errors = None
    settling = _SETTLE_FACTOR > 1 and _SETTLE_MOVES * n >= 1
    rounds = 0
    for rounds in range(1, settings.max_rounds + 1):
        if errors is None and bool((torch.bincount(cluster, minlength=clusters) == 0).any()):
            errors = _assignment_errors(shards, bases)
        cluster = _fill_empty_clusters(cluster, clusters, results, None, bases, "full", errors=errors)
        settling = settling and rounds < settings.max_rounds
        factor = _SETTLE_FACTOR if settling else 1.0
        round_settings = replace(settings, tol=tol * factor, ftol=ftol * factor)
        for j in range(clusters):
            rows = (cluster == j).nonzero().flatten()
            init = bases[j] if _effective_rank(shards, rows, rank, row_counts) == bases[j][0].shape[1] else None
            results[j] = _jd_full(shards, rows, j, round_settings, row_counts, sq_norms, init=init)
        bases = [(res.U, res.V) for res in results]
        history.append(sum(r.residual_sum for r in results) / total.item())
        errors = _assignment_errors(shards, bases)
        new_cluster, moved = reassign(errors, cluster)
        stalled = history[-2] - history[-1] < round_settings.ftol
        if settling:
            settling = moved > _SETTLE_MOVES * n and not stalled
        elif moved <= _STOP_MOVES * n or stalled or rounds == settings.max_rounds:
            break
        cluster = new_cluster
    else:
        new_cluster = cluster
    r = max(res.rank for res in results)
    U = torch.stack([_pad_columns(res.U, r) for res in results])
    V = torch.stack([_pad_columns(res.V, r) for res in results])
    sigma, res = _gather(shards, cluster, r)
    # clustering._keep_last_moves: the last reassignment's moves, each with its optimal Sigma.
    moved = (new_cluster != cluster).nonzero().flatten()
    if len(moved) and not bool((torch.bincount(new_cluster, minlength=clusters) == 0).any()):
        sigma, res = sigma.clone(), res.clone()
        for j in new_cluster[moved].unique().tolist():
            rows = moved[new_cluster[moved] == j]
            actors, locals_ = shards.holding(rows)
            parts = shards.call_each("reproject", [(local, U[j], V[j]) for local in locals_], actors)
            sigma[rows] = torch.cat([p[0] for p in parts])
            res[rows] = torch.cat([p[1] for p in parts])
        history = history[:-1] + [(res.sum() / total).item()]
        cluster = new_cluster
    return U, V, sigma, cluster, res, history


def _effective_rank(shards: _Shards, rows: Tensor, rank: int, row_counts: Tensor) -> int:
    """``jd.effective_rank`` of the adapters ``rows``."""
    return max(1, min(rank, shards.d_out, shards.d_in, int(row_counts[rows].sum())))


def _jd_full(shards: _Shards, rows: Tensor, cluster: int, settings: CompressionSettings, row_counts: Tensor,
             sq_norms: Tensor, *, init) -> _ClusterJD:
    """:func:`~jdlora.compress.jd.jd_full` (QR solver) of the adapters ``rows``; its Sigma_i stay on the shards."""
    actors, locals_ = shards.holding(rows)
    everyone = len(rows) == shards.n
    shards.call_each("set_view", [(None if everyone else local,) for local in locals_], actors)
    rank = _effective_rank(shards, rows, settings.rank, row_counts)
    k = len(rows) * shards.r_max
    bounds = torch.tensor([0, *[len(local) for local in locals_]]).cumsum(0).tolist()
    if k * _REDUCE_FACTOR <= min(shards.d_out, shards.d_in):  # small: gathered, solved by jd_full itself
        parts = shards.call("view_factors", actors=actors)
        stack = LoraStack(torch.cat([p[0] for p in parts]), Bt=torch.cat([p[1] for p in parts]),
                          sq_norms=sq_norms[rows].to(shards.dtype))
        result = jd_full(stack, settings, init=init)
        shards.call_each("set_final", [(cluster, result.sigma[a:b], result.residuals[a:b])
                                       for a, b in zip(bounds[:-1], bounds[1:])], actors)
        return _ClusterJD(result.U, result.V, result.residuals.double().sum().item())
    if init is None:  # jd.range_init over the shards: each gets its rows of the one random draw
        gen = torch.Generator().manual_seed(settings.seed)
        g_u = torch.randn(k, rank, generator=gen, dtype=torch.float64)
        g_v = torch.randn(k, rank, generator=gen, dtype=torch.float64)
        r_max = shards.r_max
        parts = shards.call_each("init_terms", [(g_u[a * r_max:b * r_max], g_v[a * r_max:b * r_max])
                                                for a, b in zip(bounds[:-1], bounds[1:])], actors)
        init = tuple(torch.linalg.qr(sum(p[i] for p in parts)).Q for i in range(2))
    return _qr_iterations(shards, actors, cluster, *init, float(sq_norms[rows].double().sum()), tol=settings.tol,
                          ftol=settings.ftol, max_iter=settings.max_iter)


def _qr_iterations(shards: _Shards, actors: list, cluster: int, U: Tensor, V: Tensor, total: float, *, tol: float,
                   ftol: float, max_iter: int) -> _ClusterJD:
    """``jd._qr_iterations`` for one stack (CPU: Householder QR), its sums reduced over the shards."""
    def call(method, *args):
        return shards.call(method, *args, actors=actors)

    error = max(0.0, 1.0 - sum(call("start", U, V)) / total)
    best_error, best_U, best_V = error, U, V
    improved = None  # the shards learn whether an iterate improved with their next call
    for _ in range(max_iter):
        U_new = torch.linalg.qr(sum(call("x_term", improved))).Q  # equations 14, 16
        V_new = torch.linalg.qr(sum(call("y_term", U_new))).Q  # equations 15, 17
        new_error = max(0.0, 1.0 - sum(call("step", V_new)) / total)
        change = max(subspace_change(U, U_new), subspace_change(V, V_new))
        drop = error - new_error
        stop = change < tol or 0 <= drop < ftol  # equation 19, or stalled
        improved = new_error <= best_error
        if improved:
            best_error, best_U, best_V = new_error, U_new, V_new
        U, V, error = U_new, V_new, new_error
        if stop:
            break
    return _ClusterJD(best_U, best_V, sum(call("finish", cluster, best_U, best_V, improved)))


def _assignment_errors(shards: _Shards, bases) -> Tensor:
    return torch.cat(shards.call("assignment_errors", bases))


def _gather(shards: _Shards, assignment: Tensor, r: int) -> tuple[Tensor, Tensor]:
    parts = shards.call_each("gather", [(local, r) for local in _split(shards, assignment)])
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _split(shards: _Shards, values: Tensor) -> list[Tensor]:
    return [values[o:o + s] for o, s in zip(shards.offsets, shards.sizes)]


def _pad_columns(X: Tensor, r: int) -> Tensor:
    return torch.nn.functional.pad(X, (0, r - X.shape[1]))
