"""Per-batch metadata shared by every adapted layer of one forward: tokens grouped by adapter.

A mixed batch is described by ``token_adapter[T]`` (adapter index per token, -1 for none). The
kernels visit tokens in blocks of the order that sorts them by adapter, so that a block of a
prefill run holds one adapter (one Sigma, one cluster) and a block of a decode step holds many.
Cluster assignments differ per module, so the metadata stops at adapters: each layer looks up
``cluster_of[a]`` itself, inside its kernel.

Everything here is device tensors built by torch ops that never synchronize with the host (a
sort and a few elementwise ops), so :func:`prepare_batch` can run inside a captured CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["JDBatch", "prepare_batch"]

_NO_ADAPTER_KEY = torch.iinfo(torch.int32).max  # sorts "no adapter" tokens after every adapter


@dataclass
class JDBatch:
    """Tokens of one batch grouped by adapter; build once per forward with :func:`prepare_batch`.

    Attributes:
        token_adapter: ``[T]`` int32, the adapter of each token in the caller's order (-1: none).
        order: ``[T]`` int32, token indices sorted by adapter (stable; -1 tokens last).
        sorted_adapter: ``[T]`` int32, ``token_adapter[order]``: runs of equal adapters, then -1s.
        num_tokens: ``T`` (a shape, known on the host without synchronizing).

    The Triton path also keeps two small float32 scratch buffers here (``[T, r]``); the one that
    must start zeroed is left zeroed by every call, so all layers of a forward share them (no memset
    launch per layer). Use one batch per CUDA stream.
    """

    token_adapter: Tensor
    order: Tensor
    sorted_adapter: Tensor
    num_tokens: int
    _scratch: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def device(self) -> torch.device:
        return self.order.device

    def scratch(self, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(h [T, w] float32 zeros, g [T, w] float32)`` with ``w >= width``.

        Allocated on first use and re-allocated for a wider rank. The Sigma kernel re-zeroes the
        rows of ``h`` that the shrink kernel filled, so ``h`` is all zeros between calls.
        """
        key = str(device)
        buf = self._scratch.get(key)
        if buf is None or buf[0].shape[1] < width:
            t = max(self.num_tokens, 1)
            buf = (
                torch.zeros(t, width, dtype=torch.float32, device=device),
                torch.empty(t, width, dtype=torch.float32, device=device),
            )
            self._scratch[key] = buf
        return buf


def prepare_batch(token_adapter: Tensor) -> JDBatch:
    """Group the tokens of a mixed batch by adapter (once per forward; reused by every layer).

    Args:
        token_adapter: ``[T]`` int32 or int64 adapter index per token; -1 (any negative) means
            the token uses no adapter.

    Returns:
        A :class:`JDBatch` on ``token_adapter``'s device. No host synchronization.

    Example::

        batch = prepare_batch(torch.tensor([3, 3, -1, 0], device="cuda"))
        for layer in layers:
            jd_lora_forward(y, x, U, V, sigma, cluster_of, batch)
    """
    if token_adapter.dim() != 1:
        raise ValueError(f"token_adapter must be 1-D [T], got shape {tuple(token_adapter.shape)}")
    if token_adapter.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"token_adapter must be int32 or int64, got {token_adapter.dtype}")
    ta = token_adapter.to(torch.int32).clamp(min=-1)
    key = torch.where(ta < 0, torch.full_like(ta, _NO_ADAPTER_KEY), ta)
    sorted_key, order = torch.sort(key, stable=True)
    sorted_adapter = torch.where(sorted_key == _NO_ADAPTER_KEY, torch.full_like(ta, -1), sorted_key)
    return JDBatch(
        token_adapter=ta,
        order=order.to(torch.int32),
        sorted_adapter=sorted_adapter,
        num_tokens=int(ta.shape[0]),
    )
