"""The hooks into vLLM 0.32's LoRA code. Each wraps one vLLM method and calls the original; no vLLM file changes.

=====================================================  =======================================================
vLLM (0.32.0)                                          what the hook adds
=====================================================  =======================================================
``LoRAModelManager._create_lora_modules``              a :class:`~jdlora_vllm.tables.JDLayer` per linear LoRA
                                                       layer and a :class:`~jdlora_vllm.registry.JDRegistry`
``WorkerLoRAManager._load_adapter``                    a request whose ``lora_path`` is a JD-LoRA collection
                                                       loads the collection once and returns an empty
                                                       ``LoRAModel`` (nothing for vLLM's slots to hold)
``LoRAModelManager._create_merged_loras_inplace``      skipped for those empty models (nothing to pack)
``LoRAModelManager.set_adapter_mapping``               per-token JD rows of the step, prepared once
``BaseLinearLayerWithLoRA._apply_lora_to_output``      ``y += U_c Sigma_a V_c^T x`` per token after vLLM's LoRA
``torch_ops.bgmv_shrink`` (CPU punica)                 tokens without adapter (index -1) get a zero shrink
                                                       (vLLM indexes slot -1, the LAST slot, for them)
``OpenAIServingModels.init_static_loras``              a ``--lora-modules name=<collection>`` entry becomes
                                                       one entry ``name:<adapter>`` per adapter
=====================================================  =======================================================
"""

from __future__ import annotations

import dataclasses
import functools
import logging

from jdlora.format.load import adapter_config_kind, read_adapter_config

from .naming import adapter_request_name, jd_target
from .registry import JDRegistry
from .tables import JDLayer

__all__ = ["install", "expand_lora_modules"]

logger = logging.getLogger("vllm.jdlora_vllm")  # under "vllm": vLLM's handlers and VLLM_LOGGING_LEVEL apply
_MARK = "__jdlora_original__"


def _wrap(owner, name: str, make):
    """Replaces ``owner.name`` by ``make(original)`` once (idempotent: vLLM may load plugins more than once)."""
    original = getattr(owner, name)
    if getattr(original, _MARK, None) is not None:
        return
    wrapper = make(original)
    functools.update_wrapper(wrapper, original)
    setattr(wrapper, _MARK, original)
    setattr(owner, name, wrapper)


def install() -> None:
    """Installs every hook in this process."""
    from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager

    _wrap(LoRAModelManager, "_create_lora_modules", _create_lora_modules)
    _wrap(LoRAModelManager, "set_adapter_mapping", _set_adapter_mapping)
    _wrap(LoRAModelManager, "_create_merged_loras_inplace", _create_merged_loras_inplace)
    _wrap(WorkerLoRAManager, "_load_adapter", _load_adapter)
    _wrap(BaseLinearLayerWithLoRA, "_apply_lora_to_output", _apply_lora_to_output)
    _install_cpu_base_rows_fix()
    try:
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    except ImportError:  # a vLLM without the OpenAI server's dependencies: offline use only
        return
    _wrap(OpenAIServingModels, "init_static_loras", _init_static_loras)


# ----- layers and registry ------------------------------------------------------------------------


def _create_lora_modules(original):
    def wrapper(self):
        original(self)
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
        from vllm.lora.layers.classifier import ClassificationHeadWithLoRA

        layers, unsupported = {}, None
        for name, module in self.modules.items():
            if not isinstance(module, BaseLinearLayerWithLoRA) or isinstance(module, ClassificationHeadWithLoRA):
                continue
            if module.tp_size > 1:  # plain LoRA still works; a JD-LoRA request is refused (JDRegistry.register)
                unsupported = (f"tensor_parallel_size={module.tp_size}: jdlora_vllm serves JD-LoRA collections with "
                               "tensor_parallel_size=1 only; start vLLM without tensor parallelism, or export the "
                               "adapters as plain LoRA (`jdlora export-lora`)")
                layers = {}
                break
            subs = self.packed_modules.get(name, [name])
            if len(subs) != len(module.output_slices):
                continue  # a packing vLLM splits differently (e.g. one fused checkpoint tensor): not served as JD
            weight = getattr(module.base_layer, "weight", None)
            dtype = weight.dtype if weight is not None and weight.is_floating_point() else self.lora_config.lora_dtype
            layers[name] = JDLayer(name, subs, module.output_slices, module.input_size, module.device, dtype)
        self._jdlora = JDRegistry(layers, unsupported=unsupported)
        for name, layer in layers.items():
            self.modules[name]._jdlora_layer = layer
            self.modules[name]._jdlora_registry = self._jdlora

    return wrapper


def _set_adapter_mapping(original):
    def wrapper(self, mapping):
        original(self, mapping)
        registry = getattr(self, "_jdlora", None)
        if registry is None or getattr(mapping.type, "name", "LANGUAGE") != "LANGUAGE":
            return
        if registry.stale or registry.mapping != mapping:
            registry.set_mapping(mapping, self.device)

    return wrapper


def _apply_lora_to_output(original):
    def wrapper(self, x, output):
        output = original(self, x, output)
        layer = getattr(self, "_jdlora_layer", None)
        if layer is None or not self._jdlora_registry.active:
            return output
        y = output.view(-1, output.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        batch = self._jdlora_registry.batch_for(x2.shape[0])
        if batch is not None:
            layer.add_to(y, x2, batch)
        return output

    return wrapper


# ----- loading ------------------------------------------------------------------------------------


def _load_adapter(original):
    def wrapper(self, lora_request):
        registry: JDRegistry | None = getattr(self._adapter_manager, "_jdlora", None)
        target = jd_target(lora_request.lora_name, lora_request.lora_path) if registry is not None else None
        if target is None:
            if registry is not None:
                registry.forget(lora_request.lora_int_id)
            return original(self, lora_request)
        if target.name is None:
            raise ValueError(
                f"LoRA request {lora_request.lora_name!r} points at the JD-LoRA collection {lora_request.lora_path}, "
                f"which holds many adapters: name one as '{lora_request.lora_name}:<adapter>' (the OpenAI server "
                "lists every adapter of a `--lora-modules name=<collection>` entry in /v1/models)."
            )
        from jdlora.errors import UnknownAdapterError
        from vllm.exceptions import LoRAAdapterNotFoundError

        try:
            registry.register(lora_request.lora_int_id, target)
        except UnknownAdapterError as e:
            logger.warning("jdlora_vllm: %s", e)
            raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path) from e
        return _jd_lora_model_class()(lora_request.lora_int_id, rank=1, loras={})

    return wrapper


@functools.cache
def _jd_lora_model_class():
    from vllm.lora.lora_model import LoRAModel

    class JDLoRAModel(LoRAModel):
        """What vLLM's caches hold for a JD-LoRA adapter: no LoRA weights (its slots are zeros), since the adapter's
        bases and Sigma live in the JD tables for as long as the engine runs."""

    return JDLoRAModel


def _create_merged_loras_inplace(original):
    def wrapper(self, lora_model):
        if isinstance(lora_model, _jd_lora_model_class()):
            return None  # nothing to pack (vLLM's version assumes at least one LoRA weight)
        return original(self, lora_model)

    return wrapper


# ----- vLLM's CPU torch ops: index -1 means "no adapter" --------------------------------------------


def _install_cpu_base_rows_fix() -> None:
    """vLLM 0.32's torch ops (used by the CPU punica wrapper) gather ``lora_a[indices]``, so a token with index -1
    (no adapter) uses the LAST slot's adapter whenever that slot is filled. Zeroing the shrink output of those
    tokens makes the expand add nothing to them (0 @ B = 0), which is what -1 means."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    def make(original):
        def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
            original(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling)
            none = lora_indices_tensor < 0
            if none.shape[0] == output_tensor.shape[0]:
                output_tensor.masked_fill_(none.view(-1, *([1] * (output_tensor.dim() - 1))), 0)
            elif bool(none.any()):
                raise RuntimeError("jdlora_vllm: unexpected shapes in vLLM's bgmv_shrink")

        return bgmv_shrink

    _wrap(lora_ops, "bgmv_shrink", make)  # sgmv_shrink (prefill) calls it through the module
    punica_cpu.bgmv_shrink = lora_ops.bgmv_shrink  # punica_cpu imported the name (decode path)


# ----- the OpenAI server --------------------------------------------------------------------------


def expand_lora_modules(modules: list) -> list:
    """``--lora-modules`` entries with each JD-LoRA collection replaced by one entry per adapter (``name:adapter``).

    Plain LoRA entries and single-adapter folders of a collection are kept as they are.
    """
    from jdlora.format.load import fetch_manifest

    expanded = []
    for module in modules:
        if adapter_config_kind(read_adapter_config(module.path)) != "collection":
            expanded.append(module)
            continue
        names = [a["name"] for a in fetch_manifest(module.path)["adapters"]]
        logger.info("jdlora_vllm: --lora-modules %s=%s serves %d JD-LoRA adapters as %s", module.name, module.path,
                    len(names), adapter_request_name(module.name, "<adapter>"))
        expanded.extend(dataclasses.replace(module, name=adapter_request_name(module.name, n)) for n in names)
    return expanded


def _init_static_loras(original):
    async def wrapper(self):
        if self.static_lora_modules:
            self.static_lora_modules = expand_lora_modules(self.static_lora_modules)
        return await original(self)

    return wrapper

