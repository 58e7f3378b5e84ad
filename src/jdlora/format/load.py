"""Reading a saved collection from a folder or a Hub repo, whole or a few adapters (docs/format.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..collection import AdapterInfo, CollectionModule, JDLoraCollection
from ..compress import ModuleCompression, SweepPoint
from ..errors import CollectionFormatError, CollectionIntegrityError, UnknownAdapterError
from ..sources import looks_local
from .layout import (
    ADAPTER_WEIGHTS, BASES_TENSORS, MANIFEST, PEFT_CONFIG, PEFT_TYPE, check_relative_path, read_manifest, resolve_inside, sha256_file,
    sigma_tensor_key,
)


def load_collection(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    adapters: Sequence[str] | None = None,
    token: str | bool | None = None,
    verify: bool = True,
    force_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> JDLoraCollection:
    """Loads a collection saved by :meth:`JDLoraCollection.save_pretrained`, locally or from the Hub.

    Args:
        path_or_repo_id: a local folder, or a Hub repo id.
        revision: branch, tag or commit of the Hub repo (ignored for folders). Every file is read at the
            commit the manifest was read at, so a concurrent push cannot mix two versions.
        adapters: names of the adapters to load; default all. Only the bases these adapters use and
            their own Sigma (``adapters/<name>/``) are read, or downloaded from the Hub.
        token: Hub token for private repos.
        verify: check every bases and Sigma file against the sha256 in the manifest.
        force_download: download again even if cached (e.g. after an integrity error).
        cache_dir: Hub cache folder.

    Raises:
        CollectionFormatError: no manifest, a newer format version, a missing or malformed file.
        CollectionIntegrityError: a file whose sha256 differs from the manifest.
        UnknownAdapterError: a name in ``adapters`` the collection does not have.
    """
    fetch = _Fetcher(path_or_repo_id, revision, token, force_download, cache_dir)
    manifest = read_manifest(fetch.manifest())
    entries = manifest["adapters"]
    if adapters is not None:
        known = [a["name"] for a in entries]
        for name in adapters:
            if name not in known:
                raise UnknownAdapterError(name, known, where=f"collection {path_or_repo_id}")
        wanted = set(adapters)
        selected = [i for i, a in enumerate(entries) if a["name"] in wanted]
    else:
        selected = list(range(len(entries)))
    whole = adapters is None

    patterns = []
    for m_index, module in enumerate(manifest["modules"]):
        if whole:
            patterns += [b["path"] for b in module["bases"]] + [module["sigma"]["path"]]
        else:
            patterns += [module["bases"][c]["path"] for c in {entries[i]["clusters"][m_index] for i in selected} - {None}]
    if not whole:
        patterns += [f"{entries[i]['subfolder']}/*" for i in selected]
    root = fetch.files(patterns)
    checked = _Checked(root, verify, fetch.jail(root))

    modules = {}
    per_adapter = {} if whole else {i: _read_adapter_folder(root, entries[i], checked) for i in selected}
    new_index = {old: new for new, old in enumerate(selected)}
    for m_index, module in enumerate(manifest["modules"]):
        name = module["name"]
        if whole:
            tensors = checked.load(module["sigma"]["path"], module["sigma"].get("sha256"))
            ids, cluster = tensors["adapter_index"].long(), tensors["cluster"].long()
            sigma = tensors["sigma"]
            # "sq_norm" / "residual": the names before jdlora 0.1.1 (same values).
            sq_norm, residual = tensors.get("sq_norms", tensors.get("sq_norm")), tensors.get("residuals", tensors.get("residual"))
            used = list(range(module["clusters"]))
        else:
            rows = [i for i in selected if entries[i]["clusters"][m_index] is not None]
            if not rows:
                continue
            used = sorted({entries[i]["clusters"][m_index] for i in rows})
            ids = torch.tensor([new_index[i] for i in rows], dtype=torch.long)
            cluster = torch.tensor([used.index(entries[i]["clusters"][m_index]) for i in rows], dtype=torch.long)
            sigma = torch.stack([per_adapter[i]["sigma"][name] for i in rows])
            sq_norm = torch.tensor([per_adapter[i]["sq_norms"][name] for i in rows])
            residual = torch.tensor([per_adapter[i]["residuals"][name] for i in rows])
        bases = [checked.load(module["bases"][c]["path"], module["bases"][c].get("sha256")) for c in used]
        U = torch.stack([b[BASES_TENSORS[0]] for b in bases])
        V = torch.stack([b[BASES_TENSORS[1]] for b in bases])
        _check_shapes(module, U, V, sigma, ids, manifest["sigma"])
        modules[name] = CollectionModule(ModuleCompression(U, V, sigma, cluster, sq_norm, residual), ids)

    infos = [
        AdapterInfo(name=a["name"], origin=a.get("origin", {}), rank=a.get("rank"), alpha=a.get("alpha"),
                    use_rslora=a.get("use_rslora", False), module_ranks=a.get("module_ranks", {}))
        for a in (entries[i] for i in selected)
    ]
    sweep = [SweepPoint.from_dict(p) for p in manifest.get("sweep", [])]
    collection = JDLoraCollection(manifest.get("base_model"), infos, modules, manifest["sigma"],
                                  manifest.get("settings", {}), sweep, manifest.get("choice"))
    collection.source = {"path_or_repo_id": str(path_or_repo_id), "revision": fetch.commit}
    return collection


def fetch_manifest(path_or_repo_id: str | os.PathLike, *, revision: str | None = None,
                   token: str | bool | None = None) -> dict:
    """Reads only ``collection.json`` of a folder or Hub repo (nothing else is downloaded)."""
    return read_manifest(_Fetcher(path_or_repo_id, revision, token, False, None).manifest())


def read_adapter_config(path_or_repo_id: str | os.PathLike, *, revision: str | None = None) -> dict | None:
    """``adapter_config.json`` of a local folder or a Hub repo, or None when there is none.

    What a serving engine reads first to tell a JD-LoRA collection (or one adapter's folder of it) from a plain
    LoRA: on the Hub only that small file is downloaded. A local path (:func:`~jdlora.sources.looks_local`)
    is never looked up on the Hub. None also for a local path that does not exist and for a repo that does
    not exist or cannot be seen (a private one without a token): the engine's own loader then reports it.
    Network errors propagate: a collection that cannot be reached must not load as something else.
    """
    local = Path(path_or_repo_id).expanduser()
    if local.is_dir():
        file = local / PEFT_CONFIG
        return json.loads(file.read_text()) if file.is_file() else None
    if looks_local(path_or_repo_id):
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        file = hf_hub_download(str(path_or_repo_id), PEFT_CONFIG, revision=revision)
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: the Hub could not be reached
        raise
    except (EntryNotFoundError, RepositoryNotFoundError):
        return None
    return json.loads(Path(file).read_text())


def adapter_config_kind(config: dict | None) -> str | None:
    """What an ``adapter_config.json`` (:func:`read_adapter_config`) describes: ``"collection"`` (a collection's
    root), ``"adapter"`` (one adapter's folder inside a collection), or None (not JD-LoRA, e.g. a plain LoRA)."""
    if not config or str(config.get("peft_type", "")).upper() != PEFT_TYPE:
        return None
    if config.get("collection"):
        return "collection"
    return "adapter" if config.get("adapter_name") else "collection"


def _read_adapter_folder(root: Path, entry: dict, checked: _Checked) -> dict:
    """One adapter's own Sigma (and norms) from ``adapters/<name>/adapter_model.safetensors``."""
    rel = f"{entry['subfolder']}/{ADAPTER_WEIGHTS}"
    tensors, metadata = checked.load(rel, entry.get("weights_sha256"), with_metadata=True)
    suffix = "." + sigma_tensor_key("x").rsplit(".", 1)[-1]
    sigma = {k.removeprefix("base_model.model.").removesuffix(suffix): v for k, v in tensors.items()}
    try:
        norms = json.loads(metadata["jdlora"])
        sq_norms, residuals = norms["sq_norms"], norms["residuals"]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise CollectionFormatError(f"{root / rel}: missing or malformed jdlora metadata ({err}).") from err
    return {"sigma": sigma, "sq_norms": sq_norms, "residuals": residuals}


def _check_shapes(module: dict, U, V, sigma, ids, sigma_kind: str) -> None:
    name, r = module["name"], module["rank"]
    expected_sigma = (len(ids), r, r) if sigma_kind == "full" else (len(ids), r)
    problems = []
    if tuple(U.shape[1:]) != (module["d_out"], r):
        problems.append(f"U has shape {tuple(U.shape[1:])}, the manifest says {(module['d_out'], r)}")
    if tuple(V.shape[1:]) != (module["d_in"], r):
        problems.append(f"V has shape {tuple(V.shape[1:])}, the manifest says {(module['d_in'], r)}")
    if tuple(sigma.shape) != expected_sigma:
        problems.append(f"Sigma has shape {tuple(sigma.shape)}, expected {expected_sigma}")
    if problems:
        raise CollectionFormatError(f"Module {name}: " + "; ".join(problems) + ". The files do not match the manifest.")


class _Checked:
    """Loads safetensors files under a root, checking each against its manifest sha256 once."""

    def __init__(self, root: Path, verify: bool, jail: Path):
        self.root, self.verify, self.jail = root, verify, jail

    def load(self, rel: str, sha256: str | None, *, with_metadata: bool = False):
        # read_manifest checked the text of every path; this also refuses links that lead outside.
        path = resolve_inside(self.root, rel, f"{self.root / MANIFEST}", self.jail)
        if not path.is_file():
            raise CollectionFormatError(f"{path} is missing: the collection is incomplete (the manifest lists it).")
        if self.verify and sha256 and (actual := sha256_file(path)) != sha256:
            raise CollectionIntegrityError(
                f"{path} has sha256 {actual[:12]}..., but the manifest records {sha256[:12]}...: the file is corrupted "
                "or belongs to another version of the collection. Re-download it (force_download=True) or re-save."
            )
        try:
            tensors = load_file(str(path))
            if not with_metadata:
                return tensors
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                return tensors, f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as err:
            raise CollectionFormatError(f"{path} is not a readable safetensors file ({err}).") from err


class _Fetcher:
    """Gives local paths for a folder or a Hub repo; on the Hub, downloads only the files asked for."""

    def __init__(self, path_or_repo_id, revision, token, force_download, cache_dir):
        local = Path(path_or_repo_id).expanduser()
        if local.is_dir():
            self.local = local
        elif local.exists():
            raise CollectionFormatError(f"{local} is a file; pass the collection's folder (the one holding {MANIFEST}) "
                                        "or a Hub repo id.")
        elif looks_local(path_or_repo_id):
            raise CollectionFormatError(
                f"No collection folder at {local.absolute()}: it does not exist (and {str(path_or_repo_id)!r} is a "
                "local path, not a Hub repo id like 'org/name'). Check the path."
            )
        else:
            self.local = None
        self.repo_id, self.revision, self.token = str(path_or_repo_id), revision, token
        self.force_download, self.cache_dir = force_download, cache_dir
        self.commit: str | None = None

    def jail(self, root: Path) -> Path:
        """The folder no file may leave: the collection's root, or for the Hub the repo's cache folder
        (``.../models--org--name``), since the snapshot's files are links into its ``blobs/``."""
        return root if self.local is not None else root.parents[1]

    def manifest(self) -> Path:
        if self.local is not None:
            return self.local / MANIFEST
        from huggingface_hub import hf_hub_download

        path = Path(self._hub(hf_hub_download, filename=MANIFEST, revision=self.revision))
        # .../snapshots/<commit>/collection.json: pin every later download to that commit.
        self.commit = path.parent.name
        return path

    def files(self, patterns: list[str]) -> Path:
        if self.local is not None:
            return self.local
        from huggingface_hub import snapshot_download

        return Path(self._hub(snapshot_download, allow_patterns=patterns, revision=self.commit))

    def _hub(self, fn, **kwargs):
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HfHubHTTPError,
            HFValidationError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        neither = f"{self.repo_id!r} is not a local folder ({Path(self.repo_id).absolute()} does not exist)"
        try:
            return fn(repo_id=self.repo_id, token=self.token, force_download=self.force_download,
                      cache_dir=self.cache_dir, **kwargs)
        except RepositoryNotFoundError as err:
            raise CollectionFormatError(
                f"{neither}, nor a Hub repo you can access (private repos need a token)."
            ) from err
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as err:  # before EntryNotFoundError: a subclass
            raise CollectionFormatError(
                f"{neither}, and the Hub is unreachable (or HF_HUB_OFFLINE is set), so it could not be looked up as a "
                "repo id. Check the path, or the network and HF_ENDPOINT."
            ) from err
        except HFValidationError as err:
            raise CollectionFormatError(f"{neither}, nor a valid Hub repo id ({err}).") from err
        except RevisionNotFoundError as err:
            raise CollectionFormatError(f"Revision {kwargs.get('revision')!r} not found in {self.repo_id}.") from err
        except EntryNotFoundError as err:
            raise CollectionFormatError(f"{self.repo_id} has no {MANIFEST}: not a jdlora collection.") from err
        except HfHubHTTPError as err:
            raise CollectionFormatError(f"Downloading from {self.repo_id} failed: {err}") from err


def load_bases_files(
    path_or_repo_id: str | os.PathLike,
    files: dict[str, dict],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    verify: bool = True,
    force_download: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (U, V)}`` from bases files of a collection, checked against their sha256.

    ``files`` is ``{module: {"path": "bases/<module>/<cluster>.safetensors", "sha256": ...}}`` with paths
    relative to the collection root ``path_or_repo_id`` (as a per-adapter ``adapter_config.json`` lists
    them). On the Hub only these files are downloaded. This is the reader the PEFT tuner uses to load one
    adapter of a collection on its own.
    """
    for module, entry in files.items():  # before anything is downloaded or opened
        rel = entry.get("path") if isinstance(entry, dict) else None
        check_relative_path(rel, f"the adapter config's bases of module {module}")
    fetch = _Fetcher(path_or_repo_id, revision, token, force_download, cache_dir)
    fetch.commit = revision
    root = fetch.files(sorted({entry["path"] for entry in files.values()}))
    checked = _Checked(root, verify, fetch.jail(root))
    out = {}
    for module, entry in files.items():
        tensors = checked.load(entry["path"], entry.get("sha256"))
        if any(key not in tensors for key in BASES_TENSORS):
            raise CollectionFormatError(f"{root / entry['path']} lacks the tensors {' and '.join(BASES_TENSORS)}.")
        out[module] = (tensors[BASES_TENSORS[0]], tensors[BASES_TENSORS[1]])
    return out
