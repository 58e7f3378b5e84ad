"""Compressing one module: normalization around the clustered JD, and the errors it reports."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .clustering import assignment_errors, jd_cluster
from .jd import residuals, sigma_diag, sigma_full
from .settings import CompressionSettings, SigmaKind
from .stack import LoraStack
from .threads import threads_for


@dataclass
class ModuleCompression:
    """One module of a compressed collection: ``dW_i ~ U[c_i] @ Sigma_i @ V[c_i]^T``.

    Sigma already carries each adapter's LoRA scaling and norm, so serving needs no extra scale.

    Attributes:
        U: ``[C, d_out, r]`` shared bases, one per cluster. V: ``[C, d_in, r]``.
        sigma: ``[m, r, r]`` (full) or ``[m, r]`` (diagonal), for the m adapters that have this module.
        cluster: ``[m]`` cluster of each adapter.
        sq_norms: ``[m]`` ``||dW_i||_F^2`` of the original updates.
        residuals: ``[m]`` ``||dW_i - U Sigma_i V^T||_F^2``.
        history: the optimized relative error at the start and after each clustering round.
    """

    U: Tensor
    V: Tensor
    sigma: Tensor
    cluster: Tensor
    sq_norms: Tensor
    residuals: Tensor
    history: list[float] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return self.U.shape[2]

    @property
    def num_clusters(self) -> int:
        return self.U.shape[0]

    @property
    def sigma_kind(self) -> SigmaKind:
        return "full" if self.sigma.dim() == 3 else "diag"

    @property
    def error(self) -> float:
        """Pooled relative error ``sum_i ||dW_i - U Sigma_i V^T||^2 / sum_i ||dW_i||^2``."""
        return (self.residuals.sum() / self.sq_norms.sum().clamp_min(1e-30)).item()

    @property
    def adapter_errors(self) -> Tensor:
        """``[m]`` relative error of each adapter, ``||dW_i - U Sigma_i V^T||^2 / ||dW_i||^2``."""
        return self.residuals / self.sq_norms.clamp_min(1e-30)

    @property
    def mean_adapter_error(self) -> float:
        """Mean of the per-adapter relative errors: what the normalized JD minimizes."""
        return self.adapter_errors.mean().item()

    def delta_weight(self, i: int) -> Tensor:
        """Dense ``U Sigma_i V^T`` of the i-th adapter of this module (d_out x d_in)."""
        c = int(self.cluster[i])
        sigma = self.sigma[i] if self.sigma.dim() == 3 else torch.diag(self.sigma[i])
        return self.U[c] @ sigma @ self.V[c].T

    def num_parameters(self) -> int:
        """Parameters after compression: the bases plus every Sigma."""
        return self.U[0].numel() * self.num_clusters + self.V[0].numel() * self.num_clusters + self.sigma.numel()


def compress_module(stack: LoraStack, settings: CompressionSettings) -> ModuleCompression:
    """Compresses one module's updates with (clustered) JD.

    With ``settings.normalize`` (the default), every ``dW_i`` is scaled to unit Frobenius norm before
    the JD, so every adapter weighs the same in the objective (it minimizes the mean per-adapter
    relative error), and the norms are folded back into Sigma afterwards. Without it the JD minimizes
    the pooled error, where large adapters dominate.

    Args:
        stack: the module's updates (LoRA scaling folded in).
        settings: resolved settings (an integer ``rank`` and ``clusters``, ``sigma_kind`` ``"full"``
            or ``"diag"``); see :func:`~jdlora.compress.clustering.jd_cluster` for what the JD reads.

    Runs with as many torch threads as products of this size use well (:func:`threads_for`).
    """
    with threads_for(stack):
        return _compress_module(stack, settings)


def _compress_module(stack: LoraStack, settings: CompressionSettings) -> ModuleCompression:
    sq_norms = stack.sq_norms()
    norms = sq_norms.sqrt()
    # A zero update stays zero under any scale; leave it alone rather than divide by zero.
    normalize = settings.normalize
    scale = torch.where(norms > 0, 1 / norms, torch.ones_like(norms)) if normalize else torch.ones_like(norms)
    work = stack.scaled(scale) if normalize else stack
    result = jd_cluster(work, settings)
    restore = (1 / scale).to(result.sigma)
    sigma_out = result.sigma * (restore[:, None, None] if settings.sigma_kind == "full" else restore[:, None])
    return ModuleCompression(
        U=result.U,
        V=result.V,
        sigma=sigma_out,
        cluster=result.cluster,
        sq_norms=sq_norms,
        residuals=result.residuals * restore.square(),
        history=result.history,
    )


def project_onto_bases(
    stack: LoraStack, U: Tensor, V: Tensor, sigma_kind: SigmaKind = "full"
) -> tuple[Tensor, Tensor, Tensor]:
    """Compresses new updates with existing bases: each joins its best cluster, with its optimal Sigma.

    ``Sigma_i = U_j^T dW_i V_j`` (equation 6) for orthonormal bases, the closed form of Appendix A.1
    case 2 for JD-Diag bases; the cluster j minimizes the error (Appendix A.3, step 2).

    Args:
        stack: the new updates (LoRA scaling folded in). U: ``[C, d_out, r]``. V: ``[C, d_in, r]``.

    Returns:
        ``(sigma, cluster, residuals)`` for the new adapters.
    """
    bases = [(U[j], V[j]) for j in range(U.shape[0])]
    cluster = assignment_errors(stack, bases, sigma_kind).argmin(dim=1)
    shape = (stack.n, U.shape[2], U.shape[2]) if sigma_kind == "full" else (stack.n, U.shape[2])
    sig = torch.zeros(shape, dtype=stack.A.dtype, device=stack.A.device)
    res = torch.zeros(stack.n, dtype=stack.A.dtype, device=stack.A.device)
    for j, (Uj, Vj) in enumerate(bases):
        members = (cluster == j).nonzero().flatten()
        if len(members):
            sub = stack.subset(members)
            sig[members] = (sigma_full if sigma_kind == "full" else sigma_diag)(sub, Uj, Vj)
            res[members] = residuals(sub, Uj, Vj, sig[members])
    return sig, cluster, res
