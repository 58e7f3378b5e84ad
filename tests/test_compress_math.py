"""The math of jdlora.compress against the paper's theory and against dense computations."""

import math

import pytest
import torch

from jdlora.compress import (
    CompressionSettings,
    LoraStack,
    ModuleSample,
    assignment_errors,
    choose_settings,
    compress_module,
    jd_cluster,
    jd_diag,
    jd_full,
    residuals,
    svd_per_adapter,
    sweep,
    ties_merge,
)

F64 = torch.float64


def CS(**fields) -> CompressionSettings:
    """Resolved settings for the math functions: JD-Full, one cluster unless told otherwise."""
    return CompressionSettings(**{"clusters": 1, "sigma_kind": "full", **fields})


def random_stack(n, d_out, d_in, ranks, *, seed, shared=0, dtype=F64) -> LoraStack:
    """Random LoRAs; with ``shared`` > 0 they overlap in that many directions (like trained ones)."""
    gen = torch.Generator().manual_seed(seed)
    ranks = [ranks] * n if isinstance(ranks, int) else ranks
    common_a = torch.randn(shared, d_in, generator=gen, dtype=dtype)
    common_b = torch.randn(d_out, shared, generator=gen, dtype=dtype)
    factors = []
    for r in ranks:
        A = torch.randn(r, d_in, generator=gen, dtype=dtype)
        B = torch.randn(d_out, r, generator=gen, dtype=dtype)
        if shared:
            A = A + 2 * torch.randn(r, shared, generator=gen, dtype=dtype) @ common_a
            B = B + 2 * common_b @ torch.randn(shared, r, generator=gen, dtype=dtype)
        factors.append((A, B))
    scalings = torch.rand(n, generator=gen, dtype=dtype).add(0.5).tolist()
    return LoraStack.from_factors(factors, scalings, dtype=dtype)


def relative_dense_error(stack, U, V, sigma) -> float:
    dense = stack.dense()
    if sigma.dim() == 2:
        sigma = torch.diag_embed(sigma)
    if U.dim() == 2:
        recon = U @ sigma @ V.T
    else:
        recon = U @ sigma @ V.transpose(1, 2)
    return ((dense - recon).square().sum() / dense.square().sum()).item()


@pytest.mark.parametrize("solver", ["qr", "eigen"])
def test_lossless_when_rank_covers_stacked_factors(solver):
    stack = random_stack(4, 40, 36, [2, 3, 2, 3], seed=1)
    result = jd_full(stack, CS(rank=10, solver=solver, tol=1e-12, ftol=0, max_iter=200))
    assert result.rank == 10
    assert relative_dense_error(stack, result.U, result.V, result.sigma) < 1e-12
    # One dimension short of the stacked rank, random factors cannot be reconstructed (Prop. 1).
    short = jd_full(stack, CS(rank=9, solver=solver, tol=1e-12, ftol=0, max_iter=500))
    assert relative_dense_error(stack, short.U, short.V, short.sigma) > 1e-6


def test_rank_beyond_stacked_rank_is_clamped():
    stack = random_stack(2, 30, 20, [2, 3], seed=2)
    assert jd_full(stack, CS(rank=16)).rank == 5


def orthogonal_unit_stack(n, d, seed):
    """n unit-norm rank-1 LoRAs with pairwise orthogonal updates: tr(dW_i dW_j^T) = 0."""
    gen = torch.Generator().manual_seed(seed)
    P = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64)).Q
    Q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64)).Q
    pairs = torch.randperm(d * d, generator=gen)[:n]
    factors = [(Q[:, int(p) % d][None, :], P[:, int(p) // d][:, None]) for p in pairs]
    return LoraStack.from_factors(factors, dtype=F64)


@pytest.mark.parametrize("n,rank,seed", [(20, 2, 0), (30, 3, 1), (12, 4, 2), (8, 2, 3)])
def test_orthogonal_unit_loras_obey_corollary_1(n, rank, seed):
    stack = orthogonal_unit_stack(n, 16, seed)
    gram = stack.dense().reshape(n, -1) @ stack.dense().reshape(n, -1).T
    assert torch.allclose(gram, torch.eye(n, dtype=F64), atol=1e-12)
    result = jd_full(stack, CS(rank=rank, tol=1e-10, ftol=0, max_iter=500))
    error = (result.residuals.sum() / n).item()
    kept = result.sigma.square().sum().item()
    assert error >= 1 - min(rank**2 / n, 1) - 1e-9
    # The lower bound of Corollary 1 (sum ||Sigma_i||^2 >= 1) holds at the optimum; our local
    # optimum must reach it too.
    assert kept >= 1 - 1e-9
    assert error <= 1 - 1 / n + 1e-9


@pytest.mark.parametrize("seed", range(5))
def test_theorem_1_bounds_hold_on_random_inputs(seed):
    gen = torch.Generator().manual_seed(100 + seed)
    n, rank = int(torch.randint(3, 12, (1,), generator=gen)), int(torch.randint(2, 6, (1,), generator=gen))
    stack = random_stack(n, 24, 20, 3, seed=seed, shared=2 * (seed % 2))
    result = jd_full(stack, CS(rank=rank, tol=1e-10, ftol=0, max_iter=1000))
    dense = stack.dense()
    L = dense.reshape(n, -1).T
    sigma_L = torch.linalg.svdvals(L)
    sigma_sum = torch.linalg.svdvals(dense.sum(dim=0))
    kept = result.sigma.square().sum().item()
    # Theorem 1's lower bound, from Jensen's inequality on the mean of the U^T dW_i V: the mean carries
    # a 1/n that the statement drops (sum ||x_i||^2 >= ||sum x_i||^2 / n, not >= ||sum x_i||^2).
    lower = sigma_sum[:rank].square().sum().item() / n
    upper = sigma_L[: min(rank**2, n)].square().sum().item()
    assert lower * (1 - 1e-9) <= kept <= upper * (1 + 1e-9)
    # sum ||Sigma_i||^2 = sum ||U Sigma_i V^T||^2 for orthonormal U, V.
    recon = result.U @ result.sigma @ result.V.T
    assert math.isclose(kept, recon.square().sum().item(), rel_tol=1e-10)


@pytest.mark.parametrize("method", ["qr", "eigen", "diag"])
def test_single_adapter_is_its_truncated_svd_in_closed_form(method):
    """n = 1: the optimum of equation 7 is the truncated SVD (diagonal Sigma: JD-Diag's optimum too), with no
    iteration, whatever the settings' iteration budget."""
    stack = random_stack(1, 30, 25, 8, seed=4)
    dense = stack.dense()[0]
    W, S, Zh = torch.linalg.svd(dense)
    for rank in (1, 3, 5, 12):
        settings = CS(rank=rank, solver="qr" if method == "diag" else method, max_iter=1)
        result = jd_diag(stack, settings) if method == "diag" else jd_full(stack, settings)
        r = min(rank, 8)  # clamped to the adapter's rank
        sigma = result.sigma[0] if method != "diag" else torch.diag(result.sigma[0])
        assert result.U.shape == (30, r) and result.converged and len(result.history) == 1
        truncated = W[:, :r] @ torch.diag(S[:r]) @ Zh[:r]
        assert torch.allclose(result.U @ sigma @ result.V.T, truncated, atol=1e-10 * S[0].item())
        expected = (S[r:].square().sum() / S.square().sum()).item()
        assert math.isclose(result.history[-1], expected, rel_tol=1e-9, abs_tol=1e-12)
        assert torch.allclose(result.residuals, residuals(stack, result.U, result.V, result.sigma), atol=1e-12)


@pytest.mark.parametrize("method", ["qr", "eigen", "diag"])
def test_objective_never_increases_across_iterations(method):
    stack = random_stack(8, 48, 40, 4, seed=5, shared=2)
    if method == "diag":
        result = jd_diag(stack, CS(rank=6, tol=1e-12, ftol=0, max_iter=300))
    else:
        result = jd_full(stack, CS(rank=6, solver=method, tol=1e-12, ftol=0, max_iter=300))
    history = result.history
    assert len(history) > 5
    assert all(b <= a + 1e-12 for a, b in zip(history, history[1:])), history
    assert history[-1] < history[0]


@pytest.mark.parametrize("seed", range(3))
def test_jd_full_error_at_most_jd_diag_error(seed):
    stack = random_stack(10, 40, 32, 4, seed=seed, shared=3)
    for rank in (4, 8):
        full = jd_full(stack, CS(rank=rank, tol=1e-8, ftol=0, max_iter=500))
        diag = jd_diag(stack, CS(rank=rank, tol=1e-8, ftol=0, max_iter=500))
        assert full.residuals.sum() <= diag.residuals.sum() * (1 + 1e-9)


@pytest.mark.parametrize("sigma", ["full", "diag"])
def test_clustered_error_at_most_single_cluster_error(sigma):
    stack = random_stack(12, 40, 32, 4, seed=6, shared=2)
    single = jd_cluster(stack, CS(rank=6, clusters=1, sigma_kind=sigma, tol=1e-8, ftol=0, max_iter=300))
    for k in (2, 3, 5):
        clustered = jd_cluster(stack, CS(rank=6, clusters=k, sigma_kind=sigma, tol=1e-8, ftol=0, max_iter=300))
        assert clustered.U.shape[0] == k
        assert set(clustered.cluster.tolist()) == set(range(k)), "no cluster may be left empty"
        assert clustered.residuals.sum() <= single.residuals.sum() * (1 + 1e-9)
        assert all(b <= a * (1 + 1e-9) for a, b in zip(clustered.history, clustered.history[1:]))


@pytest.mark.parametrize("sigma", ["full", "diag"])
def test_as_many_clusters_as_adapters_is_per_adapter_svd(sigma):
    stack = random_stack(4, 20, 16, 5, seed=7)
    clustered = jd_cluster(stack, CS(rank=3, clusters=4, sigma_kind=sigma, tol=1e-12, ftol=0, max_iter=2000))
    svd = svd_per_adapter(stack, 3)
    assert torch.allclose(clustered.residuals, svd.residuals, rtol=1e-9)


@pytest.mark.parametrize("sigma", ["full", "diag"])
def test_factor_error_equals_dense_error(sigma):
    stack = random_stack(6, 18, 14, [2, 4, 3, 4, 1, 2], seed=8)
    result = jd_cluster(stack, CS(rank=3, clusters=2, sigma_kind=sigma, tol=1e-6))
    dense = stack.dense()
    sig = result.sigma if sigma == "full" else torch.diag_embed(result.sigma)
    U, V = result.U[result.cluster], result.V[result.cluster]
    recon = U @ sig @ V.transpose(1, 2)
    assert torch.allclose(result.residuals, (dense - recon).square().sum(dim=(1, 2)), rtol=1e-9, atol=1e-12)
    # residuals() holds for any U, V and Sigma, not only optimal ones.
    gen = torch.Generator().manual_seed(0)
    U, V, S = (torch.randn(18, 3, generator=gen, dtype=F64), torch.randn(14, 3, generator=gen, dtype=F64),
               torch.randn(6, 3, 3, generator=gen, dtype=F64))
    expected = (dense - U @ S @ V.T).square().sum(dim=(1, 2))
    assert torch.allclose(residuals(stack, U, V, S), expected, rtol=1e-9)


def test_assignment_errors_match_dense_projection():
    stack = random_stack(5, 16, 12, 3, seed=9)
    gen = torch.Generator().manual_seed(1)
    bases = [(torch.linalg.qr(torch.randn(16, 4, generator=gen, dtype=F64)).Q,
              torch.linalg.qr(torch.randn(12, 4, generator=gen, dtype=F64)).Q) for _ in range(3)]
    errors = assignment_errors(stack, bases, "full")
    dense = stack.dense()
    for j, (U, V) in enumerate(bases):
        proj = U @ (U.T @ dense @ V) @ V.T
        assert torch.allclose(errors[:, j], (dense - proj).square().sum(dim=(1, 2)), rtol=1e-9)


def test_normalization_folds_norms_and_scaling_into_sigma():
    stack = random_stack(6, 30, 24, 4, seed=10, shared=2)
    stack = stack.scaled(torch.tensor([1e-3, 1.0, 5.0, 0.2, 30.0, 1.0], dtype=F64))
    for normalize in (True, False):
        result = compress_module(stack, CS(rank=5, clusters=2, normalize=normalize, tol=1e-8, ftol=0))
        dense = stack.dense()
        recon = torch.stack([result.delta_weight(i) for i in range(stack.n)])
        assert torch.allclose(result.residuals, (dense - recon).square().sum(dim=(1, 2)), rtol=1e-8, atol=1e-20)
    normalized = compress_module(stack, CS(rank=5, clusters=1, normalize=True, tol=1e-8, ftol=0))
    pooled = compress_module(stack, CS(rank=5, clusters=1, normalize=False, tol=1e-8, ftol=0))
    # Each weighting wins on the error it optimizes.
    assert normalized.mean_adapter_error <= pooled.mean_adapter_error + 1e-9
    assert pooled.error <= normalized.error + 1e-9


def test_same_seed_gives_same_result_and_other_seed_may_differ():
    stack = random_stack(9, 32, 24, 4, seed=11, shared=1)
    a = compress_module(stack, CS(rank=4, clusters=3, seed=3))
    b = compress_module(stack, CS(rank=4, clusters=3, seed=3))
    assert torch.equal(a.U, b.U) and torch.equal(a.sigma, b.sigma) and torch.equal(a.cluster, b.cluster)


def test_float32_matches_float64_on_well_conditioned_input():
    stack64 = random_stack(6, 40, 32, 4, seed=12, shared=2)
    stack32 = LoraStack(stack64.A.float(), stack64.B.float())
    e64 = compress_module(stack64, CS(rank=6, clusters=1, tol=1e-6)).error
    e32 = compress_module(stack32, CS(rank=6, clusters=1, tol=1e-6)).error
    assert abs(e64 - e32) < 1e-4


def test_svd_baseline_matches_dense_svd():
    stack = random_stack(3, 22, 18, [6, 4, 5], seed=13)
    result = svd_per_adapter(stack, 3)
    for i, dW in enumerate(stack.dense()):
        S = torch.linalg.svdvals(dW)
        assert math.isclose(result.residuals[i].item(), S[3:].square().sum().item(), rel_tol=1e-9)
        recon = result.U[i] @ torch.diag(result.S[i]) @ result.V[i].T
        assert torch.allclose((dW - recon).square().sum(), result.residuals[i], rtol=1e-9)


def test_ties_merge_trims_elects_and_averages():
    dense_a = torch.tensor([[4.0, -1.0], [0.5, 2.0]], dtype=F64)
    dense_b = torch.tensor([[2.0, 3.0], [-0.1, -6.0]], dtype=F64)
    # Rank-2 factors of these 2 x 2 updates: B = dW, A = I.
    stack = LoraStack.from_factors([(torch.eye(2, dtype=F64), dense_a), (torch.eye(2, dtype=F64), dense_b)], dtype=F64)
    merged = ties_merge(stack, density=0.5).delta
    # Trim keeps the 2 largest entries of each: a -> [[4,0],[0,2]], b -> [[0,3],[0,-6]].
    # Elected signs: [[+,+],[0,-]]; disjoint means: [[4,3],[0,-6]].
    assert torch.equal(merged, torch.tensor([[4.0, 3.0], [0.0, -6.0]], dtype=F64))
    identical = LoraStack.from_factors([(torch.eye(2, dtype=F64), dense_a)] * 3, dtype=F64)
    result = ties_merge(identical, density=1.0, max_chunk_elements=2)
    assert torch.allclose(result.delta, dense_a) and result.residuals.abs().max() < 1e-24


def test_settings_round_trip_and_reject_bad_values_with_a_remedy():
    from jdlora.errors import SettingsError

    settings = CompressionSettings(rank=8, clusters=2, sigma_kind="diag", dtype=F64, target_error=0.1)
    assert CompressionSettings.from_dict(settings.to_dict()) == settings
    assert settings.to_dict()["dtype"] == "float64" and settings["dtype"] == "float64" and dict(settings)["rank"] == 8
    # The untyped dict of earlier manifests: "sigma" for the kind, keys since removed, dtype missing.
    old = {"rank": 5, "clusters": 1, "sigma": "diag", "solver": "qr", "source": "x"}
    assert CompressionSettings.from_dict(old) == CompressionSettings(rank=5, clusters=1, sigma_kind="diag")
    for bad in ({"rank": 0}, {"rank": -1}, {"rank": "16"}, {"clusters": 0}, {"sigma_kind": "dense"},
                {"dtype": torch.float16}, {"target_error": 0}, {"tol": -1.0}):
        with pytest.raises(SettingsError, match=next(iter(bad))):
            CompressionSettings(**bad)


def test_auto_choice_takes_the_cheapest_setting_whose_worst_adapter_meets_the_target():
    stack = random_stack(16, 32, 32, 4, seed=14, shared=2)
    ranks = [4] * 16
    grid = [(r, k) for r in (2, 4, 8, 16) for k in (1, 2, 4, 8, 16)]
    settings = CS(tol=1e-6)
    points = sweep(stack, ranks, grid, settings)
    target = sorted(p.quantile_error for p in points)[len(points) // 2]  # half the grid meets it
    resolved, choice, tried = choose_settings(ModuleSample.of(stack, ranks),
                                              settings.replace(rank="auto", clusters="auto", target_error=target))
    assert choice.met and (resolved.rank, resolved.clusters) in {(p.rank, p.clusters) for p in tried}
    chosen = next(p for p in tried if (p.rank, p.clusters) == (resolved.rank, resolved.clusters))
    assert chosen.quantile_error <= target
    # Nothing in the grid that meets the target is cheaper (the search may skip settings, not better ones).
    meeting = [p for p in points if p.quantile_error <= target and p.rank in (2, 4, 8, 16)]
    assert chosen.cost() <= min(p.cost() for p in meeting)
    assert "cheapest" in choice.reason and f"{target}" in choice.reason
    # The worst adapter, not the mean: the quantile error is the largest per-adapter error.
    assert all(p.quantile_error >= p.mean_adapter_error for p in tried)


def test_auto_choice_says_when_nothing_meets_the_target_and_what_it_would_take():
    stack = random_stack(8, 24, 24, 4, seed=3)  # unrelated adapters: nothing to share
    with pytest.warns(UserWarning, match="No setting storing fewer parameters") as record:
        resolved, choice, tried = choose_settings(ModuleSample.of(stack, [4] * 8),
                                                  CS(rank="auto", clusters="auto", target_error=1e-3))
    assert not choice.met and "uncompressed" in choice.reason and "target_error=" in str(record[0].message)
    assert all(p.saved_ratio > 0 for p in tried), "the search stays within the LoRAs' own parameter count"


def _cluster_reference(stack, rank, assignment, bases, **options):
    """The per-cluster loop of jd_cluster: one jd_full per cluster, started from its bases."""
    from jdlora.compress.jd import effective_rank

    results = []
    for j, (U, V) in enumerate(bases):
        sub = stack.subset((assignment == j).nonzero().flatten())
        init = (U, V) if effective_rank(sub, rank) == U.shape[1] else None
        results.append(jd_full(sub, CS(rank=rank, **options), init=init))
    return results


def test_batched_cluster_iterations_match_per_cluster_jd():
    from jdlora.compress.clustering import _jd_full_clusters

    # min(d) = 12 and r_max = 4: every cluster of 2+ adapters is solved in full coordinates by both paths.
    ranks = [4, 4, 3, 4, 2, 4, 4, 1, 4, 4, 3, 4, 4, 2, 4, 4]
    stack = random_stack(16, 14, 12, ranks, seed=21, shared=2)
    rank = 5
    single = jd_full(stack, CS(rank=rank, tol=1e-8, ftol=0, max_iter=300))
    # Uneven sizes (8, 4, 2, 1 adapters); cluster 3 holds one rank-3 adapter: stacked rank 3 < r.
    assignment = torch.tensor([0, 1, 0, 0, 1, 0, 2, 0, 0, 1, 3, 0, 1, 2, 0, 0])
    bases = [(single.U, single.V)] * 4
    options = dict(tol=1e-8, ftol=1e-12, max_iter=300)
    batched = _jd_full_clusters(stack, assignment, bases, CS(rank=rank, **options))
    reference = _cluster_reference(stack, rank, assignment, bases, **options)
    assert [r.rank for r in batched] == [r.rank for r in reference] == [5, 5, 5, 3]
    for b, r in zip(batched, reference):
        total = r.residuals.sum().clamp_min(1e-300)
        assert len(b.history) == len(r.history) and b.converged == r.converged
        assert torch.allclose(torch.tensor(b.history), torch.tensor(r.history), rtol=1e-9, atol=1e-12)
        assert math.isclose(b.residuals.sum().item(), r.residuals.sum().item(), rel_tol=1e-9, abs_tol=1e-12)
        assert torch.allclose(b.residuals, r.residuals, atol=1e-6 * total.item() + 1e-12)
        # Never worse than the start; the history never increases.
        assert b.history[-1] <= b.history[0] + 1e-12
        assert all(y <= x + 1e-12 for x, y in zip(b.history, b.history[1:]))
        assert torch.allclose(b.U.T @ b.U, torch.eye(b.rank, dtype=F64), atol=1e-10)
    # A cluster whose previous bases had a lower rank (it was tiny, now it has grown) restarts per cluster.
    grown = torch.tensor([0, 1, 0, 0, 1, 0, 2, 0, 0, 1, 3, 0, 1, 2, 3, 3])
    bases = [(b.U, b.V) for b in batched]
    again = _jd_full_clusters(stack, grown, bases, CS(rank=rank, **options))
    ref_again = _cluster_reference(stack, rank, grown, bases, **options)
    for b, r in zip(again, ref_again):
        assert math.isclose(b.residuals.sum().item(), r.residuals.sum().item(), rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_batched_clustered_jd_matches_per_cluster_path(seed):
    ranks = [4, 4, 3, 4, 2, 4, 4, 1, 4, 4, 3, 4, 4, 2]
    stack = random_stack(14, 14, 12, ranks, seed=seed, shared=2)
    single = jd_cluster(stack, CS(rank=5, clusters=1, tol=1e-8, ftol=0, max_iter=300))
    for k in (3, 6):
        loop = jd_cluster(stack, CS(rank=5, clusters=k, tol=1e-8, ftol=1e-12, max_iter=300, seed=seed), batched=False)
        joint = jd_cluster(stack, CS(rank=5, clusters=k, tol=1e-8, ftol=1e-12, max_iter=300, seed=seed), batched=True)
        assert torch.equal(loop.cluster, joint.cluster) and loop.rounds == joint.rounds
        assert set(joint.cluster.tolist()) == set(range(k))
        assert math.isclose(loop.residuals.sum().item(), joint.residuals.sum().item(), rel_tol=1e-9)
        assert torch.allclose(torch.tensor(loop.history), torch.tensor(joint.history), rtol=1e-9)
        assert joint.residuals.sum() <= single.residuals.sum() * (1 + 1e-9)
        assert all(b <= a * (1 + 1e-9) for a, b in zip(joint.history, joint.history[1:]))
        dense = stack.dense()
        U, V = joint.U[joint.cluster], joint.V[joint.cluster]
        recon = U @ joint.sigma @ V.transpose(1, 2)
        assert torch.allclose(joint.residuals, (dense - recon).square().sum(dim=(1, 2)), rtol=1e-8,
                              atol=1e-12 * dense.square().sum().item())


def test_batched_clusters_of_one_adapter_are_solved_in_closed_form():
    """Clusters of one adapter get their truncated SVD (what jd_full gives one adapter), not iterations: with
    one cluster per adapter (what the automatic settings choose for small collections) nothing iterates."""
    from jdlora.compress.clustering import _jd_full_clusters
    from jdlora.compress.jd import jd_one_adapter

    ranks = [4, 4, 3, 4, 2, 4, 4, 4]
    stack = random_stack(8, 14, 12, ranks, seed=23, shared=2)
    single = jd_full(stack, CS(rank=3, tol=1e-8, ftol=0, max_iter=300))
    options = dict(tol=1e-8, ftol=1e-12, max_iter=300)
    # Clusters 1, 2 and 4 hold one adapter each (adapter 4 has rank 2 < r: its own, lower rank).
    assignment = torch.tensor([0, 0, 1, 3, 4, 3, 2, 0])
    batched = _jd_full_clusters(stack, assignment, [(single.U, single.V)] * 5, CS(rank=3, **options))
    reference = _cluster_reference(stack, 3, assignment, [(single.U, single.V)] * 5, **options)
    for j, adapter in ((1, 2), (2, 6), (4, 4)):
        alone = jd_one_adapter(stack.subset(torch.tensor([adapter])), min(3, ranks[adapter]), "full")
        got = batched[j]
        assert got.converged and len(got.history) == 1 and got.rank == alone.rank
        assert torch.allclose(got.U @ got.sigma[0] @ got.V.T, alone.U @ alone.sigma[0] @ alone.V.T, atol=1e-12)
        assert math.isclose(got.residuals.item(), alone.residuals.item(), rel_tol=1e-9, abs_tol=1e-14)
        assert math.isclose(got.history[0], alone.history[0], rel_tol=1e-9, abs_tol=1e-14)
    for b, r in zip(batched, reference):
        assert math.isclose(b.residuals.sum().item(), r.residuals.sum().item(), rel_tol=1e-9, abs_tol=1e-12)
    # One cluster per adapter: every result in closed form, the same as the per-cluster loop's.
    each = _jd_full_clusters(stack, torch.arange(8), [(single.U, single.V)] * 8, CS(rank=3, **options))
    assert all(len(r.history) == 1 and r.converged for r in each)
    for i, r in enumerate(each):
        alone = jd_one_adapter(stack.subset(torch.tensor([i])), min(3, ranks[i]), "full")
        assert math.isclose(r.residuals.item(), alone.residuals.item(), rel_tol=1e-9, abs_tol=1e-14)
    loop = jd_cluster(stack, CS(rank=3, clusters=8, **options), batched=False)
    joint = jd_cluster(stack, CS(rank=3, clusters=8, **options), batched=True)
    assert torch.equal(loop.cluster, joint.cluster)
    assert math.isclose(loop.residuals.sum().item(), joint.residuals.sum().item(), rel_tol=1e-9)


def test_batched_clustered_jd_with_an_emptied_cluster():
    from jdlora.compress.clustering import _fill_empty_clusters, _jd_full_clusters

    stack = random_stack(12, 14, 12, 4, seed=22, shared=2)
    single = jd_full(stack, CS(rank=5, tol=1e-8, ftol=0, max_iter=300))
    options = dict(tol=1e-8, ftol=1e-12, max_iter=300)
    bases = [(single.U, single.V)] * 3
    first = _jd_full_clusters(stack, torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 2, 2]), bases, CS(rank=5, **options))
    bases = [(r.U, r.V) for r in first]
    # Reassignment emptied cluster 2: it is re-seeded with the worst-reconstructed adapter (one
    # rank-4 adapter: stacked rank 4 < r, solved per cluster), the other clusters jointly.
    emptied = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1])
    assignment = _fill_empty_clusters(emptied, 3, first, stack, bases, "full")
    assert torch.bincount(assignment, minlength=3).tolist()[2] == 1
    batched = _jd_full_clusters(stack, assignment, bases, CS(rank=5, **options))
    reference = _cluster_reference(stack, 5, assignment, bases, **options)
    assert [r.rank for r in batched] == [r.rank for r in reference] == [5, 5, 4]
    for b, r in zip(batched, reference):
        assert math.isclose(b.residuals.sum().item(), r.residuals.sum().item(), rel_tol=1e-9, abs_tol=1e-12)
        assert b.history[-1] <= b.history[0] + 1e-12


def test_synthetic_adapters_on_a_device_are_deterministic():
    from jdlora.synthetic import llama_modules, synthetic_adapters

    modules = llama_modules(1, 32, 16, ("q_proj",))
    module = next(iter(modules))
    default = synthetic_adapters(3, modules, rank=4)[2].read_module(module)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        first = synthetic_adapters(3, modules, rank=4, device=device)[2].read_module(module)
        second = synthetic_adapters(3, modules, rank=4, device=device)[2].read_module(module)
        assert all(t.device.type == device for t in first)
        assert all(torch.equal(x, y) for x, y in zip(first, second))
    cpu = synthetic_adapters(3, modules, rank=4, device="cpu")[2].read_module(module)
    assert all(torch.equal(x, y) for x, y in zip(default, cpu))


def test_cholesky_qr2_matches_householder_and_flags_breakdown():
    from jdlora.compress.jd import _cholesky_qr2, orthonormalize

    gen = torch.Generator().manual_seed(30)
    X = torch.randn(3, 50, 6, generator=gen, dtype=F64) @ torch.diag(torch.logspace(0, -4, 6, dtype=F64))
    Q, ok = _cholesky_qr2(X)
    assert ok.all()
    assert torch.allclose(Q.mT @ Q, torch.eye(6, dtype=F64).expand(3, 6, 6), atol=1e-12)
    H = torch.linalg.qr(X).Q
    assert torch.allclose(H @ (H.mT @ Q), Q, atol=1e-10)  # the same column space
    # Float32 with a condition number of 1e3 still gives orthonormal columns.
    Q32, ok32 = _cholesky_qr2(X[..., :4].float() @ torch.diag(torch.tensor([1.0, 1e-1, 1e-2, 1e-3])))
    assert ok32.all() and torch.allclose(Q32.mT @ Q32, torch.eye(4).expand(3, 4, 4), atol=1e-5)
    # A rank-deficient matrix (a repeated column) is flagged; orthonormalize falls back to Householder.
    bad = X.clone()
    bad[1, :, 5] = bad[1, :, 0]
    _, ok_bad = _cholesky_qr2(bad)
    assert ok_bad.tolist() == [True, False, True]
    Qb = orthonormalize(bad)
    assert torch.allclose(Qb.mT @ Qb, torch.eye(6, dtype=F64).expand(3, 6, 6), atol=1e-12)


@pytest.mark.parametrize("duplicated", [False, True])
def test_qr_iterations_with_cholesky_qr_match_householder(duplicated):
    from jdlora.compress.jd import _qr_iterations, range_init

    stack = random_stack(9, 30, 26, 3, seed=31, shared=2)
    if duplicated:  # stacked rank 3 behind 27 non-padding rows: every X of rank 3 < r, Cholesky breaks down
        stack = LoraStack(stack.A[:1].expand(9, -1, -1), Bt=stack.Bt[:1].expand(9, -1, -1))
    U, V = range_init(random_stack(9, 30, 26, 3, seed=32), 5)
    k = stack.n * stack.r_max
    runs = [
        _qr_iterations(stack.A.reshape(1, k, 26), stack.Bt.reshape(1, k, 30), 3, U[None], V[None],
                       stack.sq_norms()[None], tol=1e-10, ftol=0, max_iter=60, cholesky=cholesky)
        for cholesky in (False, True)
    ]
    assert len(runs[0].history[0]) == len(runs[1].history[0])
    assert torch.allclose(torch.tensor(runs[0].history[0]), torch.tensor(runs[1].history[0]), atol=1e-10)
    assert torch.allclose(runs[0].residuals, runs[1].residuals, atol=1e-10 * stack.sq_norms().sum().item())
    assert torch.isfinite(runs[1].U).all() and torch.isfinite(runs[1].sigma).all()


def test_warm_started_jd_reduces_to_the_span_after_probing():
    from jdlora.compress.jd import _jd_full_iterate

    # k = 6 * 2 = 12 <= d / 2: solved in the span, after a few iterations in the full coordinates.
    stack = random_stack(6, 40, 32, 2, seed=33, shared=1)
    gen = torch.Generator().manual_seed(3)
    init = (torch.linalg.qr(torch.randn(40, 4, generator=gen, dtype=F64)).Q,
            torch.linalg.qr(torch.randn(32, 4, generator=gen, dtype=F64)).Q)
    probed = jd_full(stack, CS(rank=4, tol=1e-12, ftol=0, max_iter=40), init=init)
    full = _jd_full_iterate(stack, 4, "qr", 1e-12, 0, 40, init)
    assert len(probed.history) == len(full.history)
    assert torch.allclose(torch.tensor(probed.history), torch.tensor(full.history), rtol=1e-9, atol=1e-12)
    assert relative_dense_error(stack, probed.U, probed.V, probed.sigma) == pytest.approx(probed.history[-1], abs=1e-9)


@pytest.mark.parametrize("sigma", ["full", "diag"])
def test_assignment_errors_in_chunks_match_per_cluster_errors(sigma, monkeypatch):
    import importlib

    from jdlora.compress import sigma_diag

    # `import jdlora.compress.clustering as ...` fails: the attribute jdlora.compress is the function.
    clustering = importlib.import_module("jdlora.compress.clustering")

    stack = random_stack(7, 16, 12, [3, 2, 3, 1, 3, 3, 2], seed=34)
    gen = torch.Generator().manual_seed(2)
    bases = [(torch.linalg.qr(torch.randn(16, r, generator=gen, dtype=F64)).Q,
              torch.linalg.qr(torch.randn(12, r, generator=gen, dtype=F64)).Q) for r in (4, 4, 2)]
    whole = assignment_errors(stack, bases, sigma)
    monkeypatch.setattr(clustering, "_CHUNK_ELEMENTS", 1)  # one adapter per chunk
    assert torch.allclose(assignment_errors(stack, bases, sigma), whole, rtol=1e-10, atol=1e-12)
    dense = stack.dense()
    for j, (U, V) in enumerate(bases):
        S = U.T @ dense @ V if sigma == "full" else torch.diag_embed(sigma_diag(stack, U, V))
        expected = (dense - U @ S @ V.T).square().sum(dim=(1, 2))
        assert torch.allclose(whole[:, j], expected, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("batched", [False, True])
def test_clustered_jd_with_settling_rounds_and_kept_last_moves(batched, monkeypatch):
    import importlib

    clustering = importlib.import_module("jdlora.compress.clustering")
    kept = []
    keep = clustering._keep_last_moves

    def spy(stack, result, new_assignment, sigma, total):
        kept.append(int((new_assignment != result.cluster).sum()))
        return keep(stack, result, new_assignment, sigma, total)

    monkeypatch.setattr(clustering, "_keep_last_moves", spy)
    # 60 adapters: settling rounds are on (settle_moves * n >= 1); stop_moves = 0.1 stops with up to
    # 6 adapters still moving, whose moves are kept.
    stack = random_stack(60, 24, 20, 3, seed=0, shared=3)
    single = jd_cluster(stack, CS(rank=4, clusters=1))
    exact = jd_cluster(stack, CS(rank=4, clusters=6), settle_factor=1, stop_moves=0, batched=batched)
    fast = jd_cluster(stack, CS(rank=4, clusters=6), stop_moves=0.1, batched=batched)
    assert kept[-1] > 0 and fast.history[1] != exact.history[1]  # both features were exercised
    assert fast.history[-1] <= exact.history[-1] * 1.05
    dense = stack.dense()
    for result in (exact, fast):
        assert set(result.cluster.tolist()) == set(range(6))
        assert result.residuals.sum() <= single.residuals.sum() * (1 + 1e-9)
        assert all(b <= a * (1 + 1e-9) for a, b in zip(result.history, result.history[1:]))
        U, V = result.U[result.cluster], result.V[result.cluster]
        recon = U @ result.sigma @ V.transpose(1, 2)
        errors = (dense - recon).square().sum(dim=(1, 2))
        assert torch.allclose(result.residuals, errors, rtol=1e-8, atol=1e-12 * dense.square().sum().item())
        assert result.history[-1] == pytest.approx((errors.sum() / dense.square().sum()).item(), rel=1e-9)
    # After the kept moves, every adapter sits in the cluster that reconstructs it best.
    best = assignment_errors(stack, list(zip(fast.U, fast.V)), "full").min(dim=1).values
    assert torch.allclose(fast.residuals, best, rtol=1e-8, atol=1e-12 * dense.square().sum().item())


def test_stack_caches_follow_subsets_and_scaling():
    stack = random_stack(5, 12, 10, [2, 3, 1, 3, 2], seed=36)
    norms, rows = stack.sq_norms(), stack.row_counts()
    assert rows.tolist() == [2, 3, 1, 3, 2]
    index = torch.tensor([4, 1, 2])
    sub = stack.subset(index)
    fresh = LoraStack(stack.A[index], Bt=stack.Bt[index])
    assert torch.allclose(sub.sq_norms(), fresh.sq_norms(), rtol=1e-12) and torch.equal(sub.row_counts(), rows[index])
    factors = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=F64)
    scaled = stack.scaled(factors)
    assert torch.allclose(scaled.sq_norms(), LoraStack(scaled.A, Bt=scaled.Bt).sq_norms(), rtol=1e-12)
    assert torch.allclose(norms * factors.square(), scaled.sq_norms())


def test_small_modules_compress_on_one_thread_and_the_thread_count_comes_back():
    from jdlora.compress.threads import SINGLE_THREAD_ELEMENTS, threads_for

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small = random_stack(4, 16, 16, 2, seed=0)
        with threads_for(small) as used:
            assert used == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        # Large enough products keep every thread (zero factors: nothing is computed here).
        d = SINGLE_THREAD_ELEMENTS // (2 * 16)
        large = LoraStack(torch.zeros(1, 16, d), Bt=torch.zeros(1, 16, d))
        with threads_for(large) as used:
            assert used == 2
        compress_module(small, CS(rank=2))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
