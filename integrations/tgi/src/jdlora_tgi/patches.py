"""The hooks into TGI's ``text_generation_server``, one function per TGI module, applied right after it loads.

TGI's adapter API has no dispatch by adapter type (see docs/tgi.md); each hook below adds one, wrapping the
original so plain LoRA takes TGI's own code path unchanged:

========================================  =====================================================================
TGI (v3.3.7)                              hook
========================================  =====================================================================
utils.weight_files                        ``text-generation-server download-weights org/coll`` (the launcher's
                                          download step) downloads a JD collection instead of failing
utils.adapter.load_module_map             dispatch by ``peft_type``: JD adapters get a JD module map + config
adapters.lora.LoraWeights.prepare_weights dispatch by config: JD adapters register rows in shared tables
adapters.weights.LayerAdapterWeights      ``get_data`` keeps every adapter type's batch data of a layer (TGI
                                          keeps the last one); ``add/remove_adapter`` version the bucketing
adapters.weights.AdapterBatchData.ranks   LoRA ranks only (JD data has none)
layers.lora.LoraLinear.forward_layer_type LoRA part through TGI's code, JD part through jdlora.kernels
layers.lora.TensorParallelMultiAdapter   ``Linear.forward``: the JD parts of a fused projection's layer types
                                          (q/k/v, gate/up) in three launches for all
models.get_model_with_lora_adapters       expand collection entries to one adapter each, check ids, finalize
                                          (stack bases once per (layer, cluster), log GPU memory)
models.flash_causal_lm.FlashCausalLM      CUDA graphs: see :mod:`jdlora_tgi.cuda_graphs`
========================================  =====================================================================

Every hook marks what it wrapped (``__jdlora_original__``), so applying twice is a no-op.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections import defaultdict
from pathlib import Path

from jdlora.format.layout import MANIFEST, PEFT_CONFIG, check_collection_root
from jdlora.format.load import adapter_config_kind, read_adapter_config

from ._log import logger
from .naming import JDSource, adapter_id, check_unique_ids
from .registry import JDRegistry, current_registry, use_registry

__all__ = ["HOOKS", "apply_hook", "patch_loaded_modules"]

_PKG = "text_generation_server"


def _wrap(owner, name: str, make):
    """Replaces ``owner.name`` by ``make(original)`` unless already wrapped."""
    original = inspect.getattr_static(owner, name) if isinstance(owner, type) else getattr(owner, name)
    if getattr(original, "__jdlora_original__", None) is not None:
        return
    is_classmethod = isinstance(original, classmethod)
    func = original.__func__ if is_classmethod else original
    wrapper = make(func)
    wrapper.__jdlora_original__ = func
    setattr(owner, name, classmethod(wrapper) if is_classmethod else wrapper)


# ----- text_generation_server.utils: the launcher's download step ------------------------------------


def patch_utils(module) -> None:
    def make(original):
        @functools.wraps(original)
        def weight_files(model_id, revision=None, extension=".safetensors"):
            try:
                return original(model_id, revision, extension)
            except Exception:
                files = _collection_files(model_id, revision)
                if files is None:
                    raise
                return files

        return weight_files

    _wrap(module, "weight_files", make)


def _collection_files(model_id: str, revision) -> list[str] | None:
    """Downloads (and checks) a JD collection; its files, or None when ``model_id`` is no JD collection."""
    try:
        kind = adapter_config_kind(read_adapter_config(str(model_id), revision=revision))
    except Exception:
        return None
    if kind != "collection":
        return None
    from jdlora.collection import JDLoraCollection

    collection = JDLoraCollection.from_pretrained(str(model_id), revision=revision)  # downloads and checks all
    logger.info(f"JD-LoRA collection {model_id}: {len(collection)} adapters downloaded and verified")
    local = Path(str(model_id))
    if local.is_dir():
        return [str(local / MANIFEST)]
    from huggingface_hub import hf_hub_download

    return [hf_hub_download(str(model_id), MANIFEST, revision=revision)]


# ----- utils.adapter.load_module_map: dispatch by peft_type ----------------------------------------


def patch_utils_adapter(module) -> None:
    def make(original):
        @functools.wraps(original)
        def load_module_map(model_id, revision, adapter_id, adapter_path, weight_names, trust_remote_code=False):
            registry = current_registry()
            hit = registry.expanded.get(adapter_id)
            if hit is None and adapter_id not in registry.plain:
                hit = _resolve_single(registry, adapter_id, adapter_path, revision)
            if hit is None:
                return original(model_id, revision, adapter_id, adapter_path, weight_names, trust_remote_code)
            from .adapter import load_jd_module_map

            source, name = hit
            return load_jd_module_map(registry, adapter_id, source, name, weight_names)

        return load_module_map

    _wrap(module, "load_module_map", make)


def _resolve_single(registry: JDRegistry, adapter_id: str, adapter_path, revision):
    """``(source, name)`` when the adapter is one JD adapter folder; raises for a whole collection."""
    location = adapter_path or adapter_id
    try:
        config = read_adapter_config(location, revision=revision)
    except Exception:
        return None  # TGI's loader reports it
    kind = adapter_config_kind(config)
    if kind is None:
        registry.plain.add(adapter_id)
        return None
    if kind == "collection":
        raise ValueError(
            f"{location} is a JD-LoRA collection; collections are expanded into one adapter per adapter when "
            "TGI starts (jdlora_tgi's get_model_with_lora_adapters hook). Is jdlora_tgi active in this process? "
            "`python -c 'import jdlora_tgi; print(jdlora_tgi.status())'` tells."
        )
    return _single_adapter_source(location, config)


def _single_adapter_source(location: str, config: dict):
    folder = Path(location)
    if not folder.is_dir():
        raise ValueError(
            f"{location}: a single JD-LoRA adapter folder must be a local path (`name=/path/to/adapter`); "
            "for the Hub, list the whole collection (`org/coll`) and request `org/coll:<adapter>`."
        )
    root = (folder / check_collection_root(config.get("collection_root", "../.."), f"{folder / PEFT_CONFIG}")).resolve()
    name = config["adapter_name"]
    return JDSource(str(root), None, (name,)), name


# ----- adapters.lora.LoraWeights.prepare_weights: dispatch by config ------------------------------


def patch_adapters_lora(module) -> None:
    def make(original):
        @functools.wraps(original)
        def prepare_weights(cls, config, *args, **kwargs):
            from .adapter import JDLoraConfig, prepare_jd_weights

            if isinstance(config, JDLoraConfig):
                return prepare_jd_weights(config, *args, **kwargs)
            return original(cls, config, *args, **kwargs)

        return prepare_weights

    _wrap(module.LoraWeights, "prepare_weights", make)


# ----- adapters.weights: one batch type per layer -> all of them ---------------------------------


def patch_adapters_weights(module) -> None:
    LayerAdapterWeights, AdapterBatchData = module.LayerAdapterWeights, module.AdapterBatchData

    def make_bump(original):
        @functools.wraps(original)
        def method(self, *args, **kwargs):
            self._jdlora_version = getattr(self, "_jdlora_version", 0) + 1
            return original(self, *args, **kwargs)

        return method

    _wrap(LayerAdapterWeights, "add_adapter", make_bump)
    _wrap(LayerAdapterWeights, "remove_adapter", make_bump)

    def make_get_data(original):
        @functools.wraps(original)
        def get_data(self, meta, prefill, prefill_head_indices):
            results = []
            for batch_type, weights in _buckets(self).items():
                data = batch_type.load(weights, meta, prefill, prefill_head_indices)
                if data is not None:
                    results.append(data)
            if not results:  # TGI's {} would reach forward_layer_type, which only tolerates None
                return None
            if len(results) == 1:
                return results[0]
            from .adapter import MixedBatchWeights

            return MixedBatchWeights(results)

        return get_data

    _wrap(LayerAdapterWeights, "get_data", make_get_data)

    def make_ranks(original):
        @functools.wraps(original)
        def ranks(self):
            found = set()
            for data in self.data.values():
                lora = getattr(data, "lora", data)  # MixedBatchWeights -> its LoRA part
                for rank_data in getattr(lora, "rank_data", {}).values():
                    found.add(rank_data.rank)
            return found

        return ranks

    _wrap(AdapterBatchData, "ranks", make_ranks)


def _buckets(layer_weights) -> dict:
    """``{batch type: {adapter index: weights}}``, cached until an adapter is added or removed."""
    version = getattr(layer_weights, "_jdlora_version", 0)
    cached = getattr(layer_weights, "_jdlora_buckets", None)
    if cached is not None and cached[0] == version:
        return cached[1]
    buckets: dict = defaultdict(dict)
    for index, weights in layer_weights.adapter_weights.items():
        for batch_type in weights.get_batch_types():
            buckets[batch_type][index] = weights
    layer_weights._jdlora_buckets = (version, dict(buckets))
    return layer_weights._jdlora_buckets[1]


# ----- layers.lora.LoraLinear.forward_layer_type: LoRA through TGI, JD through jdlora.kernels ------


def patch_layers_lora(module) -> None:
    def make(original):
        @functools.wraps(original)
        def forward_layer_type(self, result, input, adapter_data, layer_type, start_idx, end_idx):
            if adapter_data is None:
                return original(self, result, input, adapter_data, layer_type, start_idx, end_idx)
            from .adapter import BatchJDLoraWeights, MixedBatchWeights

            data = adapter_data.data.get(layer_type)
            if isinstance(data, MixedBatchWeights):
                lora, jd = data.lora, data.jd
            elif isinstance(data, BatchJDLoraWeights):
                lora, jd = None, data
            else:
                return original(self, result, input, adapter_data, layer_type, start_idx, end_idx)
            if lora is not None:
                only_lora = type(adapter_data)(meta=adapter_data.meta, data={layer_type: lora},
                                               prefill=adapter_data.prefill)
                result = original(self, result, input, only_lora, layer_type, start_idx, end_idx)
            if jd is not None:
                deferred = self.__dict__.get("_jdlora_deferred")
                if deferred is not None and layer_type in deferred:  # run with its siblings' (see below)
                    deferred[layer_type] = (input, start_idx, end_idx)
                    return result
                from .forward import apply_jd

                apply_jd(jd.table, self.layer_id, result, input, jd.step, start_idx, end_idx, self.process_group)
            return result

        return forward_layer_type

    def make_multi(original):
        @functools.wraps(original)
        def forward(self, input, adapter_data):
            siblings = _jd_siblings(self, adapter_data)
            if not siblings:
                return original(self, input, adapter_data)
            # TGI runs each layer type's part; the JD parts only record their slice, then run together
            self._jdlora_deferred = deferred = dict.fromkeys(siblings)
            try:
                out = original(self, input, adapter_data)
            finally:
                self._jdlora_deferred = None
            from .forward import apply_jd, apply_jd_siblings

            # into TGI's final output: every part adds to its columns, so the order does not matter
            y = out if out.dim() == 2 else out.view(-1, out.shape[-1])
            got = [(jd, *deferred[t]) for t, jd in siblings.items() if deferred[t] is not None]  # (jd, x, a, b)
            if len(got) == len(siblings) and len({id(g[1]) for g in got}) == 1:
                apply_jd_siblings([g[0].table for g in got], self.layer_id, y, got[0][1], got[0][0].step,
                                  [(g[2], g[3]) for g in got])
            else:  # TGI called its layer types some other way: each its own
                for jd, x, start_idx, end_idx in got:
                    apply_jd(jd.table, self.layer_id, y, x, jd.step, start_idx, end_idx, self.process_group)
            return out

        return forward

    _wrap(module.LoraLinear, "forward_layer_type", make)
    _wrap(module.TensorParallelMultiAdapterLinear, "forward", make_multi)


def _jd_siblings(layer, adapter_data) -> dict:
    """``{layer type: its JD batch data}`` of a fused projection's layer types (q/k/v, gate/up) whose JD parts run
    as one (:func:`~jdlora_tgi.forward.apply_jd_siblings`): the column-parallel ones with weights in this layer and
    rows of the same forward, if two or more; else empty."""
    if adapter_data is None or not layer.layer_names or len(layer.layer_names) < 2:
        return {}
    from .adapter import BatchJDLoraWeights, MixedBatchWeights

    parts = {}
    for layer_type in layer.layer_names:
        data = adapter_data.data.get(layer_type)
        jd = data.jd if isinstance(data, MixedBatchWeights) else data if isinstance(data, BatchJDLoraWeights) else None
        if jd is not None and jd.table.U[layer.layer_id] is not None and not jd.table.spec.row_parallel:
            parts[layer_type] = jd
    return parts if len(parts) > 1 and len({id(jd.step) for jd in parts.values()}) == 1 else {}


# ----- models.get_model_with_lora_adapters: expand collections, finalize, log -----------------------


def patch_models(module) -> None:
    def make(original):
        signature = inspect.signature(original)

        @functools.wraps(original)
        def get_model_with_lora_adapters(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            registry = JDRegistry()
            bound.arguments["lora_adapters"] = expand_adapters(bound.arguments.get("lora_adapters") or [], registry)
            with use_registry(registry):
                model = original(*bound.args, **bound.kwargs)
            if registry.adapters:
                report = registry.finalize(bound.arguments.get("adapter_to_index"))
                logger.info(memory_line(report))
            model.jdlora = registry
            return model

        return get_model_with_lora_adapters

    _wrap(module, "get_model_with_lora_adapters", make)


def expand_adapters(lora_adapters: list, registry: JDRegistry) -> list:
    """One ``AdapterInfo`` per adapter: collection entries become ``<entry id>:<name>`` (see naming)."""
    from text_generation_server.utils.adapter import AdapterInfo

    expanded, owners = [], []
    for info in lora_adapters:
        entry = info.id + (f"={info.path}" if info.path else "") + (f"@{info.revision}" if info.revision else "")
        location = info.path or info.id
        config = read_adapter_config(location, revision=info.revision)
        kind = adapter_config_kind(config)
        if kind == "collection":
            source = JDSource(location, info.revision)
            collection = registry.collection(source)
            for name in collection.adapter_names:
                aid = adapter_id(info.id, name)
                registry.expanded[aid] = (source, name)
                expanded.append(AdapterInfo(id=aid, path=info.path, revision=info.revision))
                owners.append((aid, entry))
            logger.info(f"JD-LoRA collection {entry}: {len(collection)} adapters, ids {info.id}:<adapter name>")
            continue
        if kind == "adapter":
            registry.expanded[info.id] = _single_adapter_source(location, config)
        else:
            registry.plain.add(info.id)
        expanded.append(info)
        owners.append((info.id, entry))
    check_unique_ids(owners)
    return expanded


def memory_line(report: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    return (
        f"JD-LoRA adapters on this rank: {report['adapters']} adapters, {report['clusters']} (layer, cluster) bases: "
        f"{mib(report['total_bytes'])} = bases {mib(report['bases_bytes'])} + Sigma {mib(report['sigma_bytes'])} "
        f"(the same adapters as plain LoRA: {mib(report['lora_equivalent_bytes'])})"
    )


# ----- registration ----------------------------------------------------------------------------------


def _patch_flash_causal_lm(module) -> None:
    from .cuda_graphs import patch_flash_causal_lm

    patch_flash_causal_lm(module)


HOOKS = {
    f"{_PKG}.utils": patch_utils,
    f"{_PKG}.utils.adapter": patch_utils_adapter,
    f"{_PKG}.adapters.lora": patch_adapters_lora,
    f"{_PKG}.adapters.weights": patch_adapters_weights,
    f"{_PKG}.layers.lora": patch_layers_lora,
    f"{_PKG}.models": patch_models,
    f"{_PKG}.models.flash_causal_lm": _patch_flash_causal_lm,
}


def apply_hook(name: str, module) -> None:
    HOOKS[name](module)


def patch_loaded_modules() -> list[str]:
    """Applies the hooks of the TGI modules already imported; returns their names."""
    done = []
    for name, hook in HOOKS.items():
        module = sys.modules.get(name)
        if module is not None:
            hook(module)
            done.append(name)
    return done
