"""Where each file of a saved collection lives, and the manifest (see docs/format.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import CollectionFormatError

FORMAT_NAME = "jdlora-collection"
FORMAT_VERSION = "1.0"
MANIFEST = "collection.json"
PEFT_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CARD = "README.md"
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
    return f"bases/{module}/{cluster}.safetensors"


def sigma_path(module: str) -> str:
    """``sigma/<module>.safetensors``: the stacked Sigma of every adapter that has the module."""
    return f"sigma/{module}.safetensors"


def adapter_subfolder(name: str, num_adapters: int) -> str:
    """``adapters/<name>``, or ``adapters/<shard>/<name>`` beyond 10,000 adapters.

    The shard is the first two hex digits of the name's sha256: 256 folders of ~40 adapters per
    10,000, stable when adapters are added.
    """
    if num_adapters <= ADAPTERS_PER_FOLDER:
        return f"adapters/{name}"
    return f"adapters/{hashlib.sha256(name.encode()).hexdigest()[:2]}/{name}"


def sigma_tensor_key(module: str) -> str:
    """Key of one module's Sigma in a per-adapter ``adapter_model.safetensors`` (PEFT key style)."""
    return f"base_model.model.{module}.{SIGMA_KEY}"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | Path) -> dict:
    """Reads and checks ``collection.json``: its format name and version.

    A newer minor version (1.x) loads: readers ignore fields they do not know. A newer major version
    is refused, since files may have changed meaning.
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
    return manifest
