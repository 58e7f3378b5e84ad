"""Where an adapter's bases come from: a collection (in memory, saved, or its files), or random.

Bases are identified by content (:func:`basis_key`), so every adapter that uses the same ``U, V`` in
a layer shares one buffer there, however it was loaded.
"""

from __future__ import annotations

import hashlib
import posixpath
import zlib
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CollectionFormatError, CollectionIntegrityError, UnknownModuleError
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
    if r > min(d_out, d_in):
        raise ValueError(f"Module {module}: rank {r} exceeds its dimensions ({d_out} x {d_in}).")
    gen = torch.Generator().manual_seed(zlib.crc32(f"jdlora-bases:{seed}:{module}".encode()))
    U = torch.linalg.qr(torch.randn(d_out, r, generator=gen, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(d_in, r, generator=gen, dtype=torch.float64)).Q
    return U.float(), V.float()


def initial_sigma(config: JDLoraConfig, r: int, module: str) -> Tensor:
    """Zero (the model starts unchanged), or random for ``init_weights=False``."""
    shape = (r, r) if config.sigma == "full" else (r,)
    if config.init_weights:
        return torch.zeros(shape)
    gen = torch.Generator().manual_seed(zlib.crc32(f"jdlora-sigma:{config.bases_seed}:{module}".encode()))
    return torch.randn(shape, generator=gen) / r


def bases_for(config: JDLoraConfig, module: str, layer) -> tuple[Tensor, Tensor]:
    """``(U, V)`` for ``module`` of a new adapter with ``config``; checked against the layer's shape."""
    d_out, d_in = layer.out_features, layer.in_features
    if config.bases:
        U, V = _from_files(config, module)
    elif config._jd.bases is not None or config.bases_from is not None:
        U, V = _from_collection(config, module)
    else:
        return random_bases(d_out, d_in, config.r, config.bases_seed, module)
    if U.shape[0] != d_out or V.shape[0] != d_in:
        from ..errors import IncompatibleAdaptersError

        raise IncompatibleAdaptersError(
            f"The bases of {module} are for a layer with {V.shape[0]} inputs and {U.shape[0]} outputs, but the "
            f"model's layer has {d_in} inputs and {d_out} outputs: the collection was made for another base model."
        )
    return U, V


def _from_collection(config: JDLoraConfig, module: str) -> tuple[Tensor, Tensor]:
    collection = config._jd.bases
    if collection is None:
        from ..format import load_collection

        collection = config._jd.bases = load_collection(config.bases_from)
    if module not in collection.modules:
        raise UnknownModuleError(module, collection.modules, where="the collection of `bases_from`")
    c = collection.modules[module].compression
    k = config.bases_cluster
    if not 0 <= k < c.num_clusters:
        raise ValueError(f"bases_cluster={k}, but module {module} of the collection has {c.num_clusters} cluster(s).")
    return c.U[k], c.V[k]


def _from_files(config: JDLoraConfig, module: str) -> tuple[Tensor, Tensor]:
    """Reads ``bases/<module>/<cluster>.safetensors`` of the adapter's collection, checking its sha256."""
    from safetensors.torch import load_file

    from ..format.layout import sha256_file

    entry = config.bases.get(module)
    if entry is None:
        raise UnknownModuleError(module, config.bases, where="this adapter's bases")
    path = _fetch(config, entry["path"])
    if entry.get("sha256") and (actual := sha256_file(path)) != entry["sha256"]:
        raise CollectionIntegrityError(
            f"{path} has sha256 {actual[:12]}..., but the adapter's config records {entry['sha256'][:12]}...: the "
            "bases file is corrupted or belongs to another version of the collection. Re-download it "
            "(force_download=True) or re-save the collection."
        )
    tensors = load_file(str(path))
    if "U" not in tensors or "V" not in tensors:
        raise CollectionFormatError(f"{path} lacks the tensors U and V.")
    return tensors["U"], tensors["V"]


def _fetch(config: JDLoraConfig, rel: str) -> Path:
    """Local path of file ``rel`` (relative to the collection root) of the adapter's collection."""
    source = config._jd.source
    where = posixpath.normpath(posixpath.join(source.get("subfolder") or "", config.collection_root or "."))
    local = Path(source["path_or_repo"])
    if local.is_dir():
        path = (local / where / rel).resolve()
        if not path.is_file():
            raise CollectionFormatError(f"{path} is missing: the collection is incomplete (the adapter needs it).")
        return path
    from huggingface_hub import hf_hub_download

    filename = rel if where in ("", ".") else posixpath.normpath(posixpath.join(where, rel))
    hub = {k: source[k] for k in ("revision", "cache_dir", "token", "local_files_only", "force_download",
                                   "repo_type") if k in source}
    return Path(hf_hub_download(source["path_or_repo"], filename, **hub))
