"""Offline use: one ``LoRARequest`` per adapter of a collection, for ``LLM.generate(..., lora_request=...)``."""

from __future__ import annotations

import os

from .naming import adapter_request_name

__all__ = ["collection_lora_requests"]


def collection_lora_requests(path_or_repo_id: str | os.PathLike, *, name: str | None = None,
                             first_id: int = 1) -> dict:
    """``{adapter name: LoRARequest}`` for every adapter of the collection, ids ``first_id, first_id + 1, ...``.

    Reads only the collection's manifest. Each request is named ``<name>:<adapter>`` (``name`` defaults to
    ``path_or_repo_id``) and points at the collection, so the first one served loads the collection (bases once,
    every Sigma) and the others cost nothing more. vLLM wants each ``lora_int_id`` unique across the adapters
    it serves: give plain LoRAs ids outside ``first_id .. first_id + len - 1``.

    Example::

        requests = collection_lora_requests("/data/support", name="org/support")
        llm.generate(prompt, sampling, lora_request=requests["billing"])
    """
    from jdlora.format.load import fetch_manifest
    from vllm.lora.request import LoRARequest

    path = os.fspath(path_or_repo_id)
    names = [a["name"] for a in fetch_manifest(path)["adapters"]]
    return {n: LoRARequest(adapter_request_name(name or path, n), first_id + i, path) for i, n in enumerate(names)}
