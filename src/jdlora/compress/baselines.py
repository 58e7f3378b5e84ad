"""Baselines the paper compares JD against: per-adapter SVD (equation 4) and TIES merging."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .stack import LoraStack


@dataclass
class SVDResult:
    """Per-adapter rank-r truncated SVD ``B_i A_i ~ U_i diag(S_i) V_i^T``.

    Attributes:
        U: ``[n, d_out, r]``. S: ``[n, r]``. V: ``[n, d_in, r]``.
        residuals: ``[n]`` squared Frobenius errors.
    """

    U: Tensor
    S: Tensor
    V: Tensor
    residuals: Tensor

    def num_parameters(self) -> int:
        # S_i V_i^T is stored as one matrix (the paper's count: r n (d_A + d_B)).
        return self.U.numel() + self.V.numel()


def svd_per_adapter(stack: LoraStack, rank: int) -> SVDResult:
    """``SVD_r(B_i A_i)`` for every adapter (the paper's r-SVD baseline, equation 4).

    Through the factors: ``B_i = Q_B R_B``, ``A_i^T = Q_A R_A``, so ``B_i A_i = Q_B (R_B R_A^T) Q_A^T``
    and only the r_max x r_max core is decomposed (Eckart-Young on the core is Eckart-Young on
    ``B_i A_i``).
    """
    Q_B, R_B = torch.linalg.qr(stack.B)
    Q_A, R_A = torch.linalg.qr(stack.A.transpose(1, 2))
    W, S, Zh = torch.linalg.svd(R_B @ R_A.transpose(1, 2))
    r = min(rank, S.shape[1])
    residuals = (S[:, r:].square().sum(dim=1)).clamp_min(0)
    return SVDResult(Q_B @ W[:, :, :r], S[:, :r], Q_A @ Zh[:, :r].transpose(1, 2), residuals)


@dataclass
class TiesResult:
    """One merged update for the whole collection.

    Attributes:
        delta: ``[d_out, d_in]`` merged update (dense: TIES works entry-wise on the updates).
        residuals: ``[n]`` squared errors ``||dW_i - delta||^2``.
    """

    delta: Tensor
    residuals: Tensor


def ties_merge(stack: LoraStack, density: float = 0.2, *, max_chunk_elements: int = 2**26) -> TiesResult:
    """TIES merging (Yadav et al., 2023) of all updates into one: trim, elect sign, disjoint mean.

    1. Trim: keep the ``density`` fraction of entries of each ``dW_i`` largest in magnitude.
    2. Elect: per entry, the sign of the sum of the trimmed updates.
    3. Merge: per entry, the mean of the trimmed values that agree with the elected sign.

    TIES is entry-wise, so unlike JD it needs dense updates; rows are processed in chunks of at most
    ``max_chunk_elements`` entries across all adapters to bound memory.
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}.")
    n, d_out, d_in = stack.n, stack.d_out, stack.d_in
    keep = max(1, round(density * d_out * d_in))
    thresholds = torch.stack(
        [(stack.B[i] @ stack.A[i]).abs().flatten().kthvalue(d_out * d_in - keep + 1).values for i in range(n)]
    )
    rows = max(1, max_chunk_elements // (n * d_in))
    delta = torch.empty(d_out, d_in, dtype=stack.A.dtype, device=stack.A.device)
    residuals = torch.zeros(n, dtype=stack.A.dtype, device=stack.A.device)
    for start in range(0, d_out, rows):
        dense = stack.B[:, start : start + rows] @ stack.A  # [n, rows, d_in]
        trimmed = torch.where(dense.abs() >= thresholds[:, None, None], dense, torch.zeros_like(dense))
        elected = torch.sign(trimmed.sum(dim=0))
        agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
        merged = (trimmed * agree).sum(dim=0) / agree.sum(dim=0).clamp_min(1)
        delta[start : start + rows] = merged
        residuals += (dense - merged).square().sum(dim=(1, 2))
    return TiesResult(delta, residuals)
