"""jdlora.compress() end to end: real third-party adapters, synthetic collections, streaming, the collection."""

import gc
import weakref

import pytest
import torch

import jdlora
from jdlora.compress import LoraStack, svd_per_adapter
from jdlora.pipeline import natural_key
from jdlora.errors import IncompatibleAdaptersError, UnknownAdapterError
from jdlora.sources import open_adapters
from jdlora.synthetic import llama_modules, synthetic_adapters

F64 = torch.float64


def dense_updates(sources, module):
    """``{name: s_i B_i A_i}`` of the adapters that have ``module``, in float64."""
    out = {}
    for s in sources:
        if module in s.modules:
            A, B = s.read_module(module, dtype=F64)
            out[s.name] = s.scaling(module) * B @ A
    return out


def test_real_adapters_compress_losslessly_when_rank_covers_stacked_factors(real_adapters):
    sources = open_adapters(real_adapters)
    modules = {m for s in sources for m in s.modules}
    stacked = {m: sum(s.modules[m][0] for s in sources if m in s.modules) for m in modules}
    rank = max(stacked.values())  # 4+4+4+4+8 = 24 on q and v; 12 on k and o (three adapters have them)
    collection = jdlora.compress(real_adapters, rank=rank, clusters=1, dtype=F64, tol=1e-10, ftol=0,
                                 max_iter=300, progress=False)
    assert collection.adapter_names == [p.name for p in real_adapters]
    assert collection.base_model == "google/gemma-3-270m-it"
    assert len(collection.modules) == 18 * 4
    for module, entry in collection.modules.items():
        # Proposition 1: r >= rank of the stacked factors reconstructs every adapter exactly.
        assert entry.compression.rank == stacked[module]
        assert entry.compression.error < 1e-12, module
    layer5 = "model.layers.5.self_attn"
    dense = dense_updates(sources, f"{layer5}.q_proj")
    for name, dW in dense.items():
        assert torch.allclose(collection.delta_weight(name, f"{layer5}.q_proj"), dW, atol=1e-10 * dW.abs().max())
    # q,v-only adapters have no Sigma for k and o.
    assert collection.sigma("0112LY-logo", f"{layer5}.k_proj") is None
    assert collection.sigma("ao-wei-svg", f"{layer5}.k_proj") is not None


@pytest.mark.parametrize("rank", [1, 2])
def test_real_adapter_errors_lie_within_theorem_1_bounds(real_adapters, rank):
    sources = open_adapters(real_adapters)
    collection = jdlora.compress(real_adapters, rank=rank, clusters=1, normalize=False, dtype=F64,
                                 tol=1e-9, ftol=0, max_iter=500, progress=False)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.9.self_attn.v_proj",
                   "model.layers.17.self_attn.k_proj"):
        updates = torch.stack(list(dense_updates(sources, module).values()))
        n = updates.shape[0]
        total = updates.square().sum().item()
        sigma_L = torch.linalg.svdvals(updates.reshape(n, -1))
        sigma_sum = torch.linalg.svdvals(updates.sum(dim=0))
        error = collection.modules[module].compression.error
        # Theorem 1: sum ||Sigma_i||^2 <= the top min(r^2, n) squared singular values of L ...
        assert error >= 1 - sigma_L[: min(rank**2, n)].square().sum().item() / total - 1e-9
        # ... and >= the top-r energy of the summed update over n (Jensen).
        assert error <= 1 - sigma_sum[:rank].square().sum().item() / (n * total) + 1e-9
        assert 0 < error < 1


def test_real_adapters_with_one_cluster_each_match_per_adapter_svd(real_adapters):
    module = "model.layers.3.self_attn.q_proj"
    sources = open_adapters(real_adapters)
    collection = jdlora.compress(real_adapters, rank=2, clusters=5, normalize=False, dtype=F64, tol=1e-10,
                                 ftol=0, max_iter=2000, progress=False)
    single = jdlora.compress(real_adapters, rank=2, clusters=1, normalize=False, dtype=F64, progress=False)
    stack = LoraStack.from_factors([s.read_module(module, F64) for s in sources], [s.scaling(module) for s in sources],
                                   dtype=F64)
    svd = svd_per_adapter(stack, 2)
    entry = collection.modules[module].compression
    assert entry.num_clusters == 5
    assert torch.allclose(entry.residuals, svd.residuals, rtol=1e-6)
    assert collection.error <= single.error


def test_collection_reports_errors_and_parameter_counts(real_adapters):
    sources = open_adapters(real_adapters)
    collection = jdlora.compress(real_adapters, rank=4, clusters=2, progress=False)
    original = sum(r * (d_out + d_in) for s in sources for r, d_out, d_in in s.modules.values())
    counts = collection.parameter_counts()
    assert counts["original"] == original
    compressed = sum(e.compression.U.numel() + e.compression.V.numel() + e.compression.sigma.numel()
                     for e in collection.modules.values())
    assert counts["compressed"] == compressed
    assert counts["saved_ratio"] == pytest.approx(1 - compressed / original)
    errors = collection.adapter_errors()
    assert set(errors) == set(collection.adapter_names)
    assert all(0 <= e < 1 for e in errors.values())
    assert collection.mean_adapter_error == pytest.approx(sum(errors.values()) / len(errors))
    summary = collection.summary()
    for fragment in ("adapters            5", "sigma               full", "rank                4"):
        assert fragment in summary


def test_unknown_adapter_name_lists_close_matches(real_adapters):
    collection = jdlora.compress(real_adapters[:2], rank=2, clusters=1, progress=False)
    with pytest.raises(UnknownAdapterError, match="ao-wei-svg"):
        collection.delta_weight("ao-wei-sgv", "model.layers.0.self_attn.q_proj")


def test_compression_streams_one_module_at_a_time():
    """Raw factors of a module are released before the next module is read: memory is one module deep."""
    adapters = synthetic_adapters(6, llama_modules(3, 32, 16), rank=4)
    alive: list[weakref.ref] = []
    reads: list[str] = []
    leaks: list[str] = []

    class Watched:
        def __init__(self, inner):
            self.inner = inner
            for attr in ("name", "base_model", "modules", "origin", "rank", "alpha", "use_rslora"):
                setattr(self, attr, getattr(inner, attr))

        def scaling(self, module):
            return self.inner.scaling(module)

        def read_module(self, module, dtype=torch.float32):
            if reads and reads[-1] != module:
                gc.collect()
                if any(ref() is not None for ref in alive):
                    leaks.append(module)
                alive.clear()
            reads.append(module)
            A, B = self.inner.read_module(module, dtype)
            alive.extend([weakref.ref(A), weakref.ref(B)])
            return A, B

    jdlora.compress([Watched(a) for a in adapters], rank=4, clusters=1, progress=False)
    modules = sorted(adapters[0].modules, key=natural_key)
    assert reads == [m for m in modules for _ in adapters]  # module by module, each read once
    assert leaks == []


def test_auto_settings_keep_the_worst_adapter_under_the_target_and_say_why(tmp_path):
    # Families that share most directions, as trained LoRAs do: a target that clustering can meet.
    adapters = synthetic_adapters(12, llama_modules(2, 256, 64), rank=8, groups=3, sharing=0.97, noise=0.01)
    collection = jdlora.compress(adapters, target_error=0.1, progress=False)
    choice, settings = collection.choice, collection.settings
    assert choice.met and choice.target_error == 0.1 and choice.error_quantile == 1.0
    assert isinstance(settings.rank, int) and isinstance(settings.clusters, int) and settings.sigma_kind == "full"
    # Every adapter, not the pooled error: each adapter's error norm-weighted over the judged modules.
    assert len(choice.modules) == 4 and set(choice.modules) <= set(collection.modules)
    residuals, sq_norms = torch.zeros(12, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    for m in choice.modules:
        entry = collection.modules[m]
        residuals[entry.adapter_ids] += entry.compression.residuals.double()
        sq_norms[entry.adapter_ids] += entry.compression.sq_norms.double()
    assert (residuals / sq_norms).max().item() <= 0.1
    chosen = [p for p in collection.sweep if (p.rank, p.clusters) == (settings.rank, settings.clusters)]
    assert chosen and f"rank {settings.rank}, {settings.clusters} cluster" in choice.reason
    # No setting tried that meets the target is cheaper to store.
    assert min(p.cost() for p in collection.sweep if p.quantile_error <= 0.1) == chosen[0].cost()
    assert "automatic choice" in collection.summary() and choice.reason in collection.summary()
    # The manifest keeps the settings (typed again on load) and the choice.
    loaded = jdlora.JDLoraCollection.from_pretrained(collection.save_pretrained(tmp_path / "c", progress=False))
    assert loaded.settings == settings and loaded.choice == choice and len(loaded.sweep) == len(collection.sweep)


def test_recompress_keeps_the_settings_float64_included(tmp_path):
    from jdlora.synthetic import save_adapters

    folders = save_adapters(synthetic_adapters(4, llama_modules(1, 32, 16), rank=2), tmp_path / "loras")
    collection = jdlora.compress(folders[:3], rank=3, clusters=2, dtype=F64, progress=False)
    again = jdlora.recompress(collection, folders[3:])
    assert again.settings == collection.settings and again.settings.dtype == F64
    assert all(e.compression.U.dtype == F64 for e in again.modules.values()) and len(again) == 4
    assert jdlora.recompress(collection, clusters=1).settings.clusters == 1


def test_invalid_settings_fail_before_any_adapter_is_read():
    from jdlora.errors import SettingsError

    with pytest.raises(SettingsError, match="rank=0"):
        jdlora.compress(["/nonexistent/adapter"], rank=0, progress=False)


def test_diag_sigma_is_stored_as_vectors():
    adapters = synthetic_adapters(5, llama_modules(1, 48, 16), rank=4)
    collection = jdlora.compress(adapters, rank=6, clusters=1, sigma_kind="diag", progress=False)
    sigma = collection.modules["model.layers.0.self_attn.q_proj"].compression.sigma
    assert sigma.shape == (5, 6) and collection.sigma_kind == "diag"


def test_same_seed_gives_identical_collections():
    adapters = synthetic_adapters(8, llama_modules(1, 48, 16), rank=4)
    a = jdlora.compress(adapters, rank=5, clusters=2, seed=7, progress=False)
    b = jdlora.compress(adapters, rank=5, clusters=2, seed=7, progress=False)
    for module in a.modules:
        assert torch.equal(a.modules[module].compression.sigma, b.modules[module].compression.sigma)


def test_adapters_for_different_base_models_are_rejected():
    left = synthetic_adapters(2, llama_modules(1, 32, 16), rank=2, base_model="org/model-a")
    right = synthetic_adapters(3, llama_modules(1, 32, 16), rank=2, base_model="org/model-b", seed=1)
    right[2].name = "other-base"
    with pytest.raises(IncompatibleAdaptersError, match="other-base|model-b"):
        jdlora.compress(left + right[2:], rank=2, progress=False)


def test_mismatched_shapes_for_one_module_are_rejected():
    small = synthetic_adapters(2, llama_modules(1, 32, 16), rank=2)
    wide = synthetic_adapters(1, llama_modules(1, 48, 16), rank=2, seed=3)
    wide[0].name = "wide-one"
    with pytest.raises(IncompatibleAdaptersError) as info:
        jdlora.compress(small + wide, rank=2, progress=False)
    message = str(info.value)
    assert "wide-one" in message and "q_proj" in message and "32" in message and "48" in message


def test_collections_saved_by_earlier_versions_still_load(tmp_path):
    """The untyped settings dict with "sigma", sweep points with "sigma", and sigma files keyed sq_norm/residual."""
    import json

    from safetensors.torch import load_file, save_file

    collection = jdlora.compress(synthetic_adapters(4, llama_modules(1, 32, 16), rank=2), rank=3, clusters=1,
                                 dtype=F64, progress=False)
    root = collection.save_pretrained(tmp_path / "old", progress=False)
    for path in (root / "sigma").glob("*.safetensors"):
        tensors = load_file(path)
        tensors["sq_norm"], tensors["residual"] = tensors.pop("sq_norms"), tensors.pop("residuals")
        save_file(tensors, path)
    manifest = json.loads((root / "collection.json").read_text())
    manifest["settings"] = {"rank": 3, "clusters": 1, "sigma": "full", "normalize": True, "solver": "qr",
                            "tol": 1e-3, "ftol": 1e-5, "max_iter": 100, "max_rounds": 20, "target_error": 0.5,
                            "seed": 0, "dtype": "float64"}
    manifest["sweep"] = [{"rank": 3, "clusters": 1, "sigma": "full", "error": 0.1, "mean_adapter_error": 0.1,
                          "saved_ratio": 0.2, "seconds": 0.1}]
    del manifest["choice"]
    (root / "collection.json").write_text(json.dumps(manifest))
    old = jdlora.JDLoraCollection.from_pretrained(root, verify=False)  # the files changed under their sha256
    assert old.settings.sigma_kind == "full" and old.settings.dtype == F64 and old.settings.target_error == 0.5
    assert old.sweep[0].sigma_kind == "full" and old.choice is None
    module = next(iter(collection.modules))
    assert torch.allclose(old.modules[module].compression.residuals.double(),
                          collection.modules[module].compression.residuals.double().float().double())
