"""The Triton path of :func:`jdlora.kernels.jd_lora_forward`: configurations and the three launches.

1. :mod:`~jdlora.kernels.shrink`: ``h = V[c]^T x`` into the batch's zeroed float32 scratch;
2. :mod:`~jdlora.kernels.sigma`: ``g = Sigma[a] h``, re-zeroing ``h``;
3. :mod:`~jdlora.kernels.expand`: ``y += scale * U[c] g`` in place.

Why three and not one or two: a decode step needs the shrink split over d_in across the GPU (a few
token blocks cannot fill it), so its sums meet only after a grid-wide reduction; Sigma then needs the
whole sum, and the expand needs Sigma's result. A launch inside a CUDA graph costs about 0.7 us on
the H200 (measured, see ``benchmarks/RESULTS.md``), less than serializing Sigma for many tokens in
one program (what a fused "last program of the block applies Sigma" design did: one Sigma per token,
16 tokens per block, one SM each).

Siblings that read the same x (q, k, v) share launches 1 and 2 (:func:`jd_lora_shrink_siblings_triton`: the
same configurations and K slices per sibling, a sibling index folded into the grid), and 3 as one launch when
all their outputs are at hand (:func:`jd_lora_expand_siblings_triton`: each sibling's column tiles along the
grid's second axis), else each its own (:func:`jd_lora_expand_triton`).

Configurations are picked from static shapes only (T, d_in, the GPU's multiprocessor count), never
from tensor values, so the choice costs no host synchronization and a captured CUDA graph replays
it. The GPU numbers were chosen from the H200 sweep in ``benchmarks/RESULTS.md``
(``python benchmarks/kernels.py --sweep``); the interpreter ones keep CPU tests fast.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

from .expand import launch_expand, launch_expand_siblings
from .shrink import launch_shrink, launch_shrink_siblings
from .sigma import launch_sigma, launch_sigma_siblings
from .sizes import block_rank


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_k: int
    programs: int  # aim for about this many programs (token blocks x K slices) in all
    num_warps: int = 4
    num_stages: int = 3

    def split_k(self, m_blocks: int, d_in: int) -> int:
        return max(1, self.programs // m_blocks)


@dataclass(frozen=True)
class SigmaConfig:
    block_m: int  # tokens per program: 1 for decode (each token's Sigma in one go), >= 16 for runs
    num_warps: int = 4
    sigma_elems: int = 8192  # BLOCK_M x SIGMA_ROWS x BLOCK_R elements per gathered chunk


@dataclass(frozen=True)
class ExpandConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


Configs = tuple[ShrinkConfig, SigmaConfig, ExpandConfig]

# GPU configurations. Decode: T <= DECODE_MAX_TOKENS. `programs` is PROGRAMS_PER_SM x SMs.
# H200 sweep (2026-11-29, whole 3-launch op, one stage varied at a time; RESULTS.md): decode times
# moved by < 0.3 us over block_k 64..256, 1..4 programs per SM and block_n 32..128 (latency-bound);
# Sigma with one token per program and 4 warps was best (2 or 4 tokens per program: +1.7..5.7 us).
# Prefill (T 4096): shrink 64x64 (4 warps) best of 12; Sigma 32 tokens/4 warps and expand 32x128
# (4 warps) best, within 2 us of the runners-up.
DECODE_MAX_TOKENS = 128
PROGRAMS_PER_SM = 2
SHRINK_DECODE = ShrinkConfig(block_m=16, block_k=128, programs=0)
SHRINK_PREFILL = ShrinkConfig(block_m=64, block_k=64, programs=0, num_warps=4, num_stages=4)
SIGMA_DECODE = SigmaConfig(block_m=1)
SIGMA_PREFILL = SigmaConfig(block_m=32)
EXPAND_DECODE = ExpandConfig(block_m=16, block_n=64)
EXPAND_PREFILL = ExpandConfig(block_m=32, block_n=128)

# Under TRITON_INTERPRET=1 (CPU tests): small tiles, a few K slices (so the split path runs too).
SHRINK_INTERPRET = ShrinkConfig(block_m=16, block_k=32, programs=4)
SHRINK_INTERPRET_PREFILL = ShrinkConfig(block_m=32, block_k=32, programs=1)
SIGMA_INTERPRET = SigmaConfig(block_m=1)
SIGMA_INTERPRET_PREFILL = SigmaConfig(block_m=16, sigma_elems=4096)
EXPAND_INTERPRET = ExpandConfig(block_m=16, block_n=32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def pick_configs(T: int, d_in: int, device: torch.device) -> Configs:
    """The configurations for a batch of T tokens (decode or prefill regime)."""
    if device.type != "cuda":
        if T <= 32:
            return SHRINK_INTERPRET, SIGMA_INTERPRET, EXPAND_INTERPRET
        return SHRINK_INTERPRET_PREFILL, SIGMA_INTERPRET_PREFILL, EXPAND_INTERPRET
    return _gpu_configs(T <= DECODE_MAX_TOKENS, device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _gpu_configs(decode: bool, device_index: int) -> Configs:
    programs = PROGRAMS_PER_SM * torch.cuda.get_device_properties(device_index).multi_processor_count
    if decode:
        return dataclasses.replace(SHRINK_DECODE, programs=programs), SIGMA_DECODE, EXPAND_DECODE
    return dataclasses.replace(SHRINK_PREFILL, programs=programs), SIGMA_PREFILL, EXPAND_PREFILL


def _check_device(x) -> None:
    if not (x.is_cuda or _interpreting()):
        raise RuntimeError(
            "the Triton path runs on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1 "
            "(set before triton is imported); use backend='torch' on CPU"
        )


def _on_device_of(tensor_at: int):
    """Decorator for the Triton path's entry points: Triton launches on the *current* CUDA device and its current
    stream, so when the tensor at argument ``tensor_at`` (or the first of a list there) is on another GPU -- a
    model split across GPUs, ``device_map="auto"`` -- that GPU is made current for the call. Otherwise the kernels
    would run on the wrong GPU, on a stream that does not wait for the layer's own work."""

    def decorate(fn):
        @functools.wraps(fn)
        def on_device(*args, **kwargs):
            t = args[tensor_at]
            t = t[0] if isinstance(t, (list, tuple)) else t
            if t.is_cuda and t.device.index != torch.cuda.current_device():
                with torch.cuda.device(t.device):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

        return on_device

    return decorate


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int) -> torch.cuda.Stream:
    """One stream per GPU for the JD shrink and Sigma launches that overlap the base GEMM."""
    return torch.cuda.Stream(device=device_index)


@_on_device_of(0)
def jd_lora_linear_triton(
    x, weight, bias, U, V, sigma, cluster_of, batch, *, scale: float = 1.0, overlap: bool = True,
    configs: Configs | None = None,
):
    """``y = x W^T + b`` plus the JD update, with the shrink and Sigma launches beside the base GEMM.

    The shrink and Sigma read only ``x``, so on CUDA (``overlap=True``) they run on a side stream
    while the base GEMM runs on the caller's stream; the expand, which adds into the GEMM's output,
    waits for both. A captured CUDA graph keeps the two branches. The side stream waits for the
    caller's stream first, so consecutive layers sharing ``batch``'s scratch never race.
    """
    T = x.shape[0]
    if T == 0 or U.shape[0] == 0 or cluster_of.shape[0] == 0:
        return torch.nn.functional.linear(x, weight, bias)
    _check_device(x)
    shrink_cfg, sigma_cfg, expand_cfg = configs or pick_configs(T, x.shape[1], x.device)
    h, g = batch.scratch(block_rank(U.shape[2]), x.device)

    def shrink_and_sigma():
        launch_shrink(x, V, cluster_of, batch, h, config=shrink_cfg)
        launch_sigma(h, g, sigma, batch, exact=x.dtype == torch.float32, config=sigma_cfg)

    if overlap and x.is_cuda:
        main = torch.cuda.current_stream(x.device)
        side = _side_stream(x.device.index if x.device.index is not None else torch.cuda.current_device())
        side.wait_stream(main)
        with torch.cuda.stream(side):
            shrink_and_sigma()
        y = torch.nn.functional.linear(x, weight, bias)
        main.wait_stream(side)
    else:
        shrink_and_sigma()
        y = torch.nn.functional.linear(x, weight, bias)
    launch_expand(y, U, g, cluster_of, batch, scale=scale, config=expand_cfg)
    return y


@_on_device_of(1)
def jd_lora_forward_triton(
    y, x, U, V, sigma, cluster_of, batch, *, scale: float = 1.0, configs: Configs | None = None
):
    """Three launches (shrink, Sigma, expand) through the batch's scratch. Returns y."""
    T = x.shape[0]
    if T == 0 or U.shape[0] == 0 or cluster_of.shape[0] == 0:
        return y
    _check_device(x)
    shrink_cfg, sigma_cfg, expand_cfg = configs or pick_configs(T, x.shape[1], x.device)
    h, g = batch.scratch(block_rank(U.shape[2]), x.device)
    launch_shrink(x, V, cluster_of, batch, h, config=shrink_cfg)
    launch_sigma(h, g, sigma, batch, exact=x.dtype == torch.float32, config=sigma_cfg)
    launch_expand(y, U, g, cluster_of, batch, scale=scale, config=expand_cfg)
    return y


@_on_device_of(0)
def jd_lora_shrink_siblings_triton(x, Vs, sigmas, cluster_ofs, batch, *, configs: Configs | None = None):
    """Two launches for up to three siblings that read ``x``: the shrink of all, then Sigma of all.

    Returns ``g [len(Vs), T, w]`` (rows in adapter order; the batch's sibling scratch), what
    :func:`jd_lora_expand_triton` of sibling s reads as ``g[s]``. Every bank non-empty (the caller checks).
    """
    T = x.shape[0]
    _check_device(x)
    shrink_cfg, sigma_cfg, _ = configs or pick_configs(T, x.shape[1], x.device)
    h, g = batch.sibling_scratch(len(Vs), block_rank(Vs[0].shape[2]), x.device)
    if T == 0:
        return g
    launch_shrink_siblings(x, Vs, cluster_ofs, batch, h, config=shrink_cfg)
    launch_sigma_siblings(h, g, sigmas, batch, exact=x.dtype == torch.float32, config=sigma_cfg)
    return g


@_on_device_of(0)
def jd_lora_expand_triton(y, U, g, cluster_of, batch, *, scale: float = 1.0, d_in: int, configs: Configs | None = None):
    """The expand launch alone: ``y += scale * U[c] g`` with ``g`` from :func:`jd_lora_shrink_siblings_triton`.

    ``d_in``: the input width, which picks the configurations as for the whole forward. Returns y.
    """
    T = y.shape[0]
    if T == 0 or U.shape[0] == 0 or cluster_of.shape[0] == 0:
        return y
    _check_device(y)
    expand_cfg = (configs or pick_configs(T, d_in, y.device))[2]
    launch_expand(y, U, g, cluster_of, batch, scale=scale, config=expand_cfg)
    return y


@_on_device_of(0)
def jd_lora_expand_siblings_triton(ys, Us, g, cluster_ofs, batch, *, scale: float = 1.0, d_in: int,
                                   configs: Configs | None = None):
    """The expands of every sibling of one :func:`jd_lora_shrink_siblings_triton` call in one launch:
    ``ys[s] += scale * U_s[c_s] g[s]``, each y the bits of its own :func:`jd_lora_expand_triton`.

    ``d_in``: the input width, which picks the configurations as for the whole forward.
    """
    T = ys[0].shape[0]
    if T == 0:
        return
    _check_device(ys[0])
    expand_cfg = (configs or pick_configs(T, d_in, ys[0].device))[2]
    launch_expand_siblings(ys, Us, g, cluster_ofs, batch, scale=scale, config=expand_cfg)
