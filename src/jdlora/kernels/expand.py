"""Triton kernel: expand by the cluster's U and accumulate into y in place (one launch).

Math, for every token of the batch in adapter order, with ``a = sorted_adapter[m // S]``,
``c = cluster_of[a]`` and ``g`` from :mod:`~jdlora.kernels.shrink`::

    y[t(m)] += scale * U[c] g[m]          (d_out, float32 accumulation, one rounding of y)

with ``t(m) = order[m // S] * S + m % S`` for rows of S = ``tokens_per_row`` tokens (see :mod:`~jdlora.kernels.shrink`).

``g`` is rounded to the dtype of U before the product (as vLLM/Punica round their shrink output), then
the product accumulates in float32. Rows with ``a < 0`` or ``c < 0`` are neither read nor written.

Grid: ``(cdiv(T, BLOCK_M), cdiv(d_out, BLOCK_N))``. Program (i, j) loads ``g`` of its token block once,
then loops over the clusters present in the block (only those, ascending): for cluster c it takes
the rows of the block in c (others zeroed) and multiplies them by the ``[BLOCK_N, r]`` tile of U[c].
A prefill block holds one cluster (one dot); a decode block of T <= BLOCK_M tokens in C clusters does
C dots, and every cluster's U is read once for the whole batch. With one cluster (``ONE_CLUSTER``) no
load waits for the ``cluster_of`` lookup (the lookup only masks the store).

``jd_expand_siblings_kernel`` is the same for up to three sibling modules (q, k, v) whose g came from one
siblings' shrink: grid ``(cdiv(T, BLOCK_M), tiles of every sibling's d_out)``, the column tiles of sibling 0,
then 1, then 2; each program is a program of the single kernel for its sibling (one launch instead of three).

Memory traffic per launch: y read and written once (the floor's largest term for prefill), U[c] of
every cluster present once per token block (from L2 after the first), g (T x r float32) once per
column tile (from L2).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fast_launch import FastLauncher
from .sizes import block_rank, cdiv

_BIG = tl.constexpr(2147483647)


@triton.jit
def _expand_block(
    pid_m, pid_n, y_ptr, u_ptr, g_ptr, cluster_of_ptr, order_ptr, sorted_adapter_ptr, T, tpr, d_out, r, scale,
    stride_yt, stride_yd, stride_uc, stride_ud, stride_ur, stride_ws,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, ONE_CLUSTER: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program (pid_m, pid_n) of the expand: tokens of block pid_m, columns of tile pid_n of y."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_batch = offs_m < T
    slot = offs_m // tpr  # the row of token m of the sorted order (tpr == 1: Triton folds this away)
    adapter = tl.load(sorted_adapter_ptr + slot, mask=in_batch, other=-1)
    token = tl.load(order_ptr + slot, mask=in_batch, other=0).to(tl.int64) * tpr + offs_m % tpr
    cluster = tl.load(cluster_of_ptr + adapter, mask=adapter >= 0, other=-1).to(tl.int32)
    active = cluster >= 0
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < r
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < d_out
    g_tile = g_ptr + offs_m.to(tl.int64)[:, None] * stride_ws + offs_r[None, :]
    y_tile = y_ptr + token[:, None] * stride_yt + offs_n[None, :] * stride_yd
    if ONE_CLUSTER:
        # No load waits for the cluster lookup: every row of g (rows of inactive tokens hold stale
        # values, which stay in their own rows of the product) times U[0]; only active rows stored.
        g = tl.load(g_tile, mask=in_batch[:, None] & r_mask[None, :], other=0.0).to(u_ptr.dtype.element_ty)
        u_t = tl.load(u_ptr + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_ud,
                      mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        y_old = tl.load(y_tile, mask=in_batch[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(g, u_t, input_precision=PRECISION)
        tl.store(y_tile, (y_old.to(tl.float32) + scale * acc).to(y_old.dtype), mask=active[:, None] & n_mask[None, :])
    elif tl.max(active.to(tl.int32), axis=0) > 0:
        g = tl.load(g_tile, mask=active[:, None] & r_mask[None, :], other=0.0).to(u_ptr.dtype.element_ty)
        c = tl.min(tl.where(active, cluster, _BIG), axis=0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        while c < _BIG:  # the clusters present in the block only, ascending (as in the shrink)
            g_c = tl.where((cluster == c)[:, None], g, tl.zeros_like(g))
            u_t = tl.load(  # U[c]^T tile: [r, BLOCK_N]
                u_ptr + c * stride_uc + offs_r[:, None] * stride_ur + offs_n[None, :] * stride_ud,
                mask=r_mask[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc += tl.dot(g_c, u_t, input_precision=PRECISION)
            c = tl.min(tl.where(active & (cluster > c), cluster, _BIG), axis=0)
        y_mask = active[:, None] & n_mask[None, :]
        y_old = tl.load(y_tile, mask=y_mask, other=0.0)
        tl.store(y_tile, (y_old.to(tl.float32) + scale * acc).to(y_old.dtype), mask=y_mask)


@triton.jit
def jd_expand_kernel(
    y_ptr,
    u_ptr,
    g_ptr,
    cluster_of_ptr,
    order_ptr,
    sorted_adapter_ptr,
    T,
    tpr,
    d_out,
    r,
    scale,
    stride_yt,
    stride_yd,
    stride_uc,
    stride_ud,
    stride_ur,
    stride_ws,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ONE_CLUSTER: tl.constexpr,
    PRECISION: tl.constexpr,
):
    _expand_block(tl.program_id(0), tl.program_id(1), y_ptr, u_ptr, g_ptr, cluster_of_ptr, order_ptr,
                  sorted_adapter_ptr, T, tpr, d_out, r, scale, stride_yt, stride_yd, stride_uc, stride_ud, stride_ur,
                  stride_ws, BLOCK_M, BLOCK_N, BLOCK_R, ONE_CLUSTER, PRECISION)


@triton.jit
def jd_expand_siblings_kernel(
    y0_ptr,
    y1_ptr,
    y2_ptr,
    u0_ptr,
    u1_ptr,
    u2_ptr,
    g_ptr,
    cluster_of0_ptr,
    cluster_of1_ptr,
    cluster_of2_ptr,
    order_ptr,
    sorted_adapter_ptr,
    T,
    tpr,
    n_tiles0,
    n_tiles1,
    d_out0,
    d_out1,
    d_out2,
    r,
    scale,
    stride_yt0,
    stride_yt1,
    stride_yt2,
    stride_yd,
    stride_uc0,
    stride_uc1,
    stride_uc2,
    stride_ud,
    stride_ur,
    stride_gs,
    stride_ws,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    ONE_CLUSTER0: tl.constexpr,
    ONE_CLUSTER1: tl.constexpr,
    ONE_CLUSTER2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The expands of up to three siblings: the column tiles of sibling 0's y, then 1's, then 2's, along the
    grid's second axis; program (i, j) is program (i, j - tiles before) of :func:`jd_expand_kernel` for the
    sibling that tile j falls in (its y, U bank, cluster_of and ``g[s]`` of the ``[S, T, w]`` scratch)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_n < n_tiles0:
        _expand_block(pid_m, pid_n, y0_ptr, u0_ptr, g_ptr, cluster_of0_ptr, order_ptr, sorted_adapter_ptr, T, tpr,
                      d_out0, r, scale, stride_yt0, stride_yd, stride_uc0, stride_ud, stride_ur, stride_ws,
                      BLOCK_M, BLOCK_N, BLOCK_R, ONE_CLUSTER0, PRECISION)
    elif pid_n < n_tiles0 + n_tiles1:
        _expand_block(pid_m, pid_n - n_tiles0, y1_ptr, u1_ptr, g_ptr + stride_gs, cluster_of1_ptr, order_ptr,
                      sorted_adapter_ptr, T, tpr, d_out1, r, scale, stride_yt1, stride_yd, stride_uc1, stride_ud,
                      stride_ur, stride_ws, BLOCK_M, BLOCK_N, BLOCK_R, ONE_CLUSTER1, PRECISION)
    else:
        _expand_block(pid_m, pid_n - n_tiles0 - n_tiles1, y2_ptr, u2_ptr, g_ptr + 2 * stride_gs, cluster_of2_ptr,
                      order_ptr, sorted_adapter_ptr, T, tpr, d_out2, r, scale, stride_yt2, stride_yd, stride_uc2,
                      stride_ud, stride_ur, stride_ws, BLOCK_M, BLOCK_N, BLOCK_R, ONE_CLUSTER2, PRECISION)


_expand_launch = FastLauncher(jd_expand_kernel)  # kernel[grid](...) with less host work per call


def launch_expand(y, U, g, cluster_of, batch, *, scale: float, config) -> None:
    """Launch :func:`jd_expand_kernel`: ``y[order[m]] += scale * U[c] g[m]`` in place."""
    T, d_out = y.shape
    r = U.shape[2]
    grid = (cdiv(T, config.block_m), cdiv(d_out, config.block_n))
    _expand_launch(
        grid, y, U, g, cluster_of, batch.order, batch.sorted_adapter,
        T, batch.tokens_per_row, d_out, r, float(scale),
        *y.stride(), *U.stride(), g.stride(0),
        ONE_CLUSTER=U.shape[0] == 1, **_expand_options(U, r, config),
    )


def _expand_options(U, r: int, config) -> dict:
    """The constexprs and launch options of an expand launch but the cluster flag."""
    return dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_R=block_rank(r),
                PRECISION="ieee" if U.dtype.itemsize == 4 else "tf32", num_warps=config.num_warps,
                num_stages=config.num_stages)


_siblings_launch = FastLauncher(jd_expand_siblings_kernel)


def launch_expand_siblings(ys, Us, g, cluster_ofs, batch, *, scale: float, config) -> None:
    """Launch :func:`jd_expand_siblings_kernel`: ``ys[s][order[m]] += scale * U_s[c_s] g[s, m]`` for each sibling s.

    ``ys``, ``Us``, ``cluster_ofs``: 1 to 3 siblings whose U banks share the rank, dtype and the strides of
    their last two dims, and whose outputs share the column stride (the caller checks:
    :func:`jdlora.kernels.expand_siblings_fusable`); ``g``: ``[len(ys), T, w]`` from the siblings' shrink.
    Each sibling's tiles are those of :func:`launch_expand`, so each y gets the same bits.
    """
    T = ys[0].shape[0]
    n = len(ys)
    r = Us[0].shape[2]
    tiles = [cdiv(y.shape[1], config.block_n) for y in ys] + [0] * (3 - n)
    yp = tuple(ys) + (ys[0],) * (3 - n)
    up = tuple(Us) + (Us[0],) * (3 - n)
    cp = tuple(cluster_ofs) + (cluster_ofs[0],) * (3 - n)
    _siblings_launch(
        (cdiv(T, config.block_m), sum(tiles)), *yp, *up, g, *cp, batch.order, batch.sorted_adapter,
        T, batch.tokens_per_row, tiles[0], tiles[1], *(y.shape[1] for y in yp), r, float(scale),
        *(y.stride(0) for y in yp), ys[0].stride(1), *(U.stride(0) for U in up), Us[0].stride(1), Us[0].stride(2),
        g.stride(0), g.stride(1),
        ONE_CLUSTER0=up[0].shape[0] == 1, ONE_CLUSTER1=up[1].shape[0] == 1, ONE_CLUSTER2=up[2].shape[0] == 1,
        **_expand_options(Us[0], r, config),
    )
