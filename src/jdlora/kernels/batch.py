"""Per-batch metadata shared by every adapted layer of one forward: tokens grouped by adapter.

A mixed batch is described by the adapter of each row of ``tokens_per_row`` tokens (``-1`` for
none; one token per row for an arbitrary ``token_adapter[T]``). The kernels visit tokens in blocks
of the order that sorts them by adapter, so that a block of a prefill run holds one adapter (one
Sigma, one cluster) and a block of a decode step holds many. Sorting rows rather than tokens is
enough (a row's tokens share its adapter): token ``m`` of the sorted order is token ``m %
tokens_per_row`` of row ``order[m // tokens_per_row]``. So one sort per batch of *rows* serves every
forward of a ``generate`` call, prefill (``tokens_per_row`` = prompt length) and decode (1) alike:
:meth:`JDBatch.with_tokens_per_row` only changes a number. Cluster assignments differ per module,
so the metadata stops at adapters: each layer looks up ``cluster_of[a]`` itself, inside its kernel.

Everything here is device tensors built by torch ops that never synchronize with the host (a
sort and a few elementwise ops), so :func:`prepare_batch` can run inside a captured CUDA graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["JDBatch", "prepare_batch"]

_NO_ADAPTER_KEY = torch.iinfo(torch.int32).max  # sorts "no adapter" tokens after every adapter


@dataclass
class JDBatch:
    """Tokens of one batch grouped by adapter; build once per batch with :func:`prepare_batch`.

    Attributes:
        row_adapter: ``[R]`` int32, the adapter of each row in the caller's order (-1: none).
        order: ``[R]`` int32, row indices sorted by adapter (stable; -1 rows last).
        sorted_adapter: ``[R]`` int32, ``row_adapter[order]``: runs of equal adapters, then -1s.
        tokens_per_row: tokens in each row (1: rows are tokens). The batch has ``R * tokens_per_row``
            tokens, row by row (rows of a flattened ``[R, S, d]`` tensor).
        sibling_calls: how many :func:`~jdlora.kernels.jd_lora_shrink_siblings` calls this batch has
            served; only the latest one's ``g`` is valid (the Triton path keeps them in scratch that the next
            call overwrites).

    The Triton path also keeps two small float32 scratch buffers here (``[T, r]``); the one that
    must start zeroed is left zeroed by every call, so all layers of a forward share them (no memset
    launch per layer). Use one batch per CUDA stream.
    """

    row_adapter: Tensor
    order: Tensor
    sorted_adapter: Tensor
    tokens_per_row: int = 1
    _scratch: dict = field(default_factory=dict, repr=False, compare=False)
    sibling_calls: int = field(default=0, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        """``T = R * tokens_per_row`` (from shapes: known on the host without synchronizing)."""
        return int(self.row_adapter.shape[0]) * self.tokens_per_row

    @property
    def token_adapter(self) -> Tensor:
        """``[T]`` int32, the adapter of each token (what the torch reference reads)."""
        if self.tokens_per_row == 1:
            return self.row_adapter
        return self.row_adapter.repeat_interleave(self.tokens_per_row)

    @property
    def device(self) -> torch.device:
        return self.order.device

    def with_tokens_per_row(self, tokens_per_row: int) -> JDBatch:
        """The same rows with ``tokens_per_row`` tokens each (same tensors, no device work, own scratch)."""
        if tokens_per_row == self.tokens_per_row:
            return self
        return dataclasses.replace(self, tokens_per_row=tokens_per_row, _scratch={}, sibling_calls=0)

    def scratch(self, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(h [T, w] float32 zeros, g [T, w] float32)`` with ``w >= width``.

        Allocated on first use and re-allocated for a wider rank. The Sigma kernel re-zeroes the
        rows of ``h`` that the shrink kernel filled, so ``h`` is all zeros between calls.
        """
        return self._buffers(str(device), (), width, device)

    def sibling_scratch(self, count: int, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(h [count, T, w] float32 zeros, g [count, T, w] float32)``: :meth:`scratch` for ``count`` sibling
        modules at once (:func:`~jdlora.kernels.jd_lora_shrink_siblings`). Apart from :meth:`scratch`'s
        buffers, so that the siblings' ``g`` outlive the per-layer launches that run between their expands."""
        return self._buffers(("siblings", count, str(device)), (count,), width, device)

    def _buffers(self, key, lead: tuple[int, ...], width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The ``(zeros, empty)`` float32 pair ``[*lead, T, w]`` kept under ``key``, made anew for a wider rank."""
        buf = self._scratch.get(key)
        if buf is None or buf[0].shape[-1] < width:
            shape = (*lead, max(self.num_tokens, 1), width)
            buf = (torch.zeros(shape, dtype=torch.float32, device=device),
                   torch.empty(shape, dtype=torch.float32, device=device))
            self._scratch[key] = buf
        return buf


def sort_rows(row_adapter: Tensor) -> tuple[Tensor, Tensor]:
    """``(order, sorted_adapter)`` of ``row_adapter`` (int32, -1 for none): rows by adapter, -1 rows last."""
    key = torch.where(row_adapter < 0, torch.full_like(row_adapter, _NO_ADAPTER_KEY), row_adapter)
    sorted_key, order = torch.sort(key, stable=True)
    sorted_adapter = torch.where(sorted_key == _NO_ADAPTER_KEY, torch.full_like(row_adapter, -1), sorted_key)
    return order.to(torch.int32), sorted_adapter


def prepare_batch(token_adapter: Tensor, *, tokens_per_row: int = 1) -> JDBatch:
    """Group the tokens of a mixed batch by adapter (once per batch; reused by every layer).

    Args:
        token_adapter: ``[T]`` int32 or int64 adapter index per token (per row of ``tokens_per_row``
            tokens when that is > 1); -1 (any negative) means no adapter.
        tokens_per_row: tokens in each row.

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
    if tokens_per_row < 1:
        raise ValueError(f"tokens_per_row must be >= 1, got {tokens_per_row}")
    ta = token_adapter.to(torch.int32).clamp(min=-1)
    order, sorted_adapter = sort_rows(ta)
    return JDBatch(row_adapter=ta, order=order, sorted_adapter=sorted_adapter, tokens_per_row=tokens_per_row)
