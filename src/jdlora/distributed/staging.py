"""The staging area of a resumable run: finished modules, written beside the output folder as they complete.

``<parent>/.<out name>.jdlora-partial/`` holds ``run.json`` (a fingerprint of the inputs and settings)
and one ``modules/<module>.safetensors`` per finished module. Each file is written under a temporary
name, flushed to disk and renamed into place, so a file with its final name is always complete: a run
killed at any moment leaves finished modules and, at most, temporary files that are never read. The
finished collection is then saved to ``out`` by the normal, atomic
:meth:`~jdlora.collection.JDLoraCollection.save_pretrained`, and the staging area removed. It sits
beside ``out``, not in it, because a save replaces only folders that hold nothing but a collection
(docs/safety.md).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from urllib.parse import quote, unquote

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..collection import CollectionModule
from ..compress import ModuleCompression
from ..errors import CollectionFormatError
from ..format.save import check_save_target

STAGING_SUFFIX = ".jdlora-partial"
RUN_FILE = "run.json"
MODULES_DIR = "modules"
_TMP_MARK = ".tmp-"
_TENSORS = ("U", "V", "sigma", "cluster", "sq_norms", "residuals")


class Staging:
    """The staging area of one run in ``out``; :meth:`open` it, then :meth:`finished` and :meth:`write`."""

    def __init__(self, root: Path):
        self.root = root
        self.modules_dir = root / MODULES_DIR

    @classmethod
    def open(cls, out: str | os.PathLike, fingerprint: str) -> Staging:
        """The staging area of the run ``fingerprint`` that will save to ``out``: ``.<out name>.jdlora-partial``
        beside ``out``.

        ``out`` itself is left alone until the final save, which checks it first (``check_save_target``:
        new, empty, or a collection to replace), here too, before any work. A staging area left by a run
        with other inputs or settings is cleared (with a warning): its modules are not this run's.
        Temporary files of a killed run are removed.
        """
        out = Path(out)
        check_save_target(out)
        staging = cls(staging_root(out))
        run_file = staging.root / RUN_FILE
        if run_file.is_file():
            previous = json.loads(run_file.read_text()).get("fingerprint")
            if previous != fingerprint:
                warnings.warn(f"{staging.root} holds modules of a run with other adapters or settings; starting over.",
                              stacklevel=3)
                shutil.rmtree(staging.modules_dir, ignore_errors=True)
        staging.modules_dir.mkdir(parents=True, exist_ok=True)
        for leftover in staging.modules_dir.glob(f".*{_TMP_MARK}*"):
            leftover.unlink(missing_ok=True)
        _write_atomic(run_file, lambda tmp: tmp.write_text(json.dumps({"fingerprint": fingerprint}) + "\n"))
        return staging

    def path(self, module: str) -> Path:
        return self.modules_dir / f"{quote(module, safe='')}.safetensors"

    def finished(self) -> dict[str, CollectionModule]:
        """The modules a previous run of the same fingerprint finished (complete files only)."""
        done = {}
        for path in sorted(self.modules_dir.glob("*.safetensors")):
            if path.name.startswith("."):
                continue
            module = unquote(path.name.removesuffix(".safetensors"))
            done[module] = self._read(path)
        return done

    def write(self, module: str, entry: CollectionModule) -> Path:
        """Writes one finished module atomically (temporary file, fsync, rename, fsync of the folder)."""
        c = entry.compression
        tensors = {name: getattr(c, name).detach().cpu().contiguous() for name in _TENSORS}
        tensors["adapter_ids"] = entry.adapter_ids.detach().cpu().long().contiguous()
        # json keeps every float of the history exactly (shortest round-trip repr).
        meta = {"history": json.dumps(c.history)}
        path = self.path(module)
        _write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return path

    @staticmethod
    def _read(path: Path) -> CollectionModule:
        try:
            tensors = load_file(str(path))
            with open(path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                meta = json.loads(f.read(header_len)).get("__metadata__", {})
            history = json.loads(meta["history"])
            c = ModuleCompression(*(tensors[name] for name in _TENSORS), history=history)
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
            raise CollectionFormatError(
                f"The staged module {path} cannot be read ({exc}). Delete it (or the whole "
                f"{path.parent.parent} folder) and run again: it will be recomputed."
            ) from exc
        return CollectionModule(c, tensors["adapter_ids"])


def staging_root(out: str | os.PathLike) -> Path:
    """``<parent>/.<name>.jdlora-partial``: the staging area of a run saving to ``out``."""
    out = Path(out)
    return out.parent / f".{out.name}{STAGING_SUFFIX}"


def finish(collection, out: str | os.PathLike, *, progress: bool = True) -> None:
    """Saves the finished collection to ``out`` (the normal atomic save), then removes the staging area."""
    collection.save_pretrained(out, progress=progress)
    shutil.rmtree(staging_root(out), ignore_errors=True)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

