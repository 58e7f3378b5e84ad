"""Everything JD-LoRA one vLLM LoRA manager serves: collections loaded once, global rows, per-step token rows.

One :class:`JDRegistry` hangs on each ``LoRAModelManager`` (one per worker). When a request first names an adapter
of a collection, the whole collection is loaded (from its folder or the Hub) and every one of its adapters gets a
*row* indexing the Sigma stacks of :class:`~jdlora_vllm.tables.JDLayer`; the bases are stacked once per layer and
cluster, and every Sigma of the collection stays resident. vLLM keeps only an empty ``LoRAModel`` per JD adapter in
its own caches (no weights to copy in or out of its slots), so evicting or re-activating it costs nothing.

Per step, :meth:`JDRegistry.set_mapping` turns vLLM's per-token LoRA ids (``LoRAMapping.index_mapping``, 0 = no
adapter) into per-token rows (-1 = no JD adapter: base and plain-LoRA tokens) and prepares the batch once for every
layer of the forward.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from jdlora.kernels import JDBatch, prepare_batch

from .naming import JDTarget
from .tables import JDLayer

__all__ = ["JDRegistry"]

logger = logging.getLogger("vllm.jdlora_vllm")  # under "vllm": vLLM's handlers and VLLM_LOGGING_LEVEL apply


class JDRegistry:
    """JD-LoRA collections, adapter rows and layers of one vLLM LoRA manager."""

    def __init__(self, layers: dict[str, JDLayer], *, unsupported: str | None = None):
        self.layers = layers  # vLLM module name -> its JD part
        self.unsupported = unsupported  # why this engine cannot serve JD-LoRA (None: it can)
        self._collections: dict[str, tuple[object, int]] = {}  # collection path/repo -> (collection, first row)
        self.num_rows = 0
        self._row_of_id: dict[int, int] = {}  # vLLM lora_int_id -> row
        self._rows: Tensor | None = None
        self._batch: JDBatch | None = None
        self.mapping = None  # the vLLM LoRAMapping the rows were computed for
        self.active = False  # whether the current step has any JD token

    # ----- loading --------------------------------------------------------------------------------

    def collection(self, source: str):
        """The collection at ``source`` (folder or Hub repo), loaded once with every Sigma resident."""
        if source not in self._collections:
            from jdlora.collection import JDLoraCollection

            coll = JDLoraCollection.from_pretrained(source)
            self._check_modules(source, coll)
            self._collections[source] = (coll, self.num_rows)
            self.num_rows += len(coll)
            for layer in self.layers.values():
                layer.build(list(self._collections.values()), self.num_rows)
            memory = self.memory()
            logger.info("jdlora_vllm: loaded JD-LoRA collection %s (%d adapters); JD weights now %.1f MiB "
                        "(bases %.1f MiB, Sigma %.1f MiB) for %d adapters", source, len(coll),
                        memory["total_bytes"] / 2**20, memory["bases_bytes"] / 2**20, memory["sigma_bytes"] / 2**20,
                        self.num_rows)
        return self._collections[source][0]

    def _check_modules(self, source: str, coll) -> None:
        served = {m for layer in self.layers.values() for m in layer.sub_modules}
        missing = sorted(set(coll.modules) - served)
        if missing:
            from jdlora.errors import UnknownModuleError

            raise UnknownModuleError(missing[0], sorted(served), where=f"the LoRA layers of the served model "
                                     f"(collection {source}; add the module to --lora-target-modules or serve the "
                                     "base model the collection was made for)")

    def register(self, lora_int_id: int, target: JDTarget) -> int:
        """The row of ``target``'s adapter, now served under vLLM id ``lora_int_id``.

        Raises :class:`jdlora.errors.UnknownAdapterError` (a ``KeyError``) when the collection has no such adapter,
        ``NotImplementedError`` when this engine's configuration cannot serve JD-LoRA.
        """
        if self.unsupported:
            raise NotImplementedError(f"JD-LoRA adapter {target.name!r} of {target.collection}: {self.unsupported}")
        coll = self.collection(target.collection)
        row = self._collections[target.collection][1] + coll.index(target.name)
        if self._row_of_id.get(lora_int_id) != row:
            self._row_of_id[lora_int_id] = row
            self._rows = None  # the next mapping must be recomputed even if vLLM's is unchanged
        return row

    def forget(self, lora_int_id: int) -> None:
        """``lora_int_id`` now names a plain LoRA (vLLM ids may be reused after an unload)."""
        if self._row_of_id.pop(lora_int_id, None) is not None:
            self._rows = None

    @property
    def stale(self) -> bool:
        return self._rows is None

    # ----- serving --------------------------------------------------------------------------------

    def set_mapping(self, mapping, device: torch.device) -> None:
        """Per-token rows of the next forward from vLLM's ``LoRAMapping`` (per-token LoRA ids, 0: none)."""
        rows = [self._row_of_id.get(i, -1) for i in mapping.index_mapping]
        self.mapping = mapping
        self.active = any(r >= 0 for r in rows)
        self._rows = torch.tensor(rows, dtype=torch.int32, device=device)
        self._batch = prepare_batch(self._rows) if self.active else None

    def batch_for(self, num_tokens: int) -> JDBatch | None:
        """The prepared batch for a forward of ``num_tokens`` rows (None: no JD token in this step).

        A forward longer than the mapping (padding) gives its extra tokens no adapter.
        """
        if not self.active:
            return None
        if num_tokens != self._rows.shape[0]:
            rows = torch.full((num_tokens,), -1, dtype=torch.int32, device=self._rows.device)
            n = min(num_tokens, self._rows.shape[0])
            rows[:n] = self._rows[:n]
            return prepare_batch(rows)
        return self._batch

    def memory(self) -> dict:
        """Bytes of JD-LoRA weights held by this worker."""
        bases = sum(layer.nbytes()["bases"] for layer in self.layers.values())
        sigma = sum(layer.nbytes()["sigma"] for layer in self.layers.values())
        return {"adapters": self.num_rows, "bases_bytes": bases, "sigma_bytes": sigma, "total_bytes": bases + sigma}
