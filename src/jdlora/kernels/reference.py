"""The torch reference of the JD-LoRA mixed-batch forward: it defines the numbers the kernels match.

For tokens ``x [T, d_in]`` where token t uses adapter ``a = token_adapter[t]`` in cluster
``c = cluster_of[a]`` (paper section 3, equation 2 with clusters of Appendix A.3)::

    y[t] += scale * U[c] @ Sigma[a] @ V[c].T @ x[t]        (skipped when a < 0 or c < 0)

Numbers: every product is taken in float32 (float64 when any input is float64) from the inputs upcast (products of fp16/bf16 values are
exact in float32, so this is "fp32 accumulation"), and ``y[t]`` becomes
``(float32(y[t]) + delta[t])`` rounded once to y's dtype. Rows of skipped tokens are left exactly as
they were.

Shape of the computation (no Python loop over adapters or clusters): the shrink ``x V_c`` is one
batched product of the whole batch with every cluster's V (``[T, C, r]``; C times the FLOPs of the
shrink a kernel does, which a reference can afford), each token keeps its own cluster's row, Sigma is
gathered per token (``[T, r, r]`` or ``[T, r]``) and applied by one batched product, and the expand
scatters each token's vector into its cluster's slot of a ``[T, C, r]`` tensor contracted with
every cluster's U at once.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["jd_lora_forward_reference", "jd_lora_delta_reference", "jd_lora_shrink_reference",
           "jd_lora_expand_reference"]


def jd_lora_delta_reference(
    x: Tensor, U: Tensor, V: Tensor, sigma: Tensor, cluster_of: Tensor, token_adapter: Tensor
) -> tuple[Tensor, Tensor]:
    """``(delta [T, d_out] float32, active [T] bool)``: the update before scaling, and which rows get it.

    Autocast is switched off inside: the reference fixes its own precision (float32, or float64 when an
    input is float64), whatever context it is called from.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _delta(x, U, V, sigma, cluster_of, token_adapter)


def _delta(x, U, V, sigma, cluster_of, token_adapter):
    a_safe, c_safe, active = _clusters(cluster_of, token_adapter)
    g = _g(x, V, sigma, a_safe, c_safe, active, U.dtype)
    return _expand(g, U, c_safe), active


def _accumulation(x, u_dtype, V, sigma) -> torch.dtype:
    return torch.float64 if torch.float64 in (x.dtype, u_dtype, V.dtype, sigma.dtype) else torch.float32


def _clusters(cluster_of, token_adapter):
    """``(a_safe, c_safe, active)`` per token: adapter and cluster (0 where none) and whether it has an update."""
    a = token_adapter.long()
    has_adapter = a >= 0
    a_safe = torch.where(has_adapter, a, torch.zeros_like(a))
    if cluster_of.numel() == 0:  # no adapters at all
        c = torch.full_like(a, -1)
    else:
        c = torch.where(has_adapter, cluster_of.long()[a_safe.clamp(max=cluster_of.numel() - 1)], -1)
    active = c >= 0
    return a_safe, torch.where(active, c, torch.zeros_like(c)), active


def _g(x, V, sigma, a_safe, c_safe, active, u_dtype):
    """``g [T, r]``: ``Sigma[a] V[c]^T x`` per token (zero rows where inactive; the rest from :func:`_clusters`)."""
    T, r = x.shape[0], V.shape[2]
    acc = _accumulation(x, u_dtype, V, sigma)
    h_all = torch.einsum("ti,cir->tcr", x.to(acc), V.to(acc))  # [T, C, r]
    h = h_all.gather(1, c_safe.view(T, 1, 1).expand(T, 1, r)).squeeze(1)  # [T, r]
    if sigma.dim() == 2:  # JD-Diag: Sigma_a = diag(sigma[a])
        g = h * sigma.to(acc)[a_safe]
    else:  # JD-Full
        g = torch.bmm(sigma.to(acc)[a_safe], h.unsqueeze(2)).squeeze(2)
    return g * active.unsqueeze(1)


def _expand(g, U, c_safe):
    """``delta [T, d_out]``: ``U[c] g[t]`` per token (``c_safe`` from :func:`_clusters`), in g's precision."""
    T, C, r = g.shape[0], U.shape[0], U.shape[2]
    g_slots = torch.zeros(T, C, r, dtype=g.dtype, device=g.device)
    g_slots.scatter_(1, c_safe.view(T, 1, 1).expand(T, 1, r), g.unsqueeze(1))
    return torch.einsum("tcr,cor->to", g_slots, U.to(g.dtype))  # [T, d_out]


def jd_lora_shrink_reference(x: Tensor, V: Tensor, sigma: Tensor, cluster_of: Tensor, token_adapter: Tensor,
                             u_dtype: torch.dtype) -> Tensor:
    """``g [T, r]`` (float32, float64 when an input is): ``Sigma[a] V[c]^T x[t]`` per token in the caller's
    order, zero rows for tokens without an update: the first half of :func:`jd_lora_forward_reference`."""
    if x.shape[0] == 0:
        return torch.zeros(0, V.shape[2], dtype=_accumulation(x, u_dtype, V, sigma), device=x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return _g(x, V, sigma, *_clusters(cluster_of, token_adapter), u_dtype)


def jd_lora_expand_reference(y: Tensor, U: Tensor, g: Tensor, cluster_of: Tensor, token_adapter: Tensor, *,
                             scale: float = 1.0) -> Tensor:
    """In place ``y[t] += scale * U[c] g[t]`` with ``g`` from :func:`jd_lora_shrink_reference`: the second
    half of :func:`jd_lora_forward_reference` (same bits). Returns y."""
    if y.shape[0] == 0:
        return y
    with torch.autocast(device_type=y.device.type, enabled=False):
        _, c_safe, active = _clusters(cluster_of, token_adapter)
        delta = _expand(g, U, c_safe)
    return _add_update(y, delta, active, scale)


def _add_update(y: Tensor, delta: Tensor, active: Tensor, scale: float) -> Tensor:
    """``y[t] = y[t] + scale * delta[t]`` in delta's precision, rounded once to y's dtype, for active rows only
    (the others keep their exact bits). Returns y."""
    updated = (y.to(delta.dtype) + scale * delta).to(y.dtype)
    y.copy_(torch.where(active.unsqueeze(1), updated, y))
    return y


def jd_lora_forward_reference(
    y: Tensor,
    x: Tensor,
    U: Tensor,
    V: Tensor,
    sigma: Tensor,
    cluster_of: Tensor,
    token_adapter: Tensor,
    *,
    scale: float = 1.0,
) -> Tensor:
    """In place ``y[t] += scale * U[c] Sigma[a] V[c]^T x[t]``; see the module docstring. Returns y."""
    if x.shape[0] == 0:
        return y
    delta, active = jd_lora_delta_reference(x, U, V, sigma, cluster_of, token_adapter)
    return _add_update(y, delta, active, scale)
