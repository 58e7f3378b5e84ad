"""``JDLoraModel``: the PEFT tuner that finds layers, creates JD-LoRA layers and runs mixed batches."""

from __future__ import annotations

import contextlib
import warnings
from functools import partial

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import IncompatibleAdaptersError, UnknownAdapterError, UnknownModuleError
from . import bases as jd_bases
from .config import JDLoraConfig
from .layer import AdapterGroup, JDLoraLayer, Linear
from .mixed import BASE, MixedBatch


class UnknownAdapterNameError(UnknownAdapterError, ValueError):
    """An adapter name passed in ``adapter_names`` that the model does not have (a ValueError, like LoRA's)."""


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

    prefix: str = "jd_"
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

    # ----- PEFT tuner contract ------------------------------------------------------------------

    def _prepare_adapter_config(self, peft_config: JDLoraConfig, model_config: dict) -> JDLoraConfig:
        if peft_config.bases:
            peft_config.target_modules = set(peft_config.bases)
        elif peft_config.target_modules is None and peft_config._jd.bases is not None:
            peft_config.target_modules = set(peft_config._jd.bases.modules)
        return super()._prepare_adapter_config(peft_config, model_config)

    def _check_new_adapter_config(self, config: JDLoraConfig) -> None:
        super()._check_new_adapter_config(config)
        if config.bases and config._jd.source is None:
            raise ValueError(
                "This JD-LoRA config lists bases files of a collection but not where the collection is; "
                "load the adapter with PeftModel.from_pretrained(base, repo, subfolder='adapters/<name>')."
            )

    def _create_and_replace(self, config: JDLoraConfig, adapter_name, target, target_name, parent, current_key,
                            **optional_kwargs):
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        layer = target if isinstance(target, JDLoraLayer) else self._create_new_module(config, adapter_name, target)
        if layer is not target:
            self._replace_module(parent, target_name, layer, target)
        U, V = jd_bases.bases_for(config, current_key, layer)
        r = U.shape[1]
        key = jd_bases.basis_key(U, V)
        layer.add_bases(key, U, V)
        group = self.jd_group(r, config.sigma)
        sigma = jd_bases.initial_sigma(config, r, current_key)
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
        raise TypeError(
            f"Target module {target} is not supported. JD-LoRA supports `torch.nn.Linear` and "
            "`transformers.pytorch_utils.Conv1D`."
        )

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        """PEFT's per-adapter injection, or, for a whole collection, the bulk path (:mod:`.bulk`)."""
        config = self.peft_config[adapter_name]
        if not config.is_collection_root:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype,
                                   low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
            return
        from .bulk import inject_collection

        inject_collection(self, adapter_name, config)

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

    # ----- saving: Sigma only (the bases belong to the collection) ------------------------------

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """An adapter's own tensors: its Sigmas (``<module>.jd_sigma``). Bases are saved once, with the collection."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        return {k: v for k, v in selected.items() if k.endswith(f".jd_sigma.{adapter_name}")}

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
        unknown = sorted({n for n in adapter_names if n != BASE and n not in self.peft_config})
        if unknown:
            raise UnknownAdapterNameError(unknown[0], list(self.peft_config) + [BASE],
                                          where="this model (`adapter_names`)")
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
        for module in self.modules():
            if isinstance(module, JDLoraLayer):  # the encoder runs once per input, not per beam
                if module.__dict__.get("_jd_mixed") is not (per_input if module in in_encoder else batch):
                    module._jd_mixed = per_input if module in in_encoder else batch
                devices.update(bank.sigma.device for bank in module._jd_banks.values())
                module._jd_mark_static()
            elif isinstance(module, AuxiliaryTrainingWrapper):
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


def check_modules(model: nn.Module, modules, where: str) -> dict[str, nn.Module]:
    """``{name: module}`` for collection module names, with clear errors for names the model lacks."""
    found = dict(model.named_modules())
    out = {}
    for name in modules:
        if name not in found:
            linear = [n for n, m in found.items() if isinstance(m, (nn.Linear, Conv1D, JDLoraLayer))]
            raise UnknownModuleError(name, linear, where=where)
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
