"""Stacked JD-LoRA weights of one layer type (``q_proj``, ``down_proj``, ...) for every layer of the model.

One :class:`JDLayerTable` per layer type holds, per layer ``l``::

    U[l]          [C_l, d_out_local, r]   bases of every cluster of every collection, stored once
    V[l]          [C_l, d_in_local, r]
    sigma[l]      [n, r, r] or [n, r]     one Sigma per JD adapter served (n = all JD adapters of the server)
    cluster_of[l] [n] int32               cluster of each adapter in this layer, -1: no update here

Rows are global to the server (one row per JD adapter, see :class:`~jdlora_tgi.registry.JDRegistry`), so one
per-token row vector serves every layer type of a forward. Several collections share one table: their
clusters are concatenated (cluster ids offset), ranks are zero-padded to the largest (exact: padded
directions carry zeros), and diagonal Sigmas become full ones when a full collection is present. One kernel
call per layer then serves base, plain-LoRA and JD requests from any number of collections and clusters.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .sharding import ShardSpec

__all__ = ["ModuleSlot", "JDLayerTable"]


@dataclass
class ModuleSlot:
    """One module of one collection, as the table stores it before stacking."""

    U: Tensor  # [C, d_out, r] full (unsharded)
    V: Tensor  # [C, d_in, r]
    sigma: Tensor  # [m, r, r] or [m, r]
    cluster: Tensor  # [m]
    adapter_ids: Tensor  # [m] collection-local adapter index of each Sigma row
    rows: dict[int, int] = field(default_factory=dict)  # collection-local adapter index -> global row


class JDLayerTable:
    """JD-LoRA weights of one layer type, on one rank; built with :meth:`add`, stacked by :meth:`build`."""

    def __init__(self, layer_type: str, nlayers: int, spec: ShardSpec):
        self.layer_type = layer_type
        self.nlayers = nlayers
        self.spec = spec
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self._slots: list[dict[str, ModuleSlot]] = [{} for _ in range(nlayers)]  # per layer: collection key -> slot
        self.U: list[Tensor | None] = []
        self.V: list[Tensor | None] = []
        self.sigma: list[Tensor | None] = []
        self.cluster_of: list[Tensor | None] = []
        self.rank = 0
        self.built_rows = -1  # number of rows the stacked tensors were built for (-1: not built)
        self._identity: dict = {}

    def add(self, layer_id: int, collection_key, compression, adapter_ids: Tensor, local_index: int, row: int) -> bool:
        """Registers adapter ``row`` (collection-local index ``local_index``) for layer ``layer_id``.

        ``compression`` is the collection module's :class:`~jdlora.compress.ModuleCompression`. Returns False
        when the adapter has no Sigma in this module (nothing to serve there).
        """
        if self._slots is None:
            raise RuntimeError(f"JD-LoRA table {self.layer_type} was finalized; adapters cannot be added any more")
        hits = (adapter_ids == local_index).nonzero()
        if len(hits) == 0:
            return False
        slot = self._slots[layer_id].get(collection_key)
        if slot is None:
            slot = ModuleSlot(compression.U, compression.V, compression.sigma, compression.cluster, adapter_ids)
            self._slots[layer_id][collection_key] = slot
        slot.rows[local_index] = row
        self.built_rows = -1
        return True

    @property
    def is_built(self) -> bool:
        return self.built_rows >= 0

    def build(self, num_rows: int, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        """Stacks every registered module into per-layer tensors on ``device`` in ``dtype`` (idempotent)."""
        if self.built_rows == num_rows:
            return
        if self._slots is None:
            raise RuntimeError(f"JD-LoRA table {self.layer_type} was finalized for {self.built_rows} rows")
        device = device or self.device or torch.device("cpu")
        dtype = dtype or self.dtype or torch.float32
        self.device, self.dtype = device, dtype
        slots_all = [s for layer in self._slots for s in layer.values()]
        self.rank = max((s.U.shape[2] for s in slots_all), default=0)
        full = any(s.sigma.dim() == 3 for s in slots_all)
        r = self.rank
        self.U, self.V, self.sigma, self.cluster_of = [], [], [], []
        for layer in self._slots:
            if not layer:
                for lst in (self.U, self.V, self.sigma, self.cluster_of):
                    lst.append(None)
                continue
            Us, Vs = [], []
            sigma = torch.zeros((num_rows, r, r) if full else (num_rows, r), dtype=torch.float32)
            cluster_of = torch.full((num_rows,), -1, dtype=torch.int32)
            offset = 0
            for slot in layer.values():
                U, V = self.spec.shard(_pad_rank(slot.U, r), _pad_rank(slot.V, r))
                Us.append(U)
                Vs.append(V)
                s = slot.sigma.float()
                if full and s.dim() == 2:
                    s = torch.diag_embed(s)
                for local, row in slot.rows.items():
                    k = int((slot.adapter_ids == local).nonzero()[0])
                    rk = s.shape[-1]
                    if full:
                        sigma[row, :rk, :rk] = s[k]
                    else:
                        sigma[row, :rk] = s[k]
                    cluster_of[row] = offset + int(slot.cluster[k])
                offset += slot.U.shape[0]
            self.U.append(torch.cat(Us).to(device=device, dtype=dtype).contiguous())
            self.V.append(torch.cat(Vs).to(device=device, dtype=dtype).contiguous())
            self.sigma.append(sigma.to(device=device, dtype=dtype))
            self.cluster_of.append(cluster_of.to(device))
        self.built_rows = num_rows
        self._identity.clear()

    def release_sources(self) -> None:
        """Drops the host copies of the collections once built (a later :meth:`add` then fails)."""
        if not self.is_built:
            raise RuntimeError(f"JD-LoRA table {self.layer_type}: build() before release_sources()")
        self._slots = None

    def identity(self, layer_id: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(I [C, r, r] in dtype, ones [n, r])``: the pieces that make :func:`jd_lora_forward` a plain shrink
        (``V_c^T x``, Sigma = I) or a plain expand, for the row-parallel split around the all-reduce."""
        key = (layer_id, dtype)
        if key not in self._identity:
            C, r = self.U[layer_id].shape[0], self.rank
            eye = torch.eye(r, dtype=dtype, device=self.device).expand(C, r, r).contiguous()
            ones = torch.ones(self.built_rows, r, dtype=dtype, device=self.device)
            self._identity[key] = (eye, ones)
        return self._identity[key]

    def nbytes(self) -> dict[str, int]:
        """Bytes held on the device: ``{"bases": ..., "sigma": ...}``."""
        count = lambda ts: sum(t.numel() * t.element_size() for t in ts if t is not None)  # noqa: E731
        return {"bases": count(self.U) + count(self.V), "sigma": count(self.sigma) + count(self.cluster_of)}

    def num_clusters(self) -> int:
        return sum(u.shape[0] for u in self.U if u is not None)


def _pad_rank(t: Tensor, r: int) -> Tensor:
    """Zero-pads the last (rank) dimension of ``t`` to ``r``."""
    if t.shape[-1] == r:
        return t
    return torch.nn.functional.pad(t, (0, r - t.shape[-1]))
