"""Where each file of a saved collection lives, and the manifest (see docs/format.md)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..errors import CollectionFormatError, UnsafePathError

FORMAT_NAME = "jdlora-collection"
FORMAT_VERSION = "1.0"
MANIFEST = "collection.json"
PEFT_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"
BASES_DIR, SIGMA_DIR, ADAPTERS_DIR = "bases", "sigma", "adapters"
# Everything a collection folder may hold: a save replaces a folder holding only these, nothing else.
OWNED_FILES = (MANIFEST, PEFT_CONFIG, CARD)
OWNED_DIRS = (BASES_DIR, SIGMA_DIR, ADAPTERS_DIR)
# The Hub recommends at most 10,000 entries per folder: beyond that, adapter folders are sharded.
ADAPTERS_PER_FOLDER = 10_000
# The PEFT method: its PeftType member, registered name, parameter prefix and state-dict key names.
PEFT_TYPE = "JDLORA"
PEFT_METHOD = "jdlora"
PEFT_PREFIX = "jd_"
SIGMA_KEY = "jd_sigma"
U_KEY = "jd_U"
V_KEY = "jd_V"
# Tensor names inside a bases file (bases/<module>/<cluster>.safetensors).
BASES_TENSORS = ("U", "V")


def bases_path(module: str, cluster: int) -> str:
    """``bases/<module>/<cluster>.safetensors``: U and V of one cluster of one module."""
    return f"{BASES_DIR}/{module}/{cluster}.safetensors"


def sigma_path(module: str) -> str:
    """``sigma/<module>.safetensors``: the stacked Sigma of every adapter that has the module."""
    return f"{SIGMA_DIR}/{module}.safetensors"


def adapter_subfolder(name: str, num_adapters: int) -> str:
    """``adapters/<name>``, or ``adapters/<shard>/<name>`` beyond 10,000 adapters.

    The shard is the first two hex digits of the name's sha256: 256 folders of ~40 adapters per
    10,000, stable when adapters are added.
    """
    if num_adapters <= ADAPTERS_PER_FOLDER:
        return f"{ADAPTERS_DIR}/{name}"
    return f"{ADAPTERS_DIR}/{hashlib.sha256(name.encode()).hexdigest()[:2]}/{name}"


def sigma_tensor_key(module: str) -> str:
    """Key of one module's Sigma in a per-adapter ``adapter_model.safetensors`` (PEFT key style)."""
    return f"base_model.model.{module}.{SIGMA_KEY}"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ----- names and paths: what a manifest may say (docs/format.md, "What a reader must check") ---------

# Adapter names: PEFT adapter names and one folder name each (jdlora.collection.safe_adapter_name).
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_-]+")
# Module names: dotted PEFT module paths; one folder or file name each, so no '/' and no leading '.'.
MODULE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# Relative paths: '/'-separated components of the characters above; '.' and '..' are refused below.
_PATH_PART = re.compile(r"[A-Za-z0-9_.-]+")


def check_adapter_name(name, where: str) -> str:
    """``name`` if it is a valid adapter name (letters, digits, ``_``, ``-``); else :class:`UnsafePathError`."""
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        raise UnsafePathError(
            f"{where}: adapter name {name!r} is not allowed: names are letters, digits, '_' and '-' (each adapter is "
            "a folder adapters/<name>), so a name can never lead outside the collection."
        )
    return name


def check_module_name(name, where: str) -> str:
    """``name`` if it is a valid module name (a dotted path, no ``/``); else :class:`UnsafePathError`."""
    if not isinstance(name, str) or not MODULE_NAME.fullmatch(name):
        raise UnsafePathError(
            f"{where}: module name {name!r} is not allowed: a module name is a dotted PEFT path "
            "(letters, digits, '_', '-', '.'; no '/' and no leading '.'), since it names files of the collection."
        )
    return name


def check_relative_path(rel, where: str) -> str:
    """``rel`` if it is a relative POSIX path with no ``..``/``.``/empty component; else :class:`UnsafePathError`.

    A purely textual check, made before any file is opened; :func:`resolve_inside` adds the check of links.
    """
    parts = rel.split("/") if isinstance(rel, str) else None
    if not parts or not all(_PATH_PART.fullmatch(p) and p not in (".", "..") for p in parts):
        raise UnsafePathError(
            f"{where}: path {rel!r} is not allowed: paths in a collection are relative, '/'-separated, without '..', "
            "'.' or empty parts, so that none can lead outside its folder. The collection was tampered with or "
            "written by a broken tool; do not use it."
        )
    return rel


def check_collection_root(value, where: str) -> str:
    """``value`` if it is what writers put in a per-adapter config's ``collection_root``: ``..`` components
    only (``"../.."``, or deeper for sharded adapter folders); else :class:`UnsafePathError`. So the root a
    reader goes to is always an ancestor of the adapter folder it started from."""
    parts = value.split("/") if isinstance(value, str) else None
    if not parts or any(p != ".." for p in parts):
        raise UnsafePathError(
            f"{where}: collection_root {value!r} is not allowed: it must lead from the adapter folder up to its "
            "collection ('../..'), nowhere else. The config was tampered with or written by a broken tool."
        )
    return value


def resolve_inside(root: Path, rel: str, where: str, jail: Path | None = None) -> Path:
    """``root / rel`` after :func:`check_relative_path`, refusing it when links lead it outside ``jail``.

    ``jail`` defaults to ``root``; a Hub snapshot passes its repo's cache folder, since the cache's
    snapshot files are links into the repo's ``blobs/`` folder.
    """
    path = root / check_relative_path(rel, where)
    jail = (jail or root).resolve()
    if not path.resolve().is_relative_to(jail):
        raise UnsafePathError(f"{where}: {path} leads to {path.resolve()}, outside the collection ({jail}).")
    return path


def check_manifest(manifest: dict, where: str) -> dict:
    """Checks every name and path a manifest holds, and the indices between its lists, before any use.

    Raises:
        UnsafePathError: a name or path that could lead outside the collection.
        CollectionFormatError: a field of the wrong type, duplicate names, clusters out of range.
    """

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise CollectionFormatError(f"{where}: {what}. The manifest is malformed.")

    modules, adapters = manifest["modules"], manifest["adapters"]
    need(isinstance(modules, list) and isinstance(adapters, list), "'modules' and 'adapters' must be lists")
    need(manifest["sigma"] in ("full", "diag"), f"'sigma' is {manifest['sigma']!r}, not 'full' or 'diag'")
    module_names = set()
    for m, module in enumerate(modules):
        need(isinstance(module, dict), f"modules[{m}] is not an object")
        name = check_module_name(module.get("name"), f"{where}, modules[{m}]")
        need(name not in module_names, f"module {name!r} is listed twice")
        module_names.add(name)
        bases, sigma = module.get("bases"), module.get("sigma")
        need(isinstance(bases, list) and bases and all(isinstance(b, dict) for b in bases),
             f"module {name!r} has no list of bases")
        need(isinstance(sigma, dict), f"module {name!r} has no sigma entry")
        for j, entry in enumerate(bases):
            check_relative_path(entry.get("path"), f"{where}, module {name!r}, bases[{j}]")
        check_relative_path(sigma.get("path"), f"{where}, module {name!r}, sigma")
    adapter_names = set()
    for i, adapter in enumerate(adapters):
        need(isinstance(adapter, dict), f"adapters[{i}] is not an object")
        name = check_adapter_name(adapter.get("name"), f"{where}, adapters[{i}]")
        need(name not in adapter_names, f"adapter {name!r} is listed twice")
        adapter_names.add(name)
        check_relative_path(adapter.get("subfolder"), f"{where}, adapter {name!r}, subfolder")
        clusters = adapter.get("clusters")
        need(isinstance(clusters, list) and len(clusters) == len(modules),
             f"adapter {name!r}: 'clusters' must list one cluster (or null) per module")
        for module, c in zip(modules, clusters):
            need(c is None or (type(c) is int and 0 <= c < len(module["bases"])),
                 f"adapter {name!r}: cluster {c!r} of module {module['name']!r} does not exist")
        adapter["origin"] = check_origin(adapter.get("origin") or {}, f"{where}, adapter {name!r}, origin")
    return manifest


def check_origin(origin, where: str) -> dict:
    """An adapter's origin, checked: a Hub ``repo_id`` / ``revision`` / ``subfolder``, or a local ``folder``
    name (one path component), plus ``sha256``. A ``path`` from jdlora 0.1 manifests is reduced to its
    folder name: origins never carry a local path, neither to read from nor to publish."""
    if not isinstance(origin, dict):
        raise CollectionFormatError(f"{where}: must be an object, not {origin!r}.")
    origin = dict(origin)
    if "path" in origin:
        origin["folder"] = str(origin.pop("path")).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    for key in ("folder", "subfolder"):
        value = origin.get(key)
        if value is None:
            continue
        parts = value.split("/") if isinstance(value, str) else [""]
        if (key == "folder" and len(parts) != 1) or any(p in ("", ".", "..") or "\\" in p or "\0" in p for p in parts):
            raise UnsafePathError(
                f"{where}: {key} {value!r} is not allowed: origins name a folder (one name) or a Hub subfolder "
                "(a relative path without '..'), never a local path."
            )
    return origin


def read_manifest(path: str | Path) -> dict:
    """Reads and checks ``collection.json``: its format name and version, and every name and path in it.

    A newer minor version (1.x) loads: readers ignore fields they do not know. A newer major version
    is refused, since files may have changed meaning. Names and paths are checked by
    :func:`check_manifest` before the caller opens any file they name.
    """
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CollectionFormatError(f"{path} not found: not a jdlora collection (no {MANIFEST}).") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CollectionFormatError(f"{path} is not valid JSON ({err}); the collection is corrupted.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CollectionFormatError(f"{path} is not a jdlora collection manifest (format != {FORMAT_NAME!r}).")
    version = str(manifest.get("format_version", ""))
    major = version.split(".")[0]
    if not major.isdigit():
        raise CollectionFormatError(f"{path}: missing or malformed format_version {version!r}.")
    if int(major) > int(FORMAT_VERSION.split(".")[0]):
        raise CollectionFormatError(
            f"{path} uses format version {version}, newer than this jdlora reads ({FORMAT_VERSION}). "
            "Upgrade jdlora: pip install -U jdlora."
        )
    for field in ("modules", "adapters", "sigma"):
        if field not in manifest:
            raise CollectionFormatError(f"{path}: manifest lacks the required field {field!r}.")
    return check_manifest(manifest, str(path))
