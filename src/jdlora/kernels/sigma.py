"""Triton kernel: apply each token's Sigma to its shrunk vector (launch 2 of 3).

Math, with ``a = sorted_adapter[m // S]`` and ``h`` from :mod:`~jdlora.kernels.shrink`::

    g[m] = Sigma[a] h[m]          JD-Full: r x r;  JD-Diag: g[m] = sigma[a] * h[m] elementwise

in float32, into ``g [T, w]`` (rows in adapter order); the rows of ``h`` it reads are set back to zero
(after a barrier: several threads hold copies of each element), so the scratch is clean for the next
layer without a memset launch. Rows with ``a < 0`` are not touched; rows whose adapter has no cluster
in this module hold ``h = 0`` (the shrink skipped them), get ``g = 0``, and the expand skips them, so
this kernel needs no ``cluster_of`` lookup (one dependent load less).

Grid: ``(cdiv(T, BLOCK_M),)``. A decode step uses ``BLOCK_M = 1``: one program per token loads that
token's whole Sigma (``SIGMA_ROWS`` rows at a time: all of it up to r = 64) in one go, so the latency of
the step is one round trip however many distinct adapters the batch holds. Prefill uses ``BLOCK_M >= 16``: a block whose tokens
share one adapter (a run) loads Sigma once and does one ``[BLOCK_M, r] x [r, r]`` dot; a block
straddling adapters gathers each token's Sigma, ``SIGMA_ROWS`` rows at a time.

``jd_sigma_siblings_kernel``: the same for up to three siblings (grid ``(cdiv(T, BLOCK_M), siblings)``, sibling
s's Sigma bank, ``h[s]`` and ``g[s]`` of ``[S, T, w]`` scratch), after ``jd_shrink_siblings_kernel``.

Memory traffic: ``h`` read and zeroed, ``g`` written (``T * r`` float32 each), and Sigma[a] read once
per program holding adapter a: once per token in decode (the floor: each distinct adapter's Sigma once,
plus L2 hits for repeats), once per run block in prefill.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fast_launch import FastLauncher
from .sizes import block_rank, cdiv

_BIG = tl.constexpr(2147483647)


@triton.jit
def _sigma_block(
    pid_m, h_ptr, g_ptr, sigma_ptr, sorted_adapter_ptr, T, tpr, r, stride_h, stride_sa, stride_si, stride_sj,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, SIGMA_DIAG: tl.constexpr, SIGMA_ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Program pid_m of the Sigma launch (one token in decode, BLOCK_M tokens in prefill)."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < r
    if BLOCK_M == 1:  # decode: one token per program, its whole Sigma loaded at once
        a = tl.load(sorted_adapter_ptr + pid_m // tpr)
        if a >= 0:
            row = pid_m.to(tl.int64) * stride_h
            h = tl.load(h_ptr + row + offs_r, mask=r_mask, other=0.0)
            s_row = sigma_ptr + a.to(tl.int64) * stride_sa
            if SIGMA_DIAG:
                s = tl.load(s_row + offs_r * stride_si, mask=r_mask, other=0.0)
                tl.store(g_ptr + row + offs_r, h * s.to(tl.float32), mask=r_mask)
            else:
                for i0 in range(0, r, SIGMA_ROWS):
                    offs_i = i0 + tl.arange(0, SIGMA_ROWS)
                    i_mask = offs_i < r
                    s2 = tl.load(s_row + offs_i[:, None] * stride_si + offs_r[None, :] * stride_sj,
                                 mask=i_mask[:, None] & r_mask[None, :], other=0.0)
                    tl.store(g_ptr + row + offs_i, tl.sum(s2.to(tl.float32) * h[None, :], axis=1), mask=i_mask)
            tl.debug_barrier()  # every thread has read h (threads hold copies) before it is zeroed
            tl.store(h_ptr + row + offs_r, tl.zeros((BLOCK_R,), dtype=tl.float32), mask=r_mask)
    else:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        adapter = tl.load(sorted_adapter_ptr + offs_m // tpr, mask=offs_m < T, other=-1)
        active = adapter >= 0  # rows of adapters without a cluster here hold h = 0: g = 0, never read
        if tl.max(active.to(tl.int32), axis=0) > 0:
            row = offs_m.to(tl.int64)[:, None] * stride_h
            mask = active[:, None] & r_mask[None, :]
            h = tl.load(h_ptr + row + offs_r[None, :], mask=mask, other=0.0)
            a64 = tl.where(active, adapter, 0).to(tl.int64)
            if SIGMA_DIAG:
                s = tl.load(sigma_ptr + a64[:, None] * stride_sa + offs_r[None, :] * stride_si, mask=mask, other=0.0)
                tl.store(g_ptr + row + offs_r[None, :], h * s.to(tl.float32), mask=mask)
            else:
                if BLOCK_M >= 16:  # tl.dot needs 16 rows
                    a_lo = tl.min(tl.where(active, adapter, _BIG), axis=0)
                    a_hi = tl.max(tl.where(active, adapter, -1), axis=0)
                    if a_lo == a_hi:  # a run of one adapter: g = h Sigma^T, one dot
                        s_t = tl.load(  # Sigma^T as [j, i]
                            sigma_ptr + a_lo.to(tl.int64) * stride_sa + offs_r[:, None] * stride_sj
                            + offs_r[None, :] * stride_si,
                            mask=r_mask[:, None] & r_mask[None, :],
                            other=0.0,
                        )
                        g = tl.dot(h, s_t.to(tl.float32), input_precision=PRECISION)
                        tl.store(g_ptr + row + offs_r[None, :], g, mask=mask)
                    else:
                        _sigma_gather(h, a64, active, offs_r, r, sigma_ptr, stride_sa, stride_si, stride_sj, g_ptr,
                                      row, SIGMA_ROWS)
                else:
                    _sigma_gather(h, a64, active, offs_r, r, sigma_ptr, stride_sa, stride_si, stride_sj, g_ptr, row,
                                  SIGMA_ROWS)
            tl.debug_barrier()  # every thread has read h (threads hold copies) before it is zeroed
            tl.store(h_ptr + row + offs_r[None, :], tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32), mask=mask)


@triton.jit
def jd_sigma_kernel(
    h_ptr,
    g_ptr,
    sigma_ptr,
    sorted_adapter_ptr,
    T,
    tpr,
    r,
    stride_h,
    stride_sa,
    stride_si,
    stride_sj,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SIGMA_DIAG: tl.constexpr,
    SIGMA_ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    _sigma_block(tl.program_id(0), h_ptr, g_ptr, sigma_ptr, sorted_adapter_ptr, T, tpr, r, stride_h, stride_sa,
                 stride_si, stride_sj, BLOCK_M, BLOCK_R, SIGMA_DIAG, SIGMA_ROWS, PRECISION)


@triton.jit
def jd_sigma_siblings_kernel(
    h_ptr,
    g_ptr,
    sigma0_ptr,
    sigma1_ptr,
    sigma2_ptr,
    sorted_adapter_ptr,
    T,
    tpr,
    r,
    stride_hs,
    stride_h,
    stride_sa,
    stride_si,
    stride_sj,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SIGMA_DIAG: tl.constexpr,
    SIGMA_ROWS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Sigma for up to three siblings: program (i, s) is program i of :func:`jd_sigma_kernel` for sibling s
    (its Sigma bank; ``h[s]``, ``g[s]`` of stacked ``[S, T, w]`` scratch)."""
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    off = pid_s.to(tl.int64) * stride_hs
    if pid_s == 0:
        _sigma_block(pid_m, h_ptr + off, g_ptr + off, sigma0_ptr, sorted_adapter_ptr, T, tpr, r, stride_h, stride_sa,
                     stride_si, stride_sj, BLOCK_M, BLOCK_R, SIGMA_DIAG, SIGMA_ROWS, PRECISION)
    elif pid_s == 1:
        _sigma_block(pid_m, h_ptr + off, g_ptr + off, sigma1_ptr, sorted_adapter_ptr, T, tpr, r, stride_h, stride_sa,
                     stride_si, stride_sj, BLOCK_M, BLOCK_R, SIGMA_DIAG, SIGMA_ROWS, PRECISION)
    else:
        _sigma_block(pid_m, h_ptr + off, g_ptr + off, sigma2_ptr, sorted_adapter_ptr, T, tpr, r, stride_h, stride_sa,
                     stride_si, stride_sj, BLOCK_M, BLOCK_R, SIGMA_DIAG, SIGMA_ROWS, PRECISION)


@triton.jit
def _sigma_gather(h, a64, active, offs_r, r, sigma_ptr, stride_sa, stride_si, stride_sj, g_ptr, row,
                  SIGMA_ROWS: tl.constexpr):
    """Each token its own Sigma: gather SIGMA_ROWS rows of every token's Sigma at a time."""
    r_mask = offs_r < r
    for i0 in range(0, r, SIGMA_ROWS):
        offs_i = i0 + tl.arange(0, SIGMA_ROWS)
        i_mask = offs_i < r
        s3 = tl.load(
            sigma_ptr + a64[:, None, None] * stride_sa + offs_i[None, :, None] * stride_si
            + offs_r[None, None, :] * stride_sj,
            mask=active[:, None, None] & i_mask[None, :, None] & r_mask[None, None, :],
            other=0.0,
        )
        g_i = tl.sum(s3.to(tl.float32) * h[:, None, :], axis=2)
        tl.store(g_ptr + row + offs_i[None, :], g_i, mask=active[:, None] & i_mask[None, :])


_sigma_launch = FastLauncher(jd_sigma_kernel)  # kernel[grid](...) with less host work per call


def launch_sigma(h, g, sigma, batch, *, exact: bool, config) -> None:
    """Launch :func:`jd_sigma_kernel`: ``g[m] = Sigma[a] h[m]``, then ``h[m] = 0``.

    ``exact``: float32 products in full precision (for float32 inputs), else tf32.
    """
    T = batch.num_tokens
    r = sigma.shape[1]
    diag = sigma.dim() == 2
    _sigma_launch(
        (cdiv(T, config.block_m),), h, g, sigma, batch.sorted_adapter,
        T, batch.tokens_per_row, r, h.stride(0), sigma.stride(0), sigma.stride(1), 0 if diag else sigma.stride(2),
        **_sigma_options(r, diag, exact, config),
    )


def _sigma_options(r: int, diag: bool, exact: bool, config) -> dict:
    """The constexprs and launch options of a Sigma launch (one module's or the siblings')."""
    block_r = block_rank(r)
    return dict(BLOCK_M=config.block_m, BLOCK_R=block_r, SIGMA_DIAG=diag,
                SIGMA_ROWS=max(1, min(block_r, config.sigma_elems // (config.block_m * block_r))),
                PRECISION="ieee" if exact else "tf32", num_warps=config.num_warps)


_siblings_launch = FastLauncher(jd_sigma_siblings_kernel)


def launch_sigma_siblings(h, g, sigmas, batch, *, exact: bool, config) -> None:
    """Launch :func:`jd_sigma_siblings_kernel`: ``g[s, m] = Sigma_s[a] h[s, m]``, then ``h[s, m] = 0``.

    ``h``, ``g``: ``[len(sigmas), T, w]`` with the same strides; ``sigmas``: 1 to 3 banks of one shape kind,
    dtype and strides (the caller checks).
    """
    T = batch.num_tokens
    s0 = sigmas[0]
    r = s0.shape[1]
    diag = s0.dim() == 2
    sp = tuple(sigmas) + (s0,) * (3 - len(sigmas))
    _siblings_launch(
        (cdiv(T, config.block_m), len(sigmas)), h, g, *sp, batch.sorted_adapter,
        T, batch.tokens_per_row, r, h.stride(0), h.stride(1), s0.stride(0), s0.stride(1), 0 if diag else s0.stride(2),
        **_sigma_options(r, diag, exact, config),
    )
