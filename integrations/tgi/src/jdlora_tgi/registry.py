"""The JD-LoRA adapters one TGI model serves: collections loaded once, global rows, layer tables, step rows.

TGI numbers its adapters 1..N in ``LORA_ADAPTERS`` order (0 is the base model) and keeps, per layer type, a
``LayerAdapterWeights`` dict ``{adapter index: weights}``. JD-LoRA adapters additionally get a *row*
(0..n-1, in the order they were loaded) that indexes every Sigma stack; :meth:`JDRegistry.index_map` turns
TGI's per-token adapter indices into rows on the device (-1 for base-model and plain-LoRA tokens) with one
gather, once per forward, shared by every layer.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import torch
from torch import Tensor

from jdlora.kernels import JDBatch, prepare_batch

from .naming import JDSource
from .sharding import ShardSpec
from .tables import JDLayerTable

__all__ = ["JDRegistry", "RegisteredAdapter", "StepRows", "current_registry", "use_registry"]


@dataclass
class RegisteredAdapter:
    adapter_id: str
    source: JDSource
    name: str
    local_index: int  # position in its collection
    lora_equivalent_params: int  # parameters the same adapter takes as plain LoRA (its original ranks)


class StepRows:
    """JD rows of the tokens of one forward (``[T]`` int32, -1: no JD adapter), shared by all layers.

    :func:`jdlora.kernels.prepare_batch` runs on first use, inside the forward, so that under CUDA-graph
    capture the grouping by adapter is captured too (it never synchronizes with the host) and a replay
    regroups whatever rows the static buffer holds.
    """

    def __init__(self, rows: Tensor):
        self.rows = rows
        self._batch: JDBatch | None = None

    @property
    def batch(self) -> JDBatch:
        if self._batch is None:
            self._batch = prepare_batch(self.rows)
        return self._batch


class JDRegistry:
    """Everything JD-LoRA one model serves. Created per model load; see :func:`use_registry`."""

    def __init__(self):
        self._collections: dict[JDSource, object] = {}
        self.adapters: list[RegisteredAdapter] = []
        self._row_by_id: dict[str, int] = {}
        self.expanded: dict[str, tuple[JDSource, str]] = {}  # adapter_id -> (collection, adapter name)
        self.plain: set[str] = set()  # adapter ids known not to be JD-LoRA
        self.tables: dict[str, JDLayerTable] = {}
        self._row_of_index: dict[int, int] = {}
        self._index_map: Tensor | None = None
        self._seen: list = []  # weight dicts already read into _row_of_index (identity, strong refs)
        self._step_key: tuple | None = None
        self._step: StepRows | None = None
        self.finalized = False

    # ----- loading --------------------------------------------------------------------------------

    def collection(self, source: JDSource):
        """The :class:`jdlora.JDLoraCollection` of ``source``, loaded (or downloaded) once."""
        coll = self._collections.get(source)
        if coll is None:
            from jdlora.collection import JDLoraCollection

            coll = JDLoraCollection.from_pretrained(
                source.path_or_repo_id, revision=source.revision,
                adapters=list(source.adapters) if source.adapters is not None else None,
            )
            self._collections[source] = coll
        return coll

    def register_adapter(self, adapter_id: str, source: JDSource, name: str) -> int:
        """The global row of adapter ``name`` of ``source`` served as ``adapter_id`` (assigned on first call)."""
        row = self._row_by_id.get(adapter_id)
        if row is not None:
            return row
        if self.finalized:
            raise RuntimeError(f"cannot add JD-LoRA adapter {adapter_id!r}: the model's adapters are finalized")
        coll = self.collection(source)
        local = coll.index(name)
        info = coll.adapters[local]
        params = 0
        for module, entry in coll.modules.items():
            if entry.row_of(local) is None:
                continue
            comp = entry.compression
            r_i = info.module_ranks.get(module, info.rank or comp.rank)
            params += r_i * (comp.U.shape[1] + comp.V.shape[1])
        row = len(self.adapters)
        self.adapters.append(RegisteredAdapter(adapter_id, source, name, local, params))
        self._row_by_id[adapter_id] = row
        return row

    def table(self, layer_type: str, nlayers: int, spec: ShardSpec) -> JDLayerTable:
        table = self.tables.get(layer_type)
        if table is None:
            table = self.tables[layer_type] = JDLayerTable(layer_type, nlayers, spec)
        return table

    def build(self) -> None:
        """Stacks every table for the current number of rows (on each table's device and dtype)."""
        for table in self.tables.values():
            table.build(len(self.adapters))

    def finalize(self, adapter_to_index: dict[str, int] | None = None) -> dict:
        """Builds every table, maps TGI adapter indices to rows, drops host copies; returns :meth:`memory`."""
        self.build()
        if adapter_to_index is not None:
            for adapter in self.adapters:
                index = adapter_to_index.get(adapter.adapter_id)
                if index is not None:
                    self._row_of_index[index] = self._row_by_id[adapter.adapter_id]
            self._index_map = None
        for table in self.tables.values():
            table.release_sources()
        self._collections.clear()
        self.finalized = True
        return self.memory()

    def memory(self) -> dict:
        """Device bytes of the JD-LoRA weights, and what the same adapters take as plain LoRA."""
        bases = sum(t.nbytes()["bases"] for t in self.tables.values())
        sigma = sum(t.nbytes()["sigma"] for t in self.tables.values())
        dtype = next((t.dtype for t in self.tables.values() if t.dtype is not None), torch.float16)
        element = torch.empty((), dtype=dtype).element_size()
        world = next((t.spec.world_size for t in self.tables.values()), 1)
        lora = sum(a.lora_equivalent_params for a in self.adapters) * element // world
        return {
            "adapters": len(self.adapters),
            "clusters": sum(t.num_clusters() for t in self.tables.values()),
            "bases_bytes": bases,
            "sigma_bytes": sigma,
            "total_bytes": bases + sigma,
            "lora_equivalent_bytes": lora,
        }

    # ----- serving --------------------------------------------------------------------------------

    def note_weights(self, weights: dict) -> None:
        """Learns ``{TGI adapter index: row}`` from a layer's ``{index: JDLoraWeights}`` (cheap when seen)."""
        if any(w is weights for w in self._seen):
            return
        changed = False
        for index, w in weights.items():
            if self._row_of_index.get(index) != w.row:
                self._row_of_index[index] = w.row
                changed = True
        self._seen.append(weights)
        if changed:
            self._index_map = None

    @property
    def jd_indices(self) -> frozenset[int]:
        return frozenset(self._row_of_index)

    def index_map(self, device: torch.device) -> Tensor:
        """``[max TGI index + 1]`` int32: the row of each TGI adapter index, -1 if not JD-LoRA."""
        if self._index_map is None or self._index_map.device != device:
            size = max(self._row_of_index, default=0) + 1
            table = torch.full((size,), -1, dtype=torch.int32)
            for index, row in self._row_of_index.items():
                table[index] = row
            self._index_map = table.to(device)
        return self._index_map

    def token_rows(self, adapter_indices: Tensor, prefill_head_indices: Tensor | None = None) -> Tensor:
        """Per-token JD rows from TGI's ``adapter_meta.adapter_indices`` (one device gather, no host sync).

        With ``prefill_head_indices`` (TGI passes them for ``lm_head`` only) the rows of those tokens.
        """
        index_map = self.index_map(adapter_indices.device)
        idx = adapter_indices.long().clamp(0, index_map.shape[0] - 1)
        known = adapter_indices.long() < index_map.shape[0]
        rows = torch.where(known, index_map[idx], torch.full_like(index_map[idx], -1))
        if prefill_head_indices is not None:
            rows = rows[prefill_head_indices.to(rows.device).long()]
        return rows

    def step_rows(self, adapter_indices: Tensor, prefill_head_indices: Tensor | None = None) -> StepRows:
        """:class:`StepRows` for one forward; the same object for every layer type of that forward."""
        key = (adapter_indices, prefill_head_indices, self._index_map)
        if self._step_key is not None and all(a is b for a, b in zip(key, self._step_key)):
            return self._step
        step = StepRows(self.token_rows(adapter_indices, prefill_head_indices))
        self._step_key, self._step = (adapter_indices, prefill_head_indices, self._index_map), step
        return step


_local = threading.local()
_default = JDRegistry()


def current_registry() -> JDRegistry:
    """The registry of the model being loaded (:func:`use_registry`), else a process-wide default."""
    return getattr(_local, "registry", None) or _default


@contextlib.contextmanager
def use_registry(registry: JDRegistry):
    """Makes ``registry`` current in this thread for the duration (one model load)."""
    previous = getattr(_local, "registry", None)
    _local.registry = registry
    try:
        yield registry
    finally:
        _local.registry = previous
