#!/usr/bin/env python
"""Speed of the JD-LoRA mixed-batch kernels against standard multi-LoRA (issue 5). Not a test.

One adapted linear, bf16, d_in 4096, d_out 4096 and 1024; tokens 1, 16, 64, 256 (decode: each token
draws its adapter, shuffled) and 1024, 4096 (prefill: runs of tokens per adapter); D distinct
adapters in the batch, D in 1, 8, 64, 256 (D <= T). Rows, per shape:

- ``base``: the base GEMM alone, ``y = x W^T`` (the cost to stay close to);
- ``peft``: PEFT's LoRA mixed-batch path at rank 16 (``peft.tuners.lora.Linear`` called with
  ``adapter_names``: a Python loop over the adapters in the batch), eager when its list indexing
  cannot be captured in a CUDA graph; ``peft-loop``: the same loop with the index tensors prepared
  on the device, captured;
- ``bgmv``: a gathered per-token LoRA kernel of Punica's bgmv kind at rank 16 (vLLM's Triton LoRA
  ops when ``vllm`` is importable, else the Triton kernels below: zero a float32 buffer, split-K
  shrink with atomic adds, expand; one program per token);
- ``sgmv``: segment-grouped rank-16 LoRA, run as our own kernels with one cluster per adapter and
  ``Sigma = scaling * I`` (tokens sorted by adapter, tensor-core tiles per segment);
- ``jd-*``: ``jd_lora_forward`` (Triton), rank 16 and 64, full and diagonal Sigma, 1 and 8 clusters;
  ``ref-*``: the same through the torch reference; ``base+jd-*``: base GEMM then JD in one graph;
  ``base+jd-ovl-*``: ``jd_lora_linear`` (shrink and Sigma on a side stream beside the base GEMM,
  then the expand);
- ``floor-*``: the JD bandwidth floor: x once, y read and written, the bases of the clusters present
  and the Sigma of the adapters present, over the measured device-to-device copy bandwidth.

Timing (METHOD.md): every op is captured in a CUDA graph, several copies of it each on its own set
of inputs (so that the sets together exceed the 60 MB L2 several times: no op reads warm weights
left by the previous one), and the graph replayed many times; the time is the median replay over
the number of copies. ``prepare_batch`` runs once per forward, outside the timed op.

Usage::

    PYTHONPATH=src python benchmarks/kernels.py --json $OUT/kernels.json      # everything (H200)
    PYTHONPATH=src python benchmarks/kernels.py --sweep                        # configuration sweep
    TRITON_INTERPRET=1 python benchmarks/kernels.py --smoke                    # CPU: the code runs
    PYTHONPATH=src python benchmarks/kernels.py --qkv --json $OUT/qkv.json     # eager q, k, v: fusion on/off
    JDLORA_KERNELS=triton TRITON_INTERPRET=1 python benchmarks/kernels.py --qkv --smoke   # CPU: the code runs
    PYTHONPATH=src python benchmarks/kernels.py --siblings --json $OUT/siblings.json   # q, k, v JD in a graph

``--qkv``: the host cost of one eager mixed-batch forward of q, k and v (with and without launch replays; Mistral-7B shapes: 4096 -> 4096,
1024, 1024) through jdlora's PEFT tuner layers (``JDLoraLayer.forward`` with a ``MixedBatch``), with the
siblings fused (one shrink, one Sigma and one expand launch for the three: 3 launches) and not (9), beside
the three base linears alone; see :func:`eager_qkv`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

from jdlora.kernels import jd_lora_forward, jd_lora_linear, prepare_batch

D_IN = 4096
D_OUTS = (4096, 1024)
TOKENS = (1, 16, 64, 256, 1024, 4096)
PREFILL_FROM = 1024
DISTINCT = (1, 8, 64, 256)
LORA_RANK = 16
JD_VARIANTS = [(r, kind, C) for r in (16, 64) for kind in ("full", "diag") for C in (1, 8)]
WORKING_SET = 240e6  # bytes all copies of an op's inputs should span (4x the H200's L2)
MAX_COPIES = 64
DTYPE = torch.bfloat16
# configuration sweep: (T, D, d_out, r, sigma kind, clusters)
SWEEP_SHAPES = [(64, 64, 4096, 64, "full", 1), (64, 64, 4096, 64, "full", 8), (256, 256, 4096, 16, "full", 8),
                (4096, 64, 4096, 64, "full", 8)]


# ------------------------------------------------------------------------- bgmv baseline (Punica)

if triton is not None:

    @triton.jit
    def bgmv_shrink_kernel(x_ptr, a_ptr, ta_ptr, h_ptr, d_in, r, k_per_split, s_xt, s_an, s_ar, s_ak,
                           BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """h[t] += A[a_t][:, k-slice] x[t, k-slice]; one program per (token, K slice)."""
        t = tl.program_id(0)
        ks = tl.program_id(1)
        a = tl.load(ta_ptr + t)
        if a >= 0:
            offs_r = tl.arange(0, BLOCK_R)
            offs_k = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
            k_start = ks * k_per_split
            for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
                kk = k0 + offs_k
                km = kk < d_in
                xk = tl.load(x_ptr + t.to(tl.int64) * s_xt + kk, mask=km, other=0.0)
                ak = tl.load(a_ptr + a.to(tl.int64) * s_an + offs_r[:, None] * s_ar + kk[None, :] * s_ak,
                             mask=(offs_r[:, None] < r) & km[None, :], other=0.0)
                acc += ak.to(tl.float32) * xk.to(tl.float32)[None, :]
            tl.atomic_add(h_ptr + t * r + offs_r, tl.sum(acc, axis=1), mask=offs_r < r, sem="relaxed")

    @triton.jit
    def bgmv_expand_kernel(y_ptr, b_ptr, ta_ptr, h_ptr, d_out, r, scale, s_yt, s_bn, s_bo, s_br,
                           BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
        """y[t, n-tile] += scale * B[a_t][n-tile, :] h[t]; one program per (token, column tile)."""
        t = tl.program_id(0)
        pn = tl.program_id(1)
        a = tl.load(ta_ptr + t)
        if a >= 0:
            offs_r = tl.arange(0, BLOCK_R)
            offs_n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
            nm = offs_n < d_out
            h = tl.load(h_ptr + t * r + offs_r, mask=offs_r < r, other=0.0)
            h = h.to(b_ptr.dtype.element_ty).to(tl.float32)
            b = tl.load(b_ptr + a.to(tl.int64) * s_bn + offs_n[:, None] * s_bo + offs_r[None, :] * s_br,
                        mask=nm[:, None] & (offs_r[None, :] < r), other=0.0)
            out = tl.sum(b.to(tl.float32) * h[None, :], axis=1)
            yp = y_ptr + t.to(tl.int64) * s_yt + offs_n
            y_old = tl.load(yp, mask=nm, other=0.0)
            tl.store(yp, (y_old.to(tl.float32) + scale * out).to(y_old.dtype), mask=nm)


def bgmv_lora(y, x, A, B, token_adapter, scale, *, block_k=256, block_n=128, programs=264):
    """Punica-style bgmv: y[t] += scale * B[a] A[a] x[t]. A [n, r, d_in], B [n, d_out, r]."""
    T, d_in = x.shape
    r = A.shape[1]
    h = torch.zeros(T, r, dtype=torch.float32, device=x.device)
    split = max(1, min(programs // max(T, 1), triton.cdiv(d_in, block_k)))
    k_per = triton.cdiv(triton.cdiv(d_in, split), block_k) * block_k
    split = triton.cdiv(d_in, k_per)
    br = max(16, triton.next_power_of_2(r))
    bgmv_shrink_kernel[(T, split)](x, A, token_adapter, h, d_in, r, k_per, x.stride(0), A.stride(0), A.stride(1),
                                   A.stride(2), BLOCK_R=br, BLOCK_K=block_k)
    bgmv_expand_kernel[(T, triton.cdiv(y.shape[1], block_n))](y, B, token_adapter, h, y.shape[1], r, float(scale),
                                                              y.stride(0), B.stride(0), B.stride(1), B.stride(2),
                                                              BLOCK_R=br, BLOCK_N=block_n)
    return y


def vllm_available() -> bool:
    try:
        import vllm.lora.ops.triton_ops  # noqa: F401
    except Exception:
        return False
    return True


# ----------------------------------------------------------------------------------------- timing


def time_graph(ops, replays: int, device) -> float:
    """Median seconds per op: all ``ops`` captured in one CUDA graph, replayed ``replays`` times."""
    if device.type != "cuda":  # smoke mode: run once, time on the host
        t0 = time.perf_counter()
        for op in ops:
            op()
        return (time.perf_counter() - t0) / len(ops)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for op in ops:
            op()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for op in ops:
            op()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) / 1e3)
    del g
    return statistics.median(times) / len(ops)


def mean_host_seconds(op, calls: int, device, warmup: int) -> float:
    """Mean wall seconds per call of ``op`` over ``calls`` calls with no synchronization between them (after
    ``warmup`` calls): the host's cost per call whenever the host, not the GPU, is the bottleneck."""
    for _ in range(warmup):
        op()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        op()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls


def time_eager(ops, replays: int, device) -> float:
    """Median seconds per op, eager (for code that a CUDA graph cannot capture)."""
    for op in ops:
        op()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for i in range(replays):
        op = ops[i % len(ops)]
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            op()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copies_for(bytes_per_copy: float) -> int:
    return max(2, min(MAX_COPIES, math.ceil(WORKING_SET / max(bytes_per_copy, 1))))


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (1 GiB buffers)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(2**28, device=device)  # 1 GiB
    b = torch.empty_like(a)
    t = time_graph([lambda: b.copy_(a)] * 5, 20, device)
    return 2 * a.numel() * a.element_size() / t


def launch_floor(device) -> float:
    """Seconds per launch of an empty Triton kernel inside a CUDA graph (the cost of one launch)."""
    if device.type != "cuda":
        return float("nan")

    @triton.jit
    def _empty(p):
        pass

    buf = torch.empty(1, device=device)
    return time_graph([lambda: _empty[(1,)](buf)] * 100, 50, device)


# -------------------------------------------------------------------------------------- problems


def token_adapters(T: int, D: int, device) -> torch.Tensor:
    ids = torch.arange(T, device=device) % D
    if T < PREFILL_FROM:  # decode: each request its own adapter, in arbitrary order
        return ids[torch.randperm(T, device=device)]
    return ids.sort().values  # prefill: runs of T / D tokens


def jd_floor_bytes(T, d_out, r, kind, C_present, D, itemsize=2) -> int:
    sig = r * r if kind == "full" else r
    return itemsize * (T * D_IN + 2 * T * d_out + C_present * (D_IN + d_out) * r + D * sig)


def random_rows(T, d, k, device) -> list:
    """``k`` random ``[T, d]`` inputs or outputs (one per copy of an op in a timed graph)."""
    return [torch.randn(T, d, device=device, dtype=DTYPE) for _ in range(k)]


def make_jd(T, d_out, D, r, kind, C, device):
    U = torch.randn(C, d_out, r, device=device, dtype=DTYPE) / r**0.5
    V = torch.randn(C, D_IN, r, device=device, dtype=DTYPE) / D_IN**0.5
    sigma = torch.randn(*((D, r, r) if kind == "full" else (D, r)), device=device, dtype=DTYPE)
    cluster_of = torch.randperm(max(C, D), device=device)[:D] % C  # every cluster used when D >= C
    return U, V, sigma, cluster_of


def bench_shape(d_out, T, D, device, replays, results, variants=JD_VARIANTS, peft_ok=True, baselines=True):
    """Every row for one (d_out, T, D); ``baselines=False``: only base, JD and base + JD."""
    row = dict(d_in=D_IN, d_out=d_out, tokens=T, distinct=D)
    x_bytes, y_bytes = 2 * T * D_IN, 2 * T * d_out
    ta = token_adapters(T, D, device)

    # base GEMM
    k = copies_for(2 * d_out * D_IN + x_bytes + y_bytes)
    W = [torch.randn(d_out, D_IN, device=device, dtype=DTYPE) / D_IN**0.5 for _ in range(k)]
    X, Y = random_rows(T, D_IN, k, device), random_rows(T, d_out, k, device)
    row["base"] = time_graph([lambda i=i: torch.matmul(X[i], W[i].t(), out=Y[i]) for i in range(k)], replays, device)

    if baselines:
        bench_baselines(row, d_out, T, D, ta, device, replays, peft_ok)
    bench_jd(row, d_out, T, D, ta, device, replays, variants, references=baselines)
    results.append(row)
    return row


def bench_baselines(row, d_out, T, D, ta, device, replays, peft_ok):
    """Standard multi-LoRA at rank 16: bgmv, sgmv, PEFT's loop (captured) and PEFT itself."""
    x_bytes, y_bytes = 2 * T * D_IN, 2 * T * d_out

    r = LORA_RANK
    k = copies_for(2 * D * r * (D_IN + d_out) + x_bytes + y_bytes)
    A = [torch.randn(D, r, D_IN, device=device, dtype=DTYPE) / D_IN**0.5 for _ in range(k)]
    B = [torch.randn(D, d_out, r, device=device, dtype=DTYPE) / r**0.5 for _ in range(k)]
    X, Y = random_rows(T, D_IN, k, device), random_rows(T, d_out, k, device)
    tas = ta.to(torch.int32)
    if triton is not None and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        row["bgmv"] = time_graph([lambda i=i: bgmv_lora(Y[i], X[i], A[i], B[i], tas, 2.0) for i in range(k)],
                                 replays, device)
        batch = prepare_batch(ta)
        eye = torch.full((D, r), 2.0, device=device, dtype=DTYPE)
        own = torch.arange(D, device=device)
        row["sgmv"] = time_graph(
            [lambda i=i: jd_lora_forward(Y[i], X[i], B[i], A[i].transpose(1, 2), eye, own, batch, backend="triton")
             for i in range(k)], replays, device)
    # PEFT's loop over adapters, with the indices on the device (capturable)
    idx = [(ta == a).nonzero().squeeze(1) for a in range(D)]
    k_loop = min(k, 4)

    def peft_loop(i):
        for a in range(D):
            sub = X[i][idx[a]]
            out = (sub @ A[i][a].t()) @ B[i][a].t() * 2.0
            Y[i].index_add_(0, idx[a], out.to(Y[i].dtype))

    row["peft-loop"] = time_graph([lambda i=i: peft_loop(i) for i in range(k_loop)], max(5, replays // 4), device)
    if peft_ok:
        row.update(bench_peft(A[0], B[0], X, ta, d_out, device, replays))


def bench_jd(row, d_out, T, D, ta, device, replays, variants, references=True):
    """JD through the kernels (and the torch reference); base + JD serial and overlapped (rank 64, full)."""

    for r, kind, C in variants:
        name = f"r{r}-{kind}-c{C}"
        C_present = min(C, D)
        fb = jd_floor_bytes(T, d_out, r, kind, C_present, D)
        row[f"floor-bytes-{name}"] = fb
        k = copies_for(fb)
        probs = [make_jd(T, d_out, D, r, kind, C, device) for _ in range(k)]
        batches = [prepare_batch(ta) for _ in range(k)]
        X, Y = random_rows(T, D_IN, k, device), random_rows(T, d_out, k, device)
        row[f"jd-{name}"] = time_graph(
            [lambda i=i: jd_lora_forward(Y[i], X[i], *probs[i], batches[i], backend="triton") for i in range(k)],
            replays, device)
        if references:
            kr = min(k, 4)
            row[f"ref-{name}"] = time_graph(
                [lambda i=i: jd_lora_forward(Y[i], X[i], *probs[i], batches[i], backend="torch") for i in range(kr)],
                max(5, replays // 4), device)
        if r == 64 and kind == "full":
            k2 = copies_for(fb + 2 * d_out * D_IN)
            W2 = [torch.randn(d_out, D_IN, device=device, dtype=DTYPE) / D_IN**0.5 for _ in range(k2)]
            probs2 = probs[:k2] + [make_jd(T, d_out, D, r, kind, C, device) for _ in range(k2 - len(probs[:k2]))]
            b2 = [prepare_batch(ta) for _ in range(k2)]
            X2, Y2 = random_rows(T, D_IN, k2, device), random_rows(T, d_out, k2, device)

            def both(i):
                torch.matmul(X2[i], W2[i].t(), out=Y2[i])
                jd_lora_forward(Y2[i], X2[i], *probs2[i], b2[i], backend="triton")

            row[f"base+jd-{name}"] = time_graph([lambda i=i: both(i) for i in range(k2)], replays, device)
            row[f"base+jd-ovl-{name}"] = time_graph(
                [lambda i=i: jd_lora_linear(X2[i], W2[i], None, *probs2[i], b2[i], backend="triton") for i in range(k2)],
                replays, device)
            del W2, probs2, b2, X2, Y2
        del probs, batches, X, Y


def bench_peft(A, B, X, ta, d_out, device, replays) -> dict:
    """PEFT's own mixed-batch forward (``adapter_names``) on one LoRA-wrapped Linear."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return {}
    D = A.shape[0]

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D_IN, d_out, bias=False, device=device, dtype=DTYPE)

        def forward(self, x, **kw):
            return self.proj(x)

    cfg = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=["proj"])
    model = get_peft_model(M(), cfg, adapter_name="a0")
    for a in range(1, D):
        model.add_adapter(f"a{a}", cfg)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for a in range(D):
            layer.lora_A[f"a{a}"].weight.copy_(A[a])
            layer.lora_B[f"a{a}"].weight.copy_(B[a])
    names = [f"a{a}" for a in ta.tolist()]
    out = {}
    with torch.no_grad():
        ops = [lambda i=i: layer(X[i], adapter_names=names) for i in range(min(len(X), 2))]
        try:
            out["peft"] = time_graph(ops, max(5, replays // 4), device)
            out["peft-mode"] = "graph"
        except Exception as e:  # list indexing copies host data: not capturable
            torch.cuda.synchronize() if device.type == "cuda" else None
            out["peft"] = time_eager(ops, max(5, replays // 4), device)
            out["peft-mode"] = f"eager ({type(e).__name__})"
    del model, layer
    return out


# ----------------------------------------------------------------------------------------- sweep


def sweep(device, replays, results):
    """Decode and prefill configuration candidates at the issue's target shape and at prefill."""
    from jdlora.kernels import launch as L

    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    for T, D, d_out, r, kind, C in SWEEP_SHAPES:
        decode = T <= L.DECODE_MAX_TOKENS
        if decode:
            shrinks = [L.ShrinkConfig(block_m=16, block_k=bk, programs=pps * sms, num_warps=nw)
                       for bk in (64, 128, 256) for pps in (1, 2, 4) for nw in (4,)]
            sigmas = [L.SigmaConfig(block_m=bm, num_warps=nw) for bm in (1, 2, 4) for nw in (2, 4)]
            expands = [L.ExpandConfig(block_m=16, block_n=bn, num_warps=nw) for bn in (32, 64, 128) for nw in (4,)]
        else:
            shrinks = [L.ShrinkConfig(block_m=bm, block_k=bk, programs=2 * sms, num_warps=nw, num_stages=4)
                       for bm in (32, 64, 128) for bk in (32, 64) for nw in (4, 8)]
            sigmas = [L.SigmaConfig(block_m=bm, num_warps=nw) for bm in (16, 32) for nw in (4, 8)]
            expands = [L.ExpandConfig(block_m=bm, block_n=bn, num_warps=nw)
                       for bm in (32, 64, 128) for bn in (64, 128) for nw in (4, 8)]
        ta = token_adapters(T, D, device)
        k = copies_for(jd_floor_bytes(T, d_out, r, kind, min(C, D), D))
        probs = [make_jd(T, d_out, D, r, kind, C, device) for _ in range(k)]
        batches = [prepare_batch(ta) for _ in range(k)]
        X = [torch.randn(T, D_IN, device=device, dtype=DTYPE) for _ in range(k)]
        Y = [torch.randn(T, d_out, device=device, dtype=DTYPE) for _ in range(k)]
        default = L.pick_configs(T, D_IN, device)
        for stage, (tag, cands) in enumerate((("shrink", shrinks), ("sigma", sigmas), ("expand", expands))):
            for cfg in cands:
                cfgs = tuple(cfg if j == stage else default[j] for j in range(3))
                try:
                    t = time_graph([lambda i=i: L.jd_lora_forward_triton(Y[i], X[i], *probs[i], batches[i], configs=cfgs)
                                    for i in range(k)], replays, device)
                except Exception as e:  # e.g. out of shared memory
                    t = float("nan")
                    print("config failed", cfg, type(e).__name__, str(e)[:100], file=sys.stderr)
                results.append(dict(T=T, D=D, d_out=d_out, r=r, kind=kind, C=C, stage=tag, config=cfg.__dict__, seconds=t))
                print(f"sweep T={T} D={D} d_out={d_out} r{r}-{kind}-c{C} {tag} {cfg.__dict__}: {t*1e6:.2f} us", flush=True)


# ------------------------------------------------------------------------------------------ main


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write all results here")
    p.add_argument("--replays", type=int, default=40)
    p.add_argument("--sweep", action="store_true", help="configuration sweep only")
    p.add_argument("--smoke", action="store_true", help="tiny run on any device (checks the code runs)")
    p.add_argument("--linear", action="store_true",
                   help="only base, JD r64 full and base + JD (serial and overlapped): the layer-level comparison")
    p.add_argument("--host", action="store_true",
                   help="eager wall time per call, and a profile of the host side of jd_lora_forward (cProfile)")
    p.add_argument("--once", action="store_true", help="run the issue's target shape a few times, eagerly (for ncu)")
    p.add_argument("--qkv", action="store_true",
                   help="eager wall time of one mixed-batch q, k, v forward of tuner layers, sibling fusion on and off")
    p.add_argument("--siblings", action="store_true",
                   help="device time of q, k, v's JD in a CUDA graph: 9, 5 or 3 launches, beside the base GEMMs")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                torch=torch.__version__, triton=getattr(triton, "__version__", None), vllm=vllm_available(),
                dtype=str(DTYPE))
    results, sweeps = [], []
    global D_IN, D_OUTS, TOKENS, DISTINCT, WORKING_SET, SWEEP_SHAPES
    if args.smoke:
        D_IN, D_OUTS, TOKENS, DISTINCT, WORKING_SET = 64, (32,), (4, 40), (1, 3), 1
        SWEEP_SHAPES = [(8, 4, 32, 16, "full", 2), (200, 4, 32, 16, "full", 2)]
        args.replays = 2
    if device.type == "cuda":
        meta["copy_bandwidth"] = copy_bandwidth(device)
        meta["launch_in_graph"] = launch_floor(device)
        print(f"copy bandwidth {meta['copy_bandwidth']/1e12:.2f} TB/s, empty launch in a graph "
              f"{meta['launch_in_graph']*1e6:.2f} us", flush=True)
    if args.once:  # T 64, 64 adapters, d 4096, rank 64 full, 1 and 8 clusters: per-kernel times under ncu
        ta = token_adapters(64, 64, device)
        for C in (1, 8):
            U, V, sigma, cluster_of = make_jd(64, 4096, 64, 64, "full", C, device)
            x = torch.randn(64, D_IN, device=device, dtype=DTYPE)
            y = torch.randn(64, 4096, device=device, dtype=DTYPE)
            batch = prepare_batch(ta)
            for _ in range(3):
                jd_lora_forward(y, x, U, V, sigma, cluster_of, batch, backend="triton")
        return
    if args.qkv:
        rows = eager_qkv(device, calls=300 if device.type == "cuda" else 2, smoke=args.smoke)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, qkv=rows), f, indent=1)
        return
    if args.siblings:
        rows = siblings_in_graph(device, args.replays, smoke=args.smoke)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(meta=meta, siblings=rows), f, indent=1)
        return
    if args.host:
        per_call = eager_per_call(device, calls=500 if device.type == "cuda" else 2)
        print("eager per call (us):", {k: round(v * 1e6, 1) for k, v in per_call.items()}, flush=True)
        profile_host(device)
        return
    if args.linear:
        meta["eager_per_call"] = eager_per_call(device, calls=500 if device.type == "cuda" else 2)
        print("eager per call (us):", {k: round(v * 1e6, 1) for k, v in meta["eager_per_call"].items()}, flush=True)
    if args.sweep:
        sweep(device, args.replays, sweeps)
    else:
        for d_out in D_OUTS:
            for T in TOKENS:
                for D in DISTINCT:
                    if D > T:
                        continue
                    t0 = time.time()
                    if args.linear:
                        row = bench_shape(d_out, T, D, device, args.replays, results, baselines=False,
                                          variants=[(64, "full", 1), (64, "full", 8)])
                    else:
                        row = bench_shape(d_out, T, D, device, args.replays, results, peft_ok=D <= 64)
                    print(summary_line(row, meta), f"({time.time()-t0:.1f}s)", flush=True)
                    if args.json:  # after every shape: a run stopped at its time limit keeps what it measured
                        with open(args.json, "w") as f:
                            json.dump(dict(meta=meta, results=results, sweep=sweeps), f, indent=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results, sweep=sweeps), f, indent=1)
    if results:
        print(table(results, meta))


def eager_per_call(device, calls: int = 500) -> dict:
    """Wall seconds per call without a CUDA graph (host launch work included), T 64, D 64, r64 full, c1,
    d_out ``D_OUTS[0]``.

    ``serial``: ``F.linear`` then ``jd_lora_forward``; ``overlap``: ``jd_lora_linear`` (two stream
    switches more); ``base``: ``F.linear`` alone.
    """
    ta = token_adapters(64, 64, device)
    U, V, sigma, cluster_of = make_jd(64, D_OUTS[0], 64, 64, "full", 1, device)
    x = torch.randn(64, D_IN, device=device, dtype=DTYPE)
    W = torch.randn(D_OUTS[0], D_IN, device=device, dtype=DTYPE) / D_IN**0.5
    batch = prepare_batch(ta)

    def serial():
        jd_lora_forward(torch.nn.functional.linear(x, W), x, U, V, sigma, cluster_of, batch, backend="triton")

    ops = {"base": lambda: torch.nn.functional.linear(x, W), "serial": serial,
           "overlap": lambda: jd_lora_linear(x, W, None, U, V, sigma, cluster_of, batch, backend="triton")}
    return {name: mean_host_seconds(op, calls, device, warmup=20) for name, op in ops.items()}


def eager_qkv(device, calls: int = 300, *, smoke: bool = False) -> list[dict]:
    """Wall time per eager forward of q, k and v (tuner layers, one mixed batch), sibling fusion on and off.

    Mistral-7B's attention projections (d 4096; q 4096 out, k and v 1024), bf16, rank 64 JD-Full, 1 and 8
    clusters per module (each module its own clustering), T 1 and 64 decode tokens each with its own
    adapter (64 adapters). The three layers are ``jdlora.tuner`` layers linked as siblings, called as a
    model calls them: ``q(x), k(x), v(x)`` with the model's ``MixedBatch``. Without a synchronization per
    forward, the wall time of many forwards is the host's cost whenever the host is the bottleneck (eager
    decode is). ``per_layer_us``: (JD forward - base forward) / 3, the host cost JD adds per layer.
    """
    from torch import nn

    from jdlora.kernels import launch  # noqa: F401 (imports every kernel: the launchers below exist)
    from jdlora.kernels.fast_launch import LAUNCHERS as launchers
    from jdlora.tuner import siblings
    from jdlora.tuner.layer import AdapterGroup, JDLoraLayer, Linear
    from jdlora.tuner.mixed import MixedBatch

    try:
        from jdlora.kernels import replay
    except ImportError:  # code from before the replays (device.sh ab runs main's)
        replay = None
    d, d_kv, r, n = (64, 32, 16, 8) if smoke else (4096, 1024, 64, 64)
    rows = []
    for C in (1, 8):
        group = AdapterGroup(r, "full")
        names = [f"a{i}" for i in range(n)]
        group_rows = group.add(names)
        parent = nn.Module()
        for module, d_out in (("q_proj", d), ("k_proj", d_kv), ("v_proj", d_kv)):
            layer = Linear(nn.Linear(d, d_out, bias=False, device=device, dtype=DTYPE))
            clusters = torch.randperm(max(C, n))[:n] % C
            for c in range(C):
                layer.add_bases(f"c{c}", torch.randn(d_out, r) / r**0.5, torch.randn(d, r) / d**0.5, dtype=DTYPE)
                members = [i for i in range(n) if clusters[i] == c]
                if members:
                    layer.add_sigmas(group, [names[i] for i in members], [group_rows[i] for i in members],
                                     torch.randn(len(members), r, r) / r**0.5, f"c{c}")
            setattr(parent, module, layer)
        siblings.link_siblings(parent, JDLoraLayer)
        qkv = (parent.q_proj, parent.k_proj, parent.v_proj)
        for T in (1, 64):
            if smoke and T > 1:
                T = 4
            batch = MixedBatch([names[i % n] for i in torch.randperm(T).tolist()])
            x = torch.randn(T, 1, d, device=device, dtype=DTYPE)
            bases = [layer.base_layer for layer in qkv]

            def base_forward():
                for layer in bases:
                    layer(x)

            def jd_forward():
                for layer in qkv:
                    layer(x, adapter_names=batch)

            row = dict(C=C, T=T, r=r, d=d, d_kv=d_kv, adapters=min(T, n))
            cases = [("base", base_forward, True, True), ("fused", jd_forward, True, True),
                     ("unfused", jd_forward, False, True)]
            if replay is not None:  # and without the launch replays of jdlora.kernels.replay
                cases += [("fused_noreplay", jd_forward, True, False), ("unfused_noreplay", jd_forward, False, False)]
            with torch.no_grad():
                for label, op, fuse, replays in cases:
                    siblings.ENABLED = fuse
                    if replay is not None:
                        replay.ENABLED = replays
                    for _ in range(10 if not smoke else 1):  # warm-up (compiles), its launches not counted
                        op()
                    launched = sum(f.hits + f.misses for f in launchers)
                    row[f"{label}_us"] = mean_host_seconds(op, calls, device, warmup=0) * 1e6
                    row[f"{label}_launches"] = (sum(f.hits + f.misses for f in launchers) - launched) / calls
            siblings.ENABLED = True
            if replay is not None:
                replay.ENABLED = True
            for label, *_ in cases[1:]:
                row[f"{label}_per_layer_us"] = (row[f"{label}_us"] - row["base_us"]) / 3
            rows.append(row)
            print(f"q,k,v eager C={C} T={T}: base {row['base_us']:.1f} us, fused {row['fused_us']:.1f} us "
                  f"({row['fused_launches']:.0f} launches, +{row['fused_per_layer_us']:.1f} us/layer), unfused "
                  f"{row['unfused_us']:.1f} us ({row['unfused_launches']:.0f} launches, "
                  f"+{row['unfused_per_layer_us']:.1f} us/layer)"
                  + (f"; replays off: fused +{row['fused_noreplay_per_layer_us']:.1f}, unfused "
                     f"+{row['unfused_noreplay_per_layer_us']:.1f} us/layer" if replay is not None else ""), flush=True)
    return rows


def siblings_in_graph(device, replays: int, *, smoke: bool = False) -> list[dict]:
    """Device time of q, k and v's JD in a CUDA graph, three ways: each module its own three launches (``each``:
    9), the shrink and Sigma shared then an expand each (``shared``: 5), all shared (``together``: 3), beside the
    three base GEMMs (``base``). Mistral-7B's projections (4096 -> 4096, 1024, 1024), bf16, rank 64 JD-Full, 64
    adapters, 1 and 8 clusters per module, T 64 (decode) and 2048 (prefill runs). Microseconds per q, k, v."""
    from functools import partial

    from jdlora.kernels import jd_lora_expand, jd_lora_expand_siblings, jd_lora_shrink_siblings

    d_outs, r, n = ((32, 16, 16), 16, 8) if smoke else ((4096, 1024, 1024), 64, 64)
    rows = []
    for C in (1, 8):
        for T in ((4,) if smoke else (64, 2048)):
            batch = prepare_batch(token_adapters(T, n, device))
            per_copy = 2 * (T * D_IN + sum(d * D_IN + T * d + C * (d + D_IN) * r for d in d_outs))
            sets = []
            for _ in range(1 if smoke else copies_for(per_copy)):
                mods = [make_jd(T, d, n, r, "full", C, device) for d in d_outs]
                Ws = [torch.randn(d, D_IN, device=device, dtype=DTYPE) / D_IN**0.5 for d in d_outs]
                ys = [torch.randn(T, d, device=device, dtype=DTYPE) for d in d_outs]
                sets.append((torch.randn(T, D_IN, device=device, dtype=DTYPE), Ws, mods, ys))  # x, W, JD, y

            def base(s):
                for W in s[1]:
                    torch.nn.functional.linear(s[0], W)

            def each(s):
                for y, (U, V, sigma, c) in zip(s[3], s[2]):
                    jd_lora_forward(y, s[0], U, V, sigma, c, batch, backend="triton")

            def shared(s, together):
                Us, Vs, sigmas, cs = zip(*s[2])
                shrunk = jd_lora_shrink_siblings(s[0], Vs, sigmas, cs, batch, backend="triton")
                if together:
                    jd_lora_expand_siblings(s[3], Us, cs, shrunk)
                else:
                    for i, (y, U, c) in enumerate(zip(s[3], Us, cs)):
                        jd_lora_expand(y, U, c, shrunk, i)

            row = dict(C=C, T=T, r=r, adapters=n, copies=len(sets))
            for label, fn in (("base", base), ("each", each), ("shared", partial(shared, together=False)),
                              ("together", partial(shared, together=True))):
                row[f"{label}_us"] = time_graph([partial(fn, s) for s in sets], replays, device) * 1e6
            rows.append(row)
            print(f"q,k,v JD in a graph C={C} T={T}: base {row['base_us']:.1f} us, JD each {row['each_us']:.1f}, "
                  f"shared shrink {row['shared_us']:.1f}, together {row['together_us']:.1f} us", flush=True)
    return rows


def profile_host(device) -> None:
    """Where the host time of an eager ``jd_lora_forward`` goes (T 64, D 64, r64 full, c1): cProfile."""
    calls = 300 if device.type == "cuda" else 2
    import cProfile
    import pstats

    ta = token_adapters(64, 64, device)
    U, V, sigma, cluster_of = make_jd(64, D_OUTS[0], 64, 64, "full", 1, device)
    x = torch.randn(64, D_IN, device=device, dtype=DTYPE)
    y = torch.randn(64, D_OUTS[0], device=device, dtype=DTYPE)
    batch = prepare_batch(ta)
    for _ in range(20):
        jd_lora_forward(y, x, U, V, sigma, cluster_of, batch, backend="triton")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        jd_lora_forward(y, x, U, V, sigma, cluster_of, batch, backend="triton")
    prof.disable()
    if device.type == "cuda":
        torch.cuda.synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def summary_line(row, meta) -> str:
    us = lambda k: f"{row[k]*1e6:.1f}" if k in row else "-"  # noqa: E731
    return (f"d_out={row['d_out']} T={row['tokens']} D={row['distinct']}: base {us('base')} bgmv {us('bgmv')} "
            f"sgmv {us('sgmv')} peft {us('peft')} loop {us('peft-loop')} | jd r64-full-c1 {us('jd-r64-full-c1')} "
            f"c8 {us('jd-r64-full-c8')} base+jd {us('base+jd-r64-full-c1')} ovl {us('base+jd-ovl-r64-full-c1')} "
            f"c8 {us('base+jd-r64-full-c8')} ovl {us('base+jd-ovl-r64-full-c8')} ref {us('ref-r64-full-c1')}")


def table(results, meta) -> str:
    """Markdown table (microseconds): one row per shape, the issue's comparisons."""
    bw = meta.get("copy_bandwidth", float("nan"))
    cols = ["base", "peft", "peft-loop", "bgmv", "sgmv"] + [f"jd-{r}" for r in ("r16-full-c1", "r64-full-c1",
            "r64-full-c8", "r64-diag-c1", "r64-diag-c8", "r16-full-c8")] + ["ref-r64-full-c1", "base+jd-r64-full-c1",
            "base+jd-r64-full-c8", "base+jd-ovl-r64-full-c1", "base+jd-ovl-r64-full-c8"]
    lines = ["| d_out | T | D | " + " | ".join(cols) + " | floor r64-full-c1 | floor r64-full-c8 |",
             "|" + "---|" * (len(cols) + 5)]
    for row in results:
        vals = [f"{row[c]*1e6:.1f}" if c in row else "-" for c in cols]
        fl = [f"{row[f'floor-bytes-{n}'] / bw * 1e6:.2f}" for n in ("r64-full-c1", "r64-full-c8")]
        lines.append(f"| {row['d_out']} | {row['tokens']} | {row['distinct']} | " + " | ".join(vals) + " | "
                     + " | ".join(fl) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
