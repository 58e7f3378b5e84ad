"""Publishing a collection to the Hugging Face Hub in one atomic commit."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from ..collection import JDLoraCollection
from ..errors import PushError
from .card import render_card
from .layout import CARD, OWNED_DIRS, OWNED_FILES
from .save import check_names, write_collection_files

# Remote files that belong to the format: a push replaces these and deletes those that no longer exist
# (e.g. removed adapters). Anything else in the repo (a .gitattributes, user files) is left alone.
_OWNED_PREFIXES = tuple(f"{d}/" for d in OWNED_DIRS)


def push_collection(
    collection: JDLoraCollection,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    token: str | bool | None = None,
    progress: bool = True,
):
    """Uploads ``collection`` to ``repo_id`` as one commit (``HfApi.create_commit``) and returns its CommitInfo.

    Files whose content is already in the repo (same git blob id) are not uploaded again, so pushing after
    ``add_adapters`` sends only the new and changed files (new Sigma stacks, the manifest, new adapter
    folders), never unchanged bases. Files of adapters that were removed are deleted in the same commit.
    Returns None when nothing changed.

    Raises:
        PushError: the repo could not be created or read, or the commit failed. The commit is atomic:
            on failure the repo is exactly as it was.
        UnsafePathError: an adapter or module name would lead outside the repo (checked before anything
            is written or sent).
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.hf_api import RepoFile

    check_names(collection)
    network_errors = _network_errors()
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        head = api.repo_info(repo_id, revision=revision).sha
        remote = {
            f.path: f.blob_id
            for f in api.list_repo_tree(repo_id, recursive=True, revision=head)
            if isinstance(f, RepoFile)
        }
    except (HfHubHTTPError, *network_errors) as err:
        raise PushError(f"Preparing the push to {repo_id} failed ({err}); nothing was uploaded.") from err

    with tempfile.TemporaryDirectory(prefix="jdlora-push-") as tmp:
        root = Path(tmp)
        manifest = write_collection_files(collection, root, progress=progress)
        (root / CARD).write_text(render_card(manifest, repo_id=repo_id))
        local = {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file()}
        operations = [
            CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path))
            for rel, path in sorted(local.items())
            if remote.get(rel) != git_blob_id(path)
        ]
        operations += [
            CommitOperationDelete(path_in_repo=rel)
            for rel in sorted(remote)
            if rel not in local and (rel.startswith(_OWNED_PREFIXES) or rel in OWNED_FILES)
        ]
        if not operations:
            return None
        message = commit_message or f"Upload JD-LoRA collection ({len(collection)} adapters) with jdlora"
        try:
            return api.create_commit(
                repo_id, operations, commit_message=message, commit_description=commit_description,
                revision=revision, create_pr=create_pr, parent_commit=head,
            )
        except (HfHubHTTPError, *network_errors) as err:
            raise PushError(
                f"The commit to {repo_id} failed ({err}); the repo is unchanged. Retry the push."
            ) from err


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection-level errors of the HTTP client huggingface_hub uses (httpx in 1.x, httpx2 in 2.x)."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def git_blob_id(path: Path) -> str:
    """The git blob sha1 of a file: what the Hub reports as ``blob_id`` for regular files."""
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
