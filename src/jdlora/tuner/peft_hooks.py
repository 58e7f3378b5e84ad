"""The three ``PeftModel`` methods that JD-LoRA collections need to behave differently.

PEFT's tuner hooks (``BaseTuner`` classmethods, ``inject_adapter``, the config's ``from_pretrained``)
cover one adapter per folder. A collection is many adapters sharing files, and PEFT has no hook for
that at the ``PeftModel`` level, so these methods are wrapped, once, at registration:

- ``save_pretrained``: writes the collection format (docs/format.md) instead of one folder per
  adapter with its own copy of everything.
- ``push_to_hub``: publishes that format in one commit (:func:`jdlora.format.push_collection`).
- ``load_adapter``: for a collection root (``PeftModel.from_pretrained(base, root)`` calls it right
  after the bulk load in ``JDLoraModel.inject_adapter``; ``model.load_adapter(root, name)`` adds a
  whole collection), skips PEFT's single weights file, which a collection root does not have.

Each wrapper checks first that the model is a JD-LoRA PeftModel (and, for ``load_adapter``, that
the folder is a collection root); in every other case it calls PEFT's own method with the
arguments unchanged. The originals stay reachable as ``<method>.__wrapped__``.
"""

from __future__ import annotations

import functools
import inspect
import os
import shutil
import tempfile
from pathlib import Path

from . import registration

_METHODS = ("save_pretrained", "push_to_hub", "load_adapter")


def install() -> None:
    """Wraps the three ``PeftModel`` methods (idempotent)."""
    from peft import PeftModel

    for name in _METHODS:
        original = getattr(PeftModel, name)
        if getattr(original, "_jdlora", False):
            continue
        wrapper = functools.wraps(original)(_WRAPPERS[name](original))
        wrapper._jdlora = True
        setattr(PeftModel, name, wrapper)


def _is_jdlora(model) -> bool:
    return getattr(model, "peft_type", None) == registration.PEFT_TYPE


def _wrap_save_pretrained(original):
    signature = inspect.signature(original)

    def save_pretrained(self, *args, **kwargs):
        if not _is_jdlora(self):
            return original(self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if a.get("is_main_process", True):
            save_model(self, a["save_directory"], selected_adapters=a.get("selected_adapters"))

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
            hub_kwargs, _ = self._split_kwargs(kwargs)
            config = JDLoraConfig.from_pretrained(model_id, adapters=kwargs.get("adapters"), **hub_kwargs)
            if not isinstance(config, JDLoraConfig) or not config.is_collection_root:
                return original(self, model_id, adapter_name, *args, **kwargs)
            config.inference_mode = not is_trainable
            self.add_adapter(adapter_name, config, low_cpu_mem_usage=kwargs.get("low_cpu_mem_usage", False),
                             autocast_adapter_dtype=kwargs.get("autocast_adapter_dtype", True))
        elif not (isinstance(config, JDLoraConfig) and (config.is_collection_root or config._jd.bulk)):
            return original(self, model_id, adapter_name, *args, **kwargs)
        # the bulk load put every Sigma in place already: nothing left to read
        if not is_trainable:
            self.eval()
        return _IncompatibleKeys([], [])

    return load_adapter


_WRAPPERS = {"save_pretrained": _wrap_save_pretrained, "push_to_hub": _wrap_push_to_hub,
             "load_adapter": _wrap_load_adapter}


def save_model(model, save_directory: str | os.PathLike, selected_adapters=None) -> Path:
    """Writes the model's JD-LoRA adapters to ``save_directory`` in the collection format.

    Unlike :meth:`JDLoraCollection.save_pretrained` (which replaces the whole folder atomically), this
    writes the collection's files and folders into ``save_directory`` and leaves anything else there
    (a trainer's checkpoints, logs) alone; the collection's own folders are replaced, not merged.
    """
    from ..format.save import write_collection_files
    from .bulk import to_collection

    for name, config in model.peft_config.items():
        if getattr(config, "modules_to_save", None):
            raise NotImplementedError(
                f"Adapter {name!r} has modules_to_save, which the collection format cannot hold; save those "
                "modules separately."
            )
    collection = to_collection(model, selected_adapters)
    target = Path(save_directory)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write_collection_files(collection, tmp, progress=False)
        for entry in sorted(tmp.iterdir()):
            dest = target / entry.name
            if dest.is_dir() and not dest.is_symlink():
                shutil.rmtree(dest)
            elif dest.exists() or dest.is_symlink():
                dest.unlink()
            os.replace(entry, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
