"""How requests name the adapters of a JD-LoRA collection, and which LoRA paths are JD-LoRA.

vLLM's ``LoRARequest(lora_name, lora_int_id, lora_path)`` names one adapter. A JD-LoRA collection holds many,
so a request for adapter ``math`` of a collection listed as ``org/coll`` is named::

    org/coll:math        (lora_path: the collection's folder or Hub repo id)

``:`` cannot appear in a Hub repo id nor in a jdlora adapter name, so the split is unambiguous. A ``lora_path``
that is one adapter's folder of a collection (``<collection>/adapters/math``) names that adapter by itself.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from jdlora.format.layout import MANIFEST, PEFT_CONFIG, PEFT_TYPE

__all__ = ["SEPARATOR", "JDTarget", "adapter_request_name", "split_request_name", "read_adapter_config", "jd_target"]

SEPARATOR = ":"
JD_PEFT_TYPE, CONFIG_NAME, MANIFEST_NAME = PEFT_TYPE, PEFT_CONFIG, MANIFEST  # one home: jdlora.format.layout


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


def _is_local(path: str) -> bool:
    return os.path.isabs(path) or path.startswith((".", "~")) or Path(path).exists()


def read_adapter_config(path_or_repo_id: str) -> dict | None:
    """``adapter_config.json`` of a local folder or a Hub repo, or None when there is none.

    On the Hub this downloads that one small file (vLLM downloads the whole repo for a plain LoRA anyway).
    Network and authorization errors propagate: a collection that cannot be reached must not load as nothing.
    """
    if _is_local(path_or_repo_id):
        file = Path(os.path.expanduser(path_or_repo_id)) / CONFIG_NAME
        return json.loads(file.read_text()) if file.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        file = hf_hub_download(path_or_repo_id, CONFIG_NAME)
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None  # not ours: vLLM's own loader reports it
    return json.loads(Path(file).read_text())


def jd_target(lora_name: str, lora_path: str) -> JDTarget | None:
    """The JD-LoRA adapter a ``LoRARequest`` asks for, or None when ``lora_path`` is not JD-LoRA (a plain LoRA).

    A collection root names its adapter through ``lora_name`` (``<anything>:<adapter>``); one adapter's folder
    (``adapter_config.json`` with ``adapter_name``) names it itself, and the collection is the folder holding
    ``collection.json`` above it.
    """
    config = read_adapter_config(lora_path)
    if config is None or str(config.get("peft_type", "")).upper() != JD_PEFT_TYPE:
        return None
    local = _is_local(lora_path)
    # one key per collection, however the path was written (the registry loads each collection once)
    source = str(Path(os.path.expanduser(lora_path)).resolve()) if local else lora_path
    own_name = config.get("adapter_name")
    if own_name and not config.get("collection") and local:
        for root in Path(source).parents:
            if (root / MANIFEST_NAME).is_file():
                return JDTarget(str(root), own_name)
        return JDTarget(source, own_name)  # no manifest above: the loader reports the missing file
    split = split_request_name(lora_name)
    return JDTarget(source, split[1] if split else None)
