"""Reading (and writing) standard PEFT LoRA adapters, one module at a time.

An adapter is a folder (local, or a Hub repo / subfolder) holding
`adapter_config.json` and `adapter_model.safetensors`. Opening one reads only
the config and the safetensors header; `LoraAdapter.read_module` then reads
the two factors of one module, so a collection of thousands of adapters can be
compressed module by module without holding it in memory.

A *module name* is the PEFT key without the `base_model.model.` prefix and the
`.lora_A.weight` / `.lora_B.weight` suffix, e.g. `model.layers.0.self_attn.q_proj`.
For module m, adapter i contributes `dW = scaling(m) * B @ A` with A `[r, d_in]`
and B `[d_out, r]`.

Example:
    >>> adapters = open_adapters(["./my-lora", "org/other-lora@v1"])
    >>> a, b = adapters[0].read_module("model.layers.0.self_attn.q_proj")
"""

from __future__ import annotations

import collections
import copy
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from jdlora.errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    JDLoraError,
    NonFiniteWeightsError,
    TargetExistsError,
    UnknownModuleError,
    UnsafeAdapterError,
)

__all__ = ["LoraAdapter", "open_adapter", "open_adapters", "check_compatible", "looks_local", "write_lora_folder"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

# safetensors itself refuses headers above 100 MB; checking first avoids reading a garbage length.
_MAX_HEADER_BYTES = 100_000_000
# LoRA factors are floating point; any other dtype is a format error.
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}
# `[base_model.model.]<module>.lora_A[.<adapter name>].weight`
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_[AB])(?:\.[^.]+)?\.weight$")
# Config switches of LoRA variants whose update is not `scaling * B @ A` on a linear layer.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA with a bias",
    "use_bdlora": "block-diagonal LoRA",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "arrow_config": "Arrow routing",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "modules_to_save": "fully trained modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*(@.+)?$")
# No LoRA factor of a working adapter comes near this (real ones stay below 1); a value above it comes from
# corrupted bytes (a flipped exponent bit gives 1e24) and would overflow the compression into NaN.
MAX_ABS_FACTOR = 1e6


def looks_local(spec: str | os.PathLike) -> bool:
    """Whether ``spec`` names a local path rather than a Hub repo id, without touching the network.

    Local: a ``Path``; anything that is not shaped like ``org/name[/subfolder][@revision]`` (``./x``, ``/x``,
    ``~/x``, ``x``, backslashes); and ``a/b`` when ``a`` is an existing local folder (then ``a/b`` is a path
    under it, even if ``a/b`` itself is missing). So a mistyped local path fails at once instead of after
    the Hub client's retries.
    """
    if not isinstance(spec, str):
        return True
    if not _HUB_ID.match(spec) or spec.startswith((".", "~")):
        return True
    return Path(spec.split("/", 1)[0]).is_dir()


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """The value of the first pattern matching `module`, as peft's `get_pattern_key` decides.

    peft treats each key as a regex that must match a dot-separated suffix of the
    module name (`(.*\\.)?(key)$`), first key in the mapping wins.
    """
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, checked against the file size; reads no tensor data.

    Raises:
        AdapterFormatError: the file is truncated, its header is garbage, or its offsets are inconsistent.
    """

    def bad(why: str) -> AdapterFormatError:
        return AdapterFormatError(
            f"{path} is not a valid safetensors file: {why}. It is truncated or corrupted; "
            "download or export the adapter again."
        )

    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise bad(f"it is only {size} bytes long")
        (n,) = struct.unpack("<Q", prefix)
        if n > min(_MAX_HEADER_BYTES, size - 8):
            raise bad(f"the header claims {n} bytes but the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad("the header is not valid JSON") from exc
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    header.pop("__metadata__", None)
    shapes, data_end = {}, 0
    for key, info in header.items():
        dtype = info.get("dtype") if isinstance(info, dict) else None
        if not isinstance(dtype, str):
            raise bad(f"the entry of tensor {key!r} has no dtype")
        if dtype not in _DTYPE_BYTES:
            raise AdapterFormatError(f"Tensor {key!r} in {path} is {dtype}; LoRA factors are floating point.")
        try:
            shape = info["shape"]
            begin, end = info["data_offsets"]
            nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
            dims_ok = all(isinstance(d, int) and d >= 0 for d in shape)
            consistent = dims_ok and 0 <= begin <= end and end - begin == nbytes
        except (KeyError, TypeError, ValueError) as exc:
            raise bad(f"the entry of tensor {key!r} is malformed") from exc
        if not consistent:
            raise bad(f"tensor {key!r} has offsets {begin}..{end}, which do not fit its shape {shape}")
        shapes[key], data_end = tuple(int(d) for d in shape), max(data_end, end)
    if 8 + n + data_end != size:
        raise bad(f"the header describes {8 + n + data_end} bytes but the file has {size}")
    return shapes


class LoraAdapter:
    """One PEFT LoRA adapter, opened lazily: only the header is read at open; weights are read one module at a time.

    Use `open_adapter` rather than this constructor for Hub ids.

    Args:
        folder: a folder holding `adapter_config.json` and `adapter_model.safetensors`
            (or `adapter_model.bin`, see `allow_pickle`).
        name: the adapter's name; defaults to the folder name.
        origin: where it came from, e.g. `{"repo_id": ..., "revision": ..., "subfolder": ...}`;
            defaults to `{"folder": <folder name>}` (never a full local path: origins get published).
        allow_pickle: load `adapter_model.bin` (with `torch.load(weights_only=True)`) when there is
            no safetensors file. Off by default: pickles from strangers can run code.

    Attributes:
        name, base_model, config, weights_file, modules (module -> (rank, d_out, d_in)).
        folder: the local folder it was read from (for a Hub adapter, the cache's); kept in memory only.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        name: str | None = None,
        origin: Mapping[str, Any] | None = None,
        allow_pickle: bool = False,
    ):
        folder = Path(folder).resolve()
        if not folder.is_dir():
            raise AdapterFormatError(f"No adapter folder at {folder}.")
        self.name: str = name or folder.name
        self.folder = folder
        self.config: dict[str, Any] = self._read_config(folder / CONFIG_NAME)
        self.base_model: str | None = self.config.get("base_model_name_or_path")
        self._origin = dict(origin) if origin is not None else {"folder": folder.name}
        self._sha256: str | None = None
        self._state: dict[str, torch.Tensor] | None = None  # all tensors, for a pickle adapter only
        safetensors_file, pickle_file = folder / SAFETENSORS_NAME, folder / PICKLE_NAME
        if safetensors_file.is_file():
            self.weights_file = safetensors_file
            shapes = _safetensors_shapes(safetensors_file)
            try:  # let safetensors' own reader judge the header too, still without reading data
                with safe_open(safetensors_file, framework="pt", device="cpu"):
                    pass
            except (SafetensorError, OSError) as exc:
                raise AdapterFormatError(f"safetensors cannot open {safetensors_file}: {exc}.") from exc
        elif pickle_file.is_file():
            if not allow_pickle:
                raise UnsafeAdapterError(
                    f"Adapter {self.name!r} ships only a pickle, {pickle_file}; loading pickles can run "
                    "arbitrary code. If you trust its author, pass allow_pickle=True (it is then loaded with "
                    "torch.load(weights_only=True)), or convert it to adapter_model.safetensors."
                )
            self.weights_file = pickle_file
            self._state = self._load_pickle(pickle_file)
            shapes = {k: tuple(v.shape) for k, v in self._state.items()}
        else:
            raise AdapterFormatError(
                f"Adapter folder {folder} has no {SAFETENSORS_NAME} (nor {PICKLE_NAME}); "
                "point at the folder that holds the adapter weights."
            )
        self._keys: dict[str, tuple[str, str]] = {}  # module -> (lora_A key, lora_B key)
        self.modules: dict[str, tuple[int, int, int]] = self._index(shapes)

    @staticmethod
    def _read_config(path: Path) -> dict[str, Any]:
        if not path.is_file():
            raise AdapterFormatError(
                f"{path.parent} has no {CONFIG_NAME}, so it is not a PEFT adapter folder; "
                "point at the folder that holds adapter_config.json and adapter_model.safetensors."
            )
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise AdapterFormatError(f"{path} is not valid JSON: {exc}.") from exc
        if not isinstance(config, dict) or str(config.get("peft_type", "LORA")).upper() != "LORA":
            kind = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
            raise AdapterFormatError(f"{path} describes a {kind} adapter; jdlora compresses LoRA adapters only.")
        for field, variant in _UNSUPPORTED.items():
            if config.get(field):
                raise AdapterFormatError(
                    f"{path} is a {variant} adapter ({field}={config[field]!r}), which jdlora does not support: "
                    "it compresses plain LoRA (dW = scaling * B @ A on linear layers) only."
                )
        return config

    def _load_pickle(self, path: Path) -> dict[str, torch.Tensor]:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError...)
            raise AdapterFormatError(f"torch.load cannot read {path}: {exc}.") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterFormatError(f"{path} does not hold a dict of tensors, so it is not a PEFT state dict.")
        for key, tensor in state.items():
            if not tensor.is_floating_point():
                raise AdapterFormatError(f"Tensor {key!r} in {path} is {tensor.dtype}, not floating point.")
        return state

    def _index(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, int, int]]:
        """Pair lora_A / lora_B keys per module and check their shapes against each other and the config."""
        where = f"Adapter {self.name!r} ({self.weights_file})"
        pairs: dict[str, dict[str, str]] = {}
        for key in shapes:
            match = _LORA_KEY.match(key)
            if match is None:
                what = (
                    "embedding LoRA" if "lora_embedding_" in key
                    else "DoRA" if "lora_magnitude_vector" in key
                    else "a tensor that is not a LoRA factor (modules_to_save, a bias or another variant)"
                )
                raise AdapterFormatError(f"{where} holds {key!r}: {what} is not supported, only plain LoRA.")
            slot = pairs.setdefault(match["module"], {})
            if match["part"] in slot:  # e.g. two adapter names in one file
                raise AdapterFormatError(f"{where} holds both {slot[match['part']]!r} and {key!r} (two adapters?).")
            slot[match["part"]] = key
        modules = {}
        for module, slot in pairs.items():
            if len(slot) != 2:
                (has,) = slot
                missing = "lora_B" if has == "lora_A" else "lora_A"
                raise AdapterFormatError(f"{where} has {slot[has]!r} but no {missing} for module {module!r}.")
            a, b = shapes[slot["lora_A"]], shapes[slot["lora_B"]]
            if len(a) != 2 or len(b) != 2:
                raise AdapterFormatError(
                    f"{where}: module {module!r} has lora_A {a} and lora_B {b}; convolution LoRA is not supported, "
                    "only LoRA on linear layers (2-D factors)."
                )
            if a[0] != b[1]:
                raise AdapterFormatError(f"{where}: module {module!r} has lora_A {a} and lora_B {b}: ranks disagree.")
            expected = _pattern_value(self.config.get("rank_pattern"), module, self.rank)
            if a[0] != expected:
                raise AdapterFormatError(
                    f"{where}: module {module!r} has rank {a[0]} but its config says {expected} (r / rank_pattern); "
                    "scaling would be wrong. Fix adapter_config.json."
                )
            modules[module] = (a[0], b[0], a[1])
            self._keys[module] = (slot["lora_A"], slot["lora_B"])
        if not modules:
            raise AdapterFormatError(f"{where} holds no LoRA tensors.")
        return modules

    @property
    def rank(self) -> int:
        """The config-level rank `r` (peft's default 8 when absent); see `modules` for per-module ranks."""
        return int(self.config.get("r", 8))

    @property
    def alpha(self) -> float:
        """The config-level `lora_alpha` (peft's default 8 when absent)."""
        return float(self.config.get("lora_alpha", 8))

    @property
    def use_rslora(self) -> bool:
        """Whether scaling is alpha / sqrt(r) (rank-stabilized LoRA) instead of alpha / r."""
        return bool(self.config.get("use_rslora", False))

    @property
    def sha256(self) -> str:
        """Hex sha256 of the weights file, computed on first use and cached."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            with open(self.weights_file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256

    @property
    def origin(self) -> dict[str, Any]:
        """Where the adapter came from (`folder`, or `repo_id` / `revision` / `subfolder`) and its `sha256`."""
        return {**self._origin, "sha256": self.sha256}

    def _key_pair(self, module: str) -> tuple[str, str]:
        try:
            return self._keys[module]
        except KeyError:
            raise UnknownModuleError(module, self.modules, where=f"adapter {self.name!r}") from None

    def scaling(self, module: str) -> float:
        """The LoRA scaling of `module`: alpha / r, or alpha / sqrt(r) with rsLoRA.

        `rank_pattern` and `alpha_pattern` override r and alpha per module, matched as peft does.

        Args:
            module: a key of `modules`.
        """
        self._key_pair(module)
        r = _pattern_value(self.config.get("rank_pattern"), module, self.rank)
        alpha = _pattern_value(self.config.get("alpha_pattern"), module, self.alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def read_module(self, module: str, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the factors of one module: `(A [r, d_in], B [d_out, r])`, without the scaling.

        Args:
            module: a key of `modules`.
            dtype: the dtype to return (the check for NaN/Inf runs on the stored dtype).

        Raises:
            NonFiniteWeightsError: a factor holds NaN or Inf, or a value above `MAX_ABS_FACTOR` in magnitude
                (corrupted bytes); the message names the file and tensor.
        """
        keys = self._key_pair(module)
        if self._state is not None:
            tensors = [self._state[k] for k in keys]
        else:
            try:
                with safe_open(self.weights_file, framework="pt", device="cpu") as f:
                    tensors = [f.get_tensor(k) for k in keys]
            except (SafetensorError, OSError) as exc:
                raise AdapterFormatError(f"Cannot read module {module!r} from {self.weights_file}: {exc}.") from exc
        for key, tensor in zip(keys, tensors):
            finite = torch.isfinite(tensor if tensor.element_size() > 1 else tensor.float())
            if not bool(finite.all()):
                nan = int(torch.isnan(tensor.float()).sum())
                raise NonFiniteWeightsError(
                    f"Adapter {self.name!r}: tensor {key!r} in {self.weights_file} holds {nan} NaN and "
                    f"{int((~finite).sum()) - nan} Inf values. The adapter is broken; retrain or re-export it, "
                    "or leave it out of the collection."
                )
            values = tensor if tensor.element_size() > 1 else tensor.float()
            largest = float(values.abs().max()) if tensor.numel() else 0.0
            if largest > MAX_ABS_FACTOR:
                raise NonFiniteWeightsError(
                    f"Adapter {self.name!r}: tensor {key!r} in {self.weights_file} holds a value of {largest:.3g}; LoRA "
                    f"factors stay far below {MAX_ABS_FACTOR:g}, so the file's bytes are corrupted. Download or export "
                    "the adapter again, or leave it out of the collection."
                )
        # copy pickle tensors so that callers cannot edit our cached state in place
        a, b = (t.to(dtype=dtype, copy=self._state is not None) for t in tensors)
        return a, b

    def __repr__(self) -> str:
        return f"LoraAdapter({self.name!r}, base_model={self.base_model!r}, modules={len(self.modules)}, r={self.rank})"


def _download(repo_id: str, subfolder: str | None, revision: str | None, token: Any, allow_pickle: bool) -> Path:
    """Download an adapter's config and weights from the Hub; returns the cache folder holding them."""
    import huggingface_hub as hub
    from huggingface_hub import errors

    where = repo_id + (f"/{subfolder}" if subfolder else "") + (f"@{revision}" if revision else "")

    def get(filename: str) -> Path:
        return Path(hub.hf_hub_download(repo_id, filename, subfolder=subfolder, revision=revision, token=token))

    try:
        config_file = get(CONFIG_NAME)
        try:
            get(SAFETENSORS_NAME)
        except errors.RemoteEntryNotFoundError:
            pickle_in_repo = f"{subfolder}/{PICKLE_NAME}" if subfolder else PICKLE_NAME
            if allow_pickle:
                get(PICKLE_NAME)
            elif hub.file_exists(repo_id, pickle_in_repo, revision=revision, token=token):
                raise UnsafeAdapterError(
                    f"Adapter {where!r} ships only a pickle ({PICKLE_NAME}); loading pickles can run arbitrary "
                    "code. If you trust its author, pass allow_pickle=True (it is then loaded with "
                    "torch.load(weights_only=True))."
                ) from None
            else:
                raise AdapterFormatError(f"Hub repo {where!r} has {CONFIG_NAME} but no {SAFETENSORS_NAME}.") from None
        return config_file.parent
    except JDLoraError:
        raise
    except (errors.GatedRepoError, errors.RepositoryNotFoundError) as exc:
        raise AdapterFormatError(
            f"Repository {repo_id!r} was not found on the Hub, or it is private or gated: check the id, "
            "or pass token= (or run `hf auth login`)."
        ) from exc
    except errors.RevisionNotFoundError as exc:
        raise AdapterFormatError(f"Revision {revision!r} was not found in Hub repository {repo_id!r}.") from exc
    except errors.RemoteEntryNotFoundError as exc:
        raise AdapterFormatError(
            f"Hub repository {where!r} has no {CONFIG_NAME}, so it is not a PEFT adapter; "
            "if the adapter lives in a folder of the repo, pass subfolder=."
        ) from exc
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as exc:
        raise AdapterFormatError(
            f"Cannot download adapter {where!r}: there is no local folder {Path(repo_id).absolute()}, so it was taken "
            "for a Hub repo id, but the Hub is unreachable (or HF_HUB_OFFLINE is set) and it is not in the local cache. "
            "If it is a local folder, check the path; else check the network and HF_ENDPOINT."
        ) from exc
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError) as exc:
        raise AdapterFormatError(f"Downloading adapter {where!r} from the Hub failed: {exc}") from exc


def open_adapter(
    spec: str | os.PathLike,
    *,
    name: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
) -> LoraAdapter:
    """Open one LoRA adapter from a local folder or the Hugging Face Hub.

    Args:
        spec: a local folder if it exists; otherwise a Hub repo id, `org/name`, optionally with a
            subfolder (`org/name/sub/dir`) and a revision (`org/name@v1`, `org/name/sub@v1`).
        name: the adapter's name; defaults to the folder name, or `org/name[/subfolder]` for the Hub.
        revision: Hub branch, tag or commit (an `@revision` in `spec` wins).
        subfolder: folder inside the repo (or the local folder) that holds the adapter.
        token: Hub token, passed to `huggingface_hub.hf_hub_download`.
        allow_pickle: accept `adapter_model.bin` when there is no safetensors file.

    Raises:
        AdapterFormatError: the folder or repo is missing or does not hold a supported LoRA adapter.
        UnsafeAdapterError: only a pickle is available and `allow_pickle` is False.

    Example:
        >>> adapter = open_adapter("org/my-lora@main")
        >>> adapter.modules["model.layers.0.self_attn.q_proj"]   # (rank, d_out, d_in)
    """
    local = Path(spec).expanduser()
    if local.exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hub ids, but {str(spec)!r} is a local folder.")
        folder = local / subfolder if subfolder else local
        if not folder.is_dir():
            raise AdapterFormatError(f"{folder} is a file; pass the folder that holds {CONFIG_NAME} and the weights.")
        return LoraAdapter(folder, name=name, allow_pickle=allow_pickle)
    if looks_local(spec):
        raise AdapterFormatError(
            f"No adapter folder at {local.absolute()}: it does not exist (and {str(spec)!r} is a local path, not a Hub "
            "repo id like 'org/name'). Check the path."
        )
    spec = str(spec)
    path, _, at_revision = spec.partition("@")
    parts = path.split("/")
    repo_id, in_repo = "/".join(parts[:2]), "/".join(parts[2:])
    revision = at_revision or revision
    subfolder = "/".join(p for p in (in_repo, subfolder) if p) or None
    folder = _download(repo_id, subfolder, revision, token, allow_pickle)
    # The cache lays files out as .../snapshots/<commit sha>/[subfolder/]file: record the commit, not the branch.
    snapshot = folder.parents[subfolder.count("/")] if subfolder else folder
    resolved = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else revision
    origin = {"repo_id": repo_id, "revision": resolved, "subfolder": subfolder}
    default_name = repo_id + (f"/{subfolder}" if subfolder else "")
    return LoraAdapter(folder, name=name or default_name, origin=origin, allow_pickle=allow_pickle)


def _base_model_key(base_model: str) -> str:
    # One base is spelled many ways in real configs ("google/gemma-3-270m-it", "gemma3-270m-it",
    # "/content/work/google/gemma-3-270m-it"): compare the last path component, ignoring case and
    # punctuation. A mismatch this hides still fails the per-module shape check.
    return re.sub(r"[^a-z0-9]", "", re.split(r"[\\/]", base_model.rstrip("/\\"))[-1].lower())


def check_compatible(adapters: Sequence[Any]) -> None:
    """Check that adapters can be compressed together.

    Args:
        adapters: `LoraAdapter`s, or objects with `name`, `base_model` and `modules`.

    Raises:
        IncompatibleAdaptersError: duplicate names, different declared base models, or a module
            whose (d_out, d_in) differs between two adapters.
    """
    counts = collections.Counter(a.name for a in adapters)
    duplicates = sorted(n for n, c in counts.items() if c > 1)
    if duplicates:
        raise IncompatibleAdaptersError(
            f"Adapter names must be unique, but these are used more than once: {', '.join(map(repr, duplicates))}. "
            "Pass names=[...] to open_adapters (or name= to open_adapter) to tell them apart."
        )
    declared = [a for a in adapters if getattr(a, "base_model", None)]
    for other in declared[1:]:
        first = declared[0]
        if _base_model_key(other.base_model) != _base_model_key(first.base_model):
            raise IncompatibleAdaptersError(
                f"Adapters {first.name!r} and {other.name!r} are for different base models: "
                f"{first.base_model!r} and {other.base_model!r}. Compress adapters of one base model together."
            )
    seen: dict[str, tuple[str, tuple[int, int]]] = {}
    for adapter in adapters:
        for module, (_, d_out, d_in) in adapter.modules.items():
            first_name, shape = seen.setdefault(module, (adapter.name, (d_out, d_in)))
            if shape != (d_out, d_in):
                raise IncompatibleAdaptersError(
                    f"Module {module!r} has shape (d_out, d_in) = {shape} in adapter {first_name!r} but "
                    f"{(d_out, d_in)} in adapter {adapter.name!r}; they cannot share a base model."
                )


def open_adapters(
    specs: Iterable[str | os.PathLike | Any],
    *,
    names: Sequence[str | None] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    allow_pickle: bool = False,
) -> list[LoraAdapter]:
    """Open several adapters and check that they can be compressed together.

    Args:
        specs: local folders, Hub ids (see `open_adapter`) or already open adapters (any object with
            `name`, `base_model`, `modules`, `scaling()`, `read_module()` and `origin`).
        names: one name (or None to keep the default) per spec; an open adapter given a name is
            shallow-copied and renamed, never edited.
        revision, token, allow_pickle: passed to `open_adapter` for every spec that is not open yet.

    Raises:
        IncompatibleAdaptersError: see `check_compatible`.

    Example:
        >>> adapters = open_adapters(["./a", "./b"], names=["math", "code"])
    """
    specs = list(specs)
    if names is not None and len(names) != len(specs):
        raise ValueError(f"Got {len(names)} names for {len(specs)} adapters.")
    adapters = []
    for spec, name in zip(specs, names if names is not None else [None] * len(specs)):
        if isinstance(spec, (str, os.PathLike)):
            adapters.append(open_adapter(spec, name=name, revision=revision, token=token, allow_pickle=allow_pickle))
        else:
            if name is not None:
                spec = copy.copy(spec)
                spec.name = name
            adapters.append(spec)
    check_compatible(adapters)
    return adapters


# What a PEFT adapter folder holds: a folder with anything else in it is not replaced.
_ADAPTER_FILES = {CONFIG_NAME, SAFETENSORS_NAME, PICKLE_NAME, "README.md"}


def _check_lora_target(path: Path) -> None:
    if path.is_symlink():
        raise TargetExistsError(f"{path} is a symbolic link; pass the folder it points to ({path.resolve()}).")
    if not path.exists():
        return
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
    if entries is None or (entries and CONFIG_NAME not in entries) or set(entries) - _ADAPTER_FILES:
        what = "a file" if entries is None else "a folder holding " + ", ".join(entries[:5])
        raise TargetExistsError(f"{path} exists and is {what}, not a PEFT adapter folder: refusing to replace it, "
                                "which would delete it. Write to a new folder, or move it away first.")


def write_lora_folder(
    path: str | os.PathLike,
    tensors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    r: int,
    lora_alpha: float,
    base_model: str | None,
    target_modules: Iterable[str] | None = None,
    use_rslora: bool = False,
    extra_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write a standard PEFT LoRA folder that `PeftModel.from_pretrained` loads.

    The folder appears at once or not at all: it is written beside `path` and renamed into place.
    An existing PEFT LoRA folder (or empty folder) at `path` is replaced; anything else is refused with
    `TargetExistsError` (a file, a link, or a folder holding files other than an adapter's).

    Args:
        path: the folder to create.
        tensors: module name -> (A [r, d_in], B [d_out, r]); saved bit for bit, in their dtype.
        r: the config rank (modules of another rank need `rank_pattern` in `extra_config`).
        lora_alpha: the config alpha.
        base_model: written as `base_model_name_or_path`.
        target_modules: defaults to the set of last name components of the modules.
        use_rslora: scaling alpha / sqrt(r) instead of alpha / r.
        extra_config: more `peft.LoraConfig` fields, e.g. `rank_pattern`, `alpha_pattern`, `task_type`.

    Returns:
        The folder's path.
    """
    from peft import LoraConfig  # peft imports transformers (seconds); reading adapters does not need it

    path = Path(path)
    if not tensors:
        raise ValueError("write_lora_folder needs at least one module.")
    targets = sorted(set(target_modules) if target_modules is not None else {m.rsplit(".", 1)[-1] for m in tensors})
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=targets, use_rslora=use_rslora,
        base_model_name_or_path=base_model, **dict(extra_config or {}),
    )
    state = {}
    for module, (a, b) in tensors.items():
        expected = _pattern_value(config.rank_pattern, module, r)
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1] or a.shape[0] != expected:
            raise ValueError(
                f"Module {module!r}: need A [r, d_in] and B [d_out, r] with r = {expected}, "
                f"got A {tuple(a.shape)} and B {tuple(b.shape)}."
            )
        # copies: safetensors refuses tensors that share storage (e.g. slices of one matrix)
        state[f"base_model.model.{module}.lora_A.weight"] = a.detach().to("cpu", copy=True).contiguous()
        state[f"base_model.model.{module}.lora_B.weight"] = b.detach().to("cpu", copy=True).contiguous()
    config_dict = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}

    _check_lora_target(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only
        (tmp / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file(state, tmp / SAFETENSORS_NAME, metadata={"format": "pt"})
        if path.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside first
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "adapter")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "adapter", path)  # put the old folder back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
