"""jdlora_tgi: serve JD-LoRA collections (jdlora) from Text Generation Inference, beside plain LoRA.

Installed in a TGI image (``pip install "jdlora[tgi]"``), it activates itself in every Python process through
``jdlora_tgi.pth`` and hooks TGI's adapter API as TGI's modules are imported, so the stock
``text-generation-launcher`` serves ``LORA_ADAPTERS`` entries that are JD-LoRA collections. See docs/tgi.md.

Pinned TGI: v3.3.7 (commit dfb3fbe78e0d1d69251bd33065591c61bafdfaa8), the last release (maintenance mode).
"""

from __future__ import annotations

import sys

from . import _bootstrap
from .naming import SEPARATOR, AdapterIdCollisionError, adapter_id, split_adapter_id

__version__ = "0.1.0"
TGI_VERSION = "3.3.7"
TGI_COMMIT = "dfb3fbe78e0d1d69251bd33065591c61bafdfaa8"

__all__ = ["SEPARATOR", "AdapterIdCollisionError", "adapter_id", "split_adapter_id", "install", "status"]


def install() -> list[str]:
    """Activates the hooks in this process (the ``.pth`` does it at start-up) and patches the TGI modules
    already imported. Returns the names of the modules patched now."""
    if not _bootstrap.install():
        return []
    from .patches import patch_loaded_modules

    return patch_loaded_modules() if any(name in sys.modules for name in _bootstrap.HOOKED) else []


def status() -> dict:
    """Whether the import hook is active and which TGI modules are loaded and patched."""
    active = any(isinstance(f, _bootstrap.TGIHookFinder) for f in sys.meta_path)
    patched = {}
    for name in sorted(_bootstrap.HOOKED):
        module = sys.modules.get(name)
        patched[name] = None if module is None else _is_patched(name, module)
    return {"hook_active": active, "modules": patched, "tgi_version": TGI_VERSION}


def _is_patched(name: str, module) -> bool:
    probes = {
        "text_generation_server.utils": lambda m: m.weight_files,
        "text_generation_server.utils.adapter": lambda m: m.load_module_map,
        "text_generation_server.adapters.lora": lambda m: m.LoraWeights.__dict__["prepare_weights"].__func__,
        "text_generation_server.adapters.weights": lambda m: m.LayerAdapterWeights.get_data,
        "text_generation_server.layers.lora": lambda m: m.LoraLinear.forward_layer_type,
        "text_generation_server.models": lambda m: m.get_model_with_lora_adapters,
        "text_generation_server.models.flash_causal_lm": lambda m: m.FlashCausalLM.generate_token,
    }
    return getattr(probes[name](module), "__jdlora_original__", None) is not None
