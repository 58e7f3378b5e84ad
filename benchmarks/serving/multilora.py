"""Standard multi-LoRA serving: K adapters on the GPU, the rest in pinned host memory, LRU swapping.

This is the baseline of the paper's section 6.3 (vLLM's multi-LoRA engine, "max-gpu-lora" = K):

- :class:`LoraStore` holds every adapter's rank-16 factors in host memory (pinned on CUDA), one
  contiguous row per adapter, so bringing an adapter to the GPU is one host-to-device copy.
- :class:`SlotCache` keeps K adapters on the device as stacked tensors per module (``U = B``
  ``[K, d_out, 16]``, ``V = A^T`` ``[K, d_in, 16]``) and replaces the least recently used adapter that
  the current batch does not need. Copies go through a device staging buffer of a few adapters, then
  one ``index_copy_`` per module and tensor scatters them into their slots: a handful of launches per
  batch instead of two copies per module and adapter.
- :class:`MultiLoraPath` runs the model with every adapted layer doing ``y += scaling * B A x`` per
  token through :func:`jdlora.kernels.jd_lora_forward`, each slot its own "cluster" (``U = B``,
  ``V = A^T``, diagonal ``Sigma = scaling``, ``cluster_of = arange(K)``): a gathered, segmented
  LoRA kernel (Triton on CUDA, the torch reference elsewhere), the best multi-LoRA kernel we have.

Every copy is enqueued on the current stream without waiting for the device (the staging buffer is
reused only after the copies out of it, in stream order); the serving loop synchronizes once per
batch.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from jdlora.kernels import jd_lora_forward, prepare_batch
from jdlora.kernels.batch import sort_rows

from .settings import LORA_RANK

LORA_ALPHA = 32  # scaling alpha / r = 2, the same for every adapter
STAGING_ADAPTERS = 16  # adapters per staging round (about 300 MB at Mistral-7B's q, k, v)


@dataclass(frozen=True)
class ModuleSlice:
    """Where one module's factors sit in an adapter's row: ``V = A^T`` then ``U = B``."""

    name: str
    d_out: int
    d_in: int
    v_offset: int
    u_offset: int


class LoraStore:
    """Random rank-``rank`` factors of ``num_adapters`` adapters on ``modules``, in host memory.

    Adapter ``a`` is one contiguous row (:meth:`row`): per module, ``A^T`` ``[d_in, r]`` then ``B``
    ``[d_out, r]``. Rows live in buffers of at most 1 GiB, because PyTorch rounds a pinned
    allocation up to a power of two (one 19 GiB buffer for 1,024 Mistral-sized adapters would pin
    32 GiB). Values are random (throughput does not depend on them), drawn on ``fill_device``
    because drawing 1,024 Mistral-sized adapters on the CPU takes minutes.

    Args:
        modules: ``{module name: (d_out, d_in)}`` in model order.
        num_adapters: adapters in the store.
        rank, alpha: the adapters' LoRA rank and alpha (scaling ``alpha / rank``).
        dtype: storage dtype (the model's).
        pin: page-lock the host buffers (needed for asynchronous host-to-device copies).
        fill_device: where the random values are drawn.
        b_std: standard deviation of B's entries (A's is ``1 / sqrt(d_in)``).
        seed: seed of the draws.
    """

    def __init__(self, modules: dict[str, tuple[int, int]], num_adapters: int, *, rank: int = LORA_RANK,
                 alpha: float = LORA_ALPHA, dtype: torch.dtype = torch.bfloat16, pin: bool = False,
                 fill_device: str | torch.device = "cpu", b_std: float = 0.02, seed: int = 0):
        self.rank, self.alpha, self.num_adapters = rank, alpha, num_adapters
        self.slices: list[ModuleSlice] = []
        offset = 0
        for name, (d_out, d_in) in modules.items():
            self.slices.append(ModuleSlice(name, d_out, d_in, offset, offset + d_in * rank))
            offset += (d_in + d_out) * rank
        self.row_size = offset
        self.dtype = dtype
        self.per_buffer = max(1, (1 << 30) // self.bytes_per_adapter)
        self.buffers = [torch.empty(min(self.per_buffer, num_adapters - start), offset, dtype=dtype, pin_memory=pin)
                        for start in range(0, num_adapters, self.per_buffer)]
        self._fill(torch.device(fill_device), b_std, seed)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def bytes_per_adapter(self) -> int:
        return self.row_size * self.dtype.itemsize

    def row(self, adapter: int) -> Tensor:
        """Every factor of one adapter, ``[row_size]``."""
        return self.buffers[adapter // self.per_buffer][adapter % self.per_buffer]

    def factors(self, adapter: int, module: int) -> tuple[Tensor, Tensor]:
        """``(U = B [d_out, r], V = A^T [d_in, r])`` of one adapter and module (views of the store)."""
        s, r, row = self.slices[module], self.rank, self.row(adapter)
        return (row[s.u_offset:s.u_offset + s.d_out * r].view(s.d_out, r),
                row[s.v_offset:s.v_offset + s.d_in * r].view(s.d_in, r))

    def _fill(self, device: torch.device, b_std: float, seed: int) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)
        draw = max(1, (256 << 20) // self.row_size)  # about 1 GiB of float32 per draw
        r = self.rank
        for buffer in self.buffers:
            for start in range(0, len(buffer), draw):
                rows = torch.randn(min(draw, len(buffer) - start), self.row_size, device=device, generator=gen)
                for s in self.slices:
                    rows[:, s.v_offset:s.v_offset + s.d_in * r] *= s.d_in ** -0.5
                    rows[:, s.u_offset:s.u_offset + s.d_out * r] *= b_std
                buffer[start:start + len(rows)].copy_(rows.to(self.dtype))


class SlotCache:
    """``slots`` adapters resident on ``device``, least-recently-used replacement.

    Attributes:
        U, V: per module, ``[slots, d_out, r]`` and ``[slots, d_in, r]``.
        loads: adapters copied to the device (first loads included). evictions: adapters replaced.
    """

    def __init__(self, store: LoraStore, slots: int, device: str | torch.device,
                 staging: int = STAGING_ADAPTERS):
        self.store, self.slots, self.device = store, slots, torch.device(device)
        dtype, r = store.dtype, store.rank
        self.U = [torch.zeros(slots, s.d_out, r, dtype=dtype, device=self.device) for s in store.slices]
        self.V = [torch.zeros(slots, s.d_in, r, dtype=dtype, device=self.device) for s in store.slices]
        self.staging = torch.empty(min(staging, slots), store.row_size, dtype=dtype, device=self.device)
        self.reset()

    def reset(self) -> None:
        """Forgets every resident adapter and the counters (the slots' contents become stale)."""
        self.slot_of: dict[int, int] = {}
        self.recency: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.free = list(range(self.slots - 1, -1, -1))  # pop() hands out slot 0 first
        self.loads = 0
        self.evictions = 0

    def ensure(self, adapters: Sequence[int]) -> dict[int, int]:
        """Makes every adapter of a batch resident; returns ``{adapter: slot}``.

        Adapters already resident stay; each missing one takes a free slot or the slot of the least
        recently used adapter that this batch does not use.

        Raises:
            ValueError: the batch uses more distinct adapters than there are slots.
        """
        wanted = list(dict.fromkeys(adapters))
        if len(wanted) > self.slots:
            raise ValueError(f"a batch with {len(wanted)} distinct adapters cannot fit {self.slots} slots")
        needed = set(wanted)
        for a in wanted:
            if a in self.slot_of:
                self.recency.move_to_end(a)
        missing = [a for a in wanted if a not in self.slot_of]
        targets = []
        for a in missing:
            if self.free:
                slot = self.free.pop()
            else:
                victim = next(v for v in self.recency if v not in needed)
                slot = self.slot_of.pop(victim)
                del self.recency[victim]
                self.evictions += 1
            self.slot_of[a] = slot
            self.recency[a] = None
            targets.append(slot)
        self._copy_in(missing, targets)
        self.loads += len(missing)
        return {a: self.slot_of[a] for a in wanted}

    def _copy_in(self, adapters: list[int], slots: list[int]) -> None:
        if not adapters:
            return
        r, capacity = self.store.rank, self.staging.shape[0]
        index = torch.tensor(slots).to(self.device, non_blocking=True)
        for start in range(0, len(adapters), capacity):
            chunk = adapters[start:start + capacity]
            for i, a in enumerate(chunk):  # one contiguous copy per adapter
                self.staging[i].copy_(self.store.row(a), non_blocking=True)
            rows, at = self.staging[:len(chunk)], index[start:start + len(chunk)]
            for k, s in enumerate(self.store.slices):  # scatter into the per-module slot tensors
                self.V[k].index_copy_(0, at, rows[:, s.v_offset:s.v_offset + s.d_in * r].view(-1, s.d_in, r))
                self.U[k].index_copy_(0, at, rows[:, s.u_offset:s.u_offset + s.d_out * r].view(-1, s.d_out, r))


class MultiLoraLinear(nn.Module):
    """A base linear layer plus the multi-LoRA update of the path's current batch."""

    def __init__(self, base: nn.Linear, path: MultiLoraPath, module: int):
        super().__init__()
        self.base = base
        self.module = module
        self.__dict__["path"] = path  # not a submodule: the path is not part of the model

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        path = self.path
        if path.batch is None:
            return y
        cache = path.cache
        jd_lora_forward(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), cache.U[self.module],
                        cache.V[self.module], path.sigma, path.cluster_of, path.batch)
        return y


class MultiLoraPath:
    """The model with K LoRA slots on its adapted layers; see the module docstring.

    Call :meth:`begin_batch` with the batch's adapters (swaps them in), then :meth:`forward` per step;
    :meth:`close` restores the model's own layers.
    """

    kind = "multi-lora"

    def __init__(self, model: nn.Module, store: LoraStore, slots: int, device: str | torch.device,
                 *, staging: int = STAGING_ADAPTERS):
        self.model = model
        self.cache = SlotCache(store, slots, device, staging)
        self.max_adapters = slots
        dtype = store.dtype
        self.sigma = torch.full((slots, store.rank), store.scaling, dtype=dtype, device=device)
        self.cluster_of = torch.arange(slots, dtype=torch.int32, device=device)
        self.row_slots: Tensor | None = None
        self.batch = None
        self.decode_batches: dict[int, object] = {}  # graph decode: rows -> JDBatch whose tensors graphs read
        self.resident = False
        self._originals = {}
        for k, s in enumerate(store.slices):
            parent_name, _, child = s.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            self._originals[s.name] = getattr(parent, child)
            setattr(parent, child, MultiLoraLinear(self._originals[s.name], self, k))

    def begin_batch(self, adapters: Sequence[int]) -> None:
        slot_of = self.cache.ensure(adapters)
        self.row_slots = torch.tensor([slot_of[a] for a in adapters], dtype=torch.int32).to(
            self.cache.device, non_blocking=True)

    def forward(self, **inputs) -> Tensor:
        tokens_per_row = inputs["input_ids"].shape[1]
        self.batch = prepare_batch(self.row_slots.repeat_interleave(tokens_per_row))  # once for all layers
        try:
            return self.model(**inputs).logits
        finally:
            self.batch = None

    @contextmanager
    def decode_rows(self, rows: int):
        """Graph decode (:mod:`.graph`): the layers apply the batch's adapters to ``rows`` rows (its first ``rows``
        rows, padded with its first row's slot) from one fixed :class:`~jdlora.kernels.JDBatch` per row count,
        written in place (a captured graph reads its tensors; its scratch stays allocated)."""
        real = self.row_slots
        slots = torch.cat([real, real[:1].expand(rows - len(real))]) if rows > len(real) else real[:rows]
        batch = self.decode_batches.get(rows)
        if batch is None:
            batch = self.decode_batches[rows] = prepare_batch(slots.clone())
        else:
            order, sorted_slots = sort_rows(slots)
            batch.row_adapter.copy_(slots)
            batch.order.copy_(order)
            batch.sorted_adapter.copy_(sorted_slots)
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None

    def preload(self, adapters: Sequence[int]) -> None:
        """Makes ``adapters`` resident for good (multi-LoRA without memory limit): :meth:`reset` keeps them."""
        self.cache.ensure(list(adapters))
        self.cache.loads = self.cache.evictions = 0
        self.resident = True

    def counters(self) -> dict[str, int]:
        return {"loads": self.cache.loads, "evictions": self.cache.evictions}

    def reset(self) -> None:
        """Back to empty slots (or, after :meth:`preload`, only the counters back to zero)."""
        if self.resident:
            self.cache.loads = self.cache.evictions = 0
        else:
            self.cache.reset()

    def close(self) -> None:
        for name, original in self._originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, original)
        self._originals.clear()
        self.cache = None
