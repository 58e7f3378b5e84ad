"""Publishing and loading collections through the real huggingface_hub client and the local Hub server."""

import pytest
import torch

import jdlora
from jdlora.cli import main
from jdlora.collection import JDLoraCollection
from jdlora.errors import CollectionIntegrityError, PushError
from jdlora.synthetic import llama_modules, synthetic_adapters

REPO = "jdlora-test/collection"
# Synthetic adapters added to a small collection lie mostly outside its bases: the warning is expected.
pytestmark = pytest.mark.filterwarnings("ignore:.*above the collection's target")


@pytest.fixture(scope="module")
def adapters():
    return synthetic_adapters(7, llama_modules(2, 40, 16), rank=4, groups=2)


@pytest.fixture
def collection(adapters):
    return jdlora.compress(adapters[:5], rank=4, clusters=2, progress=False)


def skip_without_peft():
    """PEFT imports transformers, which pins its huggingface_hub line (transformers 5 needs 2.x): in the 1.x
    compatibility run (tests/test_hub_versions.py), the parts that need PEFT skip, saying why."""
    try:
        import peft  # noqa: F401
    except ImportError as err:
        import huggingface_hub

        pytest.skip(f"peft cannot be imported with huggingface_hub {huggingface_hub.__version__}: {err}")


def same_tensors(a, b):
    return all(
        torch.equal(getattr(a.modules[m].compression, t), getattr(b.modules[m].compression, t))
        for m in a.modules for t in ("U", "V", "sigma", "cluster")
    )


def test_push_then_pull_whole_collection(hub, collection):
    info = collection.push_to_hub(REPO, progress=False)
    assert info is not None and len(hub.commit_log) == 1  # everything in one commit
    files = hub.files(REPO)
    assert "collection.json" in files and "README.md" in files and "adapters/synthetic-00003/adapter_config.json" in files
    pulled = JDLoraCollection.from_pretrained(REPO)
    assert pulled.adapter_names == collection.adapter_names and same_tensors(collection, pulled)
    assert pulled.source == {"path_or_repo_id": REPO, "revision": hub.head(REPO)}


def test_pulling_one_adapter_downloads_only_what_it_needs(hub, collection):
    collection.push_to_hub(REPO, progress=False)
    hub.requests.clear()
    name = "synthetic-00002"
    one = JDLoraCollection.from_pretrained(REPO, adapters=[name])
    index = collection.index(name)
    needed = {"collection.json", f"adapters/{name}/adapter_config.json", f"adapters/{name}/adapter_model.safetensors"}
    for module, entry in collection.modules.items():
        needed.add(f"bases/{module}/{int(entry.compression.cluster[entry.row_of(index)])}.safetensors")
    assert set(hub.downloads(REPO)) == needed
    for module in collection.modules:
        assert torch.equal(one.delta_weight(name, module), collection.delta_weight(name, module))


def test_pushing_again_after_add_adapters_uploads_only_what_changed(hub, collection, adapters):
    collection.push_to_hub(REPO, progress=False)
    collection.add_adapters(adapters[5:])
    collection.push_to_hub(REPO, commit_message="Add two adapters", progress=False)
    uploaded = hub.uploaded_paths[-1]
    assert not any(p.startswith("bases/") for p in uploaded), "bases did not change and must not be re-uploaded"
    assert not any(p.startswith("adapters/synthetic-00000/") for p in uploaded)
    assert {"collection.json", "adapters/synthetic-00006/adapter_model.safetensors"} <= set(uploaded)
    assert all(p.startswith("sigma/") for p in uploaded if "/" in p and not p.startswith("adapters/"))
    assert len(JDLoraCollection.from_pretrained(REPO)) == 7
    assert collection.push_to_hub(REPO, progress=False) is None  # nothing changed: no empty commit


def test_removed_adapters_are_deleted_from_the_repo_in_the_same_commit(hub, collection):
    collection.push_to_hub(REPO, progress=False)
    collection.remove_adapters(["synthetic-00001"])
    collection.push_to_hub(REPO, progress=False)
    assert not any(p.startswith("adapters/synthetic-00001/") for p in hub.files(REPO))
    assert hub.commit_log[-1]["deleted"]


def test_pinned_revision_loads_the_old_collection(hub, collection, adapters):
    collection.push_to_hub(REPO, progress=False)
    first = hub.head(REPO)
    collection.add_adapters(adapters[5:])
    collection.push_to_hub(REPO, progress=False)
    assert len(JDLoraCollection.from_pretrained(REPO)) == 7
    old = JDLoraCollection.from_pretrained(REPO, revision=first)
    assert len(old) == 5 and old.source["revision"] == first


def test_push_to_a_branch_and_as_a_pull_request(hub, collection):
    collection.push_to_hub(REPO, progress=False)
    main_head = hub.head(REPO)
    collection.remove_adapters(["synthetic-00004"])
    info = collection.push_to_hub(REPO, create_pr=True, progress=False)
    assert info.pr_url and hub.head(REPO) == main_head
    collection.push_to_hub(REPO, revision="v2", progress=False)
    assert len(JDLoraCollection.from_pretrained(REPO, revision="v2")) == 4
    assert len(JDLoraCollection.from_pretrained(REPO)) == 5


def test_a_server_error_during_commit_leaves_the_repo_unchanged(hub, collection, adapters):
    collection.push_to_hub(REPO, progress=False)
    before = hub.head(REPO), hub.files(REPO)
    collection.add_adapters(adapters[5:])
    hub.fail_next("/commit/", status=500)
    with pytest.raises(PushError, match="repo is unchanged"):
        collection.push_to_hub(REPO, progress=False)
    assert (hub.head(REPO), hub.files(REPO)) == before


def test_a_corrupted_file_in_the_repo_is_caught_on_load(hub, collection):
    collection.push_to_hub(REPO, progress=False)
    hub.corrupt(REPO, "bases/model.layers.1.self_attn.q_proj/0.safetensors")
    with pytest.raises(CollectionIntegrityError, match="q_proj/0.safetensors"):
        JDLoraCollection.from_pretrained(REPO)


def test_model_card_validates_against_hub_yaml_rules(hub, collection):
    from huggingface_hub import ModelCard

    collection.push_to_hub(REPO, progress=False)
    card = ModelCard.load(REPO)
    card.validate()
    assert card.data.library_name == "peft" and "jdlora" in card.data.tags
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in card.text


def test_cli_compress_push_inspect_and_export(hub, real_adapters, tmp_path, capsys):
    out = tmp_path / "coll"
    assert main(["compress", *map(str, real_adapters), "--rank", "4", "--out", str(out), "--push", REPO]) == 0
    assert (out / "collection.json").is_file()
    hub.requests.clear()
    capsys.readouterr()
    assert main(["inspect", REPO]) == 0
    listing = capsys.readouterr().out
    assert hub.downloads(REPO) == ["collection.json"], "inspect reads only the manifest of a remote collection"
    assert "automatic choice" in listing  # --clusters auto: what it chose and why, from the manifest
    for adapter in real_adapters:
        assert adapter.name in listing
    assert main(["add", str(out), str(real_adapters[0]), ]) == 2  # already in the collection
    assert "already has an adapter" in capsys.readouterr().err
    skip_without_peft()  # writing a plain LoRA needs peft's LoraConfig
    assert main(["export-lora", REPO, "0112LY-logo", str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / "adapter_model.safetensors").is_file()


def test_publish_and_load_example_runs(hub, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    skip_without_peft()
    script = Path(__file__).parents[1] / "examples" / "publish_and_load.py"
    run = subprocess.run([sys.executable, str(script), "jdlora-test/example", "--adapters", "6", "--workdir",
                          str(tmp_path)], capture_output=True, text=True, env=dict(os.environ), timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Loaded ['synthetic-00000']" in run.stdout and "Loaded 6 adapters" in run.stdout
    assert (tmp_path / "synthetic-00000-lora" / "adapter_model.safetensors").is_file()


def test_a_network_failure_during_push_is_a_push_error(hub, collection, monkeypatch):
    import huggingface_hub.constants as hfc

    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(hfc, "ENDPOINT", dead)
    with pytest.raises(PushError, match="nothing was uploaded"):
        collection.push_to_hub(REPO, progress=False)


def test_engines_tell_a_collection_from_a_plain_lora_by_one_small_download(hub, collection):
    """What TGI and vLLM ask first (jdlora.format.read_adapter_config): a collection's root or one adapter's
    folder on the Hub, read from its adapter_config.json alone; a repo that does not exist is not JD-LoRA
    (the engine's own loader reports it)."""
    from jdlora.format import adapter_config_kind, read_adapter_config

    collection.push_to_hub(REPO, progress=False)
    hub.requests.clear()
    assert adapter_config_kind(read_adapter_config(REPO)) == "collection"
    assert hub.downloads() == ["adapter_config.json"]
    assert read_adapter_config("jdlora-test/no-such-repo") is None
