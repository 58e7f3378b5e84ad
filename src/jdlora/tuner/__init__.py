"""JD-LoRA as a PEFT method: ``JDLoraConfig``, ``JDLoraModel``, the layers, and bulk loading.

``import jdlora`` registers the method with PEFT (new ``PeftType.JDLORA``; see
:mod:`.registration`), so ``PeftModel.from_pretrained(base, "org/collection")`` and
``get_peft_model(model, JDLoraConfig(...))`` work. The names below are imported on first use, so
that ``import jdlora`` does not import PEFT.

- :mod:`.config`: :class:`JDLoraConfig`.
- :mod:`.layer`: :class:`JDLoraLayer`, :class:`Linear` (shared bases, per-adapter Sigma, banks).
- :mod:`.model`: :class:`JDLoraModel` (the tuner; mixed-adapter batches).
- :mod:`.bulk`: :func:`load_collection`, :func:`to_collection` (whole collections in and out).
- :mod:`.peft_hooks`: the ``PeftModel`` methods wrapped for collections (save, push, load).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "JDLoraConfig": ".config",
    "JDLoraLayer": ".layer",
    "Linear": ".layer",
    "AdapterGroup": ".layer",
    "JDLoraModel": ".model",
    "UnknownAdapterNameError": ".model",
    "load_collection": ".bulk",
    "to_collection": ".bulk",
    "save_model": ".peft_hooks",
}

__all__ = sorted(_LAZY) + ["register"]


def register() -> None:
    """Registers JD-LoRA with PEFT now (``import jdlora`` arranges it anyway)."""
    from .registration import register as _register

    _register()


def __getattr__(name: str):
    if name in _LAZY:
        register()
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__
