"""Writing a collection to a folder, atomically (docs/format.md)."""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import __version__
from ..collection import JDLoraCollection
from ..errors import TargetExistsError
from .layout import (
    ADAPTER_WEIGHTS,
    BASES_TENSORS,
    CARD,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    OWNED_DIRS,
    OWNED_FILES,
    PEFT_CONFIG,
    PEFT_TYPE,
    adapter_subfolder,
    bases_path,
    check_adapter_name,
    check_module_name,
    check_origin,
    sha256_file,
    sigma_path,
    sigma_tensor_key,
)

# A save's temporary folder beside the target: `.<name>.tmp-<host>-<pid>-<random>`. The host and process
# tell a later save whether the one that made it can still be running (see _remove_stale_temporaries).
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def save_collection(collection: JDLoraCollection, path: str | os.PathLike, *, progress: bool = True) -> Path:
    """Writes ``collection`` to ``path`` atomically and returns the path.

    Everything is written into a temporary folder beside ``path``, which then replaces ``path`` in one
    rename (an atomic exchange on Linux). A crash or Ctrl-C before that leaves the previous collection
    at ``path`` untouched and no partial one; the temporary folder is removed, and one left by a killed
    save (``kill -9``, power loss) is removed by the next save to ``path``.

    Raises:
        TargetExistsError: ``path`` exists and is not a jdlora collection (a file, a link, a folder of other
            files, or a collection folder holding files of its own): nothing is replaced.
        UnsafePathError: an adapter or module name of ``collection`` would lead outside ``path``.
    """
    path = Path(path)
    check_save_target(path)
    check_names(collection)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    tmp = path.parent / f".{path.name}.tmp-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_collection_files(collection, tmp, progress=progress)
        check_save_target(path)  # again: something else may have appeared there while we were writing
        _replace_dir(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def check_save_target(path: str | os.PathLike) -> None:
    """Raises :class:`TargetExistsError` unless a save may replace ``path``: it does not exist, is an empty
    folder, or is a jdlora collection folder holding only the format's own files (docs/safety.md).

    Called before any work that would end in a save (``jdlora compress --out`` checks first, so that it
    does not compress for minutes and then refuse).
    """
    path = Path(path)
    remedy = "Save to a new folder, or move it away first."
    if path.is_symlink():
        raise TargetExistsError(f"{path} is a symbolic link; pass the folder it points to ({path.resolve()}).")
    if not path.exists():
        return
    if not path.is_dir():
        raise TargetExistsError(f"{path} exists and is a file, not a jdlora collection folder: refusing to replace "
                                f"it. {remedy}")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return
    if not _is_collection_manifest(path / MANIFEST):
        shown = ", ".join(entries[:5]) + (f" (and {len(entries) - 5} more)" if len(entries) > 5 else "")
        raise TargetExistsError(f"{path} exists and is not a jdlora collection (it holds {shown}): refusing to "
                                f"replace it, which would delete its files. {remedy}")
    foreign = [e for e in entries if e not in OWNED_FILES + OWNED_DIRS]
    if foreign:
        raise TargetExistsError(
            f"{path} is a jdlora collection, but it also holds {', '.join(foreign[:5])}, which a save would delete "
            f"(it replaces the whole folder). Move {'it' if len(foreign) == 1 else 'them'} out of the folder, or "
            "save to a new folder."
        )


def _is_collection_manifest(path: Path) -> bool:
    try:
        return json.loads(path.read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def check_names(collection: JDLoraCollection) -> None:
    """Every name that becomes a path, checked before the first file is written (docs/safety.md)."""
    for info in collection.adapters:
        check_adapter_name(info.name, "the collection")
    for module in collection.modules:
        check_module_name(module, "the collection")


def _remove_stale_temporaries(path: Path) -> None:
    """Removes temporary folders that earlier saves to ``path`` left when killed: only those named like ours
    (``.<name>.tmp-<host>-<pid>-<random>``), made on this host by a process that is no longer running."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.tmp-(?P<host>[0-9a-f]{{6}})-(?P<pid>\d+)-[0-9a-f]{{8}}")
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and match["host"] == _HOST and entry.is_dir() and not entry.is_symlink() \
                and not _running(int(match["pid"])):
            shutil.rmtree(entry, ignore_errors=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # no such process (or a pid no process can have)
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_collection_files(collection: JDLoraCollection, root: Path, *, progress: bool = True) -> dict:
    """Writes every file of the format into the empty folder ``root``; returns the manifest.

    Raises:
        UnsafePathError: an adapter or module name would lead outside ``root`` (checked before any write).
    """
    check_names(collection)
    modules_out = []
    per_adapter: list[dict[str, torch.Tensor]] = [{} for _ in collection.adapters]
    per_adapter_bases: list[dict[str, dict]] = [{} for _ in collection.adapters]
    per_adapter_norms: list[dict[str, dict]] = [{"sq_norms": {}, "residuals": {}} for _ in collection.adapters]
    module_names = list(collection.modules)
    module_errors = [[None] * len(module_names) for _ in collection.adapters]
    module_clusters = [[None] * len(module_names) for _ in collection.adapters]

    for m_index, (module, entry) in enumerate(
        tqdm(collection.modules.items(), desc="Writing modules", unit="module", disable=not progress)
    ):
        c = entry.compression
        bases = []
        for j in range(c.num_clusters):
            rel = bases_path(module, j)
            _save(root / rel, dict(zip(BASES_TENSORS, (c.U[j], c.V[j]))))
            bases.append({"path": rel, "sha256": sha256_file(root / rel)})
        ids = entry.adapter_ids.long()
        rel = sigma_path(module)
        _save(root / rel, {
            "sigma": c.sigma, "adapter_index": ids, "cluster": c.cluster.long(),
            "sq_norms": c.sq_norms.float(), "residuals": c.residuals.float(),
        })
        modules_out.append({
            "name": module, "d_out": c.U.shape[1], "d_in": c.V.shape[1], "rank": c.rank,
            "clusters": c.num_clusters, "adapters": len(ids), "error": c.error,
            "mean_adapter_error": c.mean_adapter_error, "bases": bases,
            "sigma": {"path": rel, "sha256": sha256_file(root / rel)},
        })
        errors, sq_norms, residuals = c.adapter_errors.tolist(), c.sq_norms.tolist(), c.residuals.tolist()
        for row, (i, cluster) in enumerate(zip(ids.tolist(), c.cluster.tolist())):
            per_adapter_norms[i]["sq_norms"][module] = sq_norms[row]
            per_adapter_norms[i]["residuals"][module] = residuals[row]
            per_adapter[i][sigma_tensor_key(module)] = c.sigma[row]
            per_adapter_bases[i][module] = bases[cluster]
            module_errors[i][m_index] = _round(errors[row])
            module_clusters[i][m_index] = cluster

    adapter_errors = collection.adapter_errors()
    adapters_out = []
    common = _peft_config_common(collection)
    for i, info in enumerate(tqdm(collection.adapters, desc="Writing adapters", unit="adapter", disable=not progress)):
        sub = adapter_subfolder(info.name, len(collection))
        folder = root / sub
        _save(folder / ADAPTER_WEIGHTS, per_adapter[i], {"jdlora": json.dumps(per_adapter_norms[i], sort_keys=True)})
        depth = sub.count("/") + 1
        config = dict(common, target_modules=_suffixes(per_adapter_bases[i]), collection_root="/".join([".."] * depth),
                      bases=per_adapter_bases[i], adapter_name=info.name)
        _write_json(folder / PEFT_CONFIG, config)
        adapters_out.append({
            "name": info.name, "subfolder": sub,
            "origin": check_origin(info.origin, f"adapter {info.name!r}"), "rank": info.rank, "alpha": info.alpha,
            "use_rslora": info.use_rslora, "module_ranks": info.module_ranks, "error": _round(adapter_errors[info.name]),
            "module_errors": module_errors[i], "clusters": module_clusters[i],
            "weights_sha256": sha256_file(folder / ADAPTER_WEIGHTS),
        })

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "jdlora_version": __version__,
        "base_model": collection.base_model,
        "sigma": collection.sigma_kind,
        "settings": collection.settings.to_dict(),
        "choice": collection.choice.to_dict() if collection.choice else None,
        "parameter_counts": collection.parameter_counts(),
        "error": collection.error,
        "mean_adapter_error": collection.mean_adapter_error,
        "modules": modules_out,
        "adapters": adapters_out,
        "sweep": [p.to_dict() for p in collection.sweep],
    }
    _write_json(root / MANIFEST, manifest)
    _write_json(root / PEFT_CONFIG, dict(common, target_modules=_suffixes(collection.modules), collection=MANIFEST))
    from .card import render_card

    (root / CARD).write_text(render_card(manifest))
    return manifest


def _peft_config_common(collection: JDLoraCollection) -> dict:
    """Fields shared by the root's and every adapter's ``adapter_config.json`` (read by JDLoraConfig)."""
    ranks = {e.compression.rank for e in collection.modules.values()}
    return {
        "peft_type": PEFT_TYPE,
        "base_model_name_or_path": collection.base_model,
        "r": max(ranks) if ranks else 0,
        "sigma": collection.sigma_kind,
        "task_type": None,
        "inference_mode": True,
        "jdlora_version": __version__,
    }


def _suffixes(modules) -> list[str]:
    return sorted({m.rsplit(".", 1)[-1] for m in modules})


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file with ONE metadata entry: safetensors serializes metadata from a hash map,
    so with two or more entries their order, and the file's bytes and sha256, change from run to run,
    and an unchanged file would look changed to the Hub."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata or {"format": "pt"})


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


_RENAME_EXCHANGE = 2


def _replace_dir(new: Path, target: Path) -> None:
    """Puts folder ``new`` at ``target``. An existing ``target`` is swapped out atomically where the OS
    can (Linux ``renameat2(RENAME_EXCHANGE)``), so no moment exists without a complete collection there;
    elsewhere it is moved aside first. The old folder ends up at ``new`` (removed by the caller)."""
    if not target.exists():
        os.rename(new, target)
        return
    libc_name = ctypes.util.find_library("c")
    renameat2 = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    at_fdcwd = -100
    if renameat2 is not None and renameat2(at_fdcwd, os.fsencode(new), at_fdcwd, os.fsencode(target),
                                           _RENAME_EXCHANGE) == 0:
        return
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, aside)
    os.rename(new, target)
    os.rename(aside, new)
