"""JD-LoRA as a PEFT method, laid out like PEFT's own tuners.

- :mod:`.config`: :class:`JDLoraConfig` (and its run-time part, :class:`JDLoraRuntimeConfig`).
- :mod:`.layer`: :class:`JDLoraLayer`, :class:`Linear` (shared bases, per-adapter Sigma, banks).
- :mod:`.model`: :class:`JDLoraModel`, the tuner (injection, saving, mixed-adapter batches).
- :mod:`.bulk`: :func:`load_collection`, :func:`to_collection` (whole collections in and out).
- :mod:`.bases`: where a new adapter's bases come from. :mod:`.mixed`: mixed-batch bookkeeping.
- :mod:`._peft_compat`: the PEFT workarounds (the ``PeftType`` member, registering when PEFT is
  imported, the ``PeftModel`` wrappers for collections); only this ``__init__`` imports it.

Importing this package registers the method with PEFT (now if PEFT is imported, else right after it
is), so ``PeftModel.from_pretrained(base, folder)`` and ``get_peft_model(model, JDLoraConfig(...))``
work. The names below are imported on first use, so that ``import jdlora`` does not import PEFT.
"""

from __future__ import annotations

import importlib

from . import _peft_compat

_LAZY = {
    "JDLoraConfig": ".config",
    "JDLoraRuntimeConfig": ".config",
    "JDLoraLayer": ".layer",
    "Linear": ".layer",
    "AdapterGroup": ".layer",
    "JDLoraModel": ".model",
    "UnknownAdapterNameError": ".model",
    "load_collection": ".bulk",
    "to_collection": ".bulk",
}

__all__ = sorted(_LAZY) + ["register"]


def register() -> None:
    """Registers JD-LoRA with PEFT now, importing PEFT (importing this package arranges it anyway)."""
    _peft_compat.register()


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        _peft_compat.register()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return __all__


_peft_compat.register_when_peft_imported()
