"""How many CPU threads a module's compression gets: one for small products, torch's default for large.

The JD's products are thin GEMMs (``[n r_max, d] @ [d, r]``) and many r x r operations. When the
factors are small, splitting each product across threads costs more than it saves, and on a machine
whose cores are busy with other work, torch's worker threads spin waiting for each other: the demo
(64 adapters, width 512) took 47-405 s with the default threads on a loaded 2-core machine and 7-8 s
with one (``benchmarks/small_machine.py`` measures it). So the library, not only the tests, limits
threads by problem size.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .stack import LoraStack

# Elements in one module's stacked factors (n * r_max * (d_in + d_out)) below which one thread is used.
# 64 rank-16 adapters of a 4096-wide model (2 * 64 * 16 * 4096 = 8.4 M) still get every thread.
SINGLE_THREAD_ELEMENTS = 2**22


def threads_wanted(stack: LoraStack) -> int:
    """Threads worth using for ``stack``'s products on the CPU (torch's current count above the threshold)."""
    elements = stack.n * stack.r_max * (stack.d_in + stack.d_out)
    return 1 if elements < SINGLE_THREAD_ELEMENTS else torch.get_num_threads()


@contextmanager
def threads_for(stack: LoraStack) -> Iterator[int]:
    """Limits torch's intra-op threads to :func:`threads_wanted` inside the block, restoring them after.

    Never raises the count (a caller that set fewer threads keeps them) and changes nothing off the
    CPU, where the products run on the accelerator.
    """
    current = torch.get_num_threads()
    wanted = threads_wanted(stack) if stack.A.device.type == "cpu" else current
    if wanted >= current:
        yield current
        return
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(current)
