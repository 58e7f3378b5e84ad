"""The fake Hub (tests/hub_server.py) driven by the real huggingface_hub client."""

import os

import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from hub_server import git_blob_oid

REPO = "jdlora-test/adapters"
BIG = bytes(range(256)) * 4096  # 1 MiB binary


@pytest.fixture
def api(hub):
    return HfApi()  # endpoint and token come from the env set in conftest.py


@pytest.fixture
def repo(api):
    api.create_repo(REPO)
    api.create_commit(
        REPO,
        operations=[
            CommitOperationAdd("README.md", b"---\nlicense: apache-2.0\ntags: [lora]\n---\n# Adapters\n"),
            CommitOperationAdd("config.json", b'{"rank": 8}'),
            CommitOperationAdd("adapters/a/adapter_config.json", b'{"r": 8}'),
            CommitOperationAdd("adapters/a/adapter_model.safetensors", BIG),
            CommitOperationAdd("adapters/b/adapter_config.json", b'{"r": 4}'),
            CommitOperationAdd("adapters/b/adapter_model.safetensors", b"b-weights"),
        ],
        commit_message="add adapters",
    )
    return REPO


def test_env_points_at_fake_hub(hub):
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub.url and os.environ["HF_HUB_DISABLE_XET"] == "1"


def test_create_repo_and_exist_ok(api, hub):
    url = api.create_repo(REPO)
    assert url.repo_id == REPO and url.startswith(hub.url)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo(REPO)
    assert exc.value.response.status_code == 409
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO
    assert api.list_repo_files(REPO) == [".gitattributes"]  # like the Hub's initial commit
    assert api.create_repo("solo").repo_id == f"{hub.username}/solo"  # namespace from the token's user


def test_commit_files_info_and_download(api, hub, repo):
    files = api.list_repo_files(repo)
    assert set(files) == {".gitattributes", "README.md", "config.json", "adapters/a/adapter_config.json",
                          "adapters/a/adapter_model.safetensors", "adapters/b/adapter_config.json",
                          "adapters/b/adapter_model.safetensors"}
    assert sorted(hub.uploaded_paths[0]) == sorted(f for f in files if f != ".gitattributes")
    info = api.model_info(repo, files_metadata=True)
    assert info.sha == hub.head(repo) and len(info.sha) == 40 and info.private is False
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["adapters/a/adapter_model.safetensors"] == len(BIG)
    assert info.card_data.license == "apache-2.0" and info.last_modified is not None
    path = hf_hub_download(repo, "adapters/a/adapter_model.safetensors")
    assert open(path, "rb").read() == BIG
    assert api.repo_info(repo, revision=info.sha).sha == info.sha


def test_pinned_revision_keeps_old_content(api, hub, repo):
    old = hub.head(repo)
    api.upload_file(path_or_fileobj=b'{"rank": 16}', path_in_repo="config.json", repo_id=repo)
    new = hub.head(repo)
    assert new != old
    read = lambda rev: open(hf_hub_download(repo, "config.json", revision=rev), "rb").read()  # noqa: E731
    assert read(old) == b'{"rank": 8}'
    assert read("main") == read(new) == b'{"rank": 16}'
    assert [c.commit_id for c in api.list_repo_commits(repo)][:2] == [new, old]


def test_snapshot_allow_patterns_downloads_only_matches(api, hub, repo):
    hub.requests.clear()
    local = snapshot_download(repo, allow_patterns="adapters/a/*")
    assert sorted(hub.downloads(repo)) == ["adapters/a/adapter_config.json", "adapters/a/adapter_model.safetensors"]
    assert open(os.path.join(local, "adapters/a/adapter_model.safetensors"), "rb").read() == BIG
    assert not os.path.exists(os.path.join(local, "adapters/b"))


def test_tree_listing_and_pagination(api, hub, repo):
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(repo)}
    assert top == {".gitattributes": "RepoFile", "README.md": "RepoFile", "config.json": "RepoFile",
                   "adapters": "RepoFolder"}
    assert {e.path for e in api.list_repo_tree(repo, "adapters")} == {"adapters/a", "adapters/b"}
    hub.tree_page_size = 2
    hub.requests.clear()
    assert len(list(api.list_repo_tree(repo, recursive=True))) == 10  # 7 files + 3 folders
    assert sum("/tree/" in r.path for r in hub.requests) == 5


def test_paths_info(api, repo):
    infos = api.get_paths_info(repo, ["config.json", "adapters/a", "missing.txt"])
    by_path = {i.path: i for i in infos}
    assert set(by_path) == {"config.json", "adapters/a"}
    assert by_path["config.json"].size == len(b'{"rank": 8}') and len(by_path["config.json"].blob_id) == 40
    assert type(by_path["adapters/a"]).__name__ == "RepoFolder"
    (entry,) = api.get_paths_info(repo, ["adapters/b"], expand=True)
    assert entry.last_commit.title == "add adapters"


def test_upload_folder_resends_only_changed_files(api, hub, tmp_path):
    api.create_repo(REPO)
    folder = tmp_path / "out"
    (folder / "adapters" / "x").mkdir(parents=True)
    (folder / "adapters" / "x" / "w.bin").write_bytes(b"w" * 100)
    (folder / "manifest.json").write_text("{}")
    api.upload_folder(folder_path=folder, repo_id=REPO)
    assert sorted(hub.uploaded_paths[-1]) == ["adapters/x/w.bin", "manifest.json"]
    (folder / "adapters" / "y.bin").write_bytes(b"y")
    api.upload_folder(folder_path=folder, repo_id=REPO)
    assert hub.uploaded_paths[-1] == ["adapters/y.bin"]  # unchanged files were skipped by the client
    assert set(hub.files(REPO)) == {".gitattributes", "manifest.json", "adapters/x/w.bin", "adapters/y.bin"}


def test_delete_operations(api, hub, repo):
    api.create_commit(repo, operations=[CommitOperationDelete("config.json"), CommitOperationDelete("adapters/b/")],
                      commit_message="prune")
    assert set(api.list_repo_files(repo)) == {".gitattributes", "README.md", "adapters/a/adapter_config.json",
                                              "adapters/a/adapter_model.safetensors"}
    with pytest.raises(EntryNotFoundError):
        api.delete_file("nope.txt", repo_id=repo)


def test_create_pr_leaves_main_untouched(api, hub, repo):
    main = hub.head(repo)
    info = api.create_commit(repo, operations=[CommitOperationAdd("new.txt", b"pr")], commit_message="pr",
                             create_pr=True)
    assert info.pr_revision == "refs/pr/1" and info.pr_num == 1
    assert hub.head(repo) == main and "new.txt" not in api.list_repo_files(repo)
    assert "new.txt" in api.list_repo_files(repo, revision="refs/pr/1")
    assert open(hf_hub_download(repo, "new.txt", revision="refs/pr/1"), "rb").read() == b"pr"
    refs = api.list_repo_refs(repo, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"] and refs.pull_requests[0].target_commit == info.oid


def test_branches_tags_and_parent_commit(api, hub, repo):
    api.create_branch(repo, branch="dev")
    api.create_branch(repo, branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"d", path_in_repo="dev.txt", repo_id=repo, revision="dev")
    api.create_tag(repo, tag="v1", revision="dev")
    assert "dev.txt" in api.list_repo_files(repo, revision="v1") and "dev.txt" not in api.list_repo_files(repo)
    assert {b.name for b in api.list_repo_refs(repo).branches} == {"main", "dev"}
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit(repo, operations=[CommitOperationAdd("x", b"x")], commit_message="x",
                          parent_commit="0" * 40)
    assert exc.value.response.status_code == 412


def test_failed_commit_leaves_repo_unchanged(api, hub, repo):
    before_sha, before_files = hub.head(repo), hub.files(repo)
    hub.fail_next("/commit/", status=500)
    with pytest.raises(HfHubHTTPError):
        api.create_commit(repo, operations=[CommitOperationAdd("config.json", b"changed"),
                                            CommitOperationDelete("README.md")], commit_message="boom")
    assert hub.head(repo) == before_sha and hub.files(repo) == before_files
    assert api.model_info(repo).sha == before_sha
    api.upload_file(path_or_fileobj=b"ok", path_in_repo="later.txt", repo_id=repo)  # one-shot failure
    assert hub.head(repo) != before_sha


def test_corrupted_file_is_served_corrupted(api, hub, repo):
    hub.corrupt(repo, "adapters/b/adapter_model.safetensors")
    data = open(hf_hub_download(repo, "adapters/b/adapter_model.safetensors"), "rb").read()
    assert data != b"b-weights" and len(data) == len(b"b-weights")
    hub.corrupt(repo, "config.json", data=b"{")
    meta = get_hf_file_metadata(hf_hub_url(repo, "config.json"))
    assert meta.size == 1 and meta.etag == git_blob_oid(b"{") and meta.commit_hash == hub.head(repo)


def test_model_card_validate_and_whoami(api, hub):
    ModelCard("---\nlicense: apache-2.0\ntags:\n- lora\nbase_model: org/base\n---\n# Card\n").validate()
    with pytest.raises(ValueError):
        ModelCard("---\n- just\n- a list\n---\n").validate()
    with pytest.raises(ValueError):
        ModelCard("---\nlicense: [1, 2]\n---\n").validate()
    me = api.whoami()
    assert me["name"] == hub.username
    with pytest.raises(HfHubHTTPError):
        HfApi(token="hf_wrong").whoami()


def test_not_found_errors(api, hub, repo):
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("jdlora-test/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("jdlora-test/missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files(repo, revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo, "missing.safetensors")


def test_private_repo_needs_token(api, hub):
    api.create_repo("jdlora-test/secret", private=True)
    assert api.model_info("jdlora-test/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("jdlora-test/secret")
