"""Triton kernel: shrink by the cluster's V, then apply the adapter's Sigma (one launch).

Math, for every token t of the batch in adapter order (``order``, ``sorted_adapter`` of a
:class:`~jdlora.kernels.JDBatch`), with ``a = sorted_adapter[m]`` and ``c = cluster_of[a]``::

    h[m] = V[c]^T x[order[m]]            (r,   float32 accumulation)
    g[m] = Sigma[a] h[m]                 (r x r, or elementwise by diag(Sigma[a]))

``g`` (float32, ``[T, r]``, rows in adapter order) goes to the expand kernel. Rows with ``a < 0`` or
``c < 0`` are skipped and not written.

Grid: ``(cdiv(T, BLOCK_M), split_k)``. Program (i, k) takes tokens ``[i*BLOCK_M, (i+1)*BLOCK_M)`` of the
sorted order and the slice ``[k*k_per_split, (k+1)*k_per_split)`` of d_in. Its loop runs over the
clusters present in the block times the K slice (one flat loop, so Triton pipelines the loads); rows
of other clusters are masked out of the x loads, so x is read once in all. With ``split_k > 1`` (small
batches: not enough token blocks to fill the GPU) the partial sums meet in a float32 scratch by atomic
adds; the program that arrives last at the block's counter (acquire/release atomics) reads the sum,
applies Sigma, and re-zeroes the scratch and counter for the next layer: no memset launch, no host
synchronization.

Sigma: a block whose tokens share one adapter (prefill runs) does one ``[BLOCK_M, r] x [r, r]`` dot; a
block of several adapters (decode) gathers each token's Sigma in chunks of ``SIGMA_ROWS`` rows and
reduces on the vector units (every load independent, so they are all in flight at once).

Memory traffic per launch: x once (T * d_in), V[c] of every cluster present once per token block
(from L2 after the first), Sigma[a] once per token block holding adapter a, ``g`` written once, and,
when split, the scratch: ``split_k`` atomic adds of ``T * r`` float32 plus one read and one zeroing.
"""

from __future__ import annotations

import triton
import triton.language as tl

_BIG = 2147483647


@triton.jit
def _apply_sigma_store(
    h,
    adapter,
    active,
    offs_m,
    offs_r,
    r,
    sigma_ptr,
    stride_sa,
    stride_si,
    stride_sj,
    g_ptr,
    stride_ws,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SIGMA_DIAG: tl.constexpr,
    SIGMA_ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """g[m] = Sigma[adapter[m]] h[m] for the active rows of one block; stores float32 g."""
    r_mask = offs_r < r
    g_rows = g_ptr + offs_m.to(tl.int64)[:, None] * stride_ws
    out_mask = active[:, None] & r_mask[None, :]
    a64 = tl.where(active, adapter, 0).to(tl.int64)
    if SIGMA_DIAG:
        s = tl.load(sigma_ptr + a64[:, None] * stride_sa + offs_r[None, :] * stride_si, mask=out_mask, other=0.0)
        tl.store(g_rows + offs_r[None, :], h * s.to(tl.float32), mask=out_mask)
    else:
        a_lo = tl.min(tl.where(active, adapter, _BIG), axis=0)
        a_hi = tl.max(tl.where(active, adapter, -1), axis=0)
        if a_lo == a_hi:  # one adapter in the block: g = h Sigma^T, loaded transposed as [j, i]
            s_t = tl.load(
                sigma_ptr + a_lo.to(tl.int64) * stride_sa + offs_r[:, None] * stride_sj + offs_r[None, :] * stride_si,
                mask=r_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            g = tl.dot(h, s_t.to(tl.float32), input_precision=PRECISION)
            tl.store(g_rows + offs_r[None, :], g, mask=out_mask)
        else:  # several adapters: gather each token's Sigma, SIGMA_ROWS rows at a time
            for i0 in tl.static_range(0, BLOCK_R, SIGMA_ROWS):
                offs_i = i0 + tl.arange(0, SIGMA_ROWS)
                i_mask = offs_i < r
                s3 = tl.load(
                    sigma_ptr
                    + a64[:, None, None] * stride_sa
                    + offs_i[None, :, None] * stride_si
                    + offs_r[None, None, :] * stride_sj,
                    mask=active[:, None, None] & i_mask[None, :, None] & r_mask[None, None, :],
                    other=0.0,
                )
                g_i = tl.sum(s3.to(tl.float32) * h[:, None, :], axis=2)
                tl.store(g_rows + offs_i[None, :], g_i, mask=active[:, None] & i_mask[None, :])


@triton.jit
def jd_shrink_sigma_kernel(
    x_ptr,
    v_ptr,
    sigma_ptr,
    cluster_of_ptr,
    order_ptr,
    sorted_adapter_ptr,
    partial_ptr,
    g_ptr,
    counter_ptr,
    T,
    d_in,
    r,
    split_k,
    k_per_split,
    stride_xt,
    stride_xd,
    stride_vc,
    stride_vd,
    stride_vr,
    stride_sa,
    stride_si,
    stride_sj,
    stride_ws,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT: tl.constexpr,
    SIGMA_DIAG: tl.constexpr,
    SIGMA_ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    in_batch = offs_m < T
    adapter = tl.load(sorted_adapter_ptr + offs_m, mask=in_batch, other=-1)
    cluster = tl.load(cluster_of_ptr + adapter, mask=adapter >= 0, other=-1).to(tl.int32)
    active = cluster >= 0
    if tl.max(active.to(tl.int32), axis=0) > 0:  # else: nothing to do (whole block unadapted here)
        token = tl.load(order_ptr + offs_m, mask=in_batch, other=0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < r
        offs_k = tl.arange(0, BLOCK_K)
        c_lo = tl.min(tl.where(active, cluster, _BIG), axis=0)
        c_hi = tl.max(cluster, axis=0)
        k_start = pid_k * k_per_split
        k_end = tl.minimum(k_start + k_per_split, d_in)
        n_k = tl.cdiv(k_end - k_start, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        x_rows = x_ptr + token[:, None] * stride_xt
        for it in range(0, (c_hi - c_lo + 1) * n_k):  # (cluster, K chunk) pairs, one flat loop
            c = c_lo + it // n_k
            kk = k_start + (it % n_k) * BLOCK_K + offs_k
            k_mask = kk < k_end
            rows = active & (cluster == c)
            xb = tl.load(x_rows + kk[None, :] * stride_xd, mask=rows[:, None] & k_mask[None, :], other=0.0)
            vb = tl.load(
                v_ptr + c.to(tl.int64) * stride_vc + kk[:, None] * stride_vd + offs_r[None, :] * stride_vr,
                mask=k_mask[:, None] & r_mask[None, :],
                other=0.0,
            )
            acc += tl.dot(xb, vb, input_precision=PRECISION)
        if SPLIT:
            ws = partial_ptr + offs_m.to(tl.int64)[:, None] * stride_ws + offs_r[None, :]
            ws_mask = active[:, None] & r_mask[None, :]
            tl.atomic_add(ws, acc, mask=ws_mask, sem="relaxed")
            tl.debug_barrier()  # every thread's adds precede the release below
            arrived = tl.atomic_add(counter_ptr + pid_m, 1, sem="acq_rel")
            if arrived == split_k - 1:  # last of the block: the sum is complete
                h = tl.load(ws, mask=ws_mask, other=0.0, cache_modifier=".cg")
                tl.store(ws, tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), mask=ws_mask)
                tl.atomic_xchg(counter_ptr + pid_m, 0)
                _apply_sigma_store(
                    h, adapter, active, offs_m, offs_r, r, sigma_ptr, stride_sa, stride_si, stride_sj,
                    g_ptr, stride_ws, BLOCK_M, BLOCK_R, SIGMA_DIAG, SIGMA_ROWS, PRECISION,
                )
        else:
            _apply_sigma_store(
                acc, adapter, active, offs_m, offs_r, r, sigma_ptr, stride_sa, stride_si, stride_sj,
                g_ptr, stride_ws, BLOCK_M, BLOCK_R, SIGMA_DIAG, SIGMA_ROWS, PRECISION,
            )


def launch_shrink_sigma(x, V, sigma, cluster_of, batch, partial, g, counters, *, config) -> None:
    """Launch :func:`jd_shrink_sigma_kernel`: ``g[m] = Sigma[a] V[c]^T x[order[m]]`` (float32)."""
    T, d_in = x.shape
    r = V.shape[2]
    block_m, block_k = config.block_m, config.block_k
    block_r = max(16, triton.next_power_of_2(r))
    m_blocks = triton.cdiv(T, block_m)
    split_k = max(1, min(config.split_k(m_blocks, d_in), triton.cdiv(d_in, block_k)))
    k_per_split = triton.cdiv(triton.cdiv(d_in, split_k), block_k) * block_k
    split_k = triton.cdiv(d_in, k_per_split)  # no empty slice: every program arrives at the counter
    diag = sigma.dim() == 2
    sigma_rows = max(1, min(block_r, config.sigma_elems // (block_m * block_r)))
    jd_shrink_sigma_kernel[(m_blocks, split_k)](
        x, V, sigma, cluster_of, batch.order, batch.sorted_adapter, partial, g, counters,
        T, d_in, r, split_k, k_per_split,
        x.stride(0), x.stride(1), V.stride(0), V.stride(1), V.stride(2),
        sigma.stride(0), sigma.stride(1), 0 if diag else sigma.stride(2),
        partial.stride(0),
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, SPLIT=split_k > 1,
        SIGMA_DIAG=diag, SIGMA_ROWS=sigma_rows,
        PRECISION="ieee" if x.dtype.itemsize == 4 else "tf32",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
