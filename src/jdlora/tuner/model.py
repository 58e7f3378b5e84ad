"""``JDLoraModel``: the PEFT tuner that finds layers, creates JD-LoRA layers and runs mixed batches."""

from __future__ import annotations

import contextlib
import copy
import difflib
import warnings
from functools import partial

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _ExcludedModule,
    _get_in_out_features,
    _maybe_include_all_linear_layers,
)
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import IncompatibleAdaptersError, UnknownAdapterError
from ..format.layout import PEFT_PREFIX, SIGMA_KEY, U_KEY, V_KEY
from . import bases as jd_bases
from .bulk import inject_collection
from .config import JDLoraConfig, JDLoraRuntimeConfig
from .layer import AdapterGroup, JDLoraLayer, Linear
from .mixed import BASE, MixedBatch
from .siblings import link_siblings


class UnknownAdapterNameError(UnknownAdapterError, ValueError):
    """Adapter names passed in ``adapter_names`` that the model does not have: LoRA's message, naming every
    unknown adapter, then close matches among the known ones."""

    def __init__(self, names: list[str], known: list[str]):
        self.names, self.known = sorted(names), list(known)
        hints = [f"{n!r} -> {', '.join(map(repr, close))}" for n in self.names
                 if (close := difflib.get_close_matches(n, self.known, n=3, cutoff=0.5))]
        message = f"Trying to infer with non-existing adapter(s): {', '.join(self.names)}"
        if hints:
            message += f". Did you mean: {'; '.join(hints)}?"
        ValueError.__init__(self, message)

    def __str__(self) -> str:
        return self.args[0]


class JDLoraModel(BaseTuner):
    """Creates JD-LoRA layers in a model (arXiv 2407.00066): ``dW = U_c Sigma V_c^T`` per module.

    Besides the usual PEFT contract (``get_peft_model``, ``set_adapter``, merging, saving), it loads
    whole compressed collections in bulk (one pass over the model for all adapters, bases created
    once per layer and cluster, every Sigma at once; see :func:`jdlora.tuner.load_collection`) and
    runs batches that mix adapters (``model(..., adapter_names=[...])``) without a Python loop over
    adapters.

    Example:
        ```python
        >>> import jdlora
        >>> from peft import PeftModel
        >>> model = PeftModel.from_pretrained(base, "org/my-collection")  # every adapter, by name
        >>> out = model.generate(**batch, adapter_names=["math", "code", "__base__"])
        ```
    """

    prefix: str = PEFT_PREFIX
    tuner_layer_cls = JDLoraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    uses_shared_state: bool = True

    # ----- shared state: adapter groups and what each adapter came from -------------------------

    @property
    def jd_groups(self) -> dict[str, AdapterGroup]:
        """``{"r<rank>-<full|diag>": AdapterGroup}``: Sigma-bank rows shared by every layer."""
        return self.__dict__.setdefault("_jd_groups", {})

    @property
    def jd_meta(self) -> dict[str, dict]:
        """Per adapter: its :class:`~jdlora.collection.AdapterInfo` and per-module norms, for saving."""
        return self.__dict__.setdefault("_jd_meta", {})

    def jd_group(self, rank: int, kind: str) -> AdapterGroup:
        key = f"r{rank}-{kind}"
        if key not in self.jd_groups:
            self.jd_groups[key] = AdapterGroup(rank, kind)
        return self.jd_groups[key]

    def jd_layers(self) -> dict[str, JDLoraLayer]:
        """``{module name: layer}`` with names as in a collection (``model.layers.0.self_attn.q_proj``)."""
        return {name: m for name, m in self.model.named_modules() if isinstance(m, JDLoraLayer)}

    def jd_adapters(self) -> list[str]:
        """The adapters that have weights (a Sigma in some layer), in ``peft_config`` order. The entry of a
        bulk-loaded collection, which stands for the whole collection, has none."""
        present = set()
        for layer in self.jd_layers().values():
            present.update(layer.jd_sigma.keys())
        return [n for n in self.peft_config if n in present]

    def jd_saved_config(self, adapter_name: str) -> JDLoraConfig:
        """The config ``save_pretrained`` writes next to the adapter's weights file: ``bases_in_weights`` set
        (the file carries the bases; see :meth:`_get_adapter_state_dict`), no reference to collection files; for
        an adapter of a bulk load (whose config is shared by the whole collection) exactly the modules it adapts
        and its rank there, so it loads on its own without missing keys."""
        config = copy.copy(self.peft_config[adapter_name])
        config.runtime_config = JDLoraRuntimeConfig()
        config.bases_in_weights = True
        config.bases = config.collection_root = None
        if self.peft_config[adapter_name].runtime_config.bulk_member:
            layers = {n: layer for n, layer in self.jd_layers().items() if adapter_name in layer.jd_sigma}
            ranks = {layer.r[adapter_name] for layer in layers.values()}
            if len(ranks) > 1:
                raise IncompatibleAdaptersError(
                    f"Adapter {adapter_name!r} has ranks {sorted(ranks)} in different modules, which one PEFT config "
                    "cannot describe; save the collection: jdlora.tuner.to_collection(model).save_pretrained(path)."
                )
            config.target_modules = set(layers)
            config.r = ranks.pop() if ranks else config.r
        return config

    # ----- PEFT tuner contract ------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config: JDLoraConfig, model_config: dict) -> JDLoraConfig:
        if peft_config.bases and not peft_config.bases_in_weights:
            peft_config.target_modules = set(peft_config.bases)
        elif peft_config.target_modules is None and peft_config.runtime_config.bases is not None:
            peft_config.target_modules = set(peft_config.runtime_config.bases.modules)
        return super()._prepare_adapter_config(peft_config, model_config)

    def _check_new_adapter_config(self, config: JDLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        config.check()  # again: a field set after construction (config.bias = "all") is caught here

    def _resolve_targets(self, model: nn.Module, config: JDLoraConfig) -> dict[str, tuple]:
        """Every module ``config`` adapts and its bases, checked before any layer is touched (as PEFT matches
        them in ``inject_adapter``), so that a failing adapter leaves the model as it was."""
        config = _maybe_include_all_linear_layers(self._prepare_adapter_config(config, self.get_model_config(model)),
                                                  model)
        shapes = {}
        inside = []
        for key, module in model.named_modules():
            if not key or any(key.startswith(prefix) for prefix in inside):
                continue
            if isinstance(module, BaseTunerLayer):
                inside.append(key + ".")
            found = self._check_target_module_exists(config, key)
            if not found or isinstance(found, _ExcludedModule):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            if not isinstance(base, (nn.Linear, Conv1D)):
                _unsupported(module)
            d_in, d_out = _get_in_out_features(base)
            shapes[key] = (d_out, d_in)
        return jd_bases.resolve_bases(config, shapes)

    def _create_and_replace(self, config: JDLoraConfig, adapter_name, target, target_name, parent, current_key,
                            **optional_kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        resolved = self.__dict__.get("_jd_resolved") or {}
        if current_key in resolved:
            U, V = resolved[current_key]
        else:  # injected from a state dict's keys: no pre-check ran
            U, V = jd_bases.resolve_bases(config, {current_key: (target.out_features, target.in_features)
                                                   if isinstance(target, JDLoraLayer)
                                                   else _get_in_out_features(target)[::-1]})[current_key]
        layer = target if isinstance(target, JDLoraLayer) else self._create_new_module(config, adapter_name, target)
        if layer is not target:
            self._replace_module(parent, target_name, layer, target)
        r = U.shape[1]
        key = jd_bases.basis_key(U, V)
        layer.add_bases(key, U, V)
        group = self.jd_group(r, config.sigma)
        sigma = jd_bases.initial_sigma(config, r)
        layer.add_sigmas(group, [adapter_name], group.add([adapter_name]), sigma[None], key, trainable=True,
                         dropout=config.dropout)

    @staticmethod
    def _create_new_module(config: JDLoraConfig, adapter_name: str, target: nn.Module) -> Linear:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, Conv1D):
            config.fan_in_fan_out = True
            return Linear(target, fan_in_fan_out=True, is_target_conv_1d_layer=True)
        if isinstance(base, nn.Linear):
            if config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                              "Setting fan_in_fan_out to False.")
                config.fan_in_fan_out = False
            return Linear(target)
        _unsupported(target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        """PEFT's per-adapter injection, after every target and its bases were checked; or, for a whole
        collection, the bulk path (:func:`~jdlora.tuner.bulk.inject_collection`). Either way the config's
        run-time references to a source collection are dropped afterwards: the layers hold what they use."""
        config = self.peft_config[adapter_name]
        if config.is_collection_root:
            config.check()
            inject_collection(self, adapter_name, config)
        else:
            try:
                if state_dict is None:
                    self._check_new_adapter_config(config)
                    self.__dict__["_jd_resolved"] = self._resolve_targets(model, config)
                super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                       low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
            finally:
                self.__dict__.pop("_jd_resolved", None)
        config.runtime_config.release()
        link_siblings(model, JDLoraLayer)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """JD-LoRA tensors of a layer share banks, so a layer has one dtype: float32 when the base is
        fp16/bf16 (PEFT's ``autocast_adapter_dtype``), else the base's. Without autocast, layers that hold
        ``adapter_name`` take the base layer's dtype (with every adapter they hold)."""
        if autocast_adapter_dtype:
            return
        for layer in self.jd_layers().values():
            if adapter_name in layer.jd_sigma:
                dtype = layer.get_base_weight().dtype
                if dtype.is_floating_point:
                    layer.jd_cast(dtype)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for group in self.jd_groups.values():
            group.remove(adapter_name)
        self.jd_meta.pop(adapter_name, None)

    # ----- saving and loading: an adapter's Sigma and the bases it uses -------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Per module: the adapter's Sigma and the bases it uses, ``<module>.jd_sigma``, ``<module>.jd_U`` and
        ``<module>.jd_V`` once PEFT removes the adapter name, so a saved adapter stands on its own (PEFT's layout;
        docs/format.md). A collection stores shared bases once instead: ``to_collection(model).save_pretrained``."""
        out = {}
        for name, layer in model.named_modules():
            if not isinstance(layer, JDLoraLayer) or adapter_name not in layer.jd_sigma:
                continue
            name = name.removeprefix("_fsdp_wrapped_module.")
            basis = layer.jd_basis[adapter_name]
            for attr, tensor_key, tensors in ((SIGMA_KEY, adapter_name, layer.jd_sigma), (U_KEY, basis, layer.jd_U),
                                              (V_KEY, basis, layer.jd_V)):
                value = state_dict.get(f"{name}.{attr}.{tensor_key}", tensors[tensor_key])
                # a view of a bank row: clone, so that torch.save does not write the whole bank
                out[f"{name}.{attr}.{adapter_name}"] = value.detach().clone()
        return out

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Puts the bases saved with the adapter (``<module>.jd_U`` / ``.jd_V``) in its layers, then maps the rest
        (Sigma) as PEFT does."""
        saved: dict[str, dict] = {}
        rest = {}
        for key, value in state_dict.items():
            head, _, attr = key.rpartition(".")
            if attr in (U_KEY, V_KEY):
                saved.setdefault(head, {})[attr] = value
            else:
                rest[key] = value
        if saved:
            layers = {n.removeprefix("_fsdp_wrapped_module."): m for n, m in model.named_modules()
                      if isinstance(m, JDLoraLayer)}
            for head, pair in saved.items():
                layer = layers.get(head) or layers.get(head.removeprefix("base_model.model."))
                if layer is None or adapter_name not in layer.jd_sigma or len(pair) != 2:
                    rest.update({f"{head}.{attr}": value for attr, value in pair.items()})  # reported as unexpected
                    continue
                U, V = pair[U_KEY], pair[V_KEY]
                with torch.no_grad():
                    layer.replace_bases(adapter_name, U, V, jd_bases.basis_key(U, V))
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, rest)

    # ----- mixed-adapter batches ----------------------------------------------------------------

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        """Passes ``adapter_names`` to every JD-LoRA layer for one forward or ``generate`` call.

        Same checks and errors as LoRA: not in training mode, known names (``"__base__"`` for rows without
        adapter), beam search repeats each name ``num_beams`` times.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if not isinstance(adapter_names, (list, tuple)):
            raise TypeError(f"Got adapter names of type {type(adapter_names)}, expected a list of str.")
        # as LoRA: known means having weights in some layer (the entry of a bulk-loaded collection has none)
        unknown = self._jd_without_weights(adapter_names)
        if unknown:
            raise UnknownAdapterNameError(sorted(unknown), self.jd_adapters() + [BASE])
        num_beams = kwargs.get("num_beams")
        beams = isinstance(num_beams, int) and num_beams > 1
        rows = [n for n in adapter_names for _ in range(num_beams)] if beams else list(adapter_names)
        encoder = _get_encoder(self.model)
        in_encoder = set(encoder.modules()) if beams and encoder is not None else set()
        # The same MixedBatch objects for every call, updated in place: compiled steps read their tensors
        # as graph inputs and see a new mix without recompiling (see jdlora.tuner.mixed).
        batch = self._jd_mixed_batch("_jd_mixed")
        per_input = self._jd_mixed_batch("_jd_mixed_encoder") if in_encoder else batch
        handles, devices = [], set()
        layers, wrappers = self._jd_mixed_batch_modules()
        for module in layers:  # the encoder runs once per input, not per beam
            if module.__dict__.get("_jd_mixed") is not (per_input if module in in_encoder else batch):
                module._jd_mixed = per_input if module in in_encoder else batch
            devices.update(bank.sigma.device for bank in module._jd_banks.values())
            module._jd_mark_static()
        for module in wrappers:
            names = list(adapter_names) if module in in_encoder else rows
            handles.append(module.register_forward_pre_hook(partial(_inject_adapter_names, names=names),
                                                            with_kwargs=True))
        batch.update(rows, self.jd_groups.values(), devices)
        if per_input is not batch:
            per_input.update(adapter_names, self.jd_groups.values(), devices)
        used = {id(b): b for b in (batch, per_input)}.values()
        for b in used:
            b.active = True
        try:
            yield
        finally:
            for b in used:
                b.active = False
            for handle in handles:
                handle.remove()

    def _jd_without_weights(self, names) -> set[str]:
        """The names among ``names`` (but ``"__base__"``) that no layer has weights for. Every adapter with a Sigma
        in some layer has a row in its adapter group (rows of deleted adapters are freed), so the groups answer
        without a walk over every layer's Sigmas (2 ms per ``generate`` call for 32 layers)."""
        groups = self.jd_groups.values()
        return {n for n in set(names) - {BASE} if not any(n in group.rows for group in groups)}

    def _jd_mixed_batch_modules(self) -> tuple[list[JDLoraLayer], list[AuxiliaryTrainingWrapper]]:
        """The JD-LoRA layers and PEFT's auxiliary wrappers (``modules_to_save``) that a mixed batch reaches, found
        anew on every call (the module tree may change between calls) by a walk over ``_modules`` that skips what
        is inside either (neither holds the other): ``self.modules()`` also builds every module's name, which was
        most of the 2 ms per ``generate`` call that this walk took for 32 layers."""
        layers, wrappers, stack, seen = [], [], [self.model], set()
        while stack:
            module = stack.pop()
            if module is None or id(module) in seen:  # a None child slot; a module registered twice (once, as
                continue                              # self.modules() gives it)
            seen.add(id(module))
            if isinstance(module, JDLoraLayer):
                layers.append(module)
            elif isinstance(module, AuxiliaryTrainingWrapper):
                wrappers.append(module)
            else:
                stack.extend(reversed(module._modules.values()))  # module order, as self.modules()
        return layers, wrappers

    def _jd_mixed_batch(self, attribute: str) -> MixedBatch:
        """The model's one :class:`MixedBatch` under ``attribute`` (created on first use)."""
        batch = self.__dict__.get(attribute)
        if batch is None:
            batch = self.__dict__[attribute] = MixedBatch()
            batch.active = False  # until a call passes adapter_names
        return batch


def _inject_adapter_names(module, args, kwargs, names):
    kwargs["adapter_names"] = names
    return args, kwargs


def _get_encoder(model: nn.Module) -> nn.Module | None:
    if not hasattr(model, "get_encoder"):
        return None
    encoder = model.get_encoder()
    return None if encoder is model else encoder


def _unsupported(target: nn.Module):
    raise TypeError(
        f"Target module {target} is not supported. JD-LoRA supports `torch.nn.Linear` and "
        "`transformers.pytorch_utils.Conv1D`."
    )
