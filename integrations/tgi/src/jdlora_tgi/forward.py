"""The JD-LoRA part of an adapted TGI linear layer: ``y[t] += U_c Sigma_a V_c^T x[t]`` per token.

All math is :func:`jdlora.kernels.jd_lora_forward` (Triton kernels on CUDA, the torch reference elsewhere).
Column-parallel layers (and every layer on one rank) make one call into the rank's output slice; the layer
types of one of TGI's fused projections (q/k/v, gate/up), which read the same input, make one shrink, one Sigma
and one expand launch for all (:func:`apply_jd_siblings`).
Row-parallel layers on several ranks split it around the collective (see :mod:`jdlora_tgi.sharding`)::

    h  = V_c[shard]^T x[shard]     row_partial: jd_lora_forward with U = I, Sigma = I   (float32 [T, r])
    all_reduce(h)                  over the layer's process group
    y += U_c Sigma_a h             row_finish: jd_lora_forward with V = I  (into the reduced output)
"""

from __future__ import annotations

import torch
from torch import Tensor

from jdlora.kernels import JDBatch, jd_lora_forward, jd_lora_forward_siblings

from .registry import StepRows
from .tables import JDLayerTable

__all__ = ["apply_jd", "apply_jd_siblings", "row_partial", "row_finish"]


def apply_jd(
    table: JDLayerTable,
    layer_id: int,
    result: Tensor,
    x: Tensor,
    step: StepRows,
    start_idx: int,
    end_idx: int,
    process_group=None,
) -> Tensor:
    """Adds the JD-LoRA update of layer ``layer_id`` to ``result`` in place; returns ``result``.

    Args:
        table: the layer type's weights. layer_id: the transformer layer.
        result: ``[T, d]`` output of the base layer (column-parallel: this rank's shard of every fused
            projection; row-parallel: the reduced output). x: ``[T, d_in_local]`` input of the layer.
        step: per-token rows of this forward.
        start_idx, end_idx: columns of ``result`` this layer type owns (TGI's fused q/k/v or gate/up).
        process_group: the layer's group; row-parallel layers all-reduce ``V^T x`` over it.
    """
    if table.U[layer_id] is None:
        return result
    x2 = x.reshape(-1, x.shape[-1])
    y2 = result.view(-1, result.shape[-1])
    world = process_group.size() if process_group is not None else 1
    if table.spec.row_parallel and world > 1:
        h = row_partial(table, layer_id, x2, step.batch)
        torch.distributed.all_reduce(h, group=process_group)
        row_finish(table, layer_id, y2, h, step.batch)
        return result
    if table.spec.row_parallel:
        start_idx, end_idx = 0, y2.shape[1]
    U, V, sigma, cluster_of = (t[layer_id] for t in (table.U, table.V, table.sigma, table.cluster_of))
    jd_lora_forward(y2[:, start_idx:end_idx], x2, U, V, sigma, cluster_of, step.batch)
    return result


def apply_jd_siblings(tables: list[JDLayerTable], layer_id: int, result: Tensor, x: Tensor, step: StepRows,
                      columns: list[tuple[int, int]]) -> Tensor:
    """:func:`apply_jd` of column-parallel layer types of one fused projection that read ``x`` (``columns``: each
    one's ``(start_idx, end_idx)`` in ``result``), at once: three launches for all where their weights allow
    (:func:`jdlora.kernels.jd_lora_forward_siblings`), each slice the numbers of its own :func:`apply_jd`."""
    x2 = x.reshape(-1, x.shape[-1])
    y2 = result.view(-1, result.shape[-1])
    Us, Vs = [t.U[layer_id] for t in tables], [t.V[layer_id] for t in tables]
    sigmas, cluster_ofs = [t.sigma[layer_id] for t in tables], [t.cluster_of[layer_id] for t in tables]
    jd_lora_forward_siblings([y2[:, a:b] for a, b in columns], x2, Us, Vs, sigmas, cluster_ofs, step.batch)
    return result


def row_partial(table: JDLayerTable, layer_id: int, x: Tensor, batch: JDBatch) -> Tensor:
    """``h[t] = V_c[shard]^T x[t]`` (float32 ``[T, r]``, zero for tokens without update) on this rank."""
    eye, ones = table.identity(layer_id, x.dtype)
    h = torch.zeros(x.shape[0], table.rank, dtype=torch.float32, device=x.device)
    return jd_lora_forward(h, x, eye, table.V[layer_id], ones, table.cluster_of[layer_id], batch)


def row_finish(table: JDLayerTable, layer_id: int, y: Tensor, h: Tensor, batch: JDBatch) -> Tensor:
    """``y[t] += U_c Sigma_a h[t]`` once ``h`` holds the sum over ranks (Sigma after the collective)."""
    U = table.U[layer_id]
    eye, _ = table.identity(layer_id, U.dtype)
    return jd_lora_forward(y, h.to(U.dtype), U, eye, table.sigma[layer_id], table.cluster_of[layer_id], batch)
