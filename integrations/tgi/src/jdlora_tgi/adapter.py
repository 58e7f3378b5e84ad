"""JD-LoRA as a TGI adapter type: config, per-adapter weights, per-batch data (TGI's adapter API classes).

Imports ``text_generation_server``: only :mod:`jdlora_tgi.patches` imports this module, once TGI is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple, Type

import torch
from text_generation_server.adapters.config import AdapterConfig
from text_generation_server.adapters.weights import AdapterBatchMetadata, AdapterWeights, BatchAdapterWeights

from ._log import logger
from .naming import JDSource
from .registry import JDRegistry, StepRows
from .sharding import ShardSpec
from .tables import JDLayerTable

__all__ = [
    "JDLoraConfig",
    "JDLoraWeights",
    "BatchJDLoraWeights",
    "MixedBatchWeights",
    "load_jd_module_map",
    "prepare_jd_weights",
    "sigma_key",
]


def sigma_key(module: str) -> str:
    """Key of a module's Sigma in a JD adapter's weights (docs/format.md: per-adapter files)."""
    return f"base_model.model.{module}.jd_sigma"


@dataclass
class JDLoraConfig(AdapterConfig):
    """One JD-LoRA adapter as TGI sees it (``peft_type`` ``"JDLORA"``)."""

    adapter_id: str = ""
    source: Optional[JDSource] = None
    name: str = ""
    local_index: int = 0
    row: int = 0
    registry: Optional[JDRegistry] = field(default=None, repr=False, compare=False)

    def map_weights_for_model(self, adapter_weights: Dict, weight_names: Tuple[str]) -> Tuple[Dict, Set[str]]:
        """``{TGI weight name: {"jd_sigma": (module ref, key)}}`` for the model's modules this adapter adapts.

        ``adapter_weights`` maps :func:`sigma_key` names to ``(module name, CollectionModule)``; TGI names
        modules ``model.layers.<i>.self_attn.q_proj`` like PEFT without ``base_model.model.``, so the match
        is exact, as for TGI's LoRA.
        """
        module_map, used = {}, set()
        for weight_name in weight_names:
            key = sigma_key(weight_name)
            if key in adapter_weights:
                module_map[weight_name] = {"jd_sigma": (adapter_weights[key], key)}
                used.add(key)
        return module_map, used


class JDLoraWeights(AdapterWeights):
    """One JD adapter in one layer type: its row in the layer type's shared :class:`JDLayerTable`."""

    def __init__(self, registry: JDRegistry, table: JDLayerTable, row: int, adapter_config: JDLoraConfig):
        self.registry, self.table, self.row, self.adapter_config = registry, table, row, adapter_config

    @classmethod
    def get_batch_types(cls) -> List[Type[BatchAdapterWeights]]:
        return [BatchJDLoraWeights]


@dataclass
class BatchJDLoraWeights(BatchAdapterWeights):
    """The JD part of one layer type for one forward: the table and the tokens' rows."""

    table: JDLayerTable
    step: StepRows
    adapters: Dict[int, JDLoraWeights]

    def has_adapter(self, adapter_index: int) -> bool:
        return adapter_index in self.adapters

    @classmethod
    def load(
        cls,
        adapter_weights: Dict[int, AdapterWeights],
        meta: AdapterBatchMetadata,
        prefill: bool,
        prefill_head_indices: Optional[torch.Tensor],
    ) -> Optional["BatchJDLoraWeights"]:
        if not all(isinstance(w, JDLoraWeights) for w in _first(adapter_weights)):
            adapter_weights = {k: v for k, v in adapter_weights.items() if isinstance(v, JDLoraWeights)}
        if not adapter_weights:
            return None
        first = next(iter(adapter_weights.values()))
        registry = first.registry
        registry.note_weights(adapter_weights)
        if meta.adapter_set.isdisjoint(adapter_weights):  # no JD request in this batch: no JD work at all
            return None
        first.table.build(len(registry.adapters))  # no-op once finalized
        step = registry.step_rows(meta.adapter_indices, prefill_head_indices)
        return cls(table=first.table, step=step, adapters=adapter_weights)


def _first(d: dict):
    return [next(iter(d.values()))] if d else []


class MixedBatchWeights(BatchAdapterWeights):
    """Batch data of a layer type that serves several adapter types in one batch (TGI keeps one)."""

    def __init__(self, parts: list):
        self.parts = parts
        self.jd = next((p for p in parts if isinstance(p, BatchJDLoraWeights)), None)
        others = [p for p in parts if not isinstance(p, BatchJDLoraWeights)]
        if len(others) > 1:
            raise NotImplementedError(f"more than one non-JD adapter batch type in one layer: {others}")
        self.lora = others[0] if others else None

    def has_adapter(self, adapter_index: int) -> bool:
        return any(p.has_adapter(adapter_index) for p in self.parts)

    @classmethod
    def load(cls, adapter_weights, meta, prefill, prefill_head_indices):  # built by get_data, never loaded
        raise NotImplementedError


def load_jd_module_map(
    registry: JDRegistry, adapter_id: str, source: JDSource, name: str, weight_names: Tuple[str]
):
    """What TGI's ``load_module_map`` returns, for a JD adapter: ``(module_map, config, weight names, None)``."""
    collection = registry.collection(source)
    row = registry.register_adapter(adapter_id, source, name)
    local = collection.index(name)
    weights = {
        sigma_key(module): (module, entry)
        for module, entry in collection.modules.items()
        if entry.row_of(local) is not None
    }
    config = JDLoraConfig(
        base_model_name_or_path=collection.base_model, adapter_id=adapter_id, source=source, name=name,
        local_index=local, row=row, registry=registry,
    )
    module_map, names = config.map_weights_for_model(weights, weight_names)
    return module_map, config, names, None


def prepare_jd_weights(
    config: JDLoraConfig,
    module_map: Dict[str, Dict],
    layer_type: str,
    unused_weight_names: Set[str],
    nlayers: int,
    dtype: torch.dtype,
    world_size: int,
    process_group,
    target_to_layer: Dict[str, Tuple[str, torch.Tensor]],
) -> Optional[JDLoraWeights]:
    """TGI's ``LoraWeights.prepare_weights`` for a JD adapter: registers its Sigma rows in the shared table.

    Unlike TGI's LoRA (all layers or none), a JD adapter may adapt some layers only: the others get
    cluster -1 (no update). Bases are added once per (layer, cluster, collection), whatever the number of
    adapters; the table stacks and shards them when the model's adapters are finalized.
    """
    registry = config.registry
    rank = process_group.rank() if process_group is not None else 0
    spec = ShardSpec.for_layer(layer_type, rank, world_size)
    table = None
    for layer_id in range(nlayers):
        key = (layer_id, layer_type)
        if key not in target_to_layer:
            logger.debug(f"JD-LoRA: no {key} in the base model; {layer_type} is not served")
            return None
        weight_name, layer = target_to_layer[key]
        if weight_name not in module_map:
            continue
        (module, entry), key_name = module_map[weight_name]["jd_sigma"]
        spec.check(config.adapter_id, module)
        if table is None:
            table = registry.table(layer_type, nlayers, spec)
            table.device, table.dtype = _device_of(layer), dtype
        table.add(layer_id, config.source, entry.compression, entry.adapter_ids, config.local_index, config.row)
        unused_weight_names.discard(key_name)
    if table is None:
        return None
    return JDLoraWeights(registry, table, config.row, config)


def _device_of(layer) -> torch.device:
    base = getattr(layer, "base_layer", layer)
    for attr in ("linear", None):
        obj = getattr(base, attr) if attr else base
        weight = getattr(obj, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
    for p in layer.parameters() if hasattr(layer, "parameters") else ():
        return p.device
    for b in layer.buffers() if hasattr(layer, "buffers") else ():
        return b.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
