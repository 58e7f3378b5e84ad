"""Whole collections in and out of a model, in bulk: every adapter at once, not one PEFT walk each.

- :func:`load_collection`: a :class:`~jdlora.JDLoraCollection` into a model (or a PeftModel); this is
  also what ``PeftModel.from_pretrained(base, "org/collection")`` runs (via ``JDLoraModel.inject_adapter``).
- :func:`to_collection`: the adapters of a model back into a collection (its ``save_pretrained`` and
  ``PeftModel.push_to_hub`` write the collection format; ``PeftModel.save_pretrained`` writes PEFT's layout).

Per layer, the bulk path adds each cluster's bases once and every Sigma of the module in one indexed
write into the layer's Sigma bank, then registers each adapter's Sigma as a view of its row.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..collection import AdapterInfo, CollectionModule, JDLoraCollection
from ..compress import ModuleCompression
from ..errors import IncompatibleAdaptersError, UnknownAdapterError, UnknownModuleError
from ..format.layout import MANIFEST
from .bases import basis_key
from .config import JDLoraConfig, JDLoraRuntimeConfig
from .layer import JDLoraLayer


def load_collection(
    model: nn.Module,
    collection: JDLoraCollection,
    adapter_names: Sequence[str] | None = None,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    task_type: str | None = None,
):
    """Loads every adapter of ``collection`` (or ``adapter_names``) into ``model``, each under its own name.

    Args:
        model: a base model (a PeftModel is created around it), or a PeftModel with JD-LoRA adapters (the
            collection's adapters are added to it).
        collection: the compressed collection, e.g. from :func:`jdlora.compress` or
            ``JDLoraCollection.from_pretrained``.
        adapter_names: the adapters to load; default all.
        adapter_name: for a base model, the PEFT adapter name of the collection itself (what
            ``PeftModel.from_pretrained(base, collection_path)`` names it): the active adapter. If an adapter
            of the collection has this name, it is that adapter; otherwise it has no weights (base model
            outputs) until you ``set_adapter`` one or pass ``adapter_names=[...]`` to forward/generate.
        is_trainable: make the active adapter trainable (others stay frozen, as in PEFT).
        task_type: PEFT task type of the PeftModel created around a base model; default ``"CAUSAL_LM"`` for
            ``*ForCausalLM`` models.

    Returns:
        The PeftModel.

    Example:
        ```python
        >>> collection = jdlora.compress(lora_folders, rank=16)
        >>> model = load_collection(base, collection)
        >>> model.generate(**batch, adapter_names=[collection.adapters[0].name, "__base__"])
        ```
    """
    from peft import PeftModel, get_peft_model

    if isinstance(model, PeftModel):
        if not _is_tuner(model.base_model):
            raise TypeError(f"{type(model.base_model).__name__} cannot hold JD-LoRA adapters; pass the base model.")
        add_collection(model.base_model, collection, adapter_names, inference_mode=not is_trainable)
        return model
    if task_type is None and type(model).__name__.endswith("ForCausalLM"):
        task_type = "CAUSAL_LM"
    config = root_config(collection, task_type=task_type, inference_mode=not is_trainable)
    config.runtime_config.collection, config.runtime_config.adapter_names = collection, adapter_names
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if not is_trainable:
        peft_model.eval()
    return peft_model


def root_config(collection: JDLoraCollection, **kwargs) -> JDLoraConfig:
    """The config that stands for ``collection`` as a whole (``base_model_name_or_path`` is the model's)."""
    ranks = {e.compression.rank for e in collection.modules.values()} or {1}
    targets = sorted({m.rsplit(".", 1)[-1] for m in collection.modules})
    return JDLoraConfig(r=max(ranks), sigma=collection.sigma_kind, target_modules=targets,
                        collection=MANIFEST, **kwargs)


def inject_collection(tuner, entry_name: str, config: JDLoraConfig) -> None:
    """``JDLoraModel.inject_adapter`` for a collection's root config: bulk-load it, then PEFT's bookkeeping.

    The entry adapter ``entry_name`` stands for the collection: it is the collection's adapter of that name
    if there is one, else an adapter without weights (the base model's outputs) until ``set_adapter``."""
    collection = config.runtime_config.collection
    names = config.runtime_config.adapter_names
    if collection is None:  # PeftModel.from_pretrained(base, root) or load_adapter(root, ...)
        collection = _fetch_collection(config)
        names = None  # the fetch already selected them
        config.runtime_config.pending_load = True  # the load_adapter call that follows has nothing left to read
    first = not any(isinstance(m, JDLoraLayer) for m in tuner.model.modules())
    add_collection(tuner, collection, names, inference_mode=config.inference_mode, entry_config=config)
    # (if an adapter of the collection is named like the entry, add_collection made the entry that adapter)
    tuner.peft_config[entry_name].runtime_config.pending_load = config.runtime_config.pending_load
    if first:
        tuner.set_adapter(tuner.active_adapters, inference_mode=config.inference_mode)
        tuner._mark_only_adapters_as_trainable(tuner.model)


def _fetch_collection(config: JDLoraConfig) -> JDLoraCollection:
    from ..format import load_collection as load_saved

    source = dict(config.runtime_config.source or {})
    if not source:
        raise ValueError("This JD-LoRA config stands for a saved collection but does not say where it is; load it "
                         "with PeftModel.from_pretrained(base, path_or_repo_id).")
    root = source["path_or_repo"]
    if source.get("subfolder"):
        from pathlib import Path

        if not Path(root).is_dir():
            raise ValueError("A collection root inside a subfolder of a Hub repo is not supported: pass the repo "
                             "root, or subfolder='adapters/<name>' to load one adapter.")
        root = str(Path(root) / source["subfolder"])
    hub = {k: source[k] for k in ("revision", "token", "cache_dir", "force_download") if k in source}
    return load_saved(root, adapters=config.runtime_config.adapter_names, **hub)


def add_collection(tuner, collection: JDLoraCollection, adapter_names: Sequence[str] | None = None,
                   *, inference_mode: bool = True, entry_config: JDLoraConfig | None = None) -> list[str]:
    """Adds the collection's adapters to the tuner's model in bulk; returns their names.

    Every check (names, modules, shapes) runs before the model is touched.
    """
    names = list(adapter_names) if adapter_names is not None else collection.adapter_names
    where = f"collection for {collection.base_model or 'an unnamed base model'}"
    index_of = {a.name: i for i, a in enumerate(collection.adapters)}
    for name in names:
        if name not in index_of:
            collection.index(name)  # raises UnknownAdapterError with close matches
        if "." in name or not name:
            raise ValueError(f"Adapter name {name!r} cannot be a PEFT adapter name (empty or containing '.').")
    entry_name = next((n for n, c in tuner.peft_config.items() if c is entry_config), None)
    clashes = [n for n in names if n in tuner.peft_config and n != entry_name]
    if clashes:
        raise ValueError(f"Adapter with name {clashes[0]!r} already exists.")
    targets = check_modules(tuner.model, collection.modules, where=where)
    for module, entry in collection.modules.items():
        c = entry.compression
        check_shape(targets[module], module, c.U.shape[1], c.V.shape[1], where=where)

    member = copy.copy(entry_config) if entry_config is not None else root_config(collection)
    member.collection, member.inference_mode = None, inference_mode
    member.runtime_config = JDLoraRuntimeConfig(bulk_member=True)
    for name in names:
        tuner.peft_config[name] = member

    position = {index_of[n]: n for n in names}  # collection index -> name, selected only
    meta = {n: {"info": collection.adapters[i], "sq_norms": {}, "residuals": {}} for i, n in position.items()}
    every = len(position) == len(collection)
    for module, entry in collection.modules.items():
        c = entry.compression
        ids = entry.adapter_ids.tolist()
        picked = list(range(len(ids))) if every else [row for row, i in enumerate(ids) if i in position]
        if not picked:
            continue
        layer = targets[module]
        if not isinstance(layer, JDLoraLayer):
            layer = tuner._create_new_module(member, names[0], layer)
            parent_name, _, child = module.rpartition(".")
            tuner._replace_module(tuner.model.get_submodule(parent_name), child, layer, targets[module])
            targets[module] = layer
        group = tuner.jd_group(c.rank, collection.sigma_kind)
        clusters = c.cluster.tolist()
        for cluster in sorted({clusters[row] for row in picked}):
            key = basis_key(c.U[cluster], c.V[cluster])
            layer.add_bases(key, c.U[cluster], c.V[cluster])
            rows = [row for row in picked if clusters[row] == cluster]
            members = [position[ids[row]] for row in rows]
            layer.add_sigmas(group, members, group.add(members), c.sigma[rows], key, trainable=not inference_mode)
        for row, sq_norm, residual in zip(picked, c.sq_norms[picked].tolist(), c.residuals[picked].tolist()):
            record = meta[position[ids[row]]]
            record["sq_norms"][module] = sq_norm
            record["residuals"][module] = residual
        if module not in tuner.targeted_module_names:
            tuner.targeted_module_names.append(module)
    tuner.jd_meta.update(meta)
    tuner.__dict__.setdefault("_jd_collection_meta", {
        "base_model": collection.base_model, "settings": dict(collection.settings), "sweep": list(collection.sweep),
    })
    return names


def to_collection(model: nn.Module, adapter_names: Sequence[str] | None = None) -> JDLoraCollection:
    """The model's JD-LoRA adapters (or ``adapter_names``) as a :class:`~jdlora.JDLoraCollection`.

    Per module, the distinct bases its adapters use become its clusters; adapters loaded from a
    collection keep their records (origin, rank, errors), new ones (trained) get error 0.

    Raises:
        IncompatibleAdaptersError: adapters of one module with different ranks, or Sigma kinds that differ.
    """
    tuner = getattr(model, "base_model", model)
    if not _is_tuner(tuner):
        raise TypeError("to_collection needs a PeftModel (or JDLoraModel) with JD-LoRA adapters.")
    layers = tuner.jd_layers()
    with_weights = [n for n in tuner.peft_config if any(n in layer.jd_sigma for layer in layers.values())]
    if adapter_names is None:
        names = with_weights
    else:
        names = list(adapter_names)
        for name in names:
            if name not in with_weights:
                raise UnknownAdapterError(name, with_weights, where="this model's JD-LoRA adapters")
    kinds = {("full" if layer.jd_sigma[n].dim() == 2 else "diag") for layer in layers.values() for n in names
             if n in layer.jd_sigma}
    if len(kinds) > 1:
        raise IncompatibleAdaptersError("The adapters mix full and diagonal Sigma; save them as separate collections "
                                        "(selected_adapters=[...]).")
    index = {n: i for i, n in enumerate(names)}
    modules = {}
    for module, layer in layers.items():
        present = [n for n in names if n in layer.jd_sigma]
        if not present:
            continue
        ranks = {layer.r[n] for n in present}
        if len(ranks) > 1:
            raise IncompatibleAdaptersError(
                f"Module {module} holds adapters of ranks {sorted(ranks)}; one collection has one rank per module. "
                "Save them separately (selected_adapters=[...])."
            )
        used = {layer.jd_basis[n] for n in present}
        keys = [k for k in layer._jd_bases[ranks.pop()].keys if k in used]  # clusters keep their order
        U = torch.stack([layer.jd_U[k].detach().float().cpu() for k in keys])
        V = torch.stack([layer.jd_V[k].detach().float().cpu() for k in keys])
        sigma = torch.stack([layer.jd_sigma[n].detach().float().cpu() for n in present])
        cluster = torch.tensor([keys.index(layer.jd_basis[n]) for n in present])
        sq_norms, residuals = [], []
        for n, s, c in zip(present, sigma, cluster.tolist()):
            record = tuner.jd_meta.get(n, {})
            if module in record.get("sq_norms", {}):
                sq_norms.append(record["sq_norms"][module])
                residuals.append(record["residuals"][module])
            else:  # a new adapter: its update is exactly U Sigma V^T
                full = s if s.dim() == 2 else torch.diag(s)
                sq_norms.append(float(torch.trace(full.T @ (U[c].T @ U[c]) @ full @ (V[c].T @ V[c]))))
                residuals.append(0.0)
        modules[module] = CollectionModule(
            ModuleCompression(U, V, sigma, cluster, torch.tensor(sq_norms), torch.tensor(residuals)),
            torch.tensor([index[n] for n in present]),
        )
    infos = []
    for n in names:
        info = tuner.jd_meta.get(n, {}).get("info")
        if info is None:
            config = tuner.peft_config[n]
            info = AdapterInfo(name=n, origin={"trained": {"bases_from": config.bases_from}}, rank=config.r)
        elif info.name != n:
            info = dataclasses.replace(info, name=n)
        infos.append(info)
    meta = tuner.__dict__.get("_jd_collection_meta", {})
    base_model = meta.get("base_model") or next(
        (tuner.peft_config[n].base_model_name_or_path for n in names if tuner.peft_config[n].base_model_name_or_path),
        None,
    )
    settings = dict(meta.get("settings", {}))
    settings.update(rank=max((m.compression.rank for m in modules.values()), default=0),
                    clusters=max((m.compression.num_clusters for m in modules.values()), default=0))
    return JDLoraCollection(base_model, infos, modules, kinds.pop() if kinds else "full", settings,
                            meta.get("sweep", []))


def _is_tuner(model) -> bool:
    """Whether ``model`` is a :class:`~jdlora.tuner.JDLoraModel` (by duck type: the model imports this module)."""
    return callable(getattr(model, "jd_layers", None)) and hasattr(model, "peft_config")


def check_modules(model: nn.Module, modules, where: str) -> dict[str, nn.Module]:
    """``{name: module}`` for collection module names, with clear errors for names the model lacks."""
    found = dict(model.named_modules())
    out = {}
    for name in modules:
        if name not in found:
            linear = [n for n, m in found.items() if isinstance(m, (nn.Linear, Conv1D, JDLoraLayer))]
            raise UnknownModuleError(name, linear, where=where, missing_in="the model")
        out[name] = found[name]
    return out


def check_shape(layer_or_module: nn.Module, name: str, d_out: int, d_in: int, where: str) -> None:
    """Raises IncompatibleAdaptersError when a module's shape is not the collection's."""
    if isinstance(layer_or_module, JDLoraLayer):
        have = (layer_or_module.out_features, layer_or_module.in_features)
    elif isinstance(layer_or_module, Conv1D):
        have = (layer_or_module.weight.shape[1], layer_or_module.weight.shape[0])
    elif isinstance(layer_or_module, nn.Linear):
        have = (layer_or_module.out_features, layer_or_module.in_features)
    else:
        raise IncompatibleAdaptersError(
            f"{where} adapts {name}, which is a {type(layer_or_module).__name__} in this model; JD-LoRA adapts "
            "nn.Linear and Conv1D layers. Is the collection for another base model?"
        )
    if have != (d_out, d_in):
        raise IncompatibleAdaptersError(
            f"{where} has module {name} with {d_in} inputs and {d_out} outputs, but the model's layer has "
            f"{have[1]} inputs and {have[0]} outputs: the collection was made for another base model."
        )
