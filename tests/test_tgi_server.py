"""Conformance of jdlora_tgi with TGI's real server code (text_generation_server, pinned v3.3.7).

Skipped unless ``JDLORA_TGI_SERVER`` (or ``TGI_SERVER_PATH``) points at TGI's ``server/`` folder, e.g. from
``git archive v3.3.7 server proto | tar -x -C /work/tgi-server-v3.3.7`` with the gRPC stubs generated
(``make gen-server-raw`` or grpcio-tools) and TGI's pure-Python dependencies installed (docs/tgi.md).

On CPU: TGI's attention and punica kernels are CUDA-only, so the tests drive TGI's own loading loop
(``get_model_with_lora_adapters`` with ``get_model`` replaced by a two-layer model built from TGI's own
layers and ``Weights`` loader), TGI's batch data (``AdapterBatchData.from_meta``) and TGI's adapter layers
(``TensorParallelMultiAdapterLinear``, ``TensorParallelAdapterRowLinear``). Plain LoRA runs through TGI's
non-vectorized path with punica's pure-Python helpers (rank padding, orientation) reproduced in
``integrations/tgi/scripts/tgi_standins.py``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections import Counter, defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from test_tgi import NLAYERS, SHAPES, TGI_SRC, module_name, random_collection  # noqa: F401  (sys.path too)

sys.path.insert(0, str(TGI_SRC.parent / "scripts"))
from tgi_standins import PunicaHelpers  # noqa: E402  (punica's pure-Python helpers, shared with graph_warmup_check.py)

TGI_SERVER = os.environ.get("JDLORA_TGI_SERVER") or os.environ.get("TGI_SERVER_PATH")
pytestmark = pytest.mark.skipif(
    not TGI_SERVER or not (Path(TGI_SERVER) / "text_generation_server").is_dir(),
    reason="set JDLORA_TGI_SERVER to TGI v3.3.7's server/ folder to run the TGI conformance tests",
)

HIDDEN, KV, INTER = 64, 32, 96
LORA_RANK, LORA_ALPHA = 8, 16  # rank 8: TGI pads smaller ranks to 8 and then mis-scales (see below)
LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj")


# ----- TGI, imported once with the hooks active ---------------------------------------------------


@pytest.fixture(scope="module")
def tgi():
    return import_tgi()


def import_tgi() -> SimpleNamespace:
    """TGI's modules, imported with jdlora_tgi's hooks active (as the .pth does in a TGI image)."""
    os.environ.setdefault("ATTENTION", "paged")
    os.environ.setdefault("PREFIX_CACHING", "0")
    if TGI_SERVER not in sys.path:
        sys.path.insert(0, TGI_SERVER)
    import jdlora_tgi

    jdlora_tgi.install()
    import text_generation_server.adapters.lora as adapters_lora
    import text_generation_server.layers.lora as layers_lora
    import text_generation_server.models as models
    from text_generation_server.adapters.weights import AdapterBatchData, AdapterBatchMetadata, LayerAdapterWeights
    from text_generation_server.layers.tensor_parallel import TensorParallelColumnLinear, TensorParallelRowLinear
    from text_generation_server.utils.adapter import parse_lora_adapters
    from text_generation_server.utils.dist import FakeGroup
    from text_generation_server.utils.segments import find_segments
    from text_generation_server.utils.weights import DefaultWeightsLoader, UnquantizedWeight, Weights

    status = jdlora_tgi.status()
    assert status["hook_active"] and all(v for v in status["modules"].values() if v is not None), status
    return SimpleNamespace(**locals())


@pytest.fixture
def punica(tgi, monkeypatch):
    return torch_lora_path(tgi, monkeypatch)


def torch_lora_path(tgi, monkeypatch) -> PunicaHelpers:
    """TGI's plain LoRA on its torch path (what TGI runs on a CPU without IPEX, ``SYSTEM == "cpu"``), which
    these tests record; with intel-extension-for-pytorch installed TGI would take IPEX's kernels instead
    (covered by tests/test_tgi_e2e.py)."""
    helpers = PunicaHelpers()
    for module in (tgi.adapters_lora, tgi.layers_lora):
        monkeypatch.setattr(module, "punica_sgmv", helpers)
        monkeypatch.setattr(module, "SYSTEM", "cpu")
    return helpers


# ----- a tiny base model, a plain LoRA, two collections, one single-adapter folder ----------------------


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("tgi_assets")
    write_assets(root)
    return read_assets(root)


def read_assets(root: Path) -> SimpleNamespace:
    from safetensors.torch import load_file

    from jdlora.collection import JDLoraCollection

    return SimpleNamespace(root=root, base=load_file(root / "base" / "model.safetensors"),
                           lora=load_file(root / "lora" / "adapter_model.safetensors"),
                           coll_a=JDLoraCollection.from_pretrained(root / "coll_a"),
                           coll_b=JDLoraCollection.from_pretrained(root / "coll_b"))


def write_assets(root: Path) -> None:
    g = torch.Generator().manual_seed(7)
    base = {f"{module_name(l, s)}.weight": torch.randn(*SHAPES[s], generator=g) / 8
            for l in range(NLAYERS) for s in SHAPES}
    (root / "base").mkdir()
    save_file(base, root / "base" / "model.safetensors")
    lora = {}
    for l in range(NLAYERS):
        for s in LORA_TARGETS:
            d_out, d_in = SHAPES[s]
            lora[f"base_model.model.{module_name(l, s)}.lora_A.weight"] = torch.randn(LORA_RANK, d_in, generator=g) / 8
            lora[f"base_model.model.{module_name(l, s)}.lora_B.weight"] = torch.randn(d_out, LORA_RANK, generator=g) / 8
    (root / "lora").mkdir()
    save_file(lora, root / "lora" / "adapter_model.safetensors")
    (root / "lora" / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(root / "base"), "r": LORA_RANK, "lora_alpha": LORA_ALPHA,
        "target_modules": sorted({s.split(".")[-1] for s in LORA_TARGETS}), "fan_in_fan_out": False,
        "use_rslora": False, "task_type": "CAUSAL_LM", "bias": "none",
    }))
    coll_a = random_collection(["math", "code"], rank=4, clusters=2, sigma="full", seed=1,
                               absent={(module_name(0, "self_attn.q_proj"), "code")})
    coll_b = random_collection(["math", "chat", "law"], ["self_attn.q_proj", "mlp.down_proj", "mlp.up_proj"],
                               rank=6, clusters=1, sigma="diag", seed=2, layers=[1])
    coll_a.save_pretrained(root / "coll_a", progress=False)
    coll_b.save_pretrained(root / "coll_b", progress=False)


def lora_adapters_env(assets) -> str:
    r = assets.root
    return (f"org/a={r / 'coll_a'},plain={r / 'lora'},b={r / 'coll_b'},"
            f"single={r / 'coll_a' / 'adapters' / 'math'}")


def dense_delta(assets, adapter: str, module: str) -> torch.Tensor:
    """The update an adapter id must apply to a module, from the saved files' own numbers."""
    suffix = module.split(".", 3)[-1]
    zero = torch.zeros(*SHAPES[suffix])
    if adapter == "plain":
        if suffix not in LORA_TARGETS:
            return zero
        A = assets.lora[f"base_model.model.{module}.lora_A.weight"]
        B = assets.lora[f"base_model.model.{module}.lora_B.weight"]
        return LORA_ALPHA / LORA_RANK * B @ A
    if adapter in ("base", None):
        return zero
    coll, name = ((assets.coll_a, "math") if adapter == "single" else
                  (assets.coll_a if adapter.startswith("org/a:") else assets.coll_b, adapter.split(":")[-1]))
    if module not in coll.modules:
        return zero
    d = coll.delta_weight(name, module)
    return zero if d is None else d.float()


# ----- the stand-in for TGI's model: TGI's own layers, loaded by TGI's Weights -------------------------


def build_model(tgi, assets, process_group):
    weights = tgi.Weights([assets.root / "base" / "model.safetensors"], torch.device("cpu"), torch.float32,
                          process_group, tgi.DefaultWeightsLoader(tgi.UnquantizedWeight))
    config = SimpleNamespace(quantize=None)
    layers = torch.nn.ModuleList()
    for l in range(NLAYERS):
        p = f"model.layers.{l}"
        attn, mlp = torch.nn.Module(), torch.nn.Module()
        attn.query_key_value = tgi.layers_lora.TensorParallelMultiAdapterLinear.load(
            tgi.TensorParallelColumnLinear.load_multi(config, [f"{p}.self_attn.{k}_proj" for k in "qkv"], weights,
                                                      bias=False, dim=0),
            l, ["q_proj", "k_proj", "v_proj"], sizes=[HIDDEN, KV, KV], process_group=process_group)
        attn.o_proj = tgi.layers_lora.TensorParallelAdapterRowLinear.load(
            tgi.TensorParallelRowLinear.load(config, f"{p}.self_attn.o_proj", weights, bias=False), l, "o_proj",
            process_group=process_group)
        mlp.gate_up_proj = tgi.layers_lora.TensorParallelMultiAdapterLinear.load(
            tgi.TensorParallelColumnLinear.load_multi(config, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], weights,
                                                      bias=False, dim=0),
            l, ["gate_proj", "up_proj"], sizes=[INTER, INTER], process_group=process_group)
        mlp.down_proj = tgi.layers_lora.TensorParallelAdapterRowLinear.load(
            tgi.TensorParallelRowLinear.load(config, f"{p}.mlp.down_proj", weights, bias=False), l, "down_proj",
            process_group=process_group)
        layer = torch.nn.Module()
        layer.self_attn, layer.mlp = attn, mlp
        layers.append(layer)
    inner = torch.nn.Module()
    inner.layers = layers
    causal = torch.nn.Module()
    causal.model = inner
    return SimpleNamespace(
        model_id=str(assets.root / "base"), model=causal, dtype=torch.float32, world_size=process_group.size(),
        process_group=process_group, layer_to_adapter_weights=defaultdict(tgi.LayerAdapterWeights),
        loaded_adapters=set(), tokenizers=None)


def load(tgi, assets, process_group, monkeypatch, env=None):
    """TGI's own loading: parse LORA_ADAPTERS, get_model_with_lora_adapters (hooked), adapter_to_index."""
    stub = build_model(tgi, assets, process_group)
    monkeypatch.setattr(tgi.models, "get_model", lambda *a, **k: stub)
    adapter_to_index = {}
    model = tgi.models.get_model_with_lora_adapters(
        stub.model_id, tgi.parse_lora_adapters(env or lora_adapters_env(assets)), None, False, None, None, None,
        None, False, 64, adapter_to_index)
    return model, adapter_to_index


# ----- loading ----------------------------------------------------------------------------------------


def test_jd_collections_and_plain_lora_load_side_by_side_dispatched_by_peft_type(tgi, assets, punica, monkeypatch):
    from jdlora_tgi.adapter import JDLoraWeights

    model, index = load(tgi, assets, tgi.FakeGroup(0, 1), monkeypatch)
    assert list(index) == ["org/a:math", "org/a:code", "plain", "b:math", "b:chat", "b:law", "single"]
    assert list(index.values()) == list(range(1, 8)) and model.loaded_adapters == set(range(1, 8))
    q = model.layer_to_adapter_weights["q_proj"].adapter_weights
    assert isinstance(q[index["plain"]], tgi.adapters_lora.LoraWeights)
    assert all(isinstance(q[index[a]], JDLoraWeights) for a in index if a != "plain")
    # k/gate: only collection a (every adapter); plain LoRA has no k_proj
    assert set(model.layer_to_adapter_weights["k_proj"].adapter_weights) == {1, 2, 7}
    assert set(model.layer_to_adapter_weights["up_proj"].adapter_weights) == {1, 2, 4, 5, 6, 7}
    # one table per layer type, shared: bases once per (layer, cluster, collection)
    registry = model.jdlora
    assert registry.finalized and len(registry.adapters) == 6
    q_table = registry.tables["q_proj"]
    from jdlora.collection import JDLoraCollection

    single = JDLoraCollection.from_pretrained(assets.root / "coll_a", adapters=["math"])  # the clusters it uses
    used = [single.modules[module_name(l, "self_attn.q_proj")].compression.U.shape[0] for l in range(NLAYERS)]
    assert [u.shape[0] for u in q_table.U] == [2 + used[0], 2 + 1 + used[1]]  # a, b (layer 1 only), single
    memory = registry.memory()
    assert memory["adapters"] == 6 and memory["total_bytes"] == memory["bases_bytes"] + memory["sigma_bytes"]


def test_start_up_log_reports_jd_memory(tgi, assets, punica, monkeypatch):
    from loguru import logger

    lines = []  # a sink made like TGI's (cli.serve): only records named under text_generation_server pass
    sink = logger.add(lines.append, level="INFO", format="{message}", filter="text_generation_server")
    try:
        load(tgi, assets, tgi.FakeGroup(0, 1), monkeypatch)
    finally:
        logger.remove(sink)
    memory = [l for l in lines if "JD-LoRA adapters on this rank: 6 adapters" in l]
    assert memory and "bases" in memory[0] and "plain LoRA" in memory[0]
    assert any("JD-LoRA collection org/a=" in l and "2 adapters" in l for l in lines)


def test_colliding_ids_stop_the_start_up(tgi, assets, punica, monkeypatch):
    from jdlora_tgi import AdapterIdCollisionError

    env = f"org/a={assets.root / 'coll_a'},org/a:math={assets.root / 'lora'}"
    with pytest.raises(AdapterIdCollisionError, match="org/a:math"):
        load(tgi, assets, tgi.FakeGroup(0, 1), monkeypatch, env)


def test_module_map_and_weight_preparation_cover_every_projection(tgi, assets, punica, monkeypatch):
    from jdlora_tgi.adapter import JDLoraConfig
    from jdlora_tgi.registry import JDRegistry, use_registry

    model = build_model(tgi, assets, tgi.FakeGroup(0, 1))
    target_to_layer = tgi.models.build_layer_weight_lookup(model.model)
    weight_names = tuple(v[0] for v in target_to_layer.values())
    registry = JDRegistry()
    with use_registry(registry):
        registry.expanded["org/a:code"] = (tgi_source := _source(assets.root / "coll_a"), "code")
        module_map, config, names, tokenizer = tgi.models.load_and_merge_adapters(
            model.model_id, _params(tgi, "org/a:code", str(assets.root / "coll_a")), 1, weight_names, False)
    assert isinstance(config, JDLoraConfig) and tokenizer is None
    # every adapted module of the adapter, except layer 0's q_proj which it lacks
    expected = {module_name(l, s) for l in range(NLAYERS) for s in SHAPES} - {module_name(0, "self_attn.q_proj")}
    assert set(module_map) == expected and len(names) == len(expected)
    unused = set(names)
    for layer_type in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        w = tgi.adapters_lora.LoraWeights.prepare_weights(
            config=config, module_map=module_map, layer_type=layer_type, unused_weight_names=unused,
            nlayers=NLAYERS, dtype=torch.float32, world_size=1, process_group=tgi.FakeGroup(0, 1),
            target_to_layer=target_to_layer)
        assert w.row == config.row == 0 and w.table is registry.tables[layer_type]
    assert unused == set()
    registry.build()
    assert registry.tables["q_proj"].U[0] is None  # the only adapter lacks layer 0's q_proj: nothing there
    assert int(registry.tables["q_proj"].cluster_of[1][0]) >= 0
    assert tgi_source.path_or_repo_id.endswith("coll_a")


def _source(path):
    from jdlora_tgi.naming import JDSource

    return JDSource(str(path))


def _params(tgi, adapter_id, path):
    from text_generation_server.utils.adapter import AdapterInfo, AdapterParameters

    return AdapterParameters(adapter_info=[AdapterInfo(id=adapter_id, path=path)], weights=None, merge_strategy=0,
                             density=1.0, majority_sign_method=0)


# ----- forward: mixed batches, prefill / decode / speculative, TP ---------------------------------------

REQUESTS = ["org/a:math", "plain", "base", "b:chat", "org/a:code", "single", "b:law", "b:math", "base", "plain"]
LENGTHS = [3, 2, 1, 4, 2, 1, 3, 2, 2, 1]


def make_meta(tgi, adapter_index: list[int]):
    indices = torch.tensor(adapter_index, dtype=torch.int64)
    segments, segment_indices = tgi.find_segments(indices)
    return tgi.AdapterBatchMetadata(adapter_indices=indices, adapter_set=set(adapter_index),
                                    adapter_segments=torch.tensor(segments, dtype=torch.int32),
                                    segment_indices=segment_indices)


def token_adapters(mode: str, speculative: int = 0) -> list[str]:
    if mode == "prefill":
        return [r for r, n in zip(REQUESTS, LENGTHS) for _ in range(n)]
    return [r for r in REQUESTS for _ in range(speculative + 1)]  # decode: one token per request (+ drafts)


def check_layers(tgi, assets, model, index, mode, speculative=0, rank=0, world=1):
    """Every adapted layer's output equals x (W + dW_adapter(t))^T token by token (this rank's slice)."""
    per_token = [a if a in index else "base" for a in token_adapters(mode, speculative)]
    if mode == "prefill":
        meta = make_meta(tgi, [index.get(a, 0) for a in per_token])
    else:  # TGI's generate_token: per-request indices, expanded for speculative tokens
        meta = make_meta(tgi, [index.get(a, 0) for a in REQUESTS])  # not loaded: base model, as in TGI
        if speculative:
            n = speculative + 1
            meta = tgi.AdapterBatchMetadata(
                adapter_indices=meta.adapter_indices.unsqueeze(-1).expand(len(REQUESTS), n).reshape(-1),
                adapter_set=meta.adapter_set, adapter_segments=meta.adapter_segments * n,
                segment_indices=meta.segment_indices)
    data = tgi.AdapterBatchData.from_meta(meta, model.layer_to_adapter_weights, mode == "prefill", None)
    g = torch.Generator().manual_seed(11)
    T = len(per_token)
    for l in range(NLAYERS):
        layer = model.model.model.layers[l]
        for fused, suffixes, d_in in [
            (layer.self_attn.query_key_value, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], HIDDEN),
            (layer.self_attn.o_proj, ["self_attn.o_proj"], HIDDEN),
            (layer.mlp.gate_up_proj, ["mlp.gate_proj", "mlp.up_proj"], HIDDEN),
            (layer.mlp.down_proj, ["mlp.down_proj"], INTER),
        ]:
            x = torch.randn(T, d_in, generator=g)
            row_parallel = suffixes[0].endswith(("o_proj", "down_proj"))
            if row_parallel:
                a, b = rank * d_in // world, (rank + 1) * d_in // world
                out = fused(x[:, a:b].contiguous(), data)
            else:
                out = fused(x, data)
            pieces = []
            for s in suffixes:
                m = module_name(l, s)
                W = assets.base[f"{m}.weight"]
                full = torch.stack([x[t] @ (W + dense_delta(assets, per_token[t], m)).T for t in range(T)])
                if not row_parallel:
                    d = full.shape[1] // world
                    full = full[:, rank * d:(rank + 1) * d]
                pieces.append(full)
            bad = ((out - torch.cat(pieces, 1)).abs() > 1e-3).any(1).nonzero().flatten().tolist()
            assert not bad, (l, suffixes, mode, [(t, per_token[t]) for t in bad], out.shape)
            torch.testing.assert_close(out, torch.cat(pieces, 1), rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"layer {l} {suffixes} {mode}: {m}")


@pytest.mark.parametrize("mode,speculative", [("prefill", 0), ("decode", 0), ("decode", 2)])
def test_mixed_batch_layers_match_dense_merged_weights(tgi, assets, punica, monkeypatch, mode, speculative):
    model, index = load(tgi, assets, tgi.FakeGroup(0, 1), monkeypatch)
    check_layers(tgi, assets, model, index, mode, speculative)


def test_fused_projections_run_their_jd_parts_together_with_the_numbers_of_each_alone(tgi, assets, punica, monkeypatch):
    """q/k/v and gate/up (TGI's fused projections) make one JD shrink-and-expand for their layer types, beside TGI's
    own LoRA parts; each slice gets exactly what its layer type's own JD forward gives."""
    import jdlora.kernels
    import jdlora_tgi.patches

    model, index = load(tgi, assets, tgi.FakeGroup(0, 1), monkeypatch)
    meta = make_meta(tgi, [index.get(a, 0) for a in REQUESTS])
    data = tgi.AdapterBatchData.from_meta(meta, model.layer_to_adapter_weights, False, None)
    calls = []
    shrink = jdlora.kernels.jd_lora_shrink_siblings
    monkeypatch.setattr(jdlora.kernels, "jd_lora_shrink_siblings", lambda *a, **k: calls.append(len(a[1])) or shrink(*a, **k))
    x = torch.randn(len(REQUESTS), HIDDEN, generator=torch.Generator().manual_seed(5))
    fused_layers = [p for layer in model.model.model.layers for p in (layer.self_attn.query_key_value, layer.mlp.gate_up_proj)]
    together = [m(x, data) for m in fused_layers]
    # one shrink per set of 2+ layer types of one rank (these collections' modules have ranks 4 and 6)
    expected = []
    for l in range(NLAYERS):
        for names in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            ranks = Counter(model.jdlora.tables[n].sigma[l].shape[1] for n in names)
            expected += [count for count in ranks.values() if count > 1]
    assert expected and sorted(calls) == sorted(expected), (calls, expected)
    monkeypatch.setattr(jdlora_tgi.patches, "_jd_siblings", lambda *a: {})
    alone = [m(x, data) for m in fused_layers]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    assert len(calls) == len(expected)


def test_jd_only_and_base_only_batches(tgi, assets, punica, monkeypatch):
    from jdlora_tgi.adapter import BatchJDLoraWeights, MixedBatchWeights

    model, index = load(tgi, assets, tgi.FakeGroup(0, 1), monkeypatch)
    meta = make_meta(tgi, [0, 0, 0])
    data = tgi.AdapterBatchData.from_meta(meta, model.layer_to_adapter_weights, False, None)
    assert not any(isinstance(d, (BatchJDLoraWeights, MixedBatchWeights)) for d in data.data.values())
    meta = make_meta(tgi, [index["b:chat"], index["org/a:code"], index["plain"]])
    data = tgi.AdapterBatchData.from_meta(meta, model.layer_to_adapter_weights, False, None)
    assert isinstance(data.data["q_proj"], MixedBatchWeights)
    assert isinstance(data.data["k_proj"], BatchJDLoraWeights)
    assert data.data["q_proj"].jd.step is data.data["k_proj"].step  # rows computed once per forward
    assert data.ranks() == {LORA_RANK}  # TGI's LoRA ranks; JD data contributes none
    head = torch.tensor([1])
    lm = tgi.LayerAdapterWeights()
    lm.add_adapter(index["b:chat"], model.layer_to_adapter_weights["q_proj"].adapter_weights[index["b:chat"]])
    data = tgi.AdapterBatchData.from_meta(meta, {"q_proj": model.layer_to_adapter_weights["q_proj"], "lm_head": lm},
                                          True, head)
    assert data.data["lm_head"].step.rows.tolist() == data.data["q_proj"].jd.step.rows[head].tolist()


# ----- tensor parallelism: 1, 2 and 4 ranks with gloo on CPU ---------------------------------------------


def run_tp(world: int, root: Path, env: str, check: str = "jd") -> dict:
    """Runs ``_tp_entry`` on ``world`` spawned processes (gloo over TCP on 127.0.0.1)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # fork would inherit torch's thread pools mid-state and can hang
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = ctx.Queue()
    procs = [ctx.Process(target=_tp_entry, args=(rank, world, port, str(root), env, results, check)) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        return dict(results.get(timeout=500) for _ in range(world))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _tp_entry(rank, world, port, root, env, results, check="jd"):
    try:
        torch.set_num_threads(1)
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                             world_size=world)
        tgi, assets = import_tgi(), read_assets(Path(root))
        mp = pytest.MonkeyPatch()
        torch_lora_path(tgi, mp)
        if check == "refused":  # start-up must stop with jdlora_tgi's error on every rank
            from jdlora_tgi.sharding import UnsupportedShardingError

            with pytest.raises(UnsupportedShardingError) as refused:
                load(tgi, assets, torch.distributed.group.WORLD, mp, env)
            results.put((rank, f"refused: {refused.value}"))
            return
        model, index = load(tgi, assets, torch.distributed.group.WORLD, mp, env)
        if check == "lora_row":
            results.put((rank, _tgi_row_lora_columns(tgi, assets, model, rank, world)))
            return
        for mode, spec in [("prefill", 0), ("decode", 0), ("decode", 1)]:
            check_layers(tgi, assets, model, index, mode, spec, rank=rank, world=world)
        results.put((rank, "ok"))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        import traceback

        results.put((rank, f"{type(err).__name__}: {err}\n{traceback.format_exc()[-4000:]}"))
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 4])
def test_tensor_parallel_jd_layers_match_the_unsharded_result(assets, world):
    env = f"org/a={assets.root / 'coll_a'},b={assets.root / 'coll_b'},single={assets.root / 'coll_a/adapters/math'}"
    out = run_tp(world, assets.root, env)
    assert out == {r: "ok" for r in range(world)}, "\n".join(f"rank {r}: {v}" for r, v in sorted(out.items()))


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_fused_qkv_proj_collection_is_refused_on_every_rank(assets, world):
    """A collection adapting the fused ``qkv_proj`` (phi3) loaded through TGI's own loop on ``world`` gloo
    ranks: TGI maps ``(layer, "qkv_proj")`` to the q/k/v layer, whose rank-local output is [q_r; k_r; v_r]; the
    backend refuses instead of updating the wrong rows."""
    qkv = "self_attn.qkv_proj"
    root = assets.root / "coll_qkv"
    if not root.exists():
        shapes = {qkv: (HIDDEN + 2 * KV, HIDDEN)}
        random_collection(["math", "code"], [qkv], rank=4, clusters=1, seed=5, shapes=shapes).save_pretrained(
            root, progress=False)
    out = run_tp(world, assets.root, f"phi={root}", check="refused")
    assert set(out) == set(range(world))
    for rank, line in out.items():
        assert line.startswith("refused: ") and "'phi:" in line and "qkv_proj" in line and "--num-shard 1" in line, \
            (rank, line)


# ----- TGI's own LoRA issues this backend does not change (documented in docs/tgi.md) -----------------


def test_tgi_scales_plain_lora_by_its_padded_rank_after_the_first_layer_type(tgi, assets, punica, monkeypatch, tmp_path):
    """TGI's ``LoraWeights.prepare_weights`` pads rank 4 to 8 and writes ``config.r = 8`` into the shared
    config, so every layer type prepared after the first (here v_proj after q_proj) uses alpha / 8 instead
    of alpha / 4. jdlora_tgi leaves plain LoRA to TGI; this records the behaviour of the pinned version."""
    g = torch.Generator().manual_seed(3)
    m_q, m_v = module_name(0, "self_attn.q_proj"), module_name(0, "self_attn.v_proj")
    lora = {}
    for l in range(NLAYERS):
        for s in ("self_attn.q_proj", "self_attn.v_proj"):
            d_out, d_in = SHAPES[s]
            lora[f"base_model.model.{module_name(l, s)}.lora_A.weight"] = torch.randn(4, d_in, generator=g)
            lora[f"base_model.model.{module_name(l, s)}.lora_B.weight"] = torch.randn(d_out, 4, generator=g)
    save_file(lora, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "fan_in_fan_out": False, "base_model_name_or_path": None}))
    model, index = load(tgi, assets, tgi.FakeGroup(0, 1), monkeypatch, f"r4={tmp_path}")
    data = tgi.AdapterBatchData.from_meta(make_meta(tgi, [1]), model.layer_to_adapter_weights, False, None)
    x = torch.randn(1, HIDDEN)
    qkv = model.model.model.layers[0].self_attn.query_key_value
    delta = qkv(x, data) - qkv.base_layer(x)
    for m, cols, scale in [(m_q, slice(0, HIDDEN), 2.0), (m_v, slice(HIDDEN + KV, None), 1.0)]:
        B, A = lora[f"base_model.model.{m}.lora_B.weight"], lora[f"base_model.model.{m}.lora_A.weight"]
        torch.testing.assert_close(delta[0, cols], scale * x[0] @ (B @ A).T, rtol=1e-4, atol=1e-4)


# ----- batch metadata through TGI's own FlashCausalLMBatch: prefill, decode, filter, concatenate --------


@pytest.fixture(scope="module")
def flash_batch(tgi):
    """TGI's ``FlashCausalLMBatch``. Its module imports the CUDA attention package only for ``KVCache`` and
    ``Seqlen``; on CPU a stand-in package provides those names (the batch code paths never call them)."""
    import importlib
    import types

    name = "text_generation_server.layers.attention"
    if name not in sys.modules:
        from text_generation_server.layers.attention.common import Seqlen

        stub = types.ModuleType(name)
        stub.Seqlen, stub.KVCache, stub.__path__ = Seqlen, object, []
        sys.modules[name] = stub
    module = importlib.import_module("text_generation_server.models.flash_causal_lm")
    from text_generation_server.utils.speculate import set_speculate

    set_speculate(0)
    return module


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(20)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


def pb_batch(batch_id, requests, first_id):
    from text_generation_server.pb import generate_pb2 as pb

    reqs = []
    for i, (adapter, length) in enumerate(requests):
        text = " ".join(f"w{j % 20}" for j in range(length))
        reqs.append(pb.Request(
            id=first_id + i, inputs=text, input_chunks=pb.Input(chunks=[pb.InputChunk(text=text)]), truncate=64,
            parameters=pb.NextTokenChooserParameters(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0,
                                                     repetition_penalty=1.0, frequency_penalty=0.0, seed=0),
            stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=4), adapter_id=adapter,
            blocks=[first_id + i + 1], slots=list(range(16 * (first_id + i + 1), 16 * (first_id + i + 1) + 16))))
    return pb.Batch(id=batch_id, requests=reqs, size=len(reqs), max_tokens=16 * len(reqs), max_blocks=1)


def test_adapter_rows_follow_tgi_batches_through_prefill_decode_filter_and_concatenate(
        tgi, assets, punica, monkeypatch, flash_batch):
    from text_generation_server.models.globals import set_adapter_to_index

    model, index = load(tgi, assets, tgi.FakeGroup(0, 1), monkeypatch)
    set_adapter_to_index(index)
    registry = model.jdlora
    row = {a: registry._row_by_id.get(a, -1) for a in index} | {"base": -1, "unknown": -1}
    tok, cls = tiny_tokenizer(), flash_batch.FlashCausalLMBatch

    def prefill(batch_id, requests, first_id):
        batch = cls.from_pb(pb_batch(batch_id, requests, first_id), tok, torch.float32, torch.device("cpu"))
        batch.prepare_for_prefill()
        per_token = [a for a, n in requests for _ in range(n)]
        assert registry.token_rows(batch.adapter_meta.adapter_indices).tolist() == [row[a] for a in per_token]
        # what generate_token does once prefill is done (flash_causal_lm.py, "Since we are done prefilling"
        # and "Update values"): one token, one adapter index per request
        last = batch.cu_seqlen_prefill[1:] - 1
        batch.prefilling, batch.prefilling_mask = False, [False] * len(batch)
        batch.position_ids, batch.slot_indices = batch.position_ids[last] + 1, batch.slot_indices[last] + 1
        batch.adapter_meta.adapter_indices = batch.adapter_meta.adapter_indices[last]
        batch.input_ids = batch.input_ids[last]
        batch.cache_lengths_tensor += batch.input_lengths_tensor
        batch.input_lengths_tensor = torch.ones_like(batch.input_lengths_tensor)
        segments, _ = tgi.find_segments(batch.adapter_meta.adapter_indices)
        batch.adapter_meta.adapter_segments = torch.tensor(segments, dtype=torch.int32)
        assert registry.token_rows(batch.adapter_meta.adapter_indices).tolist() == [row[a] for a, _ in requests]
        assert batch.adapter_meta.adapter_set == {index.get(a, 0) for a, _ in requests}
        return batch

    first = [("org/a:math", 3), ("base", 2), ("b:chat", 4), ("plain", 2), ("unknown", 1)]
    second = [("single", 2), ("b:law", 3), ("org/a:code", 1)]
    b1, b2 = prefill(0, first, 0), prefill(1, second, 10)
    kept = b1.filter([0, 2, 4])  # request ids 0, 2, 4
    assert registry.token_rows(kept.adapter_meta.adapter_indices).tolist() == [row["org/a:math"], row["b:chat"], -1]
    assert kept.adapter_meta.adapter_set == {index["org/a:math"], index["b:chat"], 0}
    both = cls.concatenate([kept, b2])
    expected = ["org/a:math", "b:chat", "unknown", "single", "b:law", "org/a:code"]
    assert registry.token_rows(both.adapter_meta.adapter_indices).tolist() == [row[a] for a in expected]
    assert both.adapter_meta.adapter_set == {index.get(a, 0) for a in expected}
    data = tgi.AdapterBatchData.from_meta(both.adapter_meta, model.layer_to_adapter_weights, False, None)
    assert data.data["k_proj"].step.rows.tolist() == [row[a] for a in expected]


def _tgi_row_lora_columns(tgi, assets, model, rank, world):
    """Output columns of o_proj where TGI's plain-LoRA update (rank 16: no padding at 2 ranks) landed."""
    data = tgi.AdapterBatchData.from_meta(make_meta(tgi, [1, 1]), model.layer_to_adapter_weights, False, None)
    x = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(5))
    a, b = rank * HIDDEN // world, (rank + 1) * HIDDEN // world
    o = model.model.model.layers[0].self_attn.o_proj
    out = o(x[:, a:b].contiguous(), data)
    m = module_name(0, "self_attn.o_proj")
    base = x @ assets.base[f"{m}.weight"].T
    lora = json.loads((assets.root / "lora16" / "adapter_config.json").read_text())
    from safetensors.torch import load_file

    w = load_file(assets.root / "lora16" / "adapter_model.safetensors")
    delta = x @ (lora["lora_alpha"] / lora["r"] * w[f"base_model.model.{m}.lora_B.weight"]
                 @ w[f"base_model.model.{m}.lora_A.weight"]).T
    with_update = ((out - base - delta).abs().max(0).values < 1e-4).nonzero().flatten()
    return [int(with_update.min()), int(with_update.max()) + 1] if len(with_update) else []


@pytest.mark.slow
def test_tgi_row_parallel_lora_adds_each_ranks_slice_only(assets):
    """TGI 3.3.7's ``TensorParallelAdapterRowLinear`` adds, on rank k, only columns [k*d/n, (k+1)*d/n) of the
    LoRA update to the already all-reduced output, so ranks disagree for plain LoRA on o_proj/down_proj with
    ``--num-shard`` > 1. JD-LoRA applies the full update on every rank (test above); this records TGI's."""
    g = torch.Generator().manual_seed(9)
    folder = assets.root / "lora16"
    folder.mkdir(exist_ok=True)
    weights = {}
    for l in range(NLAYERS):
        for s in ("self_attn.o_proj",):
            d_out, d_in = SHAPES[s]
            weights[f"base_model.model.{module_name(l, s)}.lora_A.weight"] = torch.randn(16, d_in, generator=g) / 8
            weights[f"base_model.model.{module_name(l, s)}.lora_B.weight"] = torch.randn(d_out, 16, generator=g) / 8
    save_file(weights, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 16, "lora_alpha": 16, "target_modules": ["o_proj"], "fan_in_fan_out": False,
        "base_model_name_or_path": None}))
    out = run_tp(2, assets.root, f"lora16={folder}", check="lora_row")
    assert out == {0: [0, HIDDEN // 2], 1: [HIDDEN // 2, HIDDEN]}, out


def test_download_step_accepts_a_collection_and_still_refuses_other_folders(tgi, assets, tmp_path):
    """``text-generation-server download-weights <id>`` first calls ``utils.weight_files``; a collection has
    no top-level weights, so TGI alone would fail the launcher's download step."""
    from text_generation_server import utils

    files = utils.weight_files(str(assets.root / "coll_a"), None, ".safetensors")
    assert files == [str(assets.root / "coll_a" / "collection.json")]
    with pytest.raises(FileNotFoundError):
        utils.weight_files(str(tmp_path), None, ".safetensors")
