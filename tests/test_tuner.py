"""jdlora.tuner: JD-LoRA as a PEFT method, on a tiny random Llama built from a config (no download)."""

from __future__ import annotations

import ast
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import PeftType

import jdlora
from jdlora.collection import AdapterInfo, CollectionModule, JDLoraCollection
from jdlora.compress import ModuleCompression
from jdlora.errors import IncompatibleAdaptersError, UnknownAdapterError, UnknownModuleError
from jdlora.synthetic import llama_modules, save_adapters, synthetic_adapters
from jdlora.tuner import JDLoraConfig, JDLoraModel, UnknownAdapterNameError, load_collection, to_collection
from jdlora.tuner.layer import JDLoraLayer
from jdlora.tuner.mixed import MixedBatch
from jdlora.tuner._peft_compat import check_peft_version
from tiny_models import tiny_llama

SRC = Path(jdlora.__file__).parent
MODULES = llama_modules(2, 64, 32, ("q_proj", "k_proj", "v_proj", "o_proj"))
Q0 = "model.layers.0.self_attn.q_proj"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 96, (3, 6), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def adapters():
    # q, k, v everywhere; o_proj only in layer 1, so adapters leave some modules alone
    modules = {m: s for m, s in MODULES.items() if "o_proj" not in m or "layers.1" in m}
    return synthetic_adapters(6, modules, rank=4, groups=2, seed=3)


@pytest.fixture(scope="module", params=["full", "diag"])
def collection(request, adapters):
    return jdlora.compress(adapters, rank=6, clusters=2, sigma=request.param, progress=False)


@pytest.fixture(scope="module")
def full(adapters):
    return jdlora.compress(adapters, rank=6, clusters=2, progress=False)


def fresh(base):
    return copy.deepcopy(base)


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def merged_dense(base, collection, name):
    """The base model with the adapter's dense update U Sigma V^T added to each weight."""
    model = fresh(base)
    with torch.no_grad():
        for module in collection.modules:
            delta = collection.delta_weight(name, module)
            if delta is not None:
                model.get_submodule(module).weight += delta
    return model


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=0)


# ----- registration -----------------------------------------------------------------------------


def test_import_jdlora_does_not_import_peft_and_registers_when_peft_is_imported():
    code = (
        "import sys, jdlora\n"
        "assert 'peft' not in sys.modules and 'transformers' not in sys.modules\n"
        "from peft import PeftConfig\n"
        "from peft.utils import PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING\n"
        "assert PeftType('JDLORA') is PeftType.JDLORA and PeftType['JDLORA'] is PeftType.JDLORA\n"
        "assert PEFT_TYPE_TO_TUNER_MAPPING['JDLORA'].__name__ == 'JDLoraModel'\n"
        "assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.JDLORA] == 'jd_'\n"
        "assert list(PeftType).count(PeftType.JDLORA) == 1\n"
        "import peft\n"
        "assert peft.__spec__.loader.__class__.__module__ != 'jdlora.tuner._peft_compat'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    # PEFT imported first: registered at import jdlora, and importing again changes nothing
    code = ("import peft, jdlora, importlib, jdlora.tuner._peft_compat as r\n"
            "from peft.utils import PeftType\n"
            "r._state['done'] = False; r.register(); r.register()\n"
            "assert [t for t in PeftType if t.value == 'JDLORA'] == [PeftType.JDLORA]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("version", ["3.10", "3.12", "3.13"])
def test_peft_type_member_is_added_safely_and_once_on_other_pythons(version):
    python = next((p for p in (f"/root/.pyenv/versions/{v}/bin/python" for v in os.listdir("/root/.pyenv/versions")
                               if v.startswith(version + ".")) if os.path.exists(p)), None) \
        if os.path.isdir("/root/.pyenv/versions") else None
    if python is None:
        pytest.skip(f"no Python {version} here")
    source = (SRC / "tuner" / "_peft_compat.py").read_text()
    function = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "add_enum_member")
    code = (
        "import enum, json, pickle, sys\n"
        f"{ast.get_source_segment(source, function)}\n"
        "add = add_enum_member\n"
        "class PT(str, enum.Enum):\n    LORA = 'LORA'\n"
        "m = add(PT, 'JDLORA'); assert add(PT, 'JDLORA') is m\n"
        "assert PT.JDLORA is m and PT('JDLORA') is m and PT['JDLORA'] is m and m == 'JDLORA'\n"
        "assert list(PT) == [PT.LORA, m] and m in PT and {m: 1}['JDLORA'] == 1\n"
        "assert json.dumps(m) == '\"JDLORA\"' and pickle.loads(pickle.dumps(m)) is m\n"
        "assert format(m) == format(PT.LORA).replace('LORA', 'JDLORA')\n"
    )
    subprocess.run([python, "-c", code], check=True)


def test_older_peft_is_refused_with_an_upgrade_hint():
    with pytest.raises(ImportError, match=r"peft>=0\.21.*0\.20\.1.*pip install -U"):
        check_peft_version("0.20.1")
    check_peft_version("0.21.0.dev0")
    check_peft_version("1.0")


def test_config_is_a_peft_config_and_round_trips(tmp_path):
    config = JDLoraConfig(r=8, target_modules=["q_proj", "v_proj"], sigma="diag")
    assert config.peft_type == PeftType.JDLORA and config.target_modules == {"q_proj", "v_proj"}
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "JDLORA"
    loaded = JDLoraConfig.from_pretrained(tmp_path)
    assert (loaded.r, loaded.sigma, loaded.target_modules) == (8, "diag", {"q_proj", "v_proj"})
    with pytest.raises(ValueError, match="sigma"):
        JDLoraConfig(sigma="lower")
    with pytest.raises(ValueError, match="bias"):
        JDLoraConfig(bias="all")


# ----- outputs: collections, lossless compression, mixed batches, generation ---------------------


def test_every_adapter_gives_the_base_model_with_its_dense_delta_merged(base, collection, ids):
    model = load_collection(fresh(base), collection)
    assert model.active_adapters == ["default"] and close(logits(model, ids), logits(base, ids), 0)
    for name in collection.adapter_names:
        model.set_adapter(name)
        expected = logits(merged_dense(base, collection, name), ids)
        assert not close(expected, logits(base, ids), 1e-2)  # the adapter does change the outputs
        assert close(logits(model, ids), expected)


def test_bases_are_shared_buffers_stored_once_per_layer_and_cluster(base, full):
    model = load_collection(fresh(base), full)
    layer = model.base_model.model.get_submodule(Q0)
    c = full.modules[Q0].compression
    assert len(layer.jd_U) == c.num_clusters and len(layer.jd_sigma) == len(full)
    assert not any("jd_U" in n or "jd_V" in n for n, _ in model.named_parameters())
    # each Sigma is a view of its row of the layer's Sigma bank (what mixed batches gather from)
    bank = next(iter(layer._jd_banks.values()))
    for name in full.adapter_names:
        assert layer.jd_sigma[name].data_ptr() == bank.sigma[bank.group.rows[name]].data_ptr()
    # adapters of one cluster point at one basis
    for row, i in enumerate(full.modules[Q0].adapter_ids.tolist()):
        same = [full.adapters[j].name for row2, j in enumerate(full.modules[Q0].adapter_ids.tolist())
                if c.cluster[row2] == c.cluster[row]]
        assert {layer.jd_basis[n] for n in same} == {layer.jd_basis[full.adapters[i].name]}


@pytest.fixture(scope="module")
def lora_folders(tmp_path_factory, adapters):
    return save_adapters(adapters[:4], tmp_path_factory.mktemp("loras"))


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")  # the LoRAs skip layer 0's o_proj
def test_lossless_compression_reproduces_the_original_lora_models(base, lora_folders, ids):
    # 4 adapters of rank 4: rank 16 covers the stacked factors (Prop. 1), so JD is exact
    collection = jdlora.compress([str(p) for p in lora_folders], rank=16, progress=False)
    assert collection.error < 1e-6
    model = load_collection(fresh(base), collection)
    for folder in lora_folders:
        lora = PeftModel.from_pretrained(fresh(base), folder)
        assert isinstance(lora.peft_config["default"], LoraConfig)
        model.set_adapter(folder.name)
        assert close(logits(model, ids), logits(lora, ids), 2e-5)


def test_a_mixed_batch_equals_each_row_run_alone(base, collection, ids):
    model = load_collection(fresh(base), collection)
    names = [collection.adapter_names[4], "__base__", collection.adapter_names[1]]
    mixed = logits(model, ids, adapter_names=names)
    for i, name in enumerate(names):
        if name == "__base__":
            alone = logits(base, ids[i : i + 1])
        else:
            model.set_adapter(name)
            alone = logits(model, ids[i : i + 1])
        assert close(mixed[i : i + 1], alone)


def test_generate_with_adapter_names_equals_per_adapter_generation(base, full, ids):
    model = load_collection(fresh(base), full)
    names = [full.adapter_names[0], full.adapter_names[3], "__base__"]
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        for extra in ({}, {"num_beams": 2}):
            mixed = model.generate(input_ids=ids, adapter_names=names, **kw, **extra)
            for i, name in enumerate(names):
                if name == "__base__":
                    with model.disable_adapter():
                        alone = model.generate(input_ids=ids[i : i + 1], **kw, **extra)
                else:
                    model.set_adapter(name)
                    alone = model.generate(input_ids=ids[i : i + 1], **kw, **extra)
                # A row that reaches EOS early stops alone, but is filled in the batch (with the pad
                # token in greedy search, with EOS in beam search).
                n = alone.shape[1]
                assert torch.equal(mixed[i : i + 1, :n], alone)
                if n < mixed.shape[1]:
                    eos = base.config.eos_token_id
                    assert alone[0, -1] == eos and torch.isin(mixed[i, n:], torch.tensor([0, eos])).all()


def test_mixed_batches_give_the_same_errors_as_lora(base, full, ids):
    model = load_collection(fresh(base), full)
    a = full.adapter_names[0]
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same"):
        logits(model, ids, adapter_names=[a, a])
    with pytest.raises(UnknownAdapterNameError, match="synthetic-00004") as err:
        logits(model, ids, adapter_names=[a, "synthetic-0004", "__base__"])  # typo: close match suggested
    assert isinstance(err.value, ValueError) and isinstance(err.value, UnknownAdapterError)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        logits(model, ids, adapter_names=[a, a, a])
    model.eval()
    model.set_adapter(a)
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        logits(model, ids, adapter_names=[a, a, a])


# ----- the LoRA contract: merge, unmerge, disable, delete, dtype, conversion ---------------------


def test_merge_unmerge_disable_and_delete_behave_as_lora(base, full, ids):
    model = load_collection(fresh(base), full)
    a, b = full.adapter_names[2], full.adapter_names[5]
    model.set_adapter(a)
    expected, original = logits(model, ids), model.base_model.model.get_submodule(Q0).base_layer.weight.clone()
    model.merge_adapter()
    layer = model.base_model.model.get_submodule(Q0)
    assert layer.merged and not torch.equal(layer.base_layer.weight, original)
    assert close(logits(model, ids), expected)
    model.unmerge_adapter()
    assert not layer.merged and close(layer.base_layer.weight, original, 1e-6)
    with model.disable_adapter():
        assert close(logits(model, ids), logits(base, ids))
    assert close(logits(model, ids), expected)
    assert close(layer.get_delta_weight(a), full.delta_weight(a, Q0))

    model.set_adapter(b)
    before_b = logits(model, ids)
    group = model.base_model.jd_groups["r6-full"]
    row = group.rows[a]
    model.delete_adapter(a)
    assert a not in model.peft_config and a not in layer.jd_sigma and a not in group.rows and row in group.free
    assert close(logits(model, ids), before_b)  # the others are untouched
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter(a)
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, JDLoraLayer) for m in merged.modules())
    assert close(logits(merged, ids), before_b)


def test_dtype_and_device_moves_keep_sigma_views_and_banks_together(base, full, ids):
    model = load_collection(fresh(base), full)
    names = [full.adapter_names[1], full.adapter_names[2], "__base__"]
    expected = logits(model, ids, adapter_names=names)
    model.to(torch.float64)
    layer = model.base_model.model.get_submodule(Q0)
    assert layer._jd_ties_hold() and layer.jd_sigma[names[0]].dtype == torch.float64
    assert close(logits(model, ids, adapter_names=names).float(), expected)
    model.to(torch.bfloat16).to("cpu")
    assert layer._jd_ties_hold()
    assert close(logits(model, ids, adapter_names=names).float(), expected, 0.1)
    # in-place changes (an optimizer step, load_state_dict) reach the banks through the views
    model.to(torch.float32)
    with torch.no_grad():
        layer.jd_sigma[names[0]].mul_(0)
    model.set_adapter(names[0])
    assert close(logits(model, ids, adapter_names=names)[:1], logits(model, ids[:1]))


def test_autocast_runs_the_adapter_path_in_lower_precision(base, full, ids):
    model = load_collection(fresh(base), full)
    model.set_adapter(full.adapter_names[0])
    expected = logits(model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = logits(model, ids)
        mixed = logits(model, ids, adapter_names=[full.adapter_names[0]] * 3)
    assert close(out.float(), expected, 0.1) and close(mixed.float(), expected, 0.1)


def test_peft_convert_to_lora_gives_a_plain_lora_with_the_same_outputs(base, full, ids, tmp_path):
    from peft import save_as_lora

    model = load_collection(fresh(base), full)
    name = full.adapter_names[3]
    model.set_adapter(name)
    save_as_lora(tmp_path, model, rank=6, adapter_name=name)
    lora = PeftModel.from_pretrained(fresh(base), tmp_path)
    assert lora.peft_type == PeftType.LORA
    assert close(logits(lora, ids), logits(model, ids), 1e-4)


def test_the_adapter_path_compiles_without_graph_breaks(base, full):
    model = load_collection(fresh(base), full)
    layer = model.base_model.model.get_submodule(Q0)
    model.set_adapter(full.adapter_names[0])
    x = torch.randn(2, 5, 64)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert close(compiled(x), layer(x))
        # the mixed-batch path too, once the batch's rows are prepared (once per forward, outside the layers)
        batch = MixedBatch([full.adapter_names[1], "__base__"])
        expected = layer(x, adapter_names=batch)
        mixed = torch.compile(lambda t: layer(t, adapter_names=batch), fullgraph=True, backend="aot_eager")
        assert close(mixed(x), expected)


def test_gpt2_conv1d_layers_are_adapted_too():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)).eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(fresh(gpt2), JDLoraConfig(r=4, target_modules=["c_attn", "c_proj"], init_weights=False))
    model.eval()
    assert model.peft_config["default"].fan_in_fan_out  # set for Conv1D, which stores (fan_in, fan_out)
    out = logits(model, ids)
    assert not close(out, logits(gpt2, ids), 1e-2)
    mixed = logits(model, ids, adapter_names=["default", "__base__"])
    assert close(mixed[:1], out[:1]) and close(mixed[1:], logits(gpt2, ids)[1:])
    assert close(logits(copy.deepcopy(model).merge_and_unload(), ids), out)


# ----- training ---------------------------------------------------------------------------------


def train_steps(model, ids, steps=15, lr=0.05):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_new_adapter_starts_unchanged_and_training_sigma_lowers_the_loss(base, ids, checkpointing):
    model_base = fresh(base)
    if checkpointing:
        model_base.gradient_checkpointing_enable()
    model = get_peft_model(model_base, JDLoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert close(logits(model, ids), logits(base, ids), 0)
    trainable, total = model.get_nb_trainable_parameters()
    assert trainable == 4 * 4 * 4  # r x r per module, 4 modules
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad} == {"jd_sigma"}
    layer = model.base_model.model.get_submodule(Q0)
    U = layer.jd_U[layer.jd_basis["default"]]
    assert close(U.T @ U, torch.eye(4))  # fixed orthonormal bases
    U_before = U.clone()
    losses = train_steps(model, ids)
    assert losses[-1] < losses[0] - 0.05
    assert torch.equal(layer.jd_U[layer.jd_basis["default"]], U_before)
    # the trained Sigma reaches the banks that mixed batches read
    assert close(logits(model, ids, adapter_names=["default"] * 3), logits(model, ids))


def test_training_in_a_collections_subspace_adds_a_task_to_it(base, full, ids, tmp_path):
    model = load_collection(fresh(base), full)
    model.add_adapter("new-task", JDLoraConfig(bases_from=full, bases_cluster=1))
    model.set_adapter("new-task")
    layer = model.base_model.model.get_submodule(Q0)
    key = layer.jd_basis["new-task"]
    c = full.modules[Q0].compression
    assert torch.equal(layer.jd_U[key], c.U[1]) and len(layer.jd_U) == c.num_clusters  # shared, not copied
    assert model.get_nb_trainable_parameters()[0] == 6 * 6 * len(full.modules)
    losses = train_steps(model, ids, steps=10)
    assert losses[-1] < losses[0]
    to_collection(model).save_pretrained(tmp_path / "c", progress=False)
    saved = JDLoraCollection.from_pretrained(tmp_path / "c")
    assert saved.adapter_names == full.adapter_names + ["new-task"]
    assert all(torch.equal(saved.modules[m].compression.U, full.modules[m].compression.U) for m in full.modules)
    reloaded = PeftModel.from_pretrained(fresh(base), tmp_path / "c", adapter_name="new-task")
    assert reloaded.active_adapters == ["new-task"] and close(logits(reloaded, ids), logits(model, ids))
    # PEFT's layout: the adapter alone, with the bases it uses in its weights file
    model.save_pretrained(tmp_path / "p", selected_adapters=["new-task"])
    alone = PeftModel.from_pretrained(fresh(base), tmp_path / "p" / "new-task")
    assert close(logits(alone, ids), logits(model, ids))


# ----- saving and loading with PEFT (the collection format) -------------------------------------


def test_a_collection_written_by_to_collection_loads_every_adapter_with_from_pretrained(base, full, ids, tmp_path):
    model = load_collection(fresh(base), full)
    to_collection(model).save_pretrained(tmp_path, progress=False)
    assert (tmp_path / "collection.json").exists() and (tmp_path / "bases" / Q0 / "1.safetensors").exists()
    loaded = PeftModel.from_pretrained(fresh(base), tmp_path)
    assert set(loaded.peft_config) == {"default", *full.adapter_names}
    for name in full.adapter_names[::2]:
        loaded.set_adapter(name)
        model.set_adapter(name)
        assert close(logits(loaded, ids), logits(model, ids), 0)
    # a subset, and one adapter from its subfolder (only its bases), and load_adapter on top
    some = PeftModel.from_pretrained(fresh(base), tmp_path, adapters=full.adapter_names[:2])
    assert set(some.peft_config) == {"default", *full.adapter_names[:2]}
    one = PeftModel.from_pretrained(fresh(base), tmp_path, subfolder=f"adapters/{full.adapter_names[3]}")
    model.set_adapter(full.adapter_names[3])
    assert close(logits(one, ids), logits(model, ids), 0)
    one.load_adapter(tmp_path, adapter_name="other", subfolder=f"adapters/{full.adapter_names[4]}")
    one.load_adapter(tmp_path, adapter_name="all")  # a whole collection added in bulk
    names = ["default", "other", full.adapter_names[5]]
    model_names = [full.adapter_names[3], full.adapter_names[4], full.adapter_names[5]]
    assert close(logits(one, ids, adapter_names=names), logits(model, ids, adapter_names=model_names), 1e-6)
    with pytest.raises(ValueError, match="stands for a collection loaded in bulk"):
        one.load_adapter(tmp_path, adapter_name="all")  # loading into it again


def test_a_bulk_loaded_collection_saves_each_adapter_in_peft_layout(base, full, ids, tmp_path):
    model = load_collection(fresh(base), full)
    names = full.adapter_names[:3]
    with pytest.raises(ValueError, match="has no weights"):
        model.save_pretrained(tmp_path, selected_adapters=["default"])
    model.save_pretrained(tmp_path, selected_adapters=names)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(names)  # "default": no weights
    saved = json.loads((tmp_path / names[0] / "adapter_config.json").read_text())
    assert saved["bases_in_weights"] and not saved["collection"] and not (tmp_path / "adapter_config.json").exists()
    # exactly the modules the adapter adapts (o_proj of layer 1 only), so loading it reports no missing keys
    assert sorted(saved["target_modules"]) == sorted(m for m in full.modules if full.modules[m].row_of(0) is not None)
    loaded = PeftModel.from_pretrained(fresh(base), tmp_path / names[0], adapter_name=names[0])
    for name in names[1:]:
        loaded.load_adapter(tmp_path / name, adapter_name=name)
    mixed = ["__base__"] + names[:2]
    assert close(logits(loaded, ids, adapter_names=mixed), logits(model, ids, adapter_names=mixed), 1e-6)
    layer = loaded.base_model.model.get_submodule(Q0)
    assert len(layer.jd_U) == len({layer.jd_basis[n] for n in names})  # equal bases are shared again


def test_a_collection_saved_by_jdlora_format_loads_with_peft(base, full, ids, tmp_path):
    full.save_pretrained(tmp_path / "c", progress=False)
    model = PeftModel.from_pretrained(fresh(base), tmp_path / "c", adapter_name=full.adapter_names[1])
    assert model.active_adapters == [full.adapter_names[1]]
    assert close(logits(model, ids), logits(merged_dense(base, full, full.adapter_names[1]), ids))


def test_push_to_hub_and_load_from_the_hub(hub, base, full, ids):
    model = load_collection(fresh(base), full)
    model.push_to_hub("jdlora-test/tuner-collection")
    assert len(hub.commit_log) == 1
    hub.requests.clear()
    name = full.adapter_names[2]
    one = PeftModel.from_pretrained(fresh(base), "jdlora-test/tuner-collection", subfolder=f"adapters/{name}")
    index = full.index(name)
    needed = {f"adapters/{name}/adapter_config.json", f"adapters/{name}/adapter_model.safetensors"}
    for module, entry in full.modules.items():
        if (row := entry.row_of(index)) is not None:
            needed.add(f"bases/{module}/{int(entry.compression.cluster[row])}.safetensors")
    assert set(hub.downloads("jdlora-test/tuner-collection")) == needed
    whole = PeftModel.from_pretrained(fresh(base), "jdlora-test/tuner-collection")
    whole.set_adapter(name)
    assert close(logits(one, ids), logits(whole, ids), 0)


def test_a_loaded_collection_converts_back_to_the_same_collection(base, collection):
    back = to_collection(load_collection(fresh(base), collection))
    assert back.adapter_names == collection.adapter_names and back.sigma_kind == collection.sigma_kind
    for module, entry in collection.modules.items():
        for t in ("U", "V", "sigma", "cluster", "sq_norms", "residuals"):
            assert torch.equal(getattr(back.modules[module].compression, t), getattr(entry.compression, t)), t
        assert torch.equal(back.modules[module].adapter_ids, entry.adapter_ids)


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_lora_models_save_and_load_as_before(base, lora_folders, tmp_path):
    lora = PeftModel.from_pretrained(fresh(base), lora_folders[0])
    lora.load_adapter(lora_folders[1], adapter_name="second")
    lora.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "second" / "adapter_config.json").is_file()
    assert not (tmp_path / "collection.json").exists()


def test_the_mixed_batch_example_runs():
    script = Path(__file__).parents[1] / "examples" / "mixed_batch_generate.py"
    run = subprocess.run([sys.executable, str(script), "--max-new-tokens", "4"], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("(same as alone: True)") == 4


# ----- bad inputs -------------------------------------------------------------------------------


def test_bad_collections_and_names_give_clear_errors(base, full, adapters):
    with pytest.raises(UnknownAdapterError, match="synthetic-00003"):
        load_collection(fresh(base), full, ["synthetic-0003"])
    # a collection for another model: a module the model lacks, and one of another shape
    other = jdlora.compress(synthetic_adapters(2, {"model.layers.7.self_attn.q_proj": (64, 64)}, rank=2),
                            rank=2, progress=False)
    with pytest.raises(UnknownModuleError, match="model.layers.7.self_attn.q_proj.*Did you mean"):
        load_collection(fresh(base), other)
    wide = jdlora.compress(synthetic_adapters(2, {Q0: (128, 64)}, rank=2), rank=2, progress=False)
    with pytest.raises(IncompatibleAdaptersError, match="another base model"):
        load_collection(fresh(base), wide)
    model = load_collection(fresh(base), full)
    with pytest.raises(ValueError, match="already exists"):
        load_collection(model, full, full.adapter_names[:1])
    with pytest.raises(ValueError, match="rank 80 exceeds"):
        get_peft_model(fresh(base), JDLoraConfig(r=80, target_modules=["q_proj"]))
    with pytest.raises(UnknownModuleError):
        get_peft_model(fresh(base), JDLoraConfig(bases_from=other, target_modules=["q_proj"]))


def test_bulk_loading_a_thousand_adapters_registers_each_under_its_name(base):
    n, r, clusters = 1000, 8, 4
    gen = torch.Generator().manual_seed(0)
    modules = {}
    for name, (d_out, d_in) in MODULES.items():
        U = torch.linalg.qr(torch.randn(clusters, d_out, r, generator=gen)).Q
        V = torch.linalg.qr(torch.randn(clusters, d_in, r, generator=gen)).Q
        comp = ModuleCompression(U, V, torch.randn(n, r, r, generator=gen) * 0.01,
                                 torch.randint(0, clusters, (n,), generator=gen), torch.ones(n), torch.zeros(n))
        modules[name] = CollectionModule(comp, torch.arange(n))
    collection = JDLoraCollection(None, [AdapterInfo(name=f"a{i:04d}") for i in range(n)], modules, "full")
    model = load_collection(fresh(base), collection)
    assert isinstance(model.base_model, JDLoraModel) and len(model.peft_config) == n + 1
    layer = model.base_model.model.get_submodule(Q0)
    assert len(layer.jd_sigma) == n and len(layer.jd_U) == clusters
    names = ["a0007", "a0999", "__base__"]
    ids = torch.randint(1, 96, (3, 4), generator=gen)
    mixed = logits(model, ids, adapter_names=names)
    model.set_adapter("a0999")
    assert close(mixed[1:2], logits(model, ids[1:2]))


def test_a_mixed_batch_reaches_every_layer_once_with_empty_child_slots_and_shared_blocks(base, full, ids):
    """The per-call walk that hands the batch to the layers (not ``named_modules``, for speed) finds what
    ``modules()`` finds: a ``None`` child slot is skipped and a block registered twice is visited once."""
    model = load_collection(fresh(base), full)
    names = full.adapter_names
    expected = logits(model, ids, adapter_names=[names[0], "__base__", names[3]])
    inner = model.base_model.model.model
    inner.register_module("nothing", None)
    inner.alias = inner.layers[0]
    layers, wrappers = model.base_model._jd_mixed_batch_modules()
    assert layers == [m for m in model.modules() if isinstance(m, JDLoraLayer)] and wrappers == []
    assert close(logits(model, ids, adapter_names=[names[0], "__base__", names[3]]), expected)
