"""Host-side integer helpers for grids and block sizes, in plain Python.

``triton.cdiv`` and ``triton.next_power_of_2`` are Triton ``constexpr_function`` objects: on the host each
call unwraps its arguments and reads Triton's settings, a few microseconds per call (the H200 host's
profile of an eager ``jd_lora_forward``: 12 such calls, ~60 us of its ~300 us, benchmarks/RESULTS.md).
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ``b``."""
    return -(-a // b)


def block_rank(r: int) -> int:
    """The rank tile: the next power of two >= ``r``, at least 16 (``tl.dot``'s smallest K)."""
    return max(16, 1 << (r - 1).bit_length())
