"""Triton kernel: shrink by each token's cluster basis V (launch 1 of 3).

Math, for every token of the batch in adapter order (``order``, ``sorted_adapter`` of a
:class:`~jdlora.kernels.JDBatch`), with ``a = sorted_adapter[m // S]`` and ``c = cluster_of[a]``::

    h[m] = V[c]^T x[t(m)]                (r, float32 accumulation)

into the batch's float32 scratch ``h [T, w]`` (rows in adapter order), which is all zeros on entry and
which the Sigma kernel re-zeroes after reading it. Rows with ``a < 0`` or ``c < 0`` are not touched.
For rows of S = ``tokens_per_row`` tokens, token m of the sorted order is ``t(m) = order[m // S] * S + m % S``
(S = 1: rows are tokens), so one sort of the rows serves prefill and decode.

Grid: ``(cdiv(T, BLOCK_M), split_k)``. Program (i, k) takes tokens ``[i*BLOCK_M, (i+1)*BLOCK_M)`` of the
sorted order and the slice ``[k*k_per_split, (k+1)*k_per_split)`` of d_in. It loops over the clusters
present in the block (only those: the next is the smallest cluster above the last) and, per cluster,
over its K slice; rows of other clusters are masked out of the x loads, so x is read once in all, and
each present cluster's V slice once per token block. A decode batch (few token blocks) is split over d_in to fill the GPU
(``split_k`` programs per block, partial sums added atomically into the scratch); a prefill batch
has enough blocks and stores its sums directly (``SPLIT`` False). With one cluster (``ONE_CLUSTER``)
no load waits for the ``cluster_of`` lookup: all rows are shrunk by V[0], only active rows are stored.

``jd_shrink_siblings_kernel`` is the same for up to three sibling modules that read the same x (q, k, v):
grid ``(cdiv(T, BLOCK_M) * siblings, split_k)``, program (i * siblings + s, k) is program (i, k) above with
sibling s's V bank and ``cluster_of`` into ``h[s]`` of a ``[S, T, w]`` scratch (one launch instead of three;
the siblings of a token block side by side, so x comes from memory once).

Memory traffic per launch: x once (``T * d_in``), V[c] of every cluster present once per token block
(from L2 after the first block), and ``split_k * T * r`` float32 atomic adds (or ``T * r`` stores).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fast_launch import FastLauncher
from .sizes import block_rank, cdiv

_BIG = tl.constexpr(2147483647)


@triton.jit
def _store_h(acc, h_ptr, offs_m, offs_r, active, r, stride_h, SPLIT: tl.constexpr):
    h_tile = h_ptr + offs_m.to(tl.int64)[:, None] * stride_h + offs_r[None, :]
    h_mask = active[:, None] & (offs_r < r)[None, :]
    if SPLIT:
        tl.atomic_add(h_tile, acc, mask=h_mask, sem="relaxed")
    else:
        tl.store(h_tile, acc, mask=h_mask)


@triton.jit
def _shrink_block(
    pid_m, pid_k, x_ptr, v_ptr, cluster_of_ptr, order_ptr, sorted_adapter_ptr, h_ptr,
    T, tpr, d_in, r, k_per_split, stride_xt, stride_xd, stride_vc, stride_vd, stride_vr, stride_h,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr,
    ONE_CLUSTER: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (pid_m, pid_k) of the shrink: tokens of block pid_m, slice pid_k of d_in."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_batch = offs_m < T
    slot = offs_m // tpr  # the row of token m of the sorted order (tpr == 1: Triton folds this away)
    adapter = tl.load(sorted_adapter_ptr + slot, mask=in_batch, other=-1)
    token = tl.load(order_ptr + slot, mask=in_batch, other=0).to(tl.int64) * tpr + offs_m % tpr
    cluster = tl.load(cluster_of_ptr + adapter, mask=adapter >= 0, other=-1).to(tl.int32)
    active = cluster >= 0
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < r
    offs_k = tl.arange(0, BLOCK_K)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, d_in)
    x_rows = x_ptr + token[:, None] * stride_xt
    if ONE_CLUSTER:
        # No load waits for the cluster lookup (a decode step is a chain of dependent loads): every
        # row of the block is shrunk by V[0], and only active rows are stored.
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            kk = k0 + offs_k
            k_mask = kk < k_end
            xb = tl.load(x_rows + kk[None, :] * stride_xd, mask=in_batch[:, None] & k_mask[None, :], other=0.0)
            vb = tl.load(v_ptr + kk[:, None] * stride_vd + offs_r[None, :] * stride_vr,
                         mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            acc += tl.dot(xb, vb, input_precision=PRECISION)
        _store_h(acc, h_ptr, offs_m, offs_r, active, r, stride_h, SPLIT)
    elif tl.max(active.to(tl.int32), axis=0) > 0:  # else the whole block is unadapted here: exit
        # Only the clusters present in the block, in ascending order (the next one is the smallest above the
        # last): a block of a few adapters in many clusters (one cluster per adapter, multi-LoRA slots) must not
        # walk every cluster between its smallest and largest.
        c = tl.min(tl.where(active, cluster, _BIG), axis=0)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        while c < _BIG:
            rows = active & (cluster == c)
            for k0 in range(k_start, k_end, BLOCK_K):
                kk = k0 + offs_k
                k_mask = kk < k_end
                xb = tl.load(x_rows + kk[None, :] * stride_xd, mask=rows[:, None] & k_mask[None, :], other=0.0)
                vb = tl.load(
                    v_ptr + c * stride_vc + kk[:, None] * stride_vd + offs_r[None, :] * stride_vr,
                    mask=k_mask[:, None] & r_mask[None, :],
                    other=0.0,
                )
                acc += tl.dot(xb, vb, input_precision=PRECISION)
            c = tl.min(tl.where(active & (cluster > c), cluster, _BIG), axis=0)
        _store_h(acc, h_ptr, offs_m, offs_r, active, r, stride_h, SPLIT)


@triton.jit
def jd_shrink_kernel(
    x_ptr,
    v_ptr,
    cluster_of_ptr,
    order_ptr,
    sorted_adapter_ptr,
    h_ptr,
    T,
    tpr,
    d_in,
    r,
    k_per_split,
    stride_xt,
    stride_xd,
    stride_vc,
    stride_vd,
    stride_vr,
    stride_h,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT: tl.constexpr,
    ONE_CLUSTER: tl.constexpr,
    PRECISION: tl.constexpr,
):
    _shrink_block(tl.program_id(0), tl.program_id(1), x_ptr, v_ptr, cluster_of_ptr, order_ptr, sorted_adapter_ptr,
                  h_ptr, T, tpr, d_in, r, k_per_split, stride_xt, stride_xd, stride_vc, stride_vd, stride_vr, stride_h,
                  BLOCK_M, BLOCK_K, BLOCK_R, SPLIT, ONE_CLUSTER, PRECISION)


@triton.jit
def jd_shrink_siblings_kernel(
    x_ptr,
    v0_ptr,
    v1_ptr,
    v2_ptr,
    cluster_of0_ptr,
    cluster_of1_ptr,
    cluster_of2_ptr,
    order_ptr,
    sorted_adapter_ptr,
    h_ptr,
    T,
    tpr,
    d_in,
    r,
    k_per_split,
    n_siblings,
    stride_xt,
    stride_xd,
    stride_vc,
    stride_vd,
    stride_vr,
    stride_hs,
    stride_h,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT: tl.constexpr,
    ONE_CLUSTER0: tl.constexpr,
    ONE_CLUSTER1: tl.constexpr,
    ONE_CLUSTER2: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """The shrink of up to three sibling modules that read the same x: program (i * n_siblings + s, k) is program
    (i, k) of :func:`jd_shrink_kernel` for sibling s (its V bank, its cluster_of, its scratch ``h[s]``). The
    siblings of one token block are neighbours in launch order, so they run together and the x tile that one
    reads from memory the others find in L2 (a prefill's x is several times L2: with the sibling axis the
    slowest, each sibling read all of it again)."""
    pid_m = tl.program_id(0) // n_siblings
    pid_s = tl.program_id(0) % n_siblings
    pid_k = tl.program_id(1)
    h_s = h_ptr + pid_s.to(tl.int64) * stride_hs
    if pid_s == 0:
        _shrink_block(pid_m, pid_k, x_ptr, v0_ptr, cluster_of0_ptr, order_ptr, sorted_adapter_ptr, h_s, T, tpr, d_in,
                      r, k_per_split, stride_xt, stride_xd, stride_vc, stride_vd, stride_vr, stride_h,
                      BLOCK_M, BLOCK_K, BLOCK_R, SPLIT, ONE_CLUSTER0, PRECISION)
    elif pid_s == 1:
        _shrink_block(pid_m, pid_k, x_ptr, v1_ptr, cluster_of1_ptr, order_ptr, sorted_adapter_ptr, h_s, T, tpr, d_in,
                      r, k_per_split, stride_xt, stride_xd, stride_vc, stride_vd, stride_vr, stride_h,
                      BLOCK_M, BLOCK_K, BLOCK_R, SPLIT, ONE_CLUSTER1, PRECISION)
    else:
        _shrink_block(pid_m, pid_k, x_ptr, v2_ptr, cluster_of2_ptr, order_ptr, sorted_adapter_ptr, h_s, T, tpr, d_in,
                      r, k_per_split, stride_xt, stride_xd, stride_vc, stride_vd, stride_vr, stride_h,
                      BLOCK_M, BLOCK_K, BLOCK_R, SPLIT, ONE_CLUSTER2, PRECISION)


_shrink_launch = FastLauncher(jd_shrink_kernel)  # kernel[grid](...) with less host work per call


def _split(T: int, d_in: int, config) -> tuple[int, int, int]:
    """``(token blocks, K slices, K per slice)`` of a shrink of T tokens over d_in."""
    m_blocks = cdiv(T, config.block_m)
    split_k = max(1, min(config.split_k(m_blocks, d_in), cdiv(d_in, config.block_k)))
    k_per_split = cdiv(cdiv(d_in, split_k), config.block_k) * config.block_k
    return m_blocks, cdiv(d_in, k_per_split), k_per_split


def launch_shrink(x, V, cluster_of, batch, h, *, config) -> None:
    """Launch :func:`jd_shrink_kernel`: ``h[m] (+)= V[c]^T x[order[m]]`` into the zeroed scratch."""
    T, d_in = x.shape
    r = V.shape[2]
    m_blocks, split_k, k_per_split = _split(T, d_in, config)
    _shrink_launch(
        (m_blocks, split_k), x, V, cluster_of, batch.order, batch.sorted_adapter, h,
        T, batch.tokens_per_row, d_in, r, k_per_split,
        *x.stride(), *V.stride(), h.stride(0),
        ONE_CLUSTER=V.shape[0] == 1, **_shrink_options(x, r, split_k, config),
    )


def _shrink_options(x, r: int, split_k: int, config) -> dict:
    """The constexprs and launch options of a shrink launch but the cluster flags (one module's or the siblings')."""
    return dict(BLOCK_M=config.block_m, BLOCK_K=config.block_k, BLOCK_R=block_rank(r), SPLIT=split_k > 1,
                PRECISION="ieee" if x.dtype.itemsize == 4 else "tf32", num_warps=config.num_warps,
                num_stages=config.num_stages)


_siblings_launch = FastLauncher(jd_shrink_siblings_kernel)


def launch_shrink_siblings(x, Vs, cluster_ofs, batch, h, *, config) -> None:
    """Launch :func:`jd_shrink_siblings_kernel`: ``h[s, m] (+)= V_s[c_s]^T x[order[m]]`` for each sibling s.

    ``Vs``, ``cluster_ofs``: 1 to 3 banks of one rank, one dtype and the same strides (the caller checks:
    :func:`jdlora.kernels.siblings_fusable`); ``h``: ``[len(Vs), T, w]`` zeroed scratch. The token blocks
    and K slices are those of :func:`launch_shrink`, per sibling, so each ``h[s]`` gets the same sums.
    """
    T, d_in = x.shape
    V0 = Vs[0]
    r = V0.shape[2]
    m_blocks, split_k, k_per_split = _split(T, d_in, config)
    n = len(Vs)
    Vp = tuple(Vs) + (V0,) * (3 - n)
    Cp = tuple(cluster_ofs) + (cluster_ofs[0],) * (3 - n)
    _siblings_launch(
        (m_blocks * n, split_k), x, *Vp, *Cp, batch.order, batch.sorted_adapter, h,
        T, batch.tokens_per_row, d_in, r, k_per_split, n,
        *x.stride(), *V0.stride(), h.stride(0), h.stride(1),
        ONE_CLUSTER0=Vp[0].shape[0] == 1, ONE_CLUSTER1=Vp[1].shape[0] == 1, ONE_CLUSTER2=Vp[2].shape[0] == 1,
        **_shrink_options(x, r, split_k, config),
    )
