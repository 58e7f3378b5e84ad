"""Clustered joint diagonalization (paper section 3.2, Appendix A.3).

k clusters, each with its own bases ``(U_j, V_j)``; adapter i is reconstructed as
``U_c(i) Sigma_i V_c(i)^T``. The objective is ``sum_j sum_{i in C_j} ||B_i A_i - U_j Sigma_i V_j^T||^2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from .jd import (
    JDResult, _int_rank, _qr_iterations, effective_rank, jd_diag, jd_each_adapter, jd_full, residuals, sigma_diag, sigma_full,
)
from .settings import CompressionSettings, SigmaKind
from .stack import LoraStack


@dataclass
class ClusterResult:
    """Bases per cluster and Sigma per adapter.

    Attributes:
        U: ``[C, d_out, r]``. V: ``[C, d_in, r]``.
        sigma: ``[n, r, r]`` or ``[n, r]``.
        cluster: ``[n]`` cluster of each adapter.
        residuals: ``[n]`` squared errors ``||dW_i - U_c(i) Sigma_i V_c(i)^T||^2``.
        history: relative error after the single-cluster start and after every round.
    """

    U: Tensor
    V: Tensor
    sigma: Tensor
    cluster: Tensor
    residuals: Tensor
    history: list[float] = field(default_factory=list)
    rounds: int = 0


def jd(stack: LoraStack, settings: CompressionSettings, *, init: tuple[Tensor, Tensor] | None = None) -> JDResult:
    """Dispatches on ``settings.sigma_kind`` to :func:`~jdlora.compress.jd.jd_full` or :func:`~jdlora.compress.jd.jd_diag`."""
    if settings.sigma_kind == "full":
        return jd_full(stack, settings, init=init)
    if settings.sigma_kind == "diag":
        return jd_diag(stack, settings, init=init)
    raise ValueError(f"The JD needs a resolved Sigma kind, 'full' or 'diag'; got {settings.sigma_kind!r}.")


def jd_cluster(
    stack: LoraStack,
    settings: CompressionSettings,
    *,
    batched: bool | None = None,
    settle_factor: float = 100.0,
    settle_moves: float = 0.05,
    stop_moves: float = 0.005,
) -> ClusterResult:
    """Clustered JD (Appendix A.3).

    Initialization: JD of all adapters with one pair of bases, then k-means on the Sigma_i. Then
    alternate (1) a JD per cluster (Step 1) and (2) reassigning each adapter to the cluster whose
    bases reconstruct it best, with its optimal Sigma (Step 2), until the assignment settles.

    Unlike the paper (random bases per cluster), each cluster's JD starts from the bases it had: the
    single-cluster bases in the first round. Every step then only lowers the objective, so the
    result is never worse than the single-cluster JD of the same rank. A cluster left empty is
    re-seeded with the adapter that is currently reconstructed worst.

    Rounds come in two phases, which only decide how much work each JD does:

    - While more than ``settle_moves * n`` adapters change cluster per round (k-means on the single
      JD's Sigma_i typically leaves most adapters in the wrong cluster), the per-cluster JDs run with
      ``tol`` and ``ftol`` multiplied by ``settle_factor``: a few iterations each, as their clusters
      are about to change anyway. None below ``1 / settle_moves`` adapters.
    - Then with ``tol`` and ``ftol``, until at most ``stop_moves * n`` adapters change cluster (0 for
      n below ``1 / stop_moves``), a round lowers the relative error by less than ``ftol``, or
      ``max_rounds`` (whose last round is never a settling one). The changes of the last
      reassignment are kept (each lowers its adapter's error under the final bases) unless they
      would empty a cluster.

    Args:
        stack: the module's updates.
        settings: ``rank`` (r of every cluster's bases), ``clusters`` (k; clamped to n), ``sigma_kind``,
            the JD options of :func:`jd`, ``max_rounds`` (cap on the assignment/JD alternations) and
            ``seed`` (of the random initializations and of k-means).
        batched: run the JD-Full QR iterations of all clusters at once (:func:`_jd_full_clusters`)
            instead of one cluster after the other. Default: on CUDA only, where the per-cluster
            loop is bound by kernel launches and host syncs; on the CPU the per-cluster loop (where
            each cluster stops on its own and may be solved in the span of its own factors) is
            faster. JD-Diag and the eigen solver always run per cluster.
        settle_factor: tolerance factor of the settling rounds (1 disables them).
        settle_moves, stop_moves: fractions of n that end the settling rounds and the rounds.
    """
    n = stack.n
    rank, sigma_kind = _int_rank(settings), settings.sigma_kind
    if settings.clusters == "auto":
        raise ValueError("jd_cluster needs a resolved cluster count; choose one first.")
    clusters = max(1, min(settings.clusters, n))
    tol, ftol, max_rounds, seed = settings.tol, settings.ftol, settings.max_rounds, settings.seed
    single = jd(stack, settings)
    total = stack.sq_norms().sum()
    history = [(single.residuals.sum() / total).item()]
    if clusters == 1:
        return ClusterResult(
            single.U[None], single.V[None], single.sigma, torch.zeros(n, dtype=torch.long, device=stack.A.device),
            single.residuals, history,
        )
    features = single.sigma.reshape(n, -1)
    cluster = kmeans(features / features.norm(dim=1, keepdim=True).clamp_min(1e-30), clusters, seed=seed)
    bases = [(single.U, single.V)] * clusters
    results: list[JDResult | None] = [None] * clusters
    if batched is None:
        batched = stack.A.is_cuda
    batched = batched and sigma_kind == "full" and settings.solver == "qr"
    errors = None
    settling = settle_factor > 1 and settle_moves * n >= 1
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        cluster = _fill_empty_clusters(cluster, clusters, results, stack, bases, sigma_kind, errors=errors)
        settling = settling and rounds < max_rounds
        factor = settle_factor if settling else 1.0
        round_settings = replace(settings, tol=tol * factor, ftol=ftol * factor)
        if batched:
            results = _jd_full_clusters(stack, cluster, bases, round_settings)
        else:
            for j in range(clusters):
                sub = stack.subset((cluster == j).nonzero().flatten())
                init = bases[j] if effective_rank(sub, rank) == bases[j][0].shape[1] else None
                results[j] = jd(sub, round_settings, init=init)
        bases = [(res.U, res.V) for res in results]
        history.append(sum(r.residuals.sum() for r in results).item() / total.item())
        errors = assignment_errors(stack, bases, sigma_kind)
        new_cluster, moved = reassign(errors, cluster)
        stalled = history[-2] - history[-1] < round_settings.ftol
        if settling:
            settling = moved > settle_moves * n and not stalled
        elif moved <= stop_moves * n or stalled or rounds == max_rounds:
            break
        cluster = new_cluster
    else:
        new_cluster = cluster
    result = _gather(stack, results, cluster, sigma_kind, history, rounds)
    return _keep_last_moves(stack, result, new_cluster, sigma_kind, total)


def _keep_last_moves(stack: LoraStack, result: ClusterResult, new_cluster: Tensor, sigma_kind: SigmaKind,
                     total: Tensor) -> ClusterResult:
    """Moves the adapters whose last reassignment (Step 2) was not followed by a JD round.

    Each such adapter gets its optimal Sigma in its new cluster, whose bases reconstruct it better,
    so the objective only drops; the last history entry is updated to include it. Skipped when a
    cluster would be left empty.
    """
    moved = (new_cluster != result.cluster).nonzero().flatten()
    if len(moved) == 0:
        return result
    C = result.U.shape[0]
    if bool((torch.bincount(new_cluster, minlength=C) == 0).any()):
        return result
    sigmas, res = result.sigma.clone(), result.residuals.clone()
    for j in new_cluster[moved].unique().tolist():
        rows = moved[new_cluster[moved] == j]
        sub = stack.subset(rows)
        U, V = result.U[j], result.V[j]
        sig = sigma_full(sub, U, V) if sigma_kind == "full" else sigma_diag(sub, U, V)
        sigmas[rows] = sig
        res[rows] = residuals(sub, U, V, sig)
    history = result.history[:-1] + [(res.sum() / total).item()]
    return ClusterResult(result.U, result.V, sigmas, new_cluster, res, history, result.rounds)


def _jd_full_clusters(
    stack: LoraStack, cluster: Tensor, bases: list[tuple[Tensor, Tensor]], settings: CompressionSettings
) -> list[JDResult]:
    """One JD-Full (QR solver) per cluster, the iterations of all clusters run together.

    The same math per cluster as :func:`~jdlora.compress.jd.jd_full` started from ``bases[j]``
    (:func:`~jdlora.compress.jd._qr_iterations`: equations 14-17 in Gauss-Seidel order, each cluster
    stopping on its own equation 19 or ftol test, keeping its best iterate, at most ``max_iter``
    iterations). The adapters are laid out cluster by cluster, each cluster's stack zero-padded to
    the largest cluster's size (``[J, m_max * r_max, d]``), so that every product of an iteration is
    one batched GEMM over the clusters: no gathered copies of the bases per adapter, no scatter-adds.

    Unlike :func:`~jdlora.compress.jd.jd_full`, the clusters are solved in the full coordinates
    (not in the span of each cluster's factors), so the starting point is ``bases[j]`` itself
    rather than its projection on that span; the iterates after the first are the same subspaces.

    A cluster of one adapter needs no iterations: the clusters of one are solved together in closed form
    (:func:`~jdlora.compress.jd.jd_each_adapter`, their truncated SVDs), as :func:`jd_full` solves one. A
    cluster that cannot use the common rank (stacked rank below it: Proposition 1, it is already
    lossless at a lower rank) or whose previous bases have another rank runs the per-cluster
    :func:`jd_full` as before.

    Returns:
        One :class:`JDResult` per cluster, its sigma and residuals ordered like
        ``(cluster == j).nonzero()``.
    """
    C = len(bases)
    device = stack.A.device
    rank = _int_rank(settings)
    counts = torch.bincount(cluster, minlength=C)
    row_rank = stack.row_counts()
    cluster_rank = torch.zeros(C, dtype=row_rank.dtype, device=device).index_add_(0, cluster, row_rank)
    counts_list, ranks_list = torch.stack([counts, cluster_rank]).tolist()  # one sync per call
    effective = [max(1, min(rank, stack.d_out, stack.d_in, k)) for k in ranks_list]
    results: list[JDResult | None] = [None] * C
    # Clusters of one adapter: their truncated SVDs in closed form, one batched SVD per rank (no iterations).
    alone = [j for j in range(C) if counts_list[j] == 1]
    for r in sorted({effective[j] for j in alone}):
        same = [j for j in alone if effective[j] == r]
        members = (cluster[:, None] == torch.tensor(same, device=device)).nonzero()  # (adapter, index in same)
        members = members[torch.argsort(members[:, 1])][:, 0]
        for j, result in zip(same, jd_each_adapter(stack.subset(members), r, "full")):
            results[j] = result
    common = max((effective[j] for j in range(C) if counts_list[j] != 1), default=0)
    joint = [j for j in range(C) if counts_list[j] > 1 and effective[j] == common and bases[j][0].shape[1] == common]
    for j in range(C):
        if results[j] is None and j not in joint:
            sub = stack.subset((cluster == j).nonzero().flatten())
            init = bases[j] if effective[j] == bases[j][0].shape[1] else None
            results[j] = jd_full(sub, settings, init=init)
    if not joint:
        return results
    # The jointly solved clusters, renumbered 0..J-1, their adapters laid out cluster by cluster.
    J = len(joint)
    remap = torch.full((C,), -1, dtype=torch.long, device=device)
    remap[torch.tensor(joint, device=device)] = torch.arange(J, device=device)
    a = remap[cluster]
    rows = (a >= 0).nonzero().flatten()
    rows = rows[torch.argsort(a[rows], stable=True)]  # cluster by cluster, each in index order
    a = a[rows]
    sizes = [counts_list[j] for j in joint]
    m = max(sizes)
    starts = torch.tensor([0, *sizes[:-1]], device=device).cumsum(0)
    slot = torch.arange(len(rows), device=device) - starts[a]
    r_max = stack.r_max
    A = stack.A.new_zeros(J, m, r_max, stack.d_in)
    A[a, slot] = stack.A[rows]
    Bt = stack.Bt.new_zeros(J, m, r_max, stack.d_out)
    Bt[a, slot] = stack.Bt[rows]
    sq_norms = stack.A.new_zeros(J, m)
    sq_norms[a, slot] = stack.subset(rows).sq_norms()
    U = torch.stack([bases[j][0] for j in joint])  # [J, d_out, r]
    V = torch.stack([bases[j][1] for j in joint])
    out = _qr_iterations(A.reshape(J, m * r_max, stack.d_in), Bt.reshape(J, m * r_max, stack.d_out), r_max, U, V,
                         sq_norms, tol=settings.tol, ftol=settings.ftol, max_iter=settings.max_iter)
    for jj, j in enumerate(joint):
        size = sizes[jj]
        results[j] = JDResult(out.U[jj], out.V[jj], out.sigma[jj, :size], out.residuals[jj, :size],
                              out.history[jj], out.converged[jj])
    return results


def reassign(errors: Tensor, cluster: Tensor) -> tuple[Tensor, int]:
    """Appendix A.3's assignment step: each adapter to the cluster whose bases reconstruct it best
    (``errors [n, k]`` from :func:`assignment_errors`); returns the new clusters and how many moved.

    Ties with the current cluster keep it, so the alternation cannot cycle between equal choices.
    """
    new_cluster = errors.argmin(dim=1)
    current = errors.gather(1, cluster[:, None]).squeeze(1)
    new_cluster = torch.where(current <= errors.min(dim=1).values, cluster, new_cluster)
    return new_cluster, int((new_cluster != cluster).sum())


def assignment_errors(stack: LoraStack, bases: list[tuple[Tensor, Tensor]], sigma_kind: SigmaKind) -> Tensor:
    """``[n, C]``: ``min_Sigma ||B_i A_i - U_j Sigma V_j^T||^2`` for every adapter and cluster (Step 2).

    The bases of all clusters are concatenated (``[d, C * r]``), so the products with the factors are
    two GEMMs over all adapters and clusters at once (``B_i^T [U_1 .. U_C]`` and
    ``A_i [V_1 .. V_C]``, in chunks of adapters to bound memory); the rest is r x r per pair:

    - full Sigma, orthonormal bases: ``||dW_i||^2 - ||U_j^T dW_i V_j||^2`` (equation 6);
    - diagonal Sigma: ``||dW_i||^2 - c^T G^{-1} c`` with ``c = diag(U_j^T dW_i V_j)`` and
      ``G = U_j^T U_j o V_j^T V_j`` (Appendix A.1, case 2).

    Bases of a lower rank than the others are padded with zero columns (which project nothing).
    """
    norms = stack.sq_norms()
    C = len(bases)
    ranks = [U.shape[1] for U, _ in bases]
    r = max(ranks)
    U_all = torch.cat([_pad_columns(U, r) for U, _ in bases], dim=1)  # [d_out, C * r]
    V_all = torch.cat([_pad_columns(V, r) for _, V in bases], dim=1)
    grams = [(U.T @ U) * (V.T @ V) for U, V in bases] if sigma_kind == "diag" else []
    chunk = max(1, _CHUNK_ELEMENTS // max(1, stack.r_max * C * r))
    kept = []
    for start in range(0, stack.n, chunk):
        part = stack.subset(slice(start, start + chunk))
        c = part.n
        BtU = part.times_Bt(U_all).reshape(c, stack.r_max, C, r)
        AV = part.times_A(V_all).reshape(c, stack.r_max, C, r)
        if sigma_kind == "full":
            P = torch.einsum("nkcr,nkcs->ncrs", BtU, AV)  # U_j^T B_i A_i V_j
            kept.append(P.square().sum(dim=(2, 3)))
        else:
            d = (BtU * AV).sum(dim=1)  # [c, C, r]: diag(U_j^T B_i A_i V_j)
            cols = []
            for j, gram in enumerate(grams):
                dj = d[:, j, : ranks[j]]
                cols.append((dj * torch.linalg.solve(gram, dj.T).T).sum(dim=1))
            kept.append(torch.stack(cols, dim=1))
    return (norms[:, None] - torch.cat(kept)).clamp_min(0)


# Bound on the elements of one chunk's products with the concatenated bases in assignment_errors.
_CHUNK_ELEMENTS = 2**25


def kmeans(x: Tensor, k: int, *, seed: int = 0, iterations: int = 50) -> Tensor:
    """Lloyd's k-means with k-means++ seeding on the rows of ``x``; returns ``[n]`` labels.

    Empty clusters are re-seeded with the point farthest from its centre, so all k are used.
    """
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    centres = x[torch.randint(n, (1,), generator=gen)]
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).square().min(dim=1).values
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / n)
        centres = torch.cat([centres, x[torch.multinomial(probs.cpu().double(), 1, generator=gen).to(x.device)]])
    labels = None
    for _ in range(iterations):
        dist = torch.cdist(x, centres)
        labels_new = dist.argmin(dim=1)
        counts = torch.bincount(labels_new, minlength=k)
        same = torch.zeros((), dtype=torch.bool, device=x.device) if labels is None else (labels_new == labels).all()
        # One host sync per iteration: whether a cluster is empty and whether the labels changed.
        empty, same = torch.stack([(counts == 0).any(), same]).tolist()
        if empty:
            for j in range(k):
                if not (labels_new == j).any():
                    far = dist.gather(1, labels_new[:, None]).squeeze(1).argmax()
                    labels_new[far] = j
            counts = torch.bincount(labels_new, minlength=k)
            same = labels is not None and torch.equal(labels_new, labels)
        if same:
            break
        labels = labels_new
        centres = torch.zeros_like(centres).index_add_(0, labels, x) / counts[:, None].to(x.dtype)
    return labels


def _fill_empty_clusters(cluster, clusters, results, stack, bases, sigma_kind, errors=None) -> Tensor:
    """Moves the worst-reconstructed adapter of a multi-member cluster into each empty cluster.

    ``errors``: :func:`assignment_errors` for ``bases`` when the caller has them already.
    """
    cluster = cluster.clone()
    if not bool((torch.bincount(cluster, minlength=clusters) == 0).any()):  # the usual case: one sync
        return cluster
    for j in range(clusters):
        if (cluster == j).any():
            continue
        if errors is None:
            errors = assignment_errors(stack, [bases[c] for c in range(clusters)], sigma_kind)
        own = errors.gather(1, cluster[:, None]).squeeze(1)
        counts = torch.bincount(cluster, minlength=clusters)
        movable = counts[cluster] > 1
        own = torch.where(movable, own, torch.full_like(own, -1.0))
        cluster[own.argmax()] = j
    return cluster


def _gather(stack, results, cluster, sigma_kind, history, rounds) -> ClusterResult:
    """Assembles per-cluster results into stacked tensors ordered like the adapters."""
    r = max(res.rank for res in results)
    U = torch.stack([_pad_columns(res.U, r) for res in results])
    V = torch.stack([_pad_columns(res.V, r) for res in results])
    shape = (stack.n, r, r) if sigma_kind == "full" else (stack.n, r)
    sigmas = torch.zeros(shape, dtype=stack.A.dtype, device=stack.A.device)
    res_all = torch.zeros(stack.n, dtype=stack.A.dtype, device=stack.A.device)
    counts = torch.bincount(cluster, minlength=len(results)).tolist()
    order = torch.argsort(cluster, stable=True)  # cluster by cluster, each in index order
    starts = [sum(counts[:j]) for j in range(len(results))]
    for j, res in enumerate(results):
        members = order[starts[j]:starts[j] + counts[j]]
        k = res.rank
        if sigma_kind == "full":
            sigmas[members, :k, :k] = res.sigma
        else:
            sigmas[members, :k] = res.sigma
        res_all[members] = res.residuals
    return ClusterResult(U, V, sigmas, cluster, res_all, history, rounds)


def _pad_columns(X: Tensor, r: int) -> Tensor:
    # A cluster too small for rank r (Proposition 1: already lossless) gets zero columns, which
    # reconstruct nothing, so every cluster of a module has the same rank for serving.
    return torch.nn.functional.pad(X, (0, r - X.shape[1]))
