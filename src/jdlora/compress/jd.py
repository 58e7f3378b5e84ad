"""Joint diagonalization of one module's LoRA updates (paper section 3.1, Appendix A).

``dW_i ~ U Sigma_i V^T`` with U (d_out x r) and V (d_in x r) shared by all n adapters:

- :func:`jd_full`: orthonormal U, V and a full r x r ``Sigma_i`` (equation 2), solved either by the
  alternating eigen-solver of Appendix A.1 (case 1) or the QR subspace iteration of Appendix A.2.
- :func:`jd_diag`: unconstrained U, V and a diagonal ``Sigma_i`` (equation 3), solved by the
  alternating least squares of Appendix A.1 (case 2).

Both stop on the subspace criterion of equation 19 (tolerance ``tol``), when an iteration lowers
the relative error by less than ``ftol`` (the iterations reach the optimum's first digits fast and
then crawl: paper, Appendix G.10), or after ``max_iter`` iterations, and return the best iterate seen (never worse than the initialization, which the
clustering of Appendix A.3 relies on).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from .stack import LoraStack

Solver = Literal["qr", "eigen"]

# Solving in the span of the stacked factors pays off once it shrinks d at least this much.
_REDUCE_FACTOR = 2


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
    """The Q factor of the reduced QR factorization (equations 16-17)."""
    return torch.linalg.qr(X).Q


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
    return int((stack.A.abs().amax(dim=2) > 0).sum())


def effective_rank(stack: LoraStack, rank: int) -> int:
    """``rank`` clamped to what the module can use: ``min(rank, d_out, d_in, stacked rank)``.

    Beyond the stacked rank the compression is already lossless (Proposition 1).
    """
    return max(1, min(rank, stack.d_out, stack.d_in, stacked_rank(stack)))


def jd_full(
    stack: LoraStack,
    rank: int,
    *,
    solver: Solver = "qr",
    tol: float = 1e-3,
    ftol: float = 1e-5,
    max_iter: int = 100,
    init: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
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

    Args:
        stack: the module's updates.
        rank: r; clamped by :func:`effective_rank`.
        solver: ``"qr"`` or ``"eigen"``.
        tol: tolerance of the convergence criterion (equation 19).
        max_iter: iteration cap.
        init: optional ``(U, V)`` to start from (e.g. the bases of a previous run).
        seed: seed of the random initialization when ``init`` is not given.

    Returns:
        The best :class:`JDResult` seen, the initialization included.
    """
    if solver not in ("qr", "eigen"):
        raise ValueError(f"Unknown JD-Full solver {solver!r}; use 'qr' or 'eigen'.")
    rank = effective_rank(stack, rank)
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
    Q_B, Q_A = stack.span_bases()
    small = stack.in_coordinates(Q_B, Q_A)
    if init is None:
        init_small = range_init(small, rank, seed)
    else:
        init_small = (orthonormalize(Q_B.T @ init[0]), orthonormalize(Q_A.T @ init[1]))
    result = _jd_full_iterate(small, rank, solver, tol, ftol, max_iter, init_small)
    result.U, result.V = Q_B @ result.U, Q_A @ result.V
    return result


def _jd_full_iterate(
    stack: LoraStack, rank: int, solver: Solver, tol: float, ftol: float, max_iter: int, init: tuple[Tensor, Tensor]
) -> JDResult:
    total = stack.sq_norms().sum()
    U, V = init
    AV = stack.times_A(V)
    sigma = stack.times_Bt(U).transpose(1, 2) @ AV
    best = (U, V, sigma)
    history = [_relative_error_full((sigma.square().sum() / total).item())]
    converged = False
    # Four GEMMs over all adapters per iteration (A V, B^T U and the two sums); everything else is r x r.
    # One host sync per iteration: the objective and the subspace change travel together.
    for _ in range(max_iter):
        if solver == "qr":  # equations 14-17
            U_new = orthonormalize(stack.sum_B(AV @ sigma.transpose(1, 2)))
            BtU = stack.times_Bt(U_new)
            V_new = orthonormalize(stack.sum_At(BtU @ (BtU.transpose(1, 2) @ AV)))
        else:
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
    stack: LoraStack,
    rank: int,
    *,
    tol: float = 1e-3,
    ftol: float = 1e-5,
    max_iter: int = 100,
    init: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
) -> JDResult:
    """JD-Diag (equation 3): unconstrained U, V and diagonal Sigma_i, by alternating least squares.

    Cycles through the closed forms of Appendix A.1, case 2:
    ``U = (sum_i B_i A_i V S_i)(sum_i S_i V^T V S_i)^{-1}``, the same for V, then the S_i by
    :func:`sigma_diag`. After each cycle the columns of U and V are rescaled to unit norm (their
    scale moves into Sigma), which leaves the objective unchanged and keeps the systems well
    conditioned (the normalization step 4 of the paper).

    Args and return value as for :func:`jd_full`.
    """
    rank = effective_rank(stack, rank)
    k = stack.n * stack.r_max
    if k * _REDUCE_FACTOR > min(stack.d_out, stack.d_in):
        return _jd_diag_iterate(stack, rank, tol, ftol, max_iter, init or range_init(stack, rank, seed))
    Q_B, Q_A = stack.span_bases()
    small = stack.in_coordinates(Q_B, Q_A)
    init_small = range_init(small, rank, seed) if init is None else (Q_B.T @ init[0], Q_A.T @ init[1])
    result = _jd_diag_iterate(small, rank, tol, ftol, max_iter, init_small)
    result.U, result.V = Q_B @ result.U, Q_A @ result.V
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


def _ridge(gram: Tensor) -> Tensor:
    """``gram + eps I``: keeps the r x r solves defined when a direction carries no signal."""
    eps = torch.finfo(gram.dtype).eps * gram.diagonal().abs().max().clamp_min(1e-30) * gram.shape[0]
    return gram + eps * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
