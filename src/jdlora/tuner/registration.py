"""Registering JD-LoRA with PEFT: the ``PeftType.JDLORA`` member and ``register_peft_method``.

``import jdlora`` must stay fast, and importing PEFT takes seconds (it imports all of its tuners and
transformers). So ``import jdlora`` calls :func:`register_when_peft_imported`: if PEFT is already
imported, JD-LoRA is registered at once; otherwise a one-shot import hook registers it right after
PEFT's own ``__init__`` finishes, whoever imports PEFT. Either way, by the time a user can call
``PeftModel.from_pretrained`` on a JD-LoRA folder, ``PeftType.JDLORA`` exists.

This module imports nothing from PEFT (or torch) at module level.
"""

from __future__ import annotations

import enum
import importlib.abc
import sys
import warnings

MIN_PEFT = (0, 21)
PEFT_TYPE = "JDLORA"
METHOD_NAME = "jdlora"
PREFIX = "jd_"

_state = {"done": False, "busy": False}


def add_enum_member(enum_cls: type[enum.Enum], name: str, value=None) -> enum.Enum:
    """Adds member ``name`` (value ``name`` unless given) to an existing ``str``-mixin Enum, once.

    Enums are closed by design, so this goes through the same bookkeeping the Enum machinery does
    when it builds a class (``_member_map_``, ``_member_names_``, ``_value2member_map_``, the class
    attribute) and works on Python 3.10 to 3.13. Idempotent: an existing member is returned as is,
    and a different member that already holds ``value`` is an error rather than an alias.
    """
    value = name if value is None else value
    if name in enum_cls.__members__:
        return enum_cls[name]
    if value in enum_cls._value2member_map_:
        raise ValueError(f"{enum_cls.__name__} already has a member with value {value!r}.")
    member_type = enum_cls._member_type_
    member = member_type.__new__(enum_cls, value) if member_type is not object else object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    if hasattr(enum_cls, "_add_member_"):  # Python 3.13+
        enum_cls._add_member_(name, member)
    else:
        type.__setattr__(enum_cls, name, member)
        enum_cls._member_map_[name] = member
    if name not in enum_cls._member_names_:
        enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[value] = member
    hashable = getattr(enum_cls, "_hashable_values_", None)  # Python 3.13 keeps this list for `in`
    if isinstance(hashable, list) and value not in hashable:
        hashable.append(value)
    return member


def check_peft_version(version: str) -> None:
    """Raises ImportError, saying what to do, when PEFT is older than 0.21."""
    parts = []
    for piece in version.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    if tuple(parts) < MIN_PEFT:
        raise ImportError(
            f"jdlora's PEFT integration needs peft>=0.21 (its tuners' save/load hooks are overridable "
            f"classmethods from 0.21 on), but peft {version} is installed. Upgrade it: pip install -U 'peft>=0.21'."
        )


def register() -> None:
    """Registers JD-LoRA with PEFT (new ``PeftType.JDLORA``, config and tuner classes). Idempotent."""
    if _state["done"] or _state["busy"]:
        return
    _state["busy"] = True
    try:
        import peft

        check_peft_version(peft.__version__)
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
        from peft.utils import PeftType, register_peft_method

        peft_type = add_enum_member(PeftType, PEFT_TYPE)
        from .config import JDLoraConfig
        from .model import JDLoraModel

        existing = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
        if existing is None:
            register_peft_method(name=METHOD_NAME, config_cls=JDLoraConfig, model_cls=JDLoraModel, prefix=PREFIX)
        elif existing.__qualname__ == JDLoraConfig.__qualname__ and existing.__module__ == JDLoraConfig.__module__:
            # jdlora.tuner was reloaded: point PEFT at the new classes
            PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = JDLoraConfig
            PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = JDLoraModel
            PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PREFIX
        else:
            raise RuntimeError(
                f"PEFT already has a method registered as {PEFT_TYPE} ({existing.__module__}.{existing.__qualname__}); "
                "jdlora cannot register its own. Remove the other registration."
            )
        from .peft_hooks import install

        install()
        _state["done"] = True
    finally:
        _state["busy"] = False


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """One-shot finder: lets the normal finders find ``peft``, then registers JD-LoRA after it executes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps PEFT's own loader: runs it, then registers JD-LoRA; everything else is delegated."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        module.__loader__ = self._loader  # leave no trace of the wrapper
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        try:
            register()
        except Exception as exc:  # never break `import peft` because of jdlora
            warnings.warn(f"jdlora could not register JD-LoRA with PEFT: {exc}", stacklevel=2)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def register_when_peft_imported() -> None:
    """Registers now if PEFT is imported, else once PEFT gets imported (see the module docstring)."""
    peft = sys.modules.get("peft")
    if peft is not None and not getattr(getattr(peft, "__spec__", None), "_initializing", False):
        try:
            register()
        except Exception as exc:
            warnings.warn(f"jdlora could not register JD-LoRA with PEFT: {exc}", stacklevel=2)
        return
    if not any(isinstance(f, _PeftImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportHook())
