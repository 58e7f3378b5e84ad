"""Mixed-adapter batches: which Sigma row each batch row reads, as device tensors shared by every layer.

What makes ``generate(..., adapter_names=[...])`` cheap and compilable:

- **Once per call, not per layer or per step.** The adapter of each *row* is turned into Sigma-bank
  rows and sorted once per adapter group and device (:func:`jdlora.kernels.prepare_batch` on ``[B]``);
  a layer only picks ``tokens_per_row`` from its input's shape (:meth:`JDBatch.with_tokens_per_row`),
  so the prefill and every decode step of one ``generate`` reuse the same tensors.
- **The mix is tensor data.** :class:`~jdlora.tuner.model.JDLoraModel` keeps one :class:`MixedBatch`
  for all calls and :meth:`MixedBatch.update` writes a new mix into the same device tensors (same batch
  size: in place). A compiled decode step reads them as graph inputs, so a new mix of adapters runs
  the same graph (no recompilation) and a captured CUDA graph replays with the new rows. A server that
  captures an eager decode step itself (``torch.cuda.graph``) can rely on the same: the decode batch of each
  batch size and its scratch survive every update (of any size, base-only mixes included).
- **No host work inside the compiled region.** The host -> device copy of the rows (pinned, non
  blocking) happens in :meth:`MixedBatch.update`, before the model runs; inside a layer there is no
  host synchronization and no allocation that depends on the names.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..kernels import JDBatch, jd_lora_forward, prepare_batch
from ..kernels.batch import sort_rows

__all__ = ["MixedBatch", "jd_lora_forward"]

BASE = "__base__"


class MixedBatch:
    """The adapter of each batch row (``adapter_names``, ``"__base__"`` for none) as kernel batches.

    Layers group their adapters by rank and Sigma kind (:class:`~jdlora.tuner.layer.AdapterGroup`),
    with rows shared by every layer, so the row -> Sigma-row map and its sort are built once per
    group and device (:meth:`update`, or lazily on first use), not per layer.

    One set of row tensors per batch size seen is kept for the model's life, with the decode scratch of that
    size (``3 B`` int32 and ``2 B w`` float32 per group: about 130 KB at B = 256, rank 64), so that CUDA graphs
    captured at any of those sizes stay valid.

    Attributes:
        names: the adapter of each row.
        size: ``len(names)`` (what layers check; reading ``names`` in a compiled region would make
            the graph depend on the strings).
        active: whether layers of a model that holds this batch use it (set by the model for one call).
        mixes: how many mixes it has held (:meth:`update` counts); what a result computed for one mix checks.
    """

    def __init__(self, adapter_names: Sequence[str] = ()):
        self.names = list(adapter_names)
        self.size = len(self.names)
        self.active = True
        self.mixes = 0
        self._groups: dict[str, object] = {}  # group key -> AdapterGroup
        # (group key, device, batch size) -> rows batch. One per batch size, kept: a server's CUDA graph
        # captured at one size reads its tensors while other sizes (a prefill) run in between.
        self._rows: dict[tuple[str, str, int], JDBatch] = {}
        self._unused: set[tuple[str, str, int]] = set()  # keys whose rows are all -1 in the current mix
        self._eager: dict[tuple[str, str, int, int], JDBatch] = {}  # + tokens_per_row -> batch with its own scratch

    def __len__(self) -> int:
        return self.size

    def update(self, adapter_names: Sequence[str], groups: Iterable = (), devices: Iterable = ()) -> None:
        """A new mix for the next call (run outside compiled regions): the rows of every group and device
        prepared before, plus those of ``groups`` x ``devices``, are rewritten for the new names, in place
        when a mix of this batch size was prepared before (so graphs that read them see the new mix).

        The rows of other batch sizes and the decode batch of each size (one token per row) with its
        scratch are kept, so a CUDA graph captured over a decode step stays valid across calls of any
        size; prefill batches (one per prompt length) are dropped, so they cannot pile up over calls.
        """
        self.names = list(adapter_names)
        self.size = len(self.names)
        self.mixes += 1
        for group in groups:
            self._groups[group.key] = group
        pairs = {k[:2] for k in self._rows} | {(g, str(torch.device(d))) for g in self._groups for d in devices}
        for group_key, device in pairs:
            self._build(self._groups[group_key], torch.device(device))
            for eager_key in [k for k in self._eager if k[:3] == (group_key, device, self.size) and k[3] != 1]:
                del self._eager[eager_key]

    def prepared(self, group, tokens_per_row: int, device: torch.device) -> JDBatch | None:
        """The kernel batch of ``group`` for rows of ``tokens_per_row`` tokens; None if no row uses it
        (eager only: under ``torch.compile`` the batch is returned anyway, so that the graph does not
        depend on which groups the mix uses; its unused rows are -1 and the kernels skip them)."""
        key = (group.key, str(device), self.size)
        rows = self._rows.get(key)
        if rows is None:
            if torch.compiler.is_compiling():  # not prepared before the compiled region: a graph of these names
                ids = [group.rows.get(n, -1) for n in self.names]
                if all(r < 0 for r in ids):
                    return None
                return prepare_batch(torch.tensor(ids, dtype=torch.int32, device=device), tokens_per_row=tokens_per_row)
            self._groups[group.key] = group
            rows = self._build(group, device)
        if torch.compiler.is_compiling():  # the custom op keeps its own scratch
            return rows.with_tokens_per_row(tokens_per_row)
        if key in self._unused:
            return None
        eager_key = (*key, tokens_per_row)
        batch = self._eager.get(eager_key)
        if batch is None:  # one per token count, so the layers of a forward share its scratch
            batch = self._eager[eager_key] = rows.with_tokens_per_row(tokens_per_row)
        return batch

    def _build(self, group, device: torch.device) -> JDBatch:
        """The rows batch of ``group`` for the current names, kept under this batch size: the one prepared
        before for this size rewritten in place, or new tensors."""
        rows = [group.rows.get(name, -1) for name in self.names]
        key = (group.key, str(device), self.size)
        old = self._rows.get(key)
        if all(r < 0 for r in rows):
            self._unused.add(key)
        else:
            self._unused.discard(key)
        row_adapter = _to_device(torch.tensor(rows, dtype=torch.int32), device)
        if old is not None:
            order, sorted_adapter = sort_rows(row_adapter)
            old.row_adapter.copy_(row_adapter)
            old.order.copy_(order)
            old.sorted_adapter.copy_(sorted_adapter)
            return old
        batch = self._rows[key] = prepare_batch(row_adapter)
        for t in (batch.row_adapter, batch.order, batch.sorted_adapter):  # updated in place from now on
            mark_static(t)
        return batch


def worth_recording(batch: JDBatch) -> bool:
    """Whether eager launches on ``batch`` are worth recording for replays (:mod:`jdlora.kernels.replay`, keyed on
    the batch object): only a decode batch (one token per row), which :class:`MixedBatch` keeps per batch size
    across calls and mixes. A prefill's batch is made per call: its recording would never be replayed and would keep
    its scratch alive, and its host time is small beside its kernels'."""
    return batch.tokens_per_row == 1


def mark_static(t: torch.Tensor) -> None:
    """Tells ``torch.compile`` that ``t`` keeps its address (no copy into CUDA graphs' memory per replay;
    no guard on the address: a replaced tensor is re-recorded, not recompiled)."""
    if getattr(t, "_dynamo_static_input_type", None) is None:
        torch._dynamo.mark_static_address(t, guard=False)


def _to_device(rows, device: torch.device):
    if device.type == "cuda":  # pinned + non_blocking: the host does not wait for the GPU's queue
        return rows.pin_memory().to(device, non_blocking=True)
    return rows.to(device)
