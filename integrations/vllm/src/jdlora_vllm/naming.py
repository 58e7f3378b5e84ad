"""How requests name the adapters of a JD-LoRA collection, and which LoRA paths are JD-LoRA.

vLLM's ``LoRARequest(lora_name, lora_int_id, lora_path)`` names one adapter. A JD-LoRA collection holds many,
so a request for adapter ``math`` of a collection listed as ``org/coll`` is named::

    org/coll:math        (lora_path: the collection's folder or Hub repo id)

``:`` cannot appear in a Hub repo id nor in a jdlora adapter name, so the split is unambiguous. A ``lora_path``
that is one adapter's folder of a collection (``<collection>/adapters/math``) names that adapter by itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from jdlora.format.layout import MANIFEST
from jdlora.format.load import adapter_config_kind, read_adapter_config
from jdlora.sources import looks_local

__all__ = ["SEPARATOR", "JDTarget", "adapter_request_name", "split_request_name", "jd_target"]

SEPARATOR = ":"


@dataclass(frozen=True)
class JDTarget:
    """A JD-LoRA adapter a request asks for: the collection (folder or Hub repo) and the adapter's name.

    ``name`` is None when the request names the collection itself without an adapter.
    """

    collection: str
    name: str | None


def adapter_request_name(collection_name: str, adapter: str) -> str:
    """The ``lora_name`` (OpenAI ``model``) of adapter ``adapter`` of the collection listed as ``collection_name``."""
    return f"{collection_name}{SEPARATOR}{adapter}"


def split_request_name(lora_name: str) -> tuple[str, str] | None:
    """``"org/coll:math"`` -> ``("org/coll", "math")``; None when the name carries no adapter part."""
    entry, sep, name = lora_name.rpartition(SEPARATOR)
    if not sep or not entry or not name:
        return None
    return entry, name


def jd_target(lora_name: str, lora_path: str) -> JDTarget | None:
    """The JD-LoRA adapter a ``LoRARequest`` asks for, or None when ``lora_path`` is not JD-LoRA (a plain LoRA).

    A collection root names its adapter through ``lora_name`` (``<anything>:<adapter>``); one adapter's folder
    (``adapter_config.json`` with ``adapter_name``) names it itself, and the collection is the folder holding
    ``collection.json`` above it.
    """
    config = read_adapter_config(lora_path)
    kind = adapter_config_kind(config)
    if kind is None:
        return None
    local = looks_local(lora_path)
    # one key per collection, however the path was written (the registry loads each collection once)
    source = str(Path(os.path.expanduser(lora_path)).resolve()) if local else lora_path
    own_name = config.get("adapter_name") if kind == "adapter" else None
    if own_name and local:
        for root in Path(source).parents:
            if (root / MANIFEST).is_file():
                return JDTarget(str(root), own_name)
        return JDTarget(source, own_name)  # no manifest above: the loader reports the missing file
    split = split_request_name(lora_name)
    return JDTarget(source, split[1] if split else None)
