"""Every PEFT workaround of JD-LoRA, in one module that only ``jdlora.tuner``'s ``__init__`` imports.

PEFT's tuners are built in; a method that lives outside PEFT needs three things PEFT has no public
hook for:

1. **A ``PeftType`` member.** ``PeftType`` is a closed enum, and ``PeftConfig.from_pretrained`` looks
   the type up in it: :func:`add_enum_member` adds ``JDLORA``. Then ``register_peft_method`` (public)
   maps it to :class:`~jdlora.tuner.JDLoraConfig` and :class:`~jdlora.tuner.JDLoraModel`.
2. **Registering when PEFT is imported.** ``import jdlora`` must stay fast (importing PEFT takes
   seconds) yet ``PeftModel.from_pretrained(base, jd_folder)`` must work afterwards. So
   :func:`register_when_peft_imported` registers at once if PEFT is imported, else installs a finder
   that registers right after PEFT's ``__init__`` (and after the tuner's own modules, when one of them
   is what imports PEFT first) has run, whoever imports it.
3. **``PeftModel`` methods for collections.** A collection is many adapters sharing files, and PEFT has
   no ``PeftModel``-level hook for that. These methods are wrapped once, at registration; each wrapper
   checks that the model is a JD-LoRA model and otherwise calls PEFT's own method unchanged (the
   originals stay reachable as ``<method>.__wrapped__``):

   - ``save_pretrained``: PEFT's own (PEFT's layout, docs/format.md), minus the weightless entry
     adapter of a bulk-loaded collection, which has nothing to save.
   - ``push_to_hub``: publishes the collection format in one commit (:func:`jdlora.format.push_collection`).
   - ``load_adapter``: a collection root (``adapter_config.json`` with ``"collection"``) is loaded in
     bulk; PEFT's single weights file does not exist there.

This module imports nothing from PEFT (or torch) at module level.
"""

from __future__ import annotations

import enum
import functools
import importlib.abc
import inspect
import sys
import warnings

from ..format.layout import PEFT_METHOD, PEFT_PREFIX, PEFT_TYPE

MIN_PEFT = (0, 21)
_TUNER = __name__.rpartition(".")[0]  # "jdlora.tuner"
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
    """Registers JD-LoRA with PEFT (``PeftType.JDLORA``, config and tuner classes, wrappers). Idempotent."""
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
            register_peft_method(name=PEFT_METHOD, config_cls=JDLoraConfig, model_cls=JDLoraModel, prefix=PEFT_PREFIX)
        elif existing.__qualname__ == JDLoraConfig.__qualname__ and existing.__module__ == JDLoraConfig.__module__:
            # jdlora.tuner was reloaded: point PEFT at the new classes
            PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = JDLoraConfig
            PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = JDLoraModel
            PEFT_TYPE_TO_PREFIX_MAPPING[peft_type] = PEFT_PREFIX
        else:
            raise RuntimeError(
                f"PEFT already has a method registered as {PEFT_TYPE} ({existing.__module__}.{existing.__qualname__}); "
                "jdlora cannot register its own. Remove the other registration."
            )
        _wrap_peft_model()
        _state["done"] = True
    finally:
        _state["busy"] = False


# ----- registering when PEFT gets imported ---------------------------------------------------------


def _initializing(module) -> bool:
    return module is not None and getattr(getattr(module, "__spec__", None), "_initializing", False)


def _register_when_ready(finished: str | None = None) -> None:
    """Registers once PEFT is imported and no module of the tuner is half-way through its own import.

    The ``PeftType`` member is added as soon as PEFT is there, since a tuner module that imported PEFT
    first (``from jdlora.tuner.config import JDLoraConfig``) needs it before it finishes. ``finished``: the
    module whose loader calls (still marked as initializing, but done)."""
    peft = sys.modules.get("peft")
    if peft is None or (_initializing(peft) and finished != "peft") or _state["done"]:
        return
    from peft.utils import PeftType

    add_enum_member(PeftType, PEFT_TYPE)
    if any(_initializing(m) for name, m in list(sys.modules.items())
           if name.startswith(_TUNER + ".") and name != finished):
        return  # that module's loader calls again when it is done
    try:
        register()
    except Exception as exc:  # never break `import peft` because of jdlora
        warnings.warn(f"jdlora could not register JD-LoRA with PEFT: {exc}", stacklevel=3)
    if _state["done"]:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _PeftImportHook)]


class _PeftImportHook(importlib.abc.MetaPathFinder):
    """Lets the normal finders find ``peft`` (or a module of the tuner), and registers after it executes."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "peft" and not fullname.startswith(_TUNER + "."):
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
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
    """Wraps a module's own loader: runs it, then registers JD-LoRA if it can; the rest is delegated."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        try:
            self._loader.exec_module(module)
        finally:
            module.__loader__ = self._loader  # leave no trace of the wrapper
            if module.__spec__ is not None:
                module.__spec__.loader = self._loader
        _register_when_ready(finished=module.__name__)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def register_when_peft_imported() -> None:
    """Registers now if PEFT is imported, else once PEFT gets imported (see the module docstring)."""
    if sys.modules.get("peft") is not None and not _initializing(sys.modules["peft"]):
        _register_when_ready()
        return
    if not any(isinstance(f, _PeftImportHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _PeftImportHook())


# ----- PeftModel methods for collections -----------------------------------------------------------


def _wrap_peft_model() -> None:
    """Wraps the three ``PeftModel`` methods (idempotent)."""
    from peft import PeftModel

    for name, make in _WRAPPERS.items():
        original = getattr(PeftModel, name)
        if getattr(original, "_jdlora", False):
            continue
        wrapper = functools.wraps(original)(make(original))
        wrapper._jdlora = True
        setattr(PeftModel, name, wrapper)


def _is_jdlora(model) -> bool:
    return getattr(model, "peft_type", None) == PEFT_TYPE


def _wrap_save_pretrained(original):
    signature = inspect.signature(original)

    def save_pretrained(self, *args, **kwargs):
        if not _is_jdlora(self):
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        selected = bound.arguments.get("selected_adapters")
        with_weights = self.base_model.jd_adapters()
        if selected is None:
            bound.arguments["selected_adapters"] = [n for n in self.peft_config if n in with_weights]
        else:
            empty = [n for n in selected if n in self.peft_config and n not in with_weights]
            if empty:
                raise ValueError(
                    f"Adapter {empty[0]!r} has no weights: it is the entry of a collection loaded in bulk, which "
                    "stands for the whole collection. Select the collection's adapters, or write the collection "
                    "format with jdlora.tuner.to_collection(model).save_pretrained(path)."
                )
        # each adapter is written with the config that describes its weights file (see jd_saved_config)
        live = dict(self.peft_config)
        try:
            for name in bound.arguments["selected_adapters"]:
                if name in live:  # (PEFT names the unknown ones)
                    self.peft_config[name] = self.base_model.jd_saved_config(name)
            return original(*bound.args, **bound.kwargs)
        finally:
            self.peft_config.update(live)

    return save_pretrained


def _wrap_push_to_hub(original):
    def push_to_hub(self, repo_id, *args, **kwargs):
        if not _is_jdlora(self):
            return original(self, repo_id, *args, **kwargs)
        from ..format import push_collection
        from .bulk import to_collection

        keep = ("private", "revision", "commit_message", "commit_description", "create_pr", "token")
        return push_collection(to_collection(self, kwargs.get("selected_adapters")), repo_id,
                               progress=False, **{k: v for k, v in kwargs.items() if k in keep})

    return push_to_hub


def _wrap_load_adapter(original):
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        if not _is_jdlora(self):
            return original(self, model_id, adapter_name, *args, **kwargs)
        from torch.nn.modules.module import _IncompatibleKeys

        from .config import JDLoraConfig

        is_trainable = kwargs.get("is_trainable", args[0] if args else False)
        config = self.peft_config.get(adapter_name)
        if config is None:
            hub_kwargs, _ = self._split_kwargs(dict(kwargs))
            config = JDLoraConfig.from_pretrained(model_id, adapters=kwargs.get("adapters"), **hub_kwargs)
            if not isinstance(config, JDLoraConfig) or not config.is_collection_root:
                return original(self, model_id, adapter_name, *args, **kwargs)
            config.inference_mode = not is_trainable
            self.add_adapter(adapter_name, config, low_cpu_mem_usage=kwargs.get("low_cpu_mem_usage", False),
                             autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True))
        elif not (isinstance(config, JDLoraConfig) and config.runtime_config.pending_load):
            if isinstance(config, JDLoraConfig) and config.is_collection_root:
                raise ValueError(
                    f"Adapter {adapter_name!r} stands for a collection loaded in bulk; loading weights into it again "
                    "is not supported. Load the folder under a new adapter name, or delete_adapter first."
                )
            # an adapter with weights: PEFT loads the new ones into it (and the bases stored with them)
            return original(self, model_id, adapter_name, *args, **kwargs)
        # right after a bulk load of a saved collection (PeftModel.from_pretrained on a collection root):
        # every Sigma is in place already
        config.runtime_config.pending_load = False
        if not is_trainable:
            self.eval()
        return _IncompatibleKeys([], [])

    return load_adapter


_WRAPPERS = {"save_pretrained": _wrap_save_pretrained, "push_to_hub": _wrap_push_to_hub,
             "load_adapter": _wrap_load_adapter}
