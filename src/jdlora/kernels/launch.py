"""The Triton path of :func:`jdlora.kernels.jd_lora_forward`: configurations and the two launches.

Configurations are picked from static shapes only (T, d_in, the GPU's multiprocessor count), never
from tensor values, so the choice costs no host synchronization and a captured CUDA graph replays it.
Decode-sized batches split the shrink over d_in to fill the GPU; prefill-sized ones use larger token
blocks. The numbers below were chosen from the H200 measurements in ``benchmarks/RESULTS.md``
(``benchmarks/kernels.py`` prints them); the interpreter ones keep CPU tests fast.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from .expand import launch_expand
from .shrink import launch_shrink_sigma


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_k: int
    programs: int  # aim for about this many programs (token blocks x K slices) in all
    num_warps: int = 4
    num_stages: int = 3
    sigma_elems: int = 8192  # BLOCK_M x SIGMA_ROWS x BLOCK_R elements per Sigma gather chunk

    def split_k(self, m_blocks: int, d_in: int) -> int:
        return max(1, self.programs // m_blocks)


@dataclass(frozen=True)
class ExpandConfig:
    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3


# Named configurations (GPU). Decode: T <= DECODE_MAX_TOKENS.
DECODE_MAX_TOKENS = 128
SHRINK_DECODE = ShrinkConfig(block_m=16, block_k=128, programs=0)  # programs: 2 x SMs, set per device
SHRINK_PREFILL = ShrinkConfig(block_m=64, block_k=64, programs=0, num_warps=4, num_stages=4)
EXPAND_DECODE = ExpandConfig(block_m=16, block_n=64)
EXPAND_PREFILL = ExpandConfig(block_m=64, block_n=128, num_warps=8)
PROGRAMS_PER_SM = 2

# Under TRITON_INTERPRET=1 (CPU tests): small tiles, few K slices (still > 1, so the split path runs).
SHRINK_INTERPRET = ShrinkConfig(block_m=16, block_k=32, programs=4, sigma_elems=4096)
SHRINK_INTERPRET_PREFILL = ShrinkConfig(block_m=32, block_k=32, programs=1)
EXPAND_INTERPRET = ExpandConfig(block_m=16, block_n=32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def pick_configs(T: int, d_in: int, device: torch.device) -> tuple[ShrinkConfig, ExpandConfig]:
    """The configurations for a batch of T tokens (decode or prefill regime)."""
    if device.type != "cuda":
        if T <= 32:
            return SHRINK_INTERPRET, EXPAND_INTERPRET
        return SHRINK_INTERPRET_PREFILL, EXPAND_INTERPRET
    programs = PROGRAMS_PER_SM * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if T <= DECODE_MAX_TOKENS:
        return ShrinkConfig(**{**SHRINK_DECODE.__dict__, "programs": programs}), EXPAND_DECODE
    return ShrinkConfig(**{**SHRINK_PREFILL.__dict__, "programs": programs}), EXPAND_PREFILL


def jd_lora_forward_triton(
    y, x, U, V, sigma, cluster_of, batch, *, scale: float = 1.0, configs: tuple | None = None
):
    """Two launches: shrink + Sigma into the batch's float32 scratch, then expand into y. Returns y."""
    T = x.shape[0]
    if T == 0 or U.shape[0] == 0 or cluster_of.shape[0] == 0:
        return y
    if not (x.is_cuda or _interpreting()):
        raise RuntimeError(
            "the Triton path runs on CUDA tensors, or on CPU tensors only under TRITON_INTERPRET=1 "
            "(set before triton is imported); use backend='torch' on CPU"
        )
    shrink_cfg, expand_cfg = configs or pick_configs(T, x.shape[1], x.device)
    r = U.shape[2]
    partial, g, counters = batch.scratch(max(16, triton.next_power_of_2(r)), x.device)
    launch_shrink_sigma(x, V, sigma, cluster_of, batch, partial, g, counters, config=shrink_cfg)
    launch_expand(y, U, g, cluster_of, batch, scale=scale, config=expand_cfg)
    return y
