"""The on-disk format: round trips, partial loading, integrity, atomic saves, export to plain LoRA, scale."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml

import jdlora
from jdlora.collection import JDLoraCollection
from jdlora.errors import CollectionFormatError, CollectionIntegrityError, IncompatibleAdaptersError, UnknownAdapterError
from jdlora.format import read_manifest
from jdlora.synthetic import llama_modules, synthetic_adapters

MODULES = llama_modules(2, 48, 16)


@pytest.fixture(scope="module")
def adapters():
    return synthetic_adapters(8, MODULES, rank=[4, 3], groups=2)


@pytest.fixture(scope="module")
def collection(adapters):
    return jdlora.compress(adapters[:6], rank=5, clusters=2, progress=False)


def assert_same(a: JDLoraCollection, b: JDLoraCollection):
    assert a.adapter_names == b.adapter_names and list(a.modules) == list(b.modules)
    assert [x.origin for x in a.adapters] == [x.origin for x in b.adapters]
    assert a.base_model == b.base_model and a.sigma_kind == b.sigma_kind
    for module in a.modules:
        x, y = a.modules[module], b.modules[module]
        assert torch.equal(x.adapter_ids, y.adapter_ids)
        for attr in ("U", "V", "sigma", "cluster", "sq_norms", "residuals"):
            assert torch.equal(getattr(x.compression, attr), getattr(y.compression, attr)), (module, attr)


def test_save_then_load_gives_bit_identical_tensors(collection, tmp_path):
    collection.save_pretrained(tmp_path / "c", progress=False)
    loaded = JDLoraCollection.from_pretrained(tmp_path / "c")
    assert_same(collection, loaded)
    assert loaded.settings == collection.settings  # CompressionSettings, dtype included
    assert loaded.error == pytest.approx(collection.error)


def test_real_adapters_round_trip_with_provenance(real_adapters, tmp_path):
    collection = jdlora.compress(real_adapters, rank=4, clusters=2, progress=False)
    collection.save_pretrained(tmp_path / "real", progress=False)
    manifest = read_manifest(tmp_path / "real" / "collection.json")
    entry = next(a for a in manifest["adapters"] if a["name"] == "fanyihan-max-workforllm")
    weights = real_adapters[[p.name for p in real_adapters].index("fanyihan-max-workforllm")] / "adapter_model.safetensors"
    import hashlib

    assert entry["origin"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert entry["rank"] == 8 and entry["alpha"] == 32
    # q,v-only adapters have no Sigma (null) for k and o, aligned with the module list.
    names = [m["name"] for m in manifest["modules"]]
    k0 = names.index("model.layers.0.self_attn.k_proj")
    assert entry["module_errors"][k0] is None and entry["clusters"][k0] is None
    assert_same(collection, JDLoraCollection.from_pretrained(tmp_path / "real"))


def test_files_follow_the_spec(collection, tmp_path):
    root = collection.save_pretrained(tmp_path / "c", progress=False)
    module = "model.layers.1.self_attn.q_proj"
    from safetensors import safe_open

    with safe_open(str(root / "sigma" / f"{module}.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["adapter_index", "cluster", "residuals", "sigma", "sq_norms"]
        assert f.get_slice("sigma").get_shape() == [6, 5, 5]
    with safe_open(str(root / "bases" / module / "1.safetensors"), "pt") as f:
        assert f.get_slice("U").get_shape() == [48, 5] and f.get_slice("V").get_shape() == [48, 5]
    config = json.loads((root / "adapters" / "synthetic-00003" / "adapter_config.json").read_text())
    assert config["peft_type"] == "JDLORA" and config["collection_root"] == "../.."
    cluster = int(collection.modules[module].compression.cluster[3])
    assert config["bases"][module]["path"] == f"bases/{module}/{cluster}.safetensors"
    root_config = json.loads((root / "adapter_config.json").read_text())
    assert root_config["collection"] == "collection.json" and root_config["target_modules"] == ["k_proj", "q_proj", "v_proj"]


def test_loading_some_adapters_reads_only_their_bases_and_sigma(collection, tmp_path):
    root = collection.save_pretrained(tmp_path / "c", progress=False)
    wanted = "synthetic-00004"
    index = collection.index(wanted)
    # Remove everything a partial load must not need: if it were read, loading would fail.
    shutil.rmtree(root / "sigma")
    for other in collection.adapter_names:
        if other != wanted:
            shutil.rmtree(root / "adapters" / other)
    for module, entry in collection.modules.items():
        used = int(entry.compression.cluster[entry.row_of(index)])
        for j in range(entry.compression.num_clusters):
            if j != used:
                (root / "bases" / module / f"{j}.safetensors").unlink()
    partial = JDLoraCollection.from_pretrained(root, adapters=[wanted])
    assert partial.adapter_names == [wanted]
    for module in collection.modules:
        assert torch.equal(partial.delta_weight(wanted, module), collection.delta_weight(wanted, module))
        assert partial.modules[module].compression.num_clusters == 1
    assert partial.adapter_errors()[wanted] == pytest.approx(collection.adapter_errors()[wanted], rel=1e-6)


def test_unknown_adapter_name_lists_close_matches(collection, tmp_path):
    root = collection.save_pretrained(tmp_path / "c", progress=False)
    with pytest.raises(UnknownAdapterError, match="synthetic-00004"):
        JDLoraCollection.from_pretrained(root, adapters=["synthetic-0004"])


def test_corrupted_bases_file_fails_naming_it(collection, tmp_path):
    root = collection.save_pretrained(tmp_path / "c", progress=False)
    target = root / "bases" / "model.layers.0.self_attn.v_proj" / "0.safetensors"
    data = bytearray(target.read_bytes())
    data[-3] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(CollectionIntegrityError, match="v_proj/0.safetensors"):
        JDLoraCollection.from_pretrained(root)


def test_truncated_sigma_file_fails_naming_it(collection, tmp_path):
    root = collection.save_pretrained(tmp_path / "c", progress=False)
    target = root / "sigma" / "model.layers.0.self_attn.k_proj.safetensors"
    target.write_bytes(target.read_bytes()[:-40])
    with pytest.raises(CollectionIntegrityError, match="k_proj.safetensors"):
        JDLoraCollection.from_pretrained(root)
    # Without the sha256 check, the safetensors reader itself rejects the file.
    with pytest.raises(CollectionFormatError, match="k_proj.safetensors"):
        JDLoraCollection.from_pretrained(root, verify=False)


def test_missing_file_and_bad_manifest_fail_clearly(collection, tmp_path):
    root = collection.save_pretrained(tmp_path / "c", progress=False)
    (root / "bases" / "model.layers.1.self_attn.k_proj" / "1.safetensors").unlink()
    with pytest.raises(CollectionFormatError, match="k_proj/1.safetensors is missing"):
        JDLoraCollection.from_pretrained(root)
    (root / "collection.json").write_text("{not json")
    with pytest.raises(CollectionFormatError, match="collection.json is not valid JSON"):
        JDLoraCollection.from_pretrained(root)
    with pytest.raises(CollectionFormatError, match="no collection.json"):
        JDLoraCollection.from_pretrained(tmp_path)


def test_newer_major_version_is_refused_newer_minor_loads(collection, tmp_path):
    root = collection.save_pretrained(tmp_path / "c", progress=False)
    manifest = json.loads((root / "collection.json").read_text())
    manifest["format_version"] = "1.7"
    manifest["a_field_from_the_future"] = {"x": 1}
    (root / "collection.json").write_text(json.dumps(manifest))
    assert len(JDLoraCollection.from_pretrained(root)) == len(collection)
    manifest["format_version"] = "2.0"
    (root / "collection.json").write_text(json.dumps(manifest))
    with pytest.raises(CollectionFormatError, match="version 2.0.*Upgrade jdlora"):
        JDLoraCollection.from_pretrained(root)


def test_files_that_disagree_with_the_manifest_are_refused(collection, tmp_path):
    root = collection.save_pretrained(tmp_path / "c", progress=False)
    manifest = json.loads((root / "collection.json").read_text())
    manifest["modules"][0]["rank"] = 7
    (root / "collection.json").write_text(json.dumps(manifest))
    with pytest.raises(CollectionFormatError, match="manifest says"):
        JDLoraCollection.from_pretrained(root)


def test_a_crash_during_save_leaves_the_previous_collection(collection, adapters, tmp_path, monkeypatch):
    root = collection.save_pretrained(tmp_path / "c", progress=False)
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    bigger = jdlora.compress(adapters, rank=5, clusters=2, progress=False)
    import jdlora.format.save as save_module

    calls = {"n": 0}
    real_save_file = save_module.save_file

    def interrupted(*args, **kwargs):  # Ctrl-C halfway through writing the files
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(save_module, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bigger.save_pretrained(root, progress=False)
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"], "no temporary folder may be left behind"
    monkeypatch.undo()
    bigger.save_pretrained(root, progress=False)  # and a complete save replaces it
    assert len(JDLoraCollection.from_pretrained(root)) == 8
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


def test_model_card_has_hub_metadata_and_loading_snippets(collection, tmp_path):
    root = collection.save_pretrained(tmp_path / "c", progress=False)
    text = (root / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["library_name"] == "peft" and header["base_model"] == "jdlora/synthetic-base"
    assert header["base_model_relation"] == "adapter" and "jdlora" in header["tags"]
    assert "PeftModel.from_pretrained(base" in text and 'subfolder="adapters/synthetic-00000"' in text
    assert "LORA_ADAPTERS=" in text
    for name, error in collection.adapter_errors().items():
        assert f"| `{name}` | synthetic |" in text and f"{error:.4f}" in text


@pytest.mark.filterwarnings("ignore:.*above the collection's target")
def test_add_adapters_projects_onto_the_bases(collection, adapters):
    grown = jdlora.compress(adapters[:6], rank=5, clusters=2, progress=False)
    added = grown.add_adapters(adapters[6:])
    assert list(added) == ["synthetic-00006", "synthetic-00007"]
    for name, error in added.items():
        for module in grown.modules:
            # The added Sigma is the best one for the bases it joined: U^T dW V (equation 6).
            entry = grown.modules[module]
            row = entry.row_of(grown.index(name))
            c = int(entry.compression.cluster[row])
            A, B = adapters[int(name[-1])].read_module(module)
            dW = adapters[int(name[-1])].scaling(module) * B @ A
            U, V = entry.compression.U[c], entry.compression.V[c]
            assert torch.allclose(entry.compression.sigma[row], U.T @ dW @ V, atol=1e-6)
        assert 0 < error < 1
    # Existing adapters are untouched.
    for module in collection.modules:
        assert torch.equal(grown.modules[module].compression.sigma[:6], collection.modules[module].compression.sigma)
    with pytest.raises(IncompatibleAdaptersError, match="already has an adapter named"):
        grown.add_adapters(adapters[6:7])


def test_add_adapters_warns_above_the_target(adapters):
    grown = jdlora.compress(adapters[:3], rank=2, clusters=1, progress=False)
    grown.settings = grown.settings.replace(target_error=0.01)
    with pytest.warns(UserWarning, match="above the collection's target 0.01"):
        grown.add_adapters(adapters[3:4])


def test_remove_adapters_drops_their_sigma(collection, tmp_path):
    smaller = JDLoraCollection.from_pretrained(collection.save_pretrained(tmp_path / "c", progress=False))
    smaller.remove_adapters(["synthetic-00001", "synthetic-00004"])
    assert smaller.adapter_names == ["synthetic-00000", "synthetic-00002", "synthetic-00003", "synthetic-00005"]
    module = "model.layers.0.self_attn.q_proj"
    assert torch.equal(smaller.delta_weight("synthetic-00005", module), collection.delta_weight("synthetic-00005", module))
    root = smaller.save_pretrained(tmp_path / "d", progress=False)
    assert sorted(p.name for p in (root / "adapters").iterdir()) == smaller.adapter_names


def test_recompress_reopens_the_originals(real_adapters):
    collection = jdlora.compress(real_adapters[:3], rank=4, progress=False)
    again = jdlora.recompress(collection, real_adapters[3:])
    assert again.adapter_names == [p.name for p in real_adapters]
    assert again.settings["rank"] == 4


def test_exported_lora_loads_in_stock_peft_and_matches_the_compressed_delta(real_adapters, tmp_path):
    collection = jdlora.compress(real_adapters, rank=6, clusters=2, progress=False)
    name = "ao-wei-svg"
    out = collection.export_lora(name, tmp_path / "exported")
    # A process that never imports jdlora: stock PEFT on a tiny gemma-3-shaped model.
    script = f"""
import json, sys, torch
from transformers import Gemma3TextConfig, AutoModelForCausalLM
from peft import PeftModel
cfg = Gemma3TextConfig(hidden_size=640, intermediate_size=64, num_hidden_layers=18, num_attention_heads=4,
                       num_key_value_heads=1, head_dim=256, vocab_size=32)
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_config(cfg), {str(out)!r})
assert "jdlora" not in sys.modules
deltas = {{}}
for n, m in model.named_modules():
    if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {{}}):
        deltas[n.removeprefix("base_model.model.")] = m.get_delta_weight("default")
torch.save(deltas, {str(tmp_path / 'deltas.pt')!r})
"""
    subprocess.run([sys.executable, "-c", script], check=True)
    deltas = torch.load(tmp_path / "deltas.pt")
    expected = {m for m, e in collection.modules.items() if e.row_of(collection.index(name)) is not None}
    assert set(deltas) == expected and len(expected) == 18 * 4
    for module, delta in deltas.items():
        assert torch.allclose(delta, collection.delta_weight(name, module), atol=1e-6)


def test_ten_thousand_adapters_save_and_load_with_sharded_folders(tmp_path):
    n = 10_001
    adapters = synthetic_adapters(n, llama_modules(1, 8, 4, targets=("q_proj",)), rank=1, shared_rank=2)
    collection = jdlora.compress(adapters, rank=2, clusters=1, progress=False)
    start = time.perf_counter()
    root = collection.save_pretrained(tmp_path / "big", progress=False)
    saved = time.perf_counter() - start
    start = time.perf_counter()
    loaded = JDLoraCollection.from_pretrained(root)
    load_time = time.perf_counter() - start
    shards = [p for p in (root / "adapters").iterdir()]
    assert len(shards) <= 256 and all(len(os.listdir(p)) < 10_000 for p in shards)
    assert_same(collection, loaded)
    one = JDLoraCollection.from_pretrained(root, adapters=["synthetic-09999"])
    assert one.adapter_names == ["synthetic-09999"]
    print(f"\n10,001 adapters: save {saved:.1f} s, load {load_time:.1f} s")


def test_saving_twice_gives_byte_identical_files(collection, tmp_path):
    """Unchanged content must keep its bytes (and sha256), or a re-push would upload everything again."""
    a = collection.save_pretrained(tmp_path / "a", progress=False)
    b = collection.save_pretrained(tmp_path / "b", progress=False)
    files_a = {p.relative_to(a): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    assert files_a == files_b
