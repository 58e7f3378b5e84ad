"""Mixed-adapter batches: which Sigma row each token reads, computed once per forward for all layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..kernels import JDBatch, jd_lora_forward, prepare_batch

__all__ = ["MixedBatch", "jd_lora_forward"]

BASE = "__base__"


class MixedBatch:
    """The adapter of each batch row (``adapter_names``, ``"__base__"`` for none) as kernel batches.

    Layers group their adapters by rank and Sigma kind (:class:`~jdlora.tuner.layer.AdapterGroup`),
    with rows shared by every layer, so the token -> Sigma row map and its
    :func:`~jdlora.kernels.prepare_batch` are built once per group and token count, not per layer.
    """

    def __init__(self, adapter_names: Sequence[str]):
        self.names = list(adapter_names)
        self._cache: dict[tuple, JDBatch | None] = {}

    def __len__(self) -> int:
        return len(self.names)

    def prepared(self, group, tokens_per_row: int, device: torch.device) -> JDBatch | None:
        """The kernel batch of ``group`` for rows of ``tokens_per_row`` tokens; None if no row uses it."""
        key = (id(group), group.size, tokens_per_row, str(device))
        if key not in self._cache:
            rows = [group.rows.get(name, -1) for name in self.names]
            if all(r < 0 for r in rows):
                self._cache[key] = None
            else:
                token_rows: Tensor = torch.tensor(rows, dtype=torch.int32).repeat_interleave(tokens_per_row)
                if device.type == "cuda":  # pinned + non_blocking: the host does not wait for the GPU's queue
                    token_rows = token_rows.pin_memory().to(device, non_blocking=True)
                else:
                    token_rows = token_rows.to(device)
                self._cache[key] = prepare_batch(token_rows)
        return self._cache[key]
