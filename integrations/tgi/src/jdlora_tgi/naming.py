"""How requests name the adapters of a JD-LoRA collection, and which ``LORA_ADAPTERS`` entries are JD-LoRA.

TGI reads ``LORA_ADAPTERS`` as comma-separated entries ``id``, ``id@revision`` or ``id=path``
(``text_generation_server.utils.adapter.parse_lora_adapters``), and a request picks one with
``"adapter_id": id``. A JD-LoRA collection holds many adapters, so an entry that points at a collection
expands to one TGI adapter per adapter of the collection, named::

    <entry id>:<adapter name>        e.g.  org/coll:math      or, for mycoll=/data/coll,  mycoll:math

(``:`` cannot appear in a Hub repo id or in a jdlora adapter name, so the split is unambiguous). An entry that
points at one adapter folder of a collection (``math=/data/coll/adapters/math``) keeps its id as written.

Two entries that produce the same id (the same collection listed twice, ``x:y`` written by hand beside a
collection ``x`` holding ``y``) are refused at start-up with :class:`AdapterIdCollisionError`: TGI keeps the
last one silently. Give one of them another id with ``name=path``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "SEPARATOR",
    "AdapterIdCollisionError",
    "JDSource",
    "adapter_id",
    "split_adapter_id",
    "check_unique_ids",
]

SEPARATOR = ":"


class AdapterIdCollisionError(ValueError):
    """Two ``LORA_ADAPTERS`` entries give the same ``adapter_id``; requests could not tell them apart."""


@dataclass(frozen=True)
class JDSource:
    """Where a collection is read from: a local folder or a Hub repo at a revision.

    ``adapters`` is None for the whole collection, or the names to load (one adapter folder entry).
    """

    path_or_repo_id: str
    revision: str | None = None
    adapters: tuple[str, ...] | None = None


def adapter_id(entry_id: str, name: str) -> str:
    """The ``adapter_id`` of adapter ``name`` of the collection listed as ``entry_id``."""
    return f"{entry_id}{SEPARATOR}{name}"


def split_adapter_id(value: str) -> tuple[str, str] | None:
    """``"org/coll:math"`` -> ``("org/coll", "math")``; None when the id names no collection adapter."""
    entry, sep, name = value.rpartition(SEPARATOR)
    if not sep or not entry or not name:
        return None
    return entry, name


def check_unique_ids(ids_by_entry: Iterable[tuple[str, str]]) -> None:
    """Raises :class:`AdapterIdCollisionError` if two entries produce one id.

    Args:
        ids_by_entry: ``(adapter_id, entry as written in LORA_ADAPTERS)`` pairs, in order.
    """
    owners: dict[str, list[str]] = defaultdict(list)
    for adapter, entry in ids_by_entry:
        owners[adapter].append(entry)
    clashes = {a: e for a, e in owners.items() if len(e) > 1}
    if clashes:
        lines = "; ".join(f"{a!r} from {', '.join(map(repr, e))}" for a, e in sorted(clashes.items()))
        raise AdapterIdCollisionError(
            f"LORA_ADAPTERS gives the same adapter_id more than once: {lines}. Requests could not tell these "
            "adapters apart. List each collection once, or give one entry another id with `name=/local/path`."
        )
