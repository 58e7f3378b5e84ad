"""Clustered joint diagonalization (paper section 3.2, Appendix A.3).

k clusters, each with its own bases ``(U_j, V_j)``; adapter i is reconstructed as
``U_c(i) Sigma_i V_c(i)^T``. The objective is ``sum_j sum_{i in C_j} ||B_i A_i - U_j Sigma_i V_j^T||^2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .jd import JDResult, Solver, _subspace_change, effective_rank, jd_diag, jd_full, orthonormalize
from .stack import LoraStack

SigmaKind = Literal["full", "diag"]


@dataclass
class ClusterResult:
    """Bases per cluster and Sigma per adapter.

    Attributes:
        U: ``[C, d_out, r]``. V: ``[C, d_in, r]``.
        sigma: ``[n, r, r]`` or ``[n, r]``.
        assignment: ``[n]`` cluster of each adapter.
        residuals: ``[n]`` squared errors ``||dW_i - U_c(i) Sigma_i V_c(i)^T||^2``.
        history: relative error after the single-cluster start and after every round.
    """

    U: Tensor
    V: Tensor
    sigma: Tensor
    assignment: Tensor
    residuals: Tensor
    history: list[float] = field(default_factory=list)
    rounds: int = 0


def jd(
    stack: LoraStack,
    rank: int,
    *,
    sigma: SigmaKind = "full",
    solver: Solver = "qr",
    tol: float = 1e-3,
    ftol: float = 1e-5,
    max_iter: int = 100,
    init: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
) -> JDResult:
    """Dispatches to :func:`~jdlora.compress.jd.jd_full` or :func:`~jdlora.compress.jd.jd_diag`."""
    if sigma == "full":
        return jd_full(stack, rank, solver=solver, tol=tol, ftol=ftol, max_iter=max_iter, init=init, seed=seed)
    if sigma == "diag":
        return jd_diag(stack, rank, tol=tol, ftol=ftol, max_iter=max_iter, init=init, seed=seed)
    raise ValueError(f"Unknown sigma kind {sigma!r}; use 'full' or 'diag'.")


def jd_cluster(
    stack: LoraStack,
    rank: int,
    clusters: int,
    *,
    sigma: SigmaKind = "full",
    solver: Solver = "qr",
    tol: float = 1e-3,
    ftol: float = 1e-5,
    max_iter: int = 100,
    max_rounds: int = 20,
    seed: int = 0,
    batched: bool | None = None,
) -> ClusterResult:
    """Clustered JD (Appendix A.3).

    Initialization: JD of all adapters with one pair of bases, then k-means on the Sigma_i. Then
    alternate (1) a JD per cluster and (2) reassigning each adapter to the cluster whose bases
    reconstruct it best (with its optimal Sigma), until no assignment changes, a round lowers the
    relative error by less than ``ftol``, or ``max_rounds``.

    Unlike the paper (random bases per cluster), each cluster's JD starts from the bases it had: the
    single-cluster bases in the first round. Every step then only lowers the objective, so the
    result is never worse than the single-cluster JD of the same rank. A cluster left empty is
    re-seeded with the adapter that is currently reconstructed worst.

    Args:
        stack: the module's updates.
        rank: r of every cluster's bases.
        clusters: k; clamped to n.
        sigma, solver, tol, ftol, max_iter: as for :func:`jd`.
        max_rounds: cap on the assignment/JD alternations.
        seed: seed of the random initializations and of k-means.
        batched: run the JD-Full QR iterations of all clusters at once (:func:`_jd_full_clusters`)
            instead of one cluster after the other. Default: on CUDA only, where the per-cluster
            loop is bound by kernel launches and host syncs; on the CPU the per-cluster loop (which
            solves each cluster in the span of its own factors) is faster. JD-Diag and the eigen
            solver always run per cluster.
    """
    n = stack.n
    clusters = max(1, min(clusters, n))
    options = dict(sigma=sigma, solver=solver, tol=tol, ftol=ftol, max_iter=max_iter, seed=seed)
    single = jd(stack, rank, **options)
    total = stack.sq_norms().sum()
    history = [(single.residuals.sum() / total).item()]
    if clusters == 1:
        return ClusterResult(
            single.U[None], single.V[None], single.sigma, torch.zeros(n, dtype=torch.long, device=stack.A.device),
            single.residuals, history,
        )
    features = single.sigma.reshape(n, -1)
    assignment = kmeans(features / features.norm(dim=1, keepdim=True).clamp_min(1e-30), clusters, seed=seed)
    bases = [(single.U, single.V)] * clusters
    results: list[JDResult | None] = [None] * clusters
    if batched is None:
        batched = stack.A.is_cuda
    batched = batched and sigma == "full" and solver == "qr"
    rounds = 0
    for rounds in range(1, max_rounds + 1):
        assignment = _fill_empty_clusters(assignment, clusters, results, stack, bases, sigma)
        if batched:
            results = _jd_full_clusters(stack, rank, assignment, bases, tol=tol, ftol=ftol, max_iter=max_iter,
                                        seed=seed)
        else:
            for j in range(clusters):
                members = (assignment == j).nonzero().flatten()
                sub = stack.subset(members)
                init = bases[j] if effective_rank(sub, rank) == bases[j][0].shape[1] else None
                results[j] = jd(sub, rank, init=init, **options)
        bases = [(res.U, res.V) for res in results]
        history.append(sum(r.residuals.sum() for r in results).item() / total.item())
        errors = assignment_errors(stack, bases, sigma)
        new_assignment = errors.argmin(dim=1)
        # Keep ties with the current cluster, so the loop cannot cycle between equal choices.
        current = errors.gather(1, assignment[:, None]).squeeze(1)
        new_assignment = torch.where(current <= errors.min(dim=1).values, assignment, new_assignment)
        if torch.equal(new_assignment, assignment) or history[-2] - history[-1] < ftol:
            break
        assignment = new_assignment
    return _gather(stack, results, assignment, rank, sigma, history, rounds)


def _jd_full_clusters(
    stack: LoraStack,
    rank: int,
    assignment: Tensor,
    bases: list[tuple[Tensor, Tensor]],
    *,
    tol: float,
    ftol: float,
    max_iter: int,
    seed: int,
) -> list[JDResult]:
    """One JD-Full (QR solver) per cluster, the iterations of all clusters run together.

    The same math per cluster as :func:`~jdlora.compress.jd._jd_full_iterate` started from
    ``bases[j]``: equations 14-17 in Gauss-Seidel order, each cluster stopping on its own equation
    19 or ftol test (a stopped cluster's bases no longer change), keeping its best iterate (never
    worse than its start), at most ``max_iter`` iterations. Per iteration: the bases of each
    adapter's cluster are gathered (``U[assignment]``, ``[n, d, r]``), the products ``A_i V_c(i)``
    and ``B_i^T U_c(i)`` are batched GEMMs, the per-cluster sums ``sum_{i in C_j} B_i X_i`` are
    batched GEMMs summed with ``index_add_``, the QR factorizations are batched over clusters, and
    the stop flags of all clusters reach the host in one sync.

    Unlike :func:`~jdlora.compress.jd.jd_full`, the clusters are solved in the full coordinates
    (not in the span of each cluster's factors), so the starting point is ``bases[j]`` itself
    rather than its projection on that span; the iterates after the first are the same subspaces.

    A cluster that cannot use the common rank (stacked rank below it: Proposition 1, it is already
    lossless at a lower rank) or whose previous bases have another rank runs the per-cluster
    :func:`jd_full` as before.

    Returns:
        One :class:`JDResult` per cluster, its sigma and residuals ordered like
        ``(assignment == j).nonzero()``.
    """
    C = len(bases)
    device = stack.A.device
    counts = torch.bincount(assignment, minlength=C)
    row_rank = (stack.A.abs().amax(dim=2) > 0).sum(dim=1)
    cluster_rank = torch.zeros(C, dtype=row_rank.dtype, device=device).index_add_(0, assignment, row_rank)
    counts_list, ranks_list = torch.stack([counts, cluster_rank]).tolist()  # one sync per call
    order = torch.argsort(assignment, stable=True)
    offsets = [0]
    for c in counts_list:
        offsets.append(offsets[-1] + c)
    members = [order[offsets[j]:offsets[j + 1]] for j in range(C)]
    effective = [max(1, min(rank, stack.d_out, stack.d_in, k)) for k in ranks_list]
    common = max(effective)
    joint = [j for j in range(C) if effective[j] == common and bases[j][0].shape[1] == common]
    results: list[JDResult | None] = [None] * C
    for j in range(C):
        if j not in joint:
            sub = stack.subset(members[j])
            init = bases[j] if effective[j] == bases[j][0].shape[1] else None
            results[j] = jd_full(sub, rank, solver="qr", tol=tol, ftol=ftol, max_iter=max_iter, init=init,
                                 seed=seed)
    if not joint:
        return results
    # The jointly solved clusters, renumbered 0..J-1, and their adapters.
    J = len(joint)
    remap = torch.full((C,), -1, dtype=torch.long, device=device)
    remap[torch.tensor(joint, device=device)] = torch.arange(J, device=device)
    rows = torch.cat([members[j] for j in joint])
    sub = stack.subset(rows)
    a = remap[assignment[rows]]
    U = torch.stack([bases[j][0] for j in joint])  # [J, d_out, r]
    V = torch.stack([bases[j][1] for j in joint])
    out = _iterate_clusters(sub, a, U, V, tol=tol, ftol=ftol, max_iter=max_iter)
    start = 0
    for jj, j in enumerate(joint):
        stop = start + counts_list[j]
        results[j] = JDResult(out.U[jj], out.V[jj], out.sigma[start:stop], out.residuals[start:stop],
                              out.history[jj], out.converged[jj])
        start = stop
    return results


@dataclass
class _Batched:
    U: Tensor
    V: Tensor
    sigma: Tensor
    residuals: Tensor
    history: list[list[float]]
    converged: list[bool]


def _iterate_clusters(
    stack: LoraStack, a: Tensor, U: Tensor, V: Tensor, *, tol: float, ftol: float, max_iter: int
) -> _Batched:
    """The batched QR iteration of :func:`_jd_full_clusters`; ``a[i]`` is adapter i's cluster in ``[0, J)``."""
    J = U.shape[0]
    A, Bt = stack.A, stack.Bt  # [n, r_max, d_in], [n, r_max, d_out]
    B, At = Bt.transpose(1, 2), A.transpose(1, 2)

    def cluster_sum(X: Tensor) -> Tensor:  # sum_{i in C_j} X_i for X [n, ...] -> [J, ...]
        return torch.zeros((J, *X.shape[1:]), dtype=X.dtype, device=X.device).index_add_(0, a, X)

    total = cluster_sum(stack.sq_norms())  # [J]
    AV = torch.bmm(A, V[a])
    BtU = torch.bmm(Bt, U[a])
    sigma = BtU.transpose(1, 2) @ AV

    def relative_error(sigma: Tensor) -> Tensor:  # [J], float64 as in _jd_full_iterate
        kept = cluster_sum(sigma.square().sum(dim=(1, 2))) / total
        return (1.0 - kept.double()).clamp_min(0.0)

    error = relative_error(sigma)
    best_error = error
    best_U, best_V, best_sigma = U, V, sigma
    active = torch.ones(J, dtype=torch.bool, device=U.device)
    errors, actives = [error], [active]
    for _ in range(max_iter):
        U_new = orthonormalize(cluster_sum(torch.bmm(B, AV @ sigma.transpose(1, 2))))  # equations 14, 16
        U_new = torch.where(active[:, None, None], U_new, U)
        BtU = torch.bmm(Bt, U_new[a])
        Y = BtU @ (BtU.transpose(1, 2) @ AV)
        V_new = orthonormalize(cluster_sum(torch.bmm(At, Y)))  # equations 15, 17
        V_new = torch.where(active[:, None, None], V_new, V)
        change = torch.maximum(_subspace_change(U, U_new), _subspace_change(V, V_new))
        U, V = U_new, V_new
        AV = torch.bmm(A, V[a])
        sigma = BtU.transpose(1, 2) @ AV  # equation 6
        previous = error
        error = torch.where(active, relative_error(sigma), previous)
        improved = active & (error <= best_error)
        best_error = torch.where(improved, error, best_error)
        best_U = torch.where(improved[:, None, None], U, best_U)
        best_V = torch.where(improved[:, None, None], V, best_V)
        best_sigma = torch.where(improved[a][:, None, None], sigma, best_sigma)
        drop = previous - error
        stop = active & ((change < tol) | ((drop >= 0) & (drop < ftol)))
        errors.append(error)
        active = active & ~stop
        actives.append(active)
        if not bool(active.any()):  # the one host sync of the iteration
            break
    # Histories: the start, then every iteration up to and including the one each cluster stopped at.
    err_rows = torch.stack(errors).T.tolist()
    act_rows = torch.stack(actives).T.tolist()
    history, converged = [], []
    for e, alive in zip(err_rows, act_rows):
        steps = alive.index(False) if False in alive else len(alive) - 1
        history.append(e[: steps + 1])
        converged.append(False in alive)
    res = _cluster_residuals(stack, a, best_U, best_V, best_sigma)
    return _Batched(best_U, best_V, best_sigma, res, history, converged)


def _cluster_residuals(stack: LoraStack, a: Tensor, U: Tensor, V: Tensor, sigma: Tensor) -> Tensor:
    """:func:`~jdlora.compress.jd.residuals` with the bases of each adapter's cluster."""
    Ua, Va = U[a], V[a]
    P = torch.bmm(stack.Bt, Ua).transpose(1, 2) @ torch.bmm(stack.A, Va)
    cross = (P * sigma).sum(dim=(1, 2))
    gu, gv = U.transpose(1, 2) @ U, V.transpose(1, 2) @ V
    quad = ((gu[a] @ sigma @ gv[a]) * sigma).sum(dim=(1, 2))
    return (stack.sq_norms() - 2 * cross + quad).clamp_min(0)


def assignment_errors(stack: LoraStack, bases: list[tuple[Tensor, Tensor]], sigma: SigmaKind) -> Tensor:
    """``[n, C]``: ``min_Sigma ||B_i A_i - U_j Sigma V_j^T||^2`` for every adapter and cluster (Step 2)."""
    norms = stack.sq_norms()
    columns = []
    for U, V in bases:
        P = stack.project(U, V)
        if sigma == "full":  # orthonormal U, V: error = ||dW||^2 - ||U^T dW V||^2
            columns.append(norms - P.square().sum(dim=(1, 2)))
        else:  # error = ||dW||^2 - c^T G^{-1} c with c = diag(U^T dW V), G = U^T U o V^T V
            c = P.diagonal(dim1=1, dim2=2)
            gram = (U.T @ U) * (V.T @ V)
            columns.append(norms - (c * torch.linalg.solve(gram, c.T).T).sum(dim=1))
    return torch.stack(columns, dim=1).clamp_min(0)


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
        for j in range(k):
            if not (labels_new == j).any():
                far = dist.gather(1, labels_new[:, None]).squeeze(1).argmax()
                labels_new[far] = j
        if labels is not None and torch.equal(labels_new, labels):
            break
        labels = labels_new
        centres = torch.stack([x[labels == j].mean(dim=0) for j in range(k)])
    return labels


def _fill_empty_clusters(assignment, clusters, results, stack, bases, sigma) -> Tensor:
    """Moves the worst-reconstructed adapter of a multi-member cluster into each empty cluster."""
    assignment = assignment.clone()
    for j in range(clusters):
        if (assignment == j).any():
            continue
        errors = assignment_errors(stack, [bases[c] for c in range(clusters)], sigma)
        own = errors.gather(1, assignment[:, None]).squeeze(1)
        counts = torch.bincount(assignment, minlength=clusters)
        movable = counts[assignment] > 1
        own = torch.where(movable, own, torch.full_like(own, -1.0))
        assignment[own.argmax()] = j
    return assignment


def _gather(stack, results, assignment, rank, sigma, history, rounds) -> ClusterResult:
    """Assembles per-cluster results into stacked tensors ordered like the adapters."""
    r = max(res.rank for res in results)
    U = torch.stack([_pad_columns(res.U, r) for res in results])
    V = torch.stack([_pad_columns(res.V, r) for res in results])
    shape = (stack.n, r, r) if sigma == "full" else (stack.n, r)
    sigmas = torch.zeros(shape, dtype=stack.A.dtype, device=stack.A.device)
    res_all = torch.zeros(stack.n, dtype=stack.A.dtype, device=stack.A.device)
    for j, res in enumerate(results):
        members = (assignment == j).nonzero().flatten()
        k = res.rank
        if sigma == "full":
            sigmas[members, :k, :k] = res.sigma
        else:
            sigmas[members, :k] = res.sigma
        res_all[members] = res.residuals
    return ClusterResult(U, V, sigmas, assignment, res_all, history, rounds)


def _pad_columns(X: Tensor, r: int) -> Tensor:
    # A cluster too small for rank r (Proposition 1: already lossless) gets zero columns, which
    # reconstruct nothing, so every cluster of a module has the same rank for serving.
    return torch.nn.functional.pad(X, (0, r - X.shape[1]))
