"""Activates jdlora_tgi in every Python process of the environment, before TGI is imported.

``jdlora_tgi.pth`` (installed into site-packages by the wheel) runs ``import jdlora_tgi._bootstrap`` at
interpreter start-up. This module imports nothing heavy (no torch, no TGI): it puts a finder at the front of
``sys.meta_path`` that, when one of the TGI modules named in ``jdlora_tgi.patches.HOOKS`` is imported, lets
the normal machinery load it and then applies the hook to the fresh module, before any other module can
bind its names. Processes that never import ``text_generation_server`` pay one ``sys.meta_path`` lookup per
import. ``JDLORA_TGI=0`` in the environment turns it off.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

HOOKED = frozenset({
    "text_generation_server.utils",
    "text_generation_server.utils.adapter",
    "text_generation_server.adapters.lora",
    "text_generation_server.adapters.weights",
    "text_generation_server.layers.lora",
    "text_generation_server.models",
    "text_generation_server.models.flash_causal_lm",
})  # kept equal to jdlora_tgi.patches.HOOKS (a test checks), without importing it


class _HookedLoader(importlib.abc.Loader):
    """Delegates to the real loader, then applies the module's hook."""

    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self._loader  # leave no trace on the module
        self._loader.exec_module(module)
        from jdlora_tgi.patches import apply_hook

        apply_hook(self._name, module)

    def __getattr__(self, name):  # get_data, get_filename, is_package, ... of the real loader
        return getattr(self._loader, name)


class TGIHookFinder(importlib.abc.MetaPathFinder):
    """Finds hooked TGI modules with the other finders and wraps their loader."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in HOOKED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _HookedLoader(spec.loader, fullname)
                return spec
        return None


def install() -> bool:
    """Puts the finder first on ``sys.meta_path`` (idempotent); False when ``JDLORA_TGI=0``."""
    if os.environ.get("JDLORA_TGI", "1").lower() in {"0", "false", "no"}:
        return False
    if not any(isinstance(f, TGIHookFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TGIHookFinder())
    return True


install()
