"""jdlora.sources: opening real PEFT LoRA adapters, writing them, and refusing every bad input clearly."""

from __future__ import annotations

import json
import math
import pickle
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from jdlora.errors import (
    AdapterFormatError,
    IncompatibleAdaptersError,
    NonFiniteWeightsError,
    UnknownAdapterError,
    UnknownModuleError,
    UnsafeAdapterError,
)
from jdlora.sources import open_adapter, open_adapters, write_lora_folder

DATA = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve() / "gemma3-270m-it-adapters"
REAL = {  # folder: (rank, alpha, target modules), from shared/data/README.md
    "ao-wei-svg": (4, 16, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "ao-wei-svg-seed123": (4, 16, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "ao-wei-svg-curriculum1": (4, 16, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "0112LY-logo": (4, 4, {"q_proj", "v_proj"}),
    "fanyihan-max-workforllm": (8, 32, {"q_proj", "v_proj"}),
}
# gemma-3-270m: hidden 640, 4 query heads and 1 key/value head of size 256, 18 layers
GEMMA_SHAPES = {"q_proj": (1024, 640), "k_proj": (256, 640), "v_proj": (256, 640), "o_proj": (640, 1024)}
Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="session")
def data() -> Path:
    if not DATA.is_dir():
        pytest.skip(f"real adapters not found at {DATA} (the shared/ test data sits beside the repo)")
    return DATA


def copy_adapter(data: Path, name: str, dest: Path) -> Path:
    """A writable copy (the shared data is read-only, and copytree would keep that)."""
    dest.mkdir(parents=True)
    for f in (data / name).iterdir():
        shutil.copyfile(f, dest / f.name)
    return dest


def header(path: Path) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return n, json.loads(path.read_bytes()[8 : 8 + n])


def random_lora(modules: dict[str, tuple[int, int, int]], dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        m: (torch.randn(r, i, generator=g).to(dtype), torch.randn(o, r, generator=g).to(dtype))
        for m, (r, o, i) in modules.items()
    }


# ------------------------------------------------------------------------------------------ real adapters


def test_opens_all_five_real_adapters_from_headers(data):
    adapters = open_adapters(sorted(data / name for name in REAL))
    assert [a.name for a in adapters] == sorted(REAL)
    for a in adapters:
        rank, alpha, targets = REAL[a.name]
        assert (a.rank, a.alpha, a.use_rslora) == (rank, alpha, False)
        assert a.weights_file == data / a.name / "adapter_model.safetensors"
        assert {m.rsplit(".", 1)[-1] for m in a.modules} == targets
        assert len(a.modules) == 18 * len(targets)
        for module, shape in a.modules.items():
            assert shape == (rank, *GEMMA_SHAPES[module.rsplit(".", 1)[-1]])
        # origins get published: the folder name, never the local path (kept in memory only)
        assert a.origin == {"folder": a.name, "sha256": a.sha256} and len(a.sha256) == 64
        assert a.folder == data / a.name


def test_same_base_model_spelled_three_ways_is_accepted(data):
    adapters = open_adapters([data / "0112LY-logo", data / "ao-wei-svg", data / "fanyihan-max-workforllm"])
    assert len({a.base_model for a in adapters}) == 3  # google/..., bare name, a Colab path


def test_scaling_is_alpha_over_rank(data):
    for name, (rank, alpha, _) in REAL.items():
        adapter = open_adapter(data / name)
        assert adapter.scaling(Q0) == alpha / rank
    assert open_adapter(data / "0112LY-logo").scaling(Q0) == 1.0  # alpha 4, r 4: not the 4.0 of the others


def test_read_module_returns_factors_in_requested_dtype(data):
    adapter = open_adapter(data / "fanyihan-max-workforllm")
    raw = load_file(adapter.weights_file)
    a, b = adapter.read_module(Q0)
    assert a.shape == (8, 640) and b.shape == (1024, 8) and a.dtype == b.dtype == torch.float32
    assert torch.equal(a, raw[f"base_model.model.{Q0}.lora_A.weight"])
    assert torch.equal(b, raw[f"base_model.model.{Q0}.lora_B.weight"])
    a16, b16 = adapter.read_module(Q0, dtype=torch.bfloat16)
    assert a16.dtype == b16.dtype == torch.bfloat16 and torch.equal(a16, a.bfloat16())


def test_unknown_module_suggests_close_names(data):
    adapter = open_adapter(data / "0112LY-logo")
    with pytest.raises(UnknownModuleError, match=r"Did you mean: 'model.layers.0.self_attn.q_proj'") as exc:
        adapter.read_module("model.layers.0.self_attn.q_prj")
    assert isinstance(exc.value, KeyError) and not str(exc.value).startswith(("'", '"'))


def test_unknown_adapter_error_lists_close_matches_unquoted():
    err = UnknownAdapterError("ao-wei-sgv", ["ao-wei-svg", "0112LY-logo", "ao-wei-svg-seed123"])
    assert str(err).startswith("Unknown adapter 'ao-wei-sgv'") and "'ao-wei-svg'" in str(err)
    assert "0112LY-logo" not in str(err)
    assert "0112LY-logo" in str(UnknownAdapterError("zzz", ["0112LY-logo"]))  # no close match: list the names
    assert str(pickle.loads(pickle.dumps(err))) == str(err)  # survives multiprocessing


# ---------------------------------------------------------------------------- writing, scaling variants

TINY = {  # a tiny Llama: hidden 32, 4 heads of 8, 2 key/value heads, 2 layers
    f"model.layers.{i}.self_attn.{p}": (4, d_out, 32) for i in range(2) for p, d_out in (("q_proj", 32), ("v_proj", 16))
}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def peft_layers(folder: Path):
    from peft import PeftModel

    model = PeftModel.from_pretrained(tiny_llama(), str(folder))
    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_write_then_open_is_bit_identical(tmp_path, dtype):
    tensors = random_lora(TINY, dtype)
    folder = write_lora_folder(tmp_path / "ad", tensors, r=4, lora_alpha=8, base_model="tiny/llama")
    adapter = open_adapter(folder)
    assert adapter.modules == TINY and adapter.base_model == "tiny/llama" and adapter.name == "ad"
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for module, (a, b) in tensors.items():
        a2, b2 = adapter.read_module(module, dtype=dtype)
        assert a2.dtype == b2.dtype == dtype
        assert torch.equal(a2.view(bits), a.view(bits)) and torch.equal(b2.view(bits), b.view(bits))
    assert sorted(adapter.config["target_modules"]) == ["q_proj", "v_proj"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_written_folder_loads_in_stock_peft(tmp_path):
    from peft import LoraConfig

    tensors = random_lora(TINY)
    folder = write_lora_folder(tmp_path / "ad", tensors, r=4, lora_alpha=8, base_model="tiny/llama")
    config = LoraConfig.from_pretrained(str(folder))
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 8, {"q_proj", "v_proj"})
    layers = peft_layers(folder)
    assert set(layers) == set(TINY)
    for module, (a, b) in tensors.items():
        assert torch.equal(layers[module].lora_A["default"].weight, a)
        assert torch.equal(layers[module].lora_B["default"].weight, b)
        assert layers[module].scaling["default"] == 2.0


def test_rslora_scaling_is_alpha_over_sqrt_rank(tmp_path):
    modules = {m: (16, o, i) for m, (_, o, i) in TINY.items()}
    folder = write_lora_folder(tmp_path / "rs", random_lora(modules), r=16, lora_alpha=8, base_model=None,
                               use_rslora=True)
    adapter = open_adapter(folder)
    assert adapter.use_rslora and adapter.scaling(Q0) == 8 / math.sqrt(16) == 2.0
    assert peft_layers(folder)[Q0].scaling["default"] == 2.0


def test_rank_and_alpha_patterns_match_peft(tmp_path):
    rank_pattern = {"q_proj": 2, "model.layers.1.self_attn.v_proj": 6}
    alpha_pattern = {r"layers\.1\.self_attn\.q_proj": 32, "v_proj": 3}
    ranks = {m: (6 if m.endswith("1.self_attn.v_proj") else 2 if "q_proj" in m else 4) for m in TINY}
    modules = {m: (ranks[m], o, i) for m, (_, o, i) in TINY.items()}
    folder = write_lora_folder(tmp_path / "pat", random_lora(modules), r=4, lora_alpha=8, base_model=None,
                               extra_config={"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern})
    adapter = open_adapter(folder)
    assert {m: s[0] for m, s in adapter.modules.items()} == ranks
    expected = {
        "model.layers.0.self_attn.q_proj": 8 / 2, "model.layers.1.self_attn.q_proj": 32 / 2,
        "model.layers.0.self_attn.v_proj": 3 / 4, "model.layers.1.self_attn.v_proj": 3 / 6,
    }
    assert {m: adapter.scaling(m) for m in TINY} == expected
    assert {m: layer.scaling["default"] for m, layer in peft_layers(folder).items()} == expected


def test_write_replaces_an_existing_adapter_but_not_other_folders(tmp_path):
    first = write_lora_folder(tmp_path / "ad", random_lora(TINY, seed=1), r=4, lora_alpha=8, base_model=None)
    second = random_lora(TINY, seed=2)
    write_lora_folder(first, second, r=4, lora_alpha=8, base_model=None)
    assert torch.equal(open_adapter(first).read_module(Q0)[0], second[Q0][0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad"]
    other = tmp_path / "docs"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_lora_folder(other, second, r=4, lora_alpha=8, base_model=None)
    assert (other / "notes.txt").read_text() == "mine"


def test_write_rejects_rank_that_disagrees_with_config(tmp_path):
    with pytest.raises(ValueError, match=r"r = 8"):
        write_lora_folder(tmp_path / "ad", random_lora(TINY), r=8, lora_alpha=8, base_model=None)
    assert not (tmp_path / "ad").exists()


# -------------------------------------------------------------------------------------------- bad inputs


def test_missing_folder(tmp_path):
    with pytest.raises(AdapterFormatError, match="No adapter folder") as exc:
        open_adapter(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(exc.value)


def test_missing_weights_file(data, tmp_path):
    folder = copy_adapter(data, "0112LY-logo", tmp_path / "ad")
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match="has no adapter_model.safetensors"):
        open_adapter(folder)


def test_missing_config(data, tmp_path):
    folder = copy_adapter(data, "0112LY-logo", tmp_path / "ad")
    (folder / "adapter_config.json").unlink()
    with pytest.raises(AdapterFormatError, match="has no adapter_config.json"):
        open_adapter(folder)


def test_truncated_safetensors(data, tmp_path):
    folder = copy_adapter(data, "0112LY-logo", tmp_path / "ad")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(AdapterFormatError, match="truncated or corrupted") as exc:
        open_adapter(folder)
    assert str(weights) in str(exc.value)


@pytest.mark.parametrize("damage", ["json", "length", "offsets", "tiny"])
def test_corrupted_safetensors_header(data, tmp_path, damage):
    folder = copy_adapter(data, "0112LY-logo", tmp_path / "ad")
    weights = folder / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    n, head = header(weights)
    if damage == "json":
        raw[8:20] = b"\xff" * 12
    elif damage == "length":
        raw[:8] = struct.pack("<Q", 2**40)
    elif damage == "offsets":  # valid JSON whose offsets do not match the shapes
        key = next(k for k in head if k != "__metadata__")
        head[key]["data_offsets"][1] += 4
        text = json.dumps(head).encode()
        raw = struct.pack("<Q", len(text)) + text + raw[8 + n :]
    else:
        raw = raw[:5]
    weights.write_bytes(bytes(raw))
    with pytest.raises(AdapterFormatError) as exc:
        open_adapter(folder)
    assert str(weights) in str(exc.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_name_file_and_tensor(data, tmp_path, bad):
    folder = copy_adapter(data, "ao-wei-svg", tmp_path / "ad")
    weights = folder / "adapter_model.safetensors"
    n, head = header(weights)
    key = "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"
    raw = bytearray(weights.read_bytes())
    at = 8 + n + head[key]["data_offsets"][0] + 4 * 17
    raw[at : at + 4] = struct.pack("<f", bad)
    weights.write_bytes(bytes(raw))
    adapter = open_adapter(folder)  # opening reads only the header: still fine
    adapter.read_module("model.layers.3.self_attn.q_proj")  # other modules stay readable
    with pytest.raises(NonFiniteWeightsError) as exc:
        adapter.read_module("model.layers.3.self_attn.v_proj")
    msg = str(exc.value)
    assert key in msg and str(weights) in msg
    assert ("1 NaN" in msg) == math.isnan(bad) and ("1 Inf" in msg) == math.isinf(bad)


def test_pickle_refused_unless_allowed(data, tmp_path):
    folder = copy_adapter(data, "0112LY-logo", tmp_path / "ad")
    weights = folder / "adapter_model.safetensors"
    torch.save(load_file(weights), folder / "adapter_model.bin")
    weights.unlink()
    with pytest.raises(UnsafeAdapterError, match="allow_pickle=True") as exc:
        open_adapter(folder)
    assert "adapter_model.bin" in str(exc.value)
    adapter = open_adapter(folder, allow_pickle=True)
    reference = open_adapter(data / "0112LY-logo")
    assert adapter.weights_file.name == "adapter_model.bin" and adapter.modules == reference.modules
    a, b = adapter.read_module(Q0)
    a.zero_()  # callers own what they get: the next read is unaffected
    again = adapter.read_module(Q0)[0]
    assert torch.equal(again, reference.read_module(Q0)[0]) and not torch.equal(a, again)


def test_pickle_is_loaded_with_weights_only(data, tmp_path):
    folder = copy_adapter(data, "0112LY-logo", tmp_path / "ad")
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"x": SimpleNamespace(a=1)}, folder / "adapter_model.bin")  # an object: refused by weights_only
    with pytest.raises(AdapterFormatError, match="torch.load cannot read"):
        open_adapter(folder, allow_pickle=True)


def test_different_base_models_are_refused(tmp_path):
    a = write_lora_folder(tmp_path / "a", random_lora(TINY), r=4, lora_alpha=8, base_model="meta-llama/Llama-3.2-1B")
    b = write_lora_folder(tmp_path / "b", random_lora(TINY), r=4, lora_alpha=8, base_model="google/gemma-3-270m-it")
    with pytest.raises(IncompatibleAdaptersError) as exc:
        open_adapters([a, b])
    for part in ("'a'", "'b'", "meta-llama/Llama-3.2-1B", "google/gemma-3-270m-it"):
        assert part in str(exc.value)


def test_mismatched_module_shapes_are_refused(tmp_path):
    wide = dict(TINY, **{Q0: (4, 32, 48)})
    a = write_lora_folder(tmp_path / "a", random_lora(TINY), r=4, lora_alpha=8, base_model=None)
    b = write_lora_folder(tmp_path / "b", random_lora(wide), r=4, lora_alpha=8, base_model=None)
    with pytest.raises(IncompatibleAdaptersError) as exc:
        open_adapters([a, b])
    for part in (Q0, "'a'", "'b'", "(32, 32)", "(32, 48)"):
        assert part in str(exc.value)


def test_duplicate_names_are_refused_and_renaming_fixes_it(data):
    with pytest.raises(IncompatibleAdaptersError, match="'ao-wei-svg'"):
        open_adapters([data / "ao-wei-svg", data / "ao-wei-svg"])
    adapters = open_adapters([data / "ao-wei-svg", data / "ao-wei-svg"], names=["x", None])
    assert [a.name for a in adapters] == ["x", "ao-wei-svg"]


def test_open_adapters_accepts_open_and_duck_typed_adapters(data):
    opened = open_adapter(data / "0112LY-logo")
    renamed = open_adapters([opened, data / "ao-wei-svg"], names=["logo", None])
    assert renamed[0].name == "logo" and opened.name == "0112LY-logo"  # renamed a copy, not the caller's object
    duck = SimpleNamespace(name="duck", base_model=None, modules={Q0: (2, 1024, 320)}, origin={})
    with pytest.raises(IncompatibleAdaptersError, match=r"\(1024, 320\)"):
        open_adapters([opened, duck])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "IA3 adapter; jdlora compresses LoRA adapters only"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"r": 8}, "rank 4 but its config says 8"),
    ],
)
def test_unsupported_configs(data, tmp_path, change, message):
    folder = copy_adapter(data, "0112LY-logo", tmp_path / "ad")
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(AdapterFormatError, match=message):
        open_adapter(folder)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop(f"base_model.model.{Q0}.lora_B.weight"), f"no lora_B for module '{Q0}'"),
        (lambda sd: sd.update({"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}),
         "embedding LoRA"),
        (lambda sd: sd.update({f"base_model.model.{Q0}.lora_magnitude_vector": torch.zeros(4)}), "DoRA"),
        (lambda sd: sd.update({f"base_model.model.{Q0}.lora_A.weight": torch.zeros(4, 640, 1, 1)}), "convolution LoRA"),
        (lambda sd: sd.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)}), "not a LoRA factor"),
    ],
)
def test_unsupported_or_incomplete_tensors(data, tmp_path, edit, message):
    folder = copy_adapter(data, "0112LY-logo", tmp_path / "ad")
    weights = folder / "adapter_model.safetensors"
    state = load_file(weights)
    edit(state)
    save_file(state, weights)
    with pytest.raises(AdapterFormatError, match=message):
        open_adapter(folder)


def test_adapter_name_infix_in_keys_is_accepted(data, tmp_path):
    folder = copy_adapter(data, "0112LY-logo", tmp_path / "ad")
    weights = folder / "adapter_model.safetensors"
    save_file({k.replace(".weight", ".default.weight"): v for k, v in load_file(weights).items()}, weights)
    assert open_adapter(folder).modules == open_adapter(data / "0112LY-logo").modules


# ---------------------------------------------------------------------------------------------- the Hub


def test_unknown_hub_id_offline_is_our_error(monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    with pytest.raises(AdapterFormatError, match="nobody-org/no-such-lora") as exc:
        open_adapter("nobody-org/no-such-lora@v2")
    assert type(exc.value.__cause__).__module__.startswith("huggingface_hub")


def test_opens_hub_repo_with_subfolder_and_revision(data, hub):
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("org/logo")
    api.upload_folder(repo_id="org/logo", folder_path=str(data / "0112LY-logo"), path_in_repo="adapters/logo")
    api.create_tag("org/logo", tag="v1")
    # main moves on past v1
    api.upload_file(repo_id="org/logo", path_or_fileobj=b"---\nlicense: mit\n---\n", path_in_repo="README.md")
    adapter = open_adapter("org/logo/adapters/logo@v1")
    local = open_adapter(data / "0112LY-logo")
    assert adapter.name == "org/logo/adapters/logo" and adapter.modules == local.modules
    assert adapter.origin == {
        "repo_id": "org/logo", "revision": hub.head("org/logo", "v1"), "subfolder": "adapters/logo",
        "sha256": local.sha256,
    }
    assert hub.head("org/logo", "v1") != hub.head("org/logo")
    assert torch.equal(adapter.read_module(Q0)[1], local.read_module(Q0)[1])


def test_hub_errors_are_ours_and_name_the_repo(data, hub):
    from huggingface_hub import HfApi

    with pytest.raises(AdapterFormatError, match="'org/missing' was not found"):
        open_adapter("org/missing")
    api = HfApi()
    api.create_repo("org/pickled")
    api.upload_file(repo_id="org/pickled", path_or_fileobj=str(data / "0112LY-logo" / "adapter_config.json"),
                    path_in_repo="adapter_config.json")
    with pytest.raises(AdapterFormatError, match="no adapter_model.safetensors"):
        open_adapter("org/pickled")
    with pytest.raises(AdapterFormatError, match="Revision 'nope' was not found"):
        open_adapter("org/pickled", revision="nope")
    with pytest.raises(AdapterFormatError, match="no adapter_config.json"):
        open_adapter("org/pickled", subfolder="elsewhere")
    state = load_file(data / "0112LY-logo" / "adapter_model.safetensors")
    blob = Path(hub.cache_dir).parent / "adapter_model.bin"
    torch.save(state, blob)
    api.upload_file(repo_id="org/pickled", path_or_fileobj=str(blob), path_in_repo="adapter_model.bin")
    with pytest.raises(UnsafeAdapterError, match="allow_pickle=True"):
        open_adapter("org/pickled")
    assert "adapter_model.bin" not in hub.downloads("org/pickled")  # refused without even downloading it
    assert open_adapter("org/pickled", allow_pickle=True).modules == open_adapter(data / "0112LY-logo").modules
