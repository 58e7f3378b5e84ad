"""jdlora_tgi without TGI: adapter ids, sharding math, stacked tables, per-step rows, the import hook, the
CUDA-graph guard. These run in CI. Conformance against TGI's own server code: tests/test_tgi_server.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from jdlora.collection import AdapterInfo, CollectionModule, JDLoraCollection
from jdlora.compress import ModuleCompression
from jdlora.format import adapter_config_kind, read_adapter_config

TGI_SRC = Path(__file__).resolve().parents[1] / "integrations" / "tgi" / "src"
if str(TGI_SRC) not in sys.path:
    sys.path.insert(0, str(TGI_SRC))

from jdlora_tgi import naming  # noqa: E402
from jdlora_tgi.forward import apply_jd, row_finish, row_partial  # noqa: E402
from jdlora_tgi.naming import AdapterIdCollisionError, JDSource  # noqa: E402
from jdlora_tgi.registry import JDRegistry, StepRows  # noqa: E402
from jdlora_tgi.sharding import ShardSpec, UnsupportedShardingError, shard_bounds  # noqa: E402

# A tiny Llama-like shape: hidden 64, 4 heads of 16, 2 KV heads, MLP 96, 2 layers.
SHAPES = {
    "self_attn.q_proj": (64, 64), "self_attn.k_proj": (32, 64), "self_attn.v_proj": (32, 64),
    "self_attn.o_proj": (64, 64), "mlp.gate_proj": (96, 64), "mlp.up_proj": (96, 64), "mlp.down_proj": (64, 96),
}
NLAYERS = 2


def module_name(layer: int, suffix: str) -> str:
    return f"model.layers.{layer}.{suffix}"


def random_collection(
    names: list[str],
    suffixes=tuple(SHAPES),
    *,
    rank: int = 4,
    clusters: int = 2,
    sigma: str = "full",
    seed: int = 0,
    layers=range(NLAYERS),
    absent: set = frozenset(),
    shapes=SHAPES,
) -> JDLoraCollection:
    """A collection with random bases/Sigma. ``absent``: ``(module, adapter name)`` pairs without a Sigma."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for layer in layers:
        for suffix in suffixes:
            name = module_name(layer, suffix)
            d_out, d_in = shapes[suffix]
            ids = [i for i, a in enumerate(names) if (name, a) not in absent]
            m = len(ids)
            U = torch.randn(clusters, d_out, rank, generator=g) / d_out**0.5
            V = torch.randn(clusters, d_in, rank, generator=g) / d_in**0.5
            s = torch.randn(m, rank, rank, generator=g) if sigma == "full" else torch.randn(m, rank, generator=g)
            cluster = torch.randint(0, clusters, (m,), generator=g)
            modules[name] = CollectionModule(
                ModuleCompression(U, V, s, cluster, torch.ones(m), torch.zeros(m)), torch.tensor(ids, dtype=torch.long))
    infos = [AdapterInfo(n, rank=8, alpha=16) for n in names]
    return JDLoraCollection("tiny-llama", infos, modules, sigma, {"rank": rank, "clusters": clusters})


def register(registry: JDRegistry, entry: str, collection: JDLoraCollection, source: JDSource, suffixes=tuple(SHAPES)):
    """What TGI's loading loop does through our hooks, without TGI: rows + table slots for every adapter."""
    registry._collections[source] = collection
    rows = {}
    for name in collection.adapter_names:
        row = registry.register_adapter(naming.adapter_id(entry, name), source, name)
        local = collection.index(name)
        rows[name] = row
        for suffix in suffixes:
            spec = ShardSpec.for_layer(suffix.split(".")[-1])
            table = registry.table(suffix.split(".")[-1], NLAYERS, spec)
            for layer in range(NLAYERS):
                entry_ = collection.modules.get(module_name(layer, suffix))
                if entry_ is not None:
                    table.add(layer, source, entry_.compression, entry_.adapter_ids, local, row)
    return rows


def dense_delta(collection: JDLoraCollection, name: str, module: str) -> torch.Tensor:
    d = collection.delta_weight(name, module)
    if d is None:
        d_out, d_in = SHAPES[module.split(".", 3)[-1]]
        return torch.zeros(d_out, d_in)
    return d.float()


# ----- adapter ids ----------------------------------------------------------------------------------


def test_adapter_ids_join_entry_and_name_and_split_back():
    assert naming.adapter_id("org/coll", "math") == "org/coll:math"
    assert naming.split_adapter_id("org/coll:math") == ("org/coll", "math")
    assert naming.split_adapter_id("mycoll:math") == ("mycoll", "math")
    assert naming.split_adapter_id("org/plain-lora") is None
    assert naming.split_adapter_id(":x") is None


def test_colliding_adapter_ids_are_refused_naming_both_entries():
    naming.check_unique_ids([("a:x", "a=/p1"), ("b:x", "b=/p2"), ("plain", "plain")])
    with pytest.raises(AdapterIdCollisionError, match=r"'a:x' from 'a=/p1', 'a:x=/lora'") as err:
        naming.check_unique_ids([("a:x", "a=/p1"), ("a:x", "a:x=/lora")])
    assert isinstance(err.value, ValueError)


def test_adapter_configs_are_classified_by_peft_type(tmp_path):
    coll = random_collection(["a", "b"], ["self_attn.q_proj"])
    coll.save_pretrained(tmp_path / "c", progress=False)
    root = read_adapter_config(str(tmp_path / "c"))
    one = read_adapter_config(str(tmp_path / "c" / "adapters" / "a"))
    assert adapter_config_kind(root) == "collection"
    assert adapter_config_kind(one) == "adapter"
    assert adapter_config_kind({"peft_type": "LORA", "r": 8}) is None
    assert read_adapter_config(str(tmp_path)) is None  # a folder without adapter_config.json
    assert read_adapter_config(str(tmp_path / "missing")) is None  # a local path: no Hub lookup, the engine reports it


@pytest.mark.parametrize("collection_root", ["../../../elsewhere", "/etc", "../x/..", ""])
def test_a_single_adapter_folder_only_leads_up_to_its_own_collection(tmp_path, collection_root):
    """An adapter folder listed alone in LORA_ADAPTERS names its collection by ``collection_root``: the
    saved ``../..`` leads to the collection; anything else in a (downloaded, untrusted) config is refused."""
    from jdlora.errors import UnsafePathError
    from jdlora_tgi.patches import _single_adapter_source

    coll = random_collection(["a", "b"], ["self_attn.q_proj"])
    coll.save_pretrained(tmp_path / "c", progress=False)
    folder = tmp_path / "c" / "adapters" / "a"
    config = read_adapter_config(str(folder))
    source, name = _single_adapter_source(str(folder), config)
    assert (Path(source.path_or_repo_id), source.adapters, name) == ((tmp_path / "c").resolve(), ("a",), "a")
    with pytest.raises(UnsafePathError, match="collection_root"):
        _single_adapter_source(str(folder), dict(config, collection_root=collection_root))


# ----- sharding: TGI's split, the dense result ------------------------------------------------------


def test_shard_bounds_are_tgi_blocks():
    assert [shard_bounds(96, r, 4) for r in range(4)] == [(0, 24), (24, 48), (48, 72), (72, 96)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_fused_qkv_proj_is_refused_on_more_than_one_rank_naming_adapter_and_remedy(world):
    spec = ShardSpec.for_layer("qkv_proj", rank=world - 1, world_size=world)
    module = module_name(0, "self_attn.qkv_proj")
    if world == 1:
        spec.check("phi:math", module)  # one rank: the bases are used whole, exact
        return
    with pytest.raises(UnsupportedShardingError, match=r"'phi:math'.*qkv_proj.*--num-shard 1"):
        spec.check("phi:math", module)
    ShardSpec.for_layer("q_proj", world - 1, world).check("phi:math", module_name(0, "self_attn.q_proj"))


def one_table(suffix: str, world: int, rank: int, names=("a", "b", "c"), sigma="full", seed=0):
    coll = random_collection(list(names), [suffix], sigma=sigma, seed=seed)
    registry = JDRegistry()
    layer_type = suffix.split(".")[-1]
    spec = ShardSpec.for_layer(layer_type, rank, world)
    source = JDSource("c")
    registry._collections[source] = coll
    table = registry.table(layer_type, NLAYERS, spec)
    for name in names:
        row = registry.register_adapter(naming.adapter_id("c", name), source, name)
        for layer in range(NLAYERS):
            e = coll.modules[module_name(layer, suffix)]
            table.add(layer, source, e.compression, e.adapter_ids, coll.index(name), row)
    registry.build()
    return coll, table


@pytest.mark.parametrize("world", [1, 2, 4])
def test_column_parallel_shards_concatenate_to_the_dense_update(world):
    suffix = "self_attn.k_proj"
    rows = torch.tensor([0, 2, -1, 1, 0, 2])
    x = torch.randn(len(rows), 64)
    outs = []
    for rank in range(world):
        coll, table = one_table(suffix, world, rank)
        assert table.V[1].shape[1] == 64 and table.U[1].shape[1] == 32 // world  # V replicated, U sharded
        y = torch.zeros(len(rows), 32 // world)
        apply_jd(table, 1, y, x, StepRows(rows), 0, 32 // world)
        outs.append(y)
    names = coll.adapter_names
    expected = torch.stack([
        dense_delta(coll, names[r], module_name(1, suffix)) @ x[t] if r >= 0 else torch.zeros(32)
        for t, r in enumerate(rows.tolist())
    ])
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("world", [2, 4])
def test_row_parallel_partial_products_summed_before_sigma_equal_the_dense_update(world):
    suffix = "mlp.down_proj"  # d_in 96 sharded, U replicated
    rows = torch.tensor([1, 1, -1, 0, 2])
    x = torch.randn(len(rows), 96)
    tables = [one_table(suffix, world, rank, sigma="diag") for rank in range(world)]
    step = StepRows(rows)
    partials = []
    for rank, (_, table) in enumerate(tables):
        start, stop = shard_bounds(96, rank, world)
        assert table.V[0].shape[1] == stop - start and table.U[0].shape[1] == 64
        partials.append(row_partial(table, 0, x[:, start:stop].contiguous(), step.batch))
    h = torch.stack(partials).sum(0)  # the all-reduce
    coll = tables[0][0]
    expected = torch.stack([
        dense_delta(coll, coll.adapter_names[r], module_name(0, suffix)) @ x[t] if r >= 0 else torch.zeros(64)
        for t, r in enumerate(rows.tolist())
    ])
    for _, table in tables:  # every rank ends with the full update
        y = torch.zeros(len(rows), 64)
        row_finish(table, 0, y, h, step.batch)
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)


# ----- tables: several collections, ranks, Sigma kinds, absent modules --------------------------------


def two_collections():
    a = random_collection(["math", "code"], rank=4, clusters=2, sigma="full", seed=1,
                          absent={(module_name(0, "self_attn.q_proj"), "code")})
    b = random_collection(["math", "chat", "law"], ["self_attn.q_proj", "mlp.down_proj"], rank=6, clusters=1,
                          sigma="diag", seed=2, layers=[1])
    registry = JDRegistry()
    rows_a = register(registry, "org/a", a, JDSource("org/a"))
    rows_b = register(registry, "b", b, JDSource("/data/b"), ["self_attn.q_proj", "mlp.down_proj"])
    registry.build()
    return registry, {("org/a", n): (a, r) for n, r in rows_a.items()} | {("b", n): (b, r) for n, r in rows_b.items()}


def test_tables_stack_collections_with_offset_clusters_padded_ranks_and_full_sigma():
    registry, rows = two_collections()
    q = registry.tables["q_proj"]
    assert q.rank == 6 and q.sigma[1].shape == (5, 6, 6)  # diag Sigma became full beside a full collection
    assert q.U[0].shape[0] == 2 and q.U[1].shape[0] == 3  # clusters of both collections in layer 1
    for (entry, name), (coll, row) in rows.items():
        for layer in range(NLAYERS):
            module = module_name(layer, "self_attn.q_proj")
            c = int(q.cluster_of[layer][row])
            if module not in coll.modules or coll.modules[module].row_of(coll.index(name)) is None:
                assert c == -1, (entry, name, layer)
                continue
            rebuilt = q.U[layer][c] @ q.sigma[layer][row] @ q.V[layer][c].T
            torch.testing.assert_close(rebuilt, dense_delta(coll, name, module), rtol=1e-4, atol=1e-6)


def test_bases_are_stored_once_per_layer_and_cluster_whatever_the_number_of_adapters():
    def memory(n):
        coll = random_collection([f"a{i}" for i in range(n)], ["self_attn.q_proj"], clusters=2)
        registry = JDRegistry()
        register(registry, "c", coll, JDSource("c"), ["self_attn.q_proj"])
        registry.build()
        return registry.memory()

    small, large = memory(3), memory(300)
    assert small["bases_bytes"] == large["bases_bytes"] == NLAYERS * 2 * (64 + 64) * 4 * 4
    assert large["sigma_bytes"] > small["sigma_bytes"]
    assert large["lora_equivalent_bytes"] == 300 * NLAYERS * 8 * (64 + 64) * 4  # original rank 8, float32
    assert large["clusters"] == NLAYERS * 2


def test_mixed_batch_of_two_collections_and_untouched_tokens_matches_dense_weights():
    registry, rows = two_collections()
    items = list(rows.items())
    torch.manual_seed(0)
    W = {suffix: torch.randn(*SHAPES[suffix]) / 8 for suffix in SHAPES}
    token_items = [items[i % len(items)] if i % 4 != 3 else None for i in range(11)]  # every 4th: no JD adapter
    token_rows = torch.tensor([it[1][1] if it else -1 for it in token_items])
    step = StepRows(token_rows)
    for suffix, (d_out, d_in) in SHAPES.items():
        x = torch.randn(len(token_items), d_in)
        for layer in range(NLAYERS):
            y = x @ W[suffix].T
            apply_jd(registry.tables[suffix.split(".")[-1]], layer, y, x, step, 0, d_out)
            module = module_name(layer, suffix)
            for t, it in enumerate(token_items):
                delta = torch.zeros(d_out, d_in)
                if it is not None:
                    coll, name = it[1][0], it[0][1]
                    if module in coll.modules:
                        delta = dense_delta(coll, name, module)
                torch.testing.assert_close(y[t], x[t] @ (W[suffix] + delta).T, rtol=1e-4, atol=1e-5)


# ----- per-step rows -----------------------------------------------------------------------------------


def test_token_rows_map_tgi_indices_and_follow_prefill_head_indices():
    registry = JDRegistry()
    fake = {3: SimpleNamespace(row=0), 5: SimpleNamespace(row=1)}  # TGI index -> JD weights
    registry.note_weights(fake)
    indices = torch.tensor([0, 3, 3, 1, 5, 5, 5, 7])  # 0: base, 1: plain LoRA, 7: beyond the map
    assert registry.token_rows(indices).tolist() == [-1, 0, 0, -1, 1, 1, 1, -1]
    assert registry.token_rows(indices, torch.tensor([2, 6])).tolist() == [0, 1]
    assert registry.jd_indices == {3, 5}


def test_one_step_rows_object_serves_every_layer_of_a_forward():
    registry = JDRegistry()
    registry.note_weights({1: SimpleNamespace(row=0)})
    indices = torch.tensor([1, 0, 1])
    first = registry.step_rows(indices)
    assert registry.step_rows(indices) is first
    assert registry.step_rows(indices.clone()) is not first  # a new forward: new rows
    assert first.batch is first.batch  # grouped once


# ----- the import hook (.pth) -----------------------------------------------------------------------


def fake_tgi(tmp_path: Path) -> Path:
    """A stand-in ``text_generation_server`` with the two plain functions the hooks wrap."""
    pkg = tmp_path / "fake" / "text_generation_server"
    (pkg / "utils").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "utils" / "__init__.py").write_text("def weight_files(model_id, revision=None, extension='.safetensors'):\n"
                                               "    raise FileNotFoundError(model_id)\n")
    (pkg / "utils" / "adapter.py").write_text("from text_generation_server.utils import weight_files\n"
                                              "def load_module_map(*args):\n    return 'lora'\n")
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    (site_dir / "jdlora_tgi.pth").write_text((TGI_SRC / "jdlora_tgi" / "jdlora_tgi.pth").read_text())
    return tmp_path


PROBE = textwrap.dedent("""
    import json, site, sys
    site.addsitedir(sys.argv[1])           # processes the .pth as at interpreter start-up
    assert "torch" not in sys.modules       # activating the hook imports nothing heavy
    import text_generation_server.utils.adapter as a
    import text_generation_server.utils as u
    print(json.dumps({"load_module_map": hasattr(a.load_module_map, "__jdlora_original__"),
                      "bound_name": hasattr(a.weight_files, "__jdlora_original__"),
                      "loader": type(a.__loader__).__name__}))
""")


@pytest.mark.parametrize("enabled", [True, False])
def test_pth_hooks_tgi_modules_as_they_are_imported(tmp_path, enabled):
    root = fake_tgi(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "fake"), str(TGI_SRC)]),
           "JDLORA_TGI": "1" if enabled else "0"}
    out = subprocess.run([sys.executable, "-c", PROBE, str(root / "site")], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"load_module_map": enabled, "bound_name": enabled, "loader": "SourceFileLoader"}


def test_bootstrap_hooks_every_module_patches_knows():
    pytest.importorskip("loguru")  # jdlora_tgi.patches logs with loguru inside TGI, else logging
    from jdlora_tgi import _bootstrap, patches

    assert set(patches.HOOKS) == set(_bootstrap.HOOKED)


# ----- CUDA graphs: the guard ----------------------------------------------------------------------------


def fake_flash_model(graphs: dict, jd_indices=()):
    from jdlora_tgi import cuda_graphs

    seen = []

    class Model:
        def generate_token(self, batch):
            seen.append(dict(self.cuda_graphs))
            return "ok"

        def forward(self, batch, adapter_data):
            return "replayed"

    Model.generate_token = cuda_graphs._make_generate_token(Model.generate_token)
    Model.forward = cuda_graphs._make_forward(Model.forward)
    model = Model()
    model.cuda_graphs = graphs
    registry = JDRegistry()
    registry.note_weights({i: SimpleNamespace(row=k) for k, i in enumerate(jd_indices)})
    model.jdlora = registry
    return model, seen


def batch_with(adapters):
    return SimpleNamespace(adapter_meta=SimpleNamespace(adapter_set=set(adapters)), cu_seqlen_prefill=None)


def test_decode_steps_with_adapters_missing_from_the_graphs_run_eagerly():
    graphs = {1: {"graph": "g1"}, 4: {"graph": "g4"}}
    model, seen = fake_flash_model(graphs, jd_indices=[2])
    model.generate_token(batch_with([0]))  # base model only: graphs kept
    model.generate_token(batch_with([0, 1]))  # plain LoRA (TGI never captures adapters): eager
    model.generate_token(batch_with([2]))  # JD, graphs captured without JD: eager
    assert [bool(s) for s in seen] == [True, False, False]
    assert model.cuda_graphs is graphs  # restored


def test_graphs_captured_with_jd_rows_serve_jd_steps_and_get_the_rows_before_replay():
    graphs = {1: {"jdlora_rows": torch.full((1,), -1)}, 4: {"jdlora_rows": torch.full((4,), -1)}}
    model, seen = fake_flash_model(graphs, jd_indices=[2, 3])
    model.generate_token(batch_with([2, 3, 0]))
    model.generate_token(batch_with([2, 1]))  # plain LoRA still eager
    assert [bool(s) for s in seen] == [True, False]
    meta = SimpleNamespace(adapter_indices=torch.tensor([3, 0, 2]))
    assert model.forward(SimpleNamespace(cu_seqlen_prefill=None), SimpleNamespace(meta=meta)) == "replayed"
    assert graphs[4]["jdlora_rows"].tolist() == [1, -1, 0, -1]  # rows of the step, padding -1
    assert graphs[1]["jdlora_rows"].tolist() == [-1]


def test_two_gloo_ranks_serve_every_projection_as_one_rank_does():
    """tp_check.py over torch.distributed (2 processes, gloo): every rank's sharded q/k/v/o/gate/up/down output,
    the row-parallel all-reduce of ``V^T x`` included, equals the unsharded layer's, for tokens of 3 clusters
    mixed with base rows."""
    script = TGI_SRC.parent / "scripts" / "tp_check.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TGI_SRC), *sys.path]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(script), "--small"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    checks = [line for line in out.stdout.splitlines() if "TP2 == TP1" in line]
    assert len(checks) == 2 * 2 * 7 and all(" OK " in line for line in checks)  # 2 ranks x 2 batches x 7 projections
    assert "ALL OK" in out.stdout
