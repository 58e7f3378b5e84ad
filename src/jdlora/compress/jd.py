"""Joint diagonalization of one module's LoRA updates (paper section 3.1, Appendix A).

``dW_i ~ U Sigma_i V^T`` with U (d_out x r) and V (d_in x r) shared by all n adapters:

- :func:`jd_full`: orthonormal U, V and a full r x r ``Sigma_i`` (equation 2), solved either by the
  alternating eigen-solver of Appendix A.1 (case 1) or the QR subspace iteration of Appendix A.2.
- :func:`jd_diag`: unconstrained U, V and a diagonal ``Sigma_i`` (equation 3), solved by the
  alternating least squares of Appendix A.1 (case 2).
- One adapter (a cluster of one, e.g. one cluster per adapter) needs no iteration: :func:`jd_one_adapter`,
  and :func:`jd_each_adapter` for many such clusters at once.

Both stop on the subspace criterion of equation 19 (tolerance ``tol``), when an iteration lowers
the relative error by less than ``ftol`` (the iterations reach the optimum's first digits fast and
then crawl: paper, Appendix G.10), or after ``max_iter`` iterations, and return the best iterate seen (never worse than the initialization, which the
clustering of Appendix A.3 relies on).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .baselines import svd_per_adapter
from .settings import CompressionSettings, SigmaKind, Solver
from .stack import LoraStack, times, times_transposed

__all__ = ["JDResult", "Solver", "jd_diag", "jd_each_adapter", "jd_full", "jd_one_adapter", "residuals", "sigma_diag", "sigma_full"]

# Solving in the span of the stacked factors pays off once it shrinks d at least this much.
_REDUCE_FACTOR = 2
# One reduction to the span (a geqrf of each d x k stacked factor) costs about as much as k / (3 r)
# QR iterations in the full coordinates (measured on a CPU core: k = 640, d = 4096, r = 16).
_PROBE_RATIO = 3


@dataclass
class JDResult:
    """Shared bases and per-adapter Sigma of one joint diagonalization.

    Attributes:
        U: ``[d_out, r]``. V: ``[d_in, r]``.
        sigma: ``[n, r, r]`` (full) or ``[n, r]`` (diagonal).
        residuals: ``[n]`` squared Frobenius errors ``||dW_i - U Sigma_i V^T||^2``.
        history: relative error ``sum(residuals) / sum ||dW_i||^2`` at the initialization and after
            every iteration.
    """

    U: Tensor
    V: Tensor
    sigma: Tensor
    residuals: Tensor
    history: list[float] = field(default_factory=list)
    converged: bool = False

    @property
    def rank(self) -> int:
        return self.U.shape[1]


def sigma_full(stack: LoraStack, U: Tensor, V: Tensor) -> Tensor:
    """Optimal full Sigma for orthonormal U, V: ``Sigma_i = U^T B_i A_i V`` (equation 6)."""
    return stack.project(U, V)


def sigma_diag(stack: LoraStack, U: Tensor, V: Tensor) -> Tensor:
    """Optimal diagonal Sigma for any U, V (Appendix A.1, case 2).

    ``diag(Sigma_i) = (U^T U o V^T V)^{-1} (U^T B_i o V^T A_i^T) 1``, with o the Hadamard product.
    """
    gram = (U.T @ U) * (V.T @ V)
    rhs = (stack.times_Bt(U) * stack.times_A(V)).sum(dim=1)  # [n, r]
    return torch.linalg.solve(_ridge(gram), rhs.T).T


def residuals(stack: LoraStack, U: Tensor, V: Tensor, sigma: Tensor) -> Tensor:
    """``||B_i A_i - U Sigma_i V^T||_F^2`` for every adapter, through the factors (equation 5).

    Exact for any U, V (orthonormal or not) and any Sigma, full ``[n, r, r]`` or diagonal ``[n, r]``.
    """
    if sigma.dim() == 2:
        sigma = torch.diag_embed(sigma)
    cross = (stack.project(U, V) * sigma).sum(dim=(1, 2))
    quad = ((U.T @ U) @ sigma @ (V.T @ V) * sigma).sum(dim=(1, 2))
    return (stack.sq_norms() - 2 * cross + quad).clamp_min(0)


def subspace_change(old: Tensor, new: Tensor) -> float:
    """``||new - old old^T new||_F / ||new||_F`` for orthonormal ``old`` (one half of equation 19)."""
    return _subspace_change(old, new).item()


def _subspace_change(old: Tensor, new: Tensor) -> Tensor:
    """:func:`subspace_change` as a tensor (no host sync); batched over leading dimensions."""
    diff = new - old @ (old.transpose(-2, -1) @ new)
    return torch.linalg.vector_norm(diff, dim=(-2, -1)) / torch.linalg.vector_norm(new, dim=(-2, -1))


def orthonormalize(X: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``X [..., d, r]``: the QR step of equations 16-17.

    On a CPU, Householder QR (``torch.linalg.qr``). On an accelerator, Cholesky-QR2
    (:func:`_cholesky_qr2`), which needs no per-matrix solver calls, falling back to Householder QR
    for the matrices where it breaks down (rank-deficient or very ill-conditioned ``X``). The
    iterations only use the column space of the result (equations 14-17 are a subspace iteration),
    which both factorizations give. This function checks for the breakdown on the host; the JD
    iterations fold that check into their one host sync per iteration instead (:func:`_qr_iterations`).
    """
    if X.device.type == "cpu":
        return torch.linalg.qr(X).Q
    Q, ok = _cholesky_qr2(X)
    if bool(ok.all()):
        return Q
    return torch.where(ok[..., None, None], Q, torch.linalg.qr(X).Q)


def _cholesky_qr2(X: Tensor) -> tuple[Tensor, Tensor]:
    """Cholesky-QR2 of ``X [..., d, r]``: ``Q = X R^{-1}`` with ``R^T R = X^T X``, applied twice.

    Works on the r x r Gram matrix (a batched Cholesky and a triangular solve) instead of a
    Householder QR of the d x r matrix, which on GPUs runs as one solver call per matrix. One pass
    loses orthogonality like ``eps * cond(X)^2``; the second pass, on an almost orthonormal input,
    restores it to working precision (Yamamoto et al., 2015).

    Returns:
        ``(Q, ok)``: ``ok [...]`` is False where a Cholesky factorization failed or the first pass
        left the columns far from orthonormal (``X`` too ill-conditioned for Gram-based QR; this
        also catches non-finite values); there ``Q`` is not to be used. No host sync.
    """
    gram = X.mT @ X
    R, info = torch.linalg.cholesky_ex(gram, upper=True)
    Q = torch.linalg.solve_triangular(R, X, upper=True, left=False)
    gram = Q.mT @ Q
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    ok = (info == 0) & ((gram - eye).abs().amax(dim=(-2, -1)) < 0.5)  # False for NaN too
    R, info = torch.linalg.cholesky_ex(gram, upper=True)
    return torch.linalg.solve_triangular(R, Q, upper=True, left=False), ok & (info == 0)


def _orth(X: Tensor, householder: bool) -> tuple[Tensor, Tensor]:
    """``(Q, ok)`` of :func:`_cholesky_qr2`, or Householder's Q (always ok) when ``householder``."""
    if householder:
        return torch.linalg.qr(X).Q, torch.ones(X.shape[:-2], dtype=torch.bool, device=X.device)
    return _cholesky_qr2(X)


def range_init(stack: LoraStack, rank: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random orthonormal ``(U, V)`` drawn inside the spans of the stacked B's and A^T's.

    Starting inside the spans keeps the iterations away from directions no adapter uses.
    """
    gen = torch.Generator().manual_seed(seed)
    k = stack.n * stack.r_max
    g_u = torch.randn(k, rank, generator=gen, dtype=torch.float64).to(stack.B)
    g_v = torch.randn(k, rank, generator=gen, dtype=torch.float64).to(stack.A)
    U = stack.sum_B(g_u.reshape(stack.n, stack.r_max, rank))
    V = stack.sum_At(g_v.reshape(stack.n, stack.r_max, rank))
    return orthonormalize(U), orthonormalize(V)


def stacked_rank(stack: LoraStack) -> int:
    """An upper bound of the rank of the stacked factors: the number of non-padding rows of A."""
    return int(stack.row_counts().sum())


def effective_rank(stack: LoraStack, rank: int) -> int:
    """``rank`` clamped to what the module can use: ``min(rank, d_out, d_in, stacked rank)``.

    Beyond the stacked rank the compression is already lossless (Proposition 1).
    """
    return max(1, min(rank, stack.d_out, stack.d_in, stacked_rank(stack)))


def jd_full(
    stack: LoraStack, settings: CompressionSettings, *, init: tuple[Tensor, Tensor] | None = None
) -> JDResult:
    """JD-Full (equation 2): orthonormal shared U, V and full ``Sigma_i = U^T B_i A_i V``.

    Maximizes ``sum_i ||U^T B_i A_i V||_F^2`` (equation 7) by one of:

    - ``solver="qr"``: the eigenvalue iteration of Appendix A.2 (equations 14-17), updating U then V
      with the fresh U (Gauss-Seidel order, which converges in fewer iterations than the Jacobi order
      written in the paper). Every product is parenthesized through the r_i-dimensional factors.
    - ``solver="eigen"``: the alternating method of Appendix A.1, case 1: U = top-r eigenvectors of
      ``M = sum_i B_i A_i V V^T A_i^T B_i^T``, then V likewise. M is formed in the k = n * r_max
      coordinates of the stacked factors (exact, since U lies in their span), so this solver needs
      ``n * r_max`` below ``min(d_out, d_in)``.

    When ``n * r_max`` is at most half of ``min(d_out, d_in)``, the iterations run in the span of
    the stacked factors (:class:`_Span`): exact, since every iterate after the first lies there. From
    a given ``init`` (a warm start, e.g. a cluster's previous bases), the QR solver first iterates in
    the full coordinates for as many iterations as the reduction costs (about ``k / (3 r)``), and
    reduces only if it has not converged by then.

    Args:
        stack: the module's updates.
        settings: ``rank`` (r, clamped by :func:`effective_rank`), ``solver`` (``"qr"`` or ``"eigen"``),
            ``tol`` (equation 19), ``ftol``, ``max_iter`` and ``seed`` (of the random initialization
            when ``init`` is not given) are used.
        init: optional ``(U, V)`` to start from (e.g. the bases of a previous run).

    Returns:
        The best :class:`JDResult` seen, the initialization included.
    """
    solver, tol, ftol, max_iter, seed = settings.solver, settings.tol, settings.ftol, settings.max_iter, settings.seed
    rank = effective_rank(stack, _int_rank(settings))
    if stack.n == 1:
        return jd_one_adapter(stack, rank, "full")
    k = stack.n * stack.r_max
    d = min(stack.d_out, stack.d_in)
    if solver == "eigen" and k >= d:
        raise ValueError(
            f"solver='eigen' forms an eigenproblem of size n * r_max = {k}, which is not below "
            f"d = {d}; use solver='qr' (Appendix A.2) for this module."
        )
    reduce = solver == "eigen" or k * _REDUCE_FACTOR <= d
    if not reduce:
        return _jd_full_iterate(stack, rank, solver, tol, ftol, max_iter, init or range_init(stack, rank, seed))
    first = None
    if solver == "qr" and init is not None:
        # A warm start (a cluster's previous bases) often converges in a few iterations, fewer than the
        # reduction to the span costs: iterate in the full coordinates first, and reduce only for what
        # is left after as many iterations as the reduction costs (at most twice the better choice).
        probe = min(max_iter, -(-k // (_PROBE_RATIO * rank)))
        first = _jd_full_iterate(stack, rank, solver, tol, ftol, probe, init)
        if first.converged or probe == max_iter:
            return first
        init, max_iter = (first.U, first.V), max_iter - probe
    span = _Span(stack)
    small = span.small
    init_small = range_init(small, rank, seed) if init is None else tuple(map(orthonormalize, span.project(*init)))
    result = _jd_full_iterate(small, rank, solver, tol, ftol, max_iter, init_small)
    result.U, result.V = span.lift(result.U, result.V)
    if first is not None:  # one history for both phases (the second starts from the first's best iterate)
        result.history = first.history + result.history[1:]
    return result


class _Span:
    """The stack in the coordinates of its stacked factors' spans (k = n * r_max, at most d).

    Any optimal U (V) lies in the span of the stacked B's (A^T's), so the JD can run on
    ``B~_i = Q_B^T B_i`` and ``A~_i = A_i Q_A`` with ``[B_1 .. B_n] = Q_B R_B`` and
    ``[A_1^T .. A_n^T] = Q_A R_A``. Those coordinates are the columns of the R factors
    (``Q_B^T B_i`` is column block i of ``R_B``), so the reduction costs one ``geqrf`` per side and no
    product with the d-dimensional factors; Q stays in its Householder form (``ormqr`` applies it).
    """

    def __init__(self, stack: LoraStack):
        n, r_max = stack.n, stack.r_max
        k = n * r_max
        self.qr_B = torch.geqrf(stack.Bt.reshape(k, stack.d_out).T)  # [d_out, k]
        self.qr_A = torch.geqrf(stack.A.reshape(k, stack.d_in).T)
        R_B, R_A = self.qr_B[0][:k].triu(), self.qr_A[0][:k].triu()  # [k, k]
        self.small = LoraStack(R_A.T.reshape(n, r_max, k), Bt=R_B.T.reshape(n, r_max, k))
        self.k = k

    def project(self, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q_B^T U, Q_A^T V)``."""
        return (torch.ormqr(*self.qr_B, U, transpose=True)[: self.k],
                torch.ormqr(*self.qr_A, V, transpose=True)[: self.k])

    def lift(self, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        """``(Q_B U, Q_A V)`` for ``U [k, r]``, ``V [k, r]`` in span coordinates."""
        def up(qr, X):
            full = X.new_zeros(qr[0].shape[0], X.shape[1])
            full[: self.k] = X
            return torch.ormqr(*qr, full)
        return up(self.qr_B, U), up(self.qr_A, V)


def _jd_full_iterate(
    stack: LoraStack, rank: int, solver: Solver, tol: float, ftol: float, max_iter: int, init: tuple[Tensor, Tensor]
) -> JDResult:
    if solver == "qr":
        k = stack.n * stack.r_max
        out = _qr_iterations(stack.A.reshape(1, k, stack.d_in), stack.Bt.reshape(1, k, stack.d_out), stack.r_max,
                             init[0][None], init[1][None], stack.sq_norms()[None], tol=tol, ftol=ftol,
                             max_iter=max_iter)
        return JDResult(out.U[0], out.V[0], out.sigma[0], out.residuals[0], out.history[0], out.converged[0])
    total = stack.sq_norms().sum()
    U, V = init
    AV = stack.times_A(V)
    sigma = stack.times_Bt(U).transpose(1, 2) @ AV
    best = (U, V, sigma)
    history = [_relative_error_full((sigma.square().sum() / total).item())]
    converged = False
    # The alternating eigen-solver (Appendix A.1, case 1) on the span coordinates; one host sync per iteration.
    for _ in range(max_iter):
        U_new = _top_eigenvectors(stack.B @ AV, rank)
        BtU = stack.times_Bt(U_new)
        V_new = _top_eigenvectors(stack.A.transpose(1, 2) @ BtU, rank)
        change = torch.maximum(_subspace_change(U, U_new), _subspace_change(V, V_new))
        U, V = U_new, V_new
        AV = stack.times_A(V)
        sigma = BtU.transpose(1, 2) @ AV  # equation 6
        kept, change = torch.stack([sigma.square().sum() / total, change.to(total.dtype)]).tolist()
        history.append(_relative_error_full(kept))
        if history[-1] <= min(history[:-1]):
            best = (U, V, sigma)
        if change < tol or _stalled(history, ftol):
            converged = True
            break
    U, V, sigma = best
    return JDResult(U, V, sigma, residuals(stack, U, V, sigma), history, converged)


@dataclass
class _QRIterations:
    """Output of :func:`_qr_iterations` for J stacks: the best iterate of each.

    Attributes:
        U: ``[J, d_out, r]``. V: ``[J, d_in, r]``.
        sigma: ``[J, m, r, r]``, ``Sigma_i = U^T B_i A_i V`` of every adapter slot (zero for padding).
        residuals: ``[J, m]`` ``||B_i A_i - U Sigma_i V^T||^2``.
        history: per stack, the relative error at the start and after each of its iterations.
        converged: per stack, whether it stopped on equation 19 or ftol (not on ``max_iter``).
    """

    U: Tensor
    V: Tensor
    sigma: Tensor
    residuals: Tensor
    history: list[list[float]]
    converged: list[bool]


def _qr_iterations(
    A: Tensor, Bt: Tensor, r_max: int, U: Tensor, V: Tensor, sq_norms: Tensor, *, tol: float, ftol: float,
    max_iter: int, cholesky: bool | None = None,
) -> _QRIterations:
    """The QR iteration of Appendix A.2 (equations 14-17) on J independent stacks at once.

    Stack j is the m adapters ``A[j] = [A_1; ..; A_m]`` (``[J, m * r_max, d_in]``) and
    ``Bt[j] = [B_1^T; ..; B_m^T]`` (``[J, m * r_max, d_out]``); all-zero adapters pad stacks of fewer
    adapters and change nothing. J = 1 is one JD (:func:`jd_full`); J > 1 the clusters of a
    clustered JD (:func:`~jdlora.compress.clustering.jd_cluster`), all advanced by the same kernels.
    Per iteration, in Gauss-Seidel order (U, then V with the fresh U):

    - ``U <- orth(sum_i B_i (A_i V) Sigma_i^T)`` (equations 14, 16),
    - ``V <- orth(sum_i A_i^T (B_i^T U) (U^T B_i A_i V))`` (equations 15, 17),
    - ``Sigma_i = U^T B_i A_i V`` (equation 6),

    four batched GEMMs with the d-dimensional factors, everything else r x r per adapter. ``orth`` is
    Cholesky-QR2 (:func:`_cholesky_qr2`, batched over the J stacks) when ``cholesky`` (default: off
    the CPU, where a batched Householder QR runs one solver call per matrix), else Householder QR
    (LAPACK's is fast on a CPU and needs no breakdown check). Each stack stops on its own
    equation 19 (subspace change below ``tol``) or when an iteration lowers its relative error
    ``1 - sum_i ||Sigma_i||^2 / sum_i ||B_i A_i||^2`` by less than ``ftol``; a stopped stack's bases
    stay fixed. Each keeps its best iterate (never worse than its start). One host sync per
    iteration: the stop flags and the Cholesky breakdown flag together; an iteration where Cholesky-QR2
    broke down is redone with Householder QR.

    Args:
        U: ``[J, d_out, r]``, V: ``[J, d_in, r]`` orthonormal starting bases.
        sq_norms: ``[J, m]`` ``||B_i A_i||^2`` (zero for padding).
    """
    J, k, _ = A.shape
    m = k // r_max
    r = U.shape[-1]
    total = sq_norms.sum(dim=1)  # [J]

    def per_adapter(X: Tensor) -> Tensor:  # [J, k, r] -> [J, m, r_max, r]
        return X.reshape(J, m, r_max, r)

    def relative_error(sigma: Tensor) -> Tensor:  # [J], float64
        kept = sigma.square().sum(dim=(1, 2, 3)) / total
        return (1.0 - kept.double()).clamp_min(0.0)

    if cholesky is None:
        cholesky = A.device.type != "cpu"
    AV = times(A, V)
    sigma = per_adapter(times(Bt, U)).mT @ per_adapter(AV)  # equation 6
    error = relative_error(sigma)
    best_error, best_U, best_V, best_sigma = error, U, V, sigma
    active = torch.ones(J, dtype=torch.bool, device=U.device)
    errors, actives = [error], [active]
    for _ in range(max_iter):
        for householder in (not cholesky, True):
            # equations 14, 16
            X = times_transposed(Bt, (per_adapter(AV) @ sigma.mT).reshape(J, k, r))
            U_new, ok = _orth(X, householder)
            U_new = torch.where(active[:, None, None], U_new, U)
            BtU = per_adapter(times(Bt, U_new))
            # equations 15, 17
            Y = times_transposed(A, (BtU @ (BtU.mT @ per_adapter(AV))).reshape(J, k, r))
            V_new, ok_v = _orth(Y, householder)
            V_new = torch.where(active[:, None, None], V_new, V)
            AV_new = times(A, V_new)
            sigma_new = BtU.mT @ per_adapter(AV_new)  # equation 6
            change = torch.maximum(_subspace_change(U, U_new), _subspace_change(V, V_new))
            new_error = torch.where(active, relative_error(sigma_new), error)
            drop = error - new_error
            stop = active & ((change < tol) | ((drop >= 0) & (drop < ftol)))
            still = active & ~stop
            # The one host sync of the iteration.
            broke, any_active = torch.stack([(active & ~(ok & ok_v)).any(), still.any()]).tolist()
            if householder or not broke:
                break
        improved = active & (new_error <= best_error)
        best_error = torch.where(improved, new_error, best_error)
        best_U = torch.where(improved[:, None, None], U_new, best_U)
        best_V = torch.where(improved[:, None, None], V_new, best_V)
        best_sigma = torch.where(improved[:, None, None, None], sigma_new, best_sigma)
        U, V, AV, sigma, error = U_new, V_new, AV_new, sigma_new, new_error
        errors.append(error)
        actives.append(still)
        active = still
        if not any_active:
            break
    # Histories: the start, then every iteration up to and including the one each stack stopped at.
    history, converged = [], []
    for e, alive in zip(torch.stack(errors).T.tolist(), torch.stack(actives).T.tolist()):
        steps = alive.index(False) if False in alive else len(alive) - 1
        history.append(e[: steps + 1])
        converged.append(False in alive)
    res = _residuals_of_projection(sq_norms, best_U, best_V, best_sigma)
    return _QRIterations(best_U, best_V, best_sigma, res, history, converged)


def _residuals_of_projection(sq_norms: Tensor, U: Tensor, V: Tensor, sigma: Tensor) -> Tensor:
    """:func:`residuals` when ``sigma`` is exactly the projection ``U^T B_i A_i V`` (batched over J).

    ``||dW - U S V^T||^2 = ||dW||^2 - 2 <U^T dW V, S> + <U^T U S V^T V, S>``; with ``S = U^T dW V``
    already computed, no product with the factors is needed. The Gram terms keep it exact for bases
    orthonormal only to working precision.
    """
    gu, gv = U.mT @ U, V.mT @ V  # [J, r, r]
    cross = sigma.square().sum(dim=(-2, -1))
    quad = ((gu[:, None] @ sigma @ gv[:, None]) * sigma).sum(dim=(-2, -1))
    return (sq_norms - 2 * cross + quad).clamp_min(0)


def _stalled(history: list[float], ftol: float) -> bool:
    return len(history) > 1 and 0 <= history[-2] - history[-1] < ftol


def _top_eigenvectors(X: Tensor, rank: int) -> Tensor:
    """Top-``rank`` eigenvectors of ``sum_i X_i X_i^T`` for ``X [n, k, r]`` (a k x k eigenproblem)."""
    flat = X.permute(1, 0, 2).reshape(X.shape[1], -1)
    _, vectors = torch.linalg.eigh(flat @ flat.T)
    return vectors[:, -rank:].flip(1)


def _relative_error_full(kept: float) -> float:
    # With orthonormal U, V and optimal Sigma the error is 1 - sum ||Sigma_i||^2 / sum ||dW_i||^2;
    # ``kept`` is the ratio of the sums.
    return max(0.0, 1.0 - kept)


def jd_diag(
    stack: LoraStack, settings: CompressionSettings, *, init: tuple[Tensor, Tensor] | None = None
) -> JDResult:
    """JD-Diag (equation 3): unconstrained U, V and diagonal Sigma_i, by alternating least squares.

    Cycles through the closed forms of Appendix A.1, case 2:
    ``U = (sum_i B_i A_i V S_i)(sum_i S_i V^T V S_i)^{-1}``, the same for V, then the S_i by
    :func:`sigma_diag`. After each cycle the columns of U and V are rescaled to unit norm (their
    scale moves into Sigma), which leaves the objective unchanged and keeps the systems well
    conditioned (the normalization step 4 of the paper).

    Args and return value as for :func:`jd_full` (``solver`` is not used).
    """
    tol, ftol, max_iter, seed = settings.tol, settings.ftol, settings.max_iter, settings.seed
    rank = effective_rank(stack, _int_rank(settings))
    if stack.n == 1:
        return jd_one_adapter(stack, rank, "diag")
    k = stack.n * stack.r_max
    if k * _REDUCE_FACTOR > min(stack.d_out, stack.d_in):
        return _jd_diag_iterate(stack, rank, tol, ftol, max_iter, init or range_init(stack, rank, seed))
    span = _Span(stack)
    init_small = range_init(span.small, rank, seed) if init is None else span.project(*init)
    result = _jd_diag_iterate(span.small, rank, tol, ftol, max_iter, init_small)
    result.U, result.V = span.lift(result.U, result.V)
    return result


def _jd_diag_iterate(
    stack: LoraStack, rank: int, tol: float, ftol: float, max_iter: int, init: tuple[Tensor, Tensor]
) -> JDResult:
    total = stack.sq_norms().sum()
    U, V = init
    s = sigma_diag(stack, U, V)
    res = residuals(stack, U, V, s)
    best = (U, V, s, res)
    history = [(res.sum() / total).item()]
    converged = False
    for _ in range(max_iter):
        outer = s.T @ s  # sum_i s_i s_i^T
        U_new = stack.sum_B(stack.times_A(V) * s[:, None, :])
        U_new = torch.linalg.solve(_ridge((V.T @ V) * outer), U_new.T).T
        V_new = stack.sum_At(stack.times_Bt(U_new) * s[:, None, :])
        V_new = torch.linalg.solve(_ridge((U_new.T @ U_new) * outer), V_new.T).T
        U_new = U_new / U_new.norm(dim=0).clamp_min(torch.finfo(U_new.dtype).tiny)
        V_new = V_new / V_new.norm(dim=0).clamp_min(torch.finfo(V_new.dtype).tiny)
        change = torch.maximum(
            _subspace_change(orthonormalize(U), orthonormalize(U_new)),
            _subspace_change(orthonormalize(V), orthonormalize(V_new)),
        )
        U, V = U_new, V_new
        s = sigma_diag(stack, U, V)
        res = residuals(stack, U, V, s)
        error, change = torch.stack([res.sum() / total, change]).tolist()  # one host sync per iteration
        history.append(error)
        if history[-1] <= min(history[:-1]):
            best = (U, V, s, res)
        if change < tol or _stalled(history, ftol):
            converged = True
            break
    U, V, s, res = best
    return JDResult(U, V, s, res, history, converged)


def jd_one_adapter(stack: LoraStack, rank: int, sigma_kind: SigmaKind) -> JDResult:
    """The JD of one adapter in closed form: the rank-``rank`` truncated SVD of ``B_1 A_1``.

    For n = 1, equation 7 is ``||U^T B_1 A_1 V||_F^2`` over orthonormal U, V, which the top singular vectors
    maximize (Eckart-Young). Their Sigma (equation 6) is ``diag(s_1, .., s_r)``: diagonal, so the same U, V and
    Sigma are also optimal for JD-Diag (equation 3). Computed through the factors
    (:func:`~jdlora.compress.baselines.svd_per_adapter`); the iterations would only approach it.

    Returns:
        A converged :class:`JDResult`, Sigma ``[1, r, r]`` (``sigma_kind="full"``) or ``[1, r]`` (``"diag"``).
    """
    return jd_each_adapter(stack, rank, sigma_kind)[0]


def jd_each_adapter(stack: LoraStack, rank: int, sigma_kind: SigmaKind) -> list[JDResult]:
    """:func:`jd_one_adapter` of every adapter of ``stack`` on its own (clusters of one), in one batched SVD.

    Returns:
        One converged :class:`JDResult` per adapter, in the stack's order.
    """
    svd = svd_per_adapter(stack, rank)
    sigmas = torch.diag_embed(svd.S) if sigma_kind == "full" else svd.S
    errors = (svd.residuals / stack.sq_norms().clamp_min(torch.finfo(svd.S.dtype).tiny)).tolist()  # one sync
    return [JDResult(svd.U[i], svd.V[i], sigmas[i:i + 1], svd.residuals[i:i + 1], [errors[i]], converged=True)
            for i in range(stack.n)]


def _int_rank(settings: CompressionSettings) -> int:
    if settings.rank == "auto":
        raise ValueError("The JD needs a resolved rank; choose one first (jdlora.compress.auto.choose_settings).")
    return settings.rank


def _ridge(gram: Tensor) -> Tensor:
    """``gram + eps I``: keeps the r x r solves defined when a direction carries no signal."""
    eps = torch.finfo(gram.dtype).eps * gram.diagonal().abs().max().clamp_min(1e-30) * gram.shape[0]
    return gram + eps * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
