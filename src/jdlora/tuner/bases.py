"""Where a new adapter's bases come from: a collection (in memory, saved, or its files), or random.

Bases are identified by content (:func:`basis_key`), so every adapter that uses the same ``U, V`` in
a layer shares one buffer there, however it was loaded. Collection files are read through
:func:`jdlora.format.load.load_bases_files`, the format's own reader.
"""

from __future__ import annotations

import hashlib
import posixpath
import zlib

import torch
from torch import Tensor

from ..errors import CollectionFormatError, IncompatibleAdaptersError, UnknownModuleError
from .config import JDLoraConfig


def basis_key(U: Tensor, V: Tensor) -> str:
    """A name for the basis ``(U, V)`` derived from its float32 values (equal bases, equal keys)."""
    digest = hashlib.sha1()
    for t in (U, V):
        t = t.detach().to("cpu", torch.float32).contiguous()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return "b" + digest.hexdigest()[:16]


def random_bases(d_out: int, d_in: int, r: int, seed: int, module: str) -> tuple[Tensor, Tensor]:
    """Fixed random orthonormal ``U [d_out, r]``, ``V [d_in, r]`` from ``(seed, module)``."""
    check_rank(r, d_out, d_in, module)
    gen = torch.Generator().manual_seed(zlib.crc32(f"jdlora-bases:{seed}:{module}".encode()))
    U = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64)).Q
    return U.float(), V.float()


def check_rank(r: int, d_out: int, d_in: int, module: str) -> None:
    if r > min(d_out, d_in):
        raise ValueError(f"Module {module}: rank {r} exceeds its dimensions ({d_out} x {d_in}).")


def initial_sigma(config: JDLoraConfig, r: int) -> Tensor:
    """Zero (the model starts unchanged), or, for ``init_weights=False``, random from torch's global
    generator, so that ``torch.manual_seed`` decides it and two adapters differ (as in every PEFT method)."""
    shape = (r, r) if config.sigma == "full" else (r,)
    if config.init_weights:
        return torch.zeros(shape)
    return torch.randn(shape) / r


def resolve_bases(config: JDLoraConfig, targets: dict[str, tuple[int, int]]) -> dict[str, tuple[Tensor, Tensor]]:
    """``{module: (U, V)}`` for a new adapter with ``config`` on ``targets`` (``{module: (d_out, d_in)}``),
    every one checked against its layer's shape before any layer is touched.

    Bases files of a saved collection (a per-adapter config's ``bases``) are read once, together.
    ``bases_in_weights``: random placeholders, replaced when the adapter's weights are loaded.
    """
    if config.runtime_config.released and config.runtime_config.bases is None and config.bases_from is None:
        raise ValueError(
            "This config's in-memory collection (`bases_from`) was released once its adapter was injected; pass the "
            "collection again: JDLoraConfig(bases_from=collection, ...)."
        )
    if config.bases and not config.bases_in_weights:
        bases = _from_files(config, list(targets))
    elif (config.runtime_config.bases is not None or config.bases_from is not None) and not config.bases_in_weights:
        bases = {module: _from_collection(config, module) for module in targets}
    else:
        return {module: random_bases(d_out, d_in, config.r, config.bases_seed, module)
                for module, (d_out, d_in) in targets.items()}
    for module, (U, V) in bases.items():
        d_out, d_in = targets[module]
        if U.shape[0] != d_out or V.shape[0] != d_in:
            raise IncompatibleAdaptersError(
                f"The bases of {module} are for a layer with {V.shape[0]} inputs and {U.shape[0]} outputs, but the "
                f"model's layer has {d_in} inputs and {d_out} outputs: the collection was made for another base model."
            )
    return bases


def _from_collection(config: JDLoraConfig, module: str) -> tuple[Tensor, Tensor]:
    collection = config.runtime_config.bases
    if collection is None:
        from ..format import load_collection

        collection = config.runtime_config.bases = load_collection(config.bases_from)
    if module not in collection.modules:
        raise UnknownModuleError(module, collection.modules, where="the collection of `bases_from`")
    c = collection.modules[module].compression
    k = config.bases_cluster
    if not 0 <= k < c.num_clusters:
        raise ValueError(f"bases_cluster={k}, but module {module} of the collection has {c.num_clusters} cluster(s).")
    return c.U[k], c.V[k]


def _from_files(config: JDLoraConfig, modules: list[str]) -> dict[str, tuple[Tensor, Tensor]]:
    """Reads ``bases/<module>/<cluster>.safetensors`` of the adapter's collection, checking each sha256."""
    from ..format.load import load_bases_files

    source = config.runtime_config.source
    if source is None:
        raise ValueError(
            "This JD-LoRA config lists bases files of a collection but not where the collection is; load the adapter "
            "with PeftModel.from_pretrained(base, repo, subfolder='adapters/<name>')."
        )
    for module in modules:
        if module not in config.bases:
            raise UnknownModuleError(module, config.bases, where="this adapter's bases")
        if not isinstance(config.bases[module], dict) or not isinstance(config.bases[module].get("path"), str):
            raise CollectionFormatError(f"The adapter config's bases entry of {module} has no path; it is corrupted.")
    where = posixpath.normpath(posixpath.join(source.get("subfolder") or "", config.collection_root or "."))
    if where.startswith("..") or where.startswith("/"):
        raise CollectionFormatError(
            f"collection_root {config.collection_root!r} leads outside {source['path_or_repo']}; the config is corrupted."
        )
    files = {m: dict(config.bases[m], path=posixpath.join(where, config.bases[m]["path"]) if where != "."
                     else config.bases[m]["path"]) for m in modules}
    hub = {k: source[k] for k in ("revision", "cache_dir", "token", "force_download") if k in source}
    return load_bases_files(source["path_or_repo"], files, **hub)
