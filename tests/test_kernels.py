"""jdlora.kernels: the mixed-batch JD-LoRA forward, Triton kernels against the torch reference and a
dense float64 computation. Without CUDA the kernels run through Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py before triton is imported), on small shapes.

Every check draws fresh random inputs (no fixed seed): the kernels must compute the same function on
any valid input. The output is pre-filled with random values, and NaN in rows that must stay
untouched, so that rows written by mistake or left unwritten show.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest
import torch

from jdlora.kernels import JDBatch, jd_lora_forward, jd_lora_forward_reference, prepare_batch

BACKENDS = ["torch", "triton"]
ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
# Triton's interpreter mishandles bf16 (numpy has none): bf16 runs on CUDA only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])
DTYPE_IDS = ["fp32", "fp16"] + (["bf16"] if ON_CUDA else [])
# fp16/bf16 products are exact in fp32; the kernels round Sigma V^T x (float32) once to the input dtype
# before the expand, and y once at the end. Relative Frobenius error of the update y - y0 vs float64:
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _backend(backend: str):
    if backend == "triton":
        pytest.importorskip("triton")
        if not ON_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set by conftest.py)")
    return backend


def make_problem(
    T: int,
    d_in: int,
    d_out: int,
    r: int,
    C: int,
    n: int,
    *,
    diag: bool = False,
    dtype: torch.dtype = torch.float32,
    p_no_adapter: float = 0.2,
    p_no_cluster: float = 0.15,
    runs: bool = False,
    one_adapter: bool = False,
):
    """Random inputs: U, V, Sigma scaled so every update is O(1); token_adapter with -1s.

    ``runs=True`` draws prefill-like batches (runs of tokens per adapter, uneven lengths), else each
    token draws its adapter independently (decode-like).
    """
    dev = DEVICE
    x = torch.randn(T, d_in, device=dev).to(dtype)
    U = (torch.randn(C, d_out, r, device=dev) / r**0.5).to(dtype)
    V = (torch.randn(C, d_in, r, device=dev) / d_in**0.5).to(dtype)
    shape = (n, r) if diag else (n, r, r)
    sigma = (torch.randn(*shape, device=dev) / (1 if diag else r**0.5)).to(dtype)
    cluster_of = torch.randint(0, C, (n,), device=dev)
    cluster_of[torch.rand(n, device=dev) < p_no_cluster] = -1
    if runs:
        ids = []
        while len(ids) < T:
            ids += [random.randrange(-1, n) if random.random() < p_no_adapter else random.randrange(n)] * random.randint(1, max(1, T // 3))
        token_adapter = torch.tensor(ids[:T], device=dev, dtype=torch.int64)
    else:
        token_adapter = torch.randint(0, n, (T,), device=dev)
        token_adapter[torch.rand(T, device=dev) < p_no_adapter] = -1
    if one_adapter:
        token_adapter = torch.full((T,), random.randrange(n), device=dev)
    return x, U, V, sigma, cluster_of, token_adapter


def dense_float64(y0, x, U, V, sigma, cluster_of, token_adapter, scale):
    """y0 + scale * dW_a x per token, with dW_a = U_c Sigma_a V_c^T formed densely in float64."""
    S = sigma.double()
    if S.dim() == 2:
        S = torch.diag_embed(S)
    c = cluster_of.long()
    n = c.shape[0]
    dW = torch.zeros(n, U.shape[1], V.shape[1], dtype=torch.float64, device=x.device)
    has = c >= 0
    cs = c.clamp(min=0)
    dW[has] = (U.double()[cs] @ S @ V.double()[cs].transpose(1, 2))[has]
    a = token_adapter.long()
    out = y0.double().clone()
    active = a >= 0
    upd = torch.einsum("toi,ti->to", dW[a.clamp(min=0)], x.double())
    out[active] += scale * upd[active]
    return out


def poisoned_output(T, d_out, dtype, cluster_of, token_adapter):
    """Random y0, with NaN in the rows that must stay untouched (no adapter, or no cluster here)."""
    y0 = torch.randn(T, d_out, device=DEVICE).to(dtype)
    a = token_adapter.long()
    untouched = (a < 0) | (cluster_of.long()[a.clamp(min=0)] < 0) if cluster_of.numel() else a >= -1
    y0[untouched] = float("nan")
    return y0, untouched


def rel_err(y, ref, y0):
    """||(y - y0) - (ref - y0)|| / ||ref - y0|| on the rows that get an update."""
    d, dref = y.double() - y0.double(), ref - y0.double()
    ok = ~torch.isnan(y0.double()).any(1)
    num, den = (d - dref)[ok].norm(), dref[ok].norm()
    return (num / den.clamp(min=1e-30)).item()


def check(backend, *, T, d_in, d_out, r, C, n, diag, dtype, runs=False, scale=None, **kw):
    x, U, V, sigma, cluster_of, token_adapter = make_problem(T, d_in, d_out, r, C, n, diag=diag, dtype=dtype, runs=runs, **kw)
    scale = random.uniform(0.5, 2.0) if scale is None else scale
    y0, untouched = poisoned_output(T, d_out, dtype, cluster_of, token_adapter)
    y = y0.clone()
    batch = prepare_batch(token_adapter)
    out = jd_lora_forward(y, x, U, V, sigma, cluster_of, batch, scale=scale, backend=backend)
    assert out is y
    # untouched rows keep their exact bits (NaN poison stays NaN, nothing else becomes NaN)
    assert torch.isnan(y[untouched]).all()
    assert not torch.isnan(y[~untouched]).any()
    ref = dense_float64(y0, x, U, V, sigma, cluster_of, token_adapter, scale)
    if (~untouched).any():
        err = rel_err(y, ref, y0)
        assert err < TOL[dtype], f"{backend} {dtype} rel err {err:.2e} vs float64 (T={T} r={r} C={C} n={n} diag={diag})"
    if backend == "triton":  # the kernels against the reference that defines the numbers
        y_ref = jd_lora_forward_reference(y0.clone(), x, U, V, sigma, cluster_of, token_adapter, scale=scale)
        tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
        if (~untouched).any():
            assert rel_err(y, y_ref.double(), y0) < tol
        torch.testing.assert_close(y[untouched], y_ref[untouched], equal_nan=True, rtol=0, atol=0)
    return batch


# ---------------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("diag", [False, True], ids=["full", "diag"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_batches_match_dense_float64(backend, diag, dtype):
    """One token per request, many distinct adapters, random clusters and ranks."""
    _backend(backend)
    for _ in range(2):
        r = random.choice([8, 16, 24, 32, 64])
        check(backend, T=random.randint(2, 40), d_in=random.choice([32, 48, 96]), d_out=random.choice([16, 40, 64]),
              r=r, C=random.randint(1, 8), n=random.randint(1, 64), diag=diag, dtype=dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("diag", [False, True], ids=["full", "diag"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_prefill_runs_of_uneven_length_match_dense_float64(backend, diag, dtype):
    """Long uneven runs of tokens per adapter (blocks of one adapter and blocks straddling two)."""
    _backend(backend)
    r = random.choice([8, 16, 40, 64])
    check(backend, T=random.randint(40, 90), d_in=random.choice([32, 64]), d_out=random.choice([24, 48]),
          r=r, C=random.randint(1, 4), n=random.randint(2, 12), diag=diag, dtype=dtype, runs=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("diag", [False, True], ids=["full", "diag"])
def test_one_adapter_for_the_whole_batch(backend, diag):
    """Every token block holds one adapter (the one-dot Sigma path of the kernels)."""
    _backend(backend)
    check(backend, T=random.randint(33, 80), d_in=64, d_out=32, r=random.choice([16, 32]), C=3, n=5, diag=diag,
          dtype=torch.float32, p_no_adapter=0, p_no_cluster=0, runs=True, one_adapter=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token(backend):
    _backend(backend)
    check(backend, T=1, d_in=32, d_out=16, r=16, C=2, n=3, diag=False, dtype=torch.float32, p_no_adapter=0, p_no_cluster=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_leaves_y_alone(backend):
    _backend(backend)
    x, U, V, sigma, cluster_of, _ = make_problem(4, 32, 16, 16, 2, 5)
    y = torch.empty(0, 16, device=DEVICE)
    ta = torch.empty(0, dtype=torch.int64, device=DEVICE)
    assert jd_lora_forward(y, x[:0], U, V, sigma, cluster_of, ta, backend=backend).shape == (0, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tokens_without_adapter_or_cluster_keep_y_bits(backend):
    """Every token is -1 or points at an adapter with cluster -1: y is bit-for-bit unchanged."""
    _backend(backend)
    x, U, V, sigma, _, _ = make_problem(12, 32, 16, 16, 2, 4)
    cluster_of = torch.tensor([-1, -1, 0, 1], device=DEVICE)
    ta = torch.tensor([-1, 0, 1, -1, 0, 0, 1, 1, -1, 0, 1, -1], device=DEVICE)
    y0 = torch.randn(12, 16, device=DEVICE)
    y = y0.clone()
    jd_lora_forward(y, x, U, V, sigma, cluster_of, ta, backend=backend)
    assert torch.equal(y, y0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_batch_serves_layers_with_different_clusterings(backend):
    """prepare_batch once, then modules with their own ranks, cluster counts and cluster_of."""
    _backend(backend)
    n, T = 20, 29  # two token blocks, split over d_in: the scratch path runs
    ta = torch.randint(-1, n, (T,), device=DEVICE)
    batch = prepare_batch(ta)
    for r, C, diag in [(16, 1, False), (32, 5, True), (8, 3, False), (64, 2, False), (16, 8, False)]:
        x, U, V, sigma, cluster_of, _ = make_problem(T, 32, 24, r, C, n, diag=diag)
        y0 = torch.randn(T, 24, device=DEVICE)
        y = jd_lora_forward(y0.clone(), x, U, V, sigma, cluster_of, batch, backend=backend)
        ref = dense_float64(y0, x, U, V, sigma, cluster_of, ta, 1.0)
        assert rel_err(y, ref, y0) < TOL[torch.float32]
    if backend == "triton":  # the shared scratch is left zeroed for the next layer
        for h, _ in batch._scratch.values():
            assert not h.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("runs", [False, True], ids=["decode", "prefill"])
def test_a_few_adapters_among_many_clusters(backend, runs):
    """One cluster per adapter among hundreds (multi-LoRA slots; the automatic settings' per-adapter clusters):
    a block's few adapters sit far apart in cluster order, and the kernels visit only the clusters present."""
    _backend(backend)
    check(backend, T=60 if runs else 24, d_in=32, d_out=24, r=8, C=300, n=300, diag=False, dtype=torch.float32,
          runs=runs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Strided views (transposed bases, every other row/column) give the contiguous result."""
    _backend(backend)
    T, d_in, d_out, r, C, n = 19, 32, 24, 16, 3, 7
    x, U, V, sigma, cluster_of, ta = make_problem(T, d_in, d_out, r, C, n)
    xs = torch.randn(2 * T, 2 * d_in, device=DEVICE)[::2, ::2]
    xs.copy_(x)
    Us = torch.randn(C, r, d_out, device=DEVICE).transpose(1, 2)
    Us.copy_(U)
    Vs = torch.randn(C, r, d_in, device=DEVICE).transpose(1, 2)
    Vs.copy_(V)
    Ss = torch.randn(n, r, r, device=DEVICE).transpose(1, 2)
    Ss.copy_(sigma)
    y0 = torch.randn(T, d_out, device=DEVICE)
    big = torch.randn(T, 3 * d_out, device=DEVICE)
    ys = big[:, d_out : 2 * d_out]
    ys.copy_(y0)
    jd_lora_forward(ys, xs, Us, Vs, Ss, cluster_of, ta, backend=backend)
    ref = jd_lora_forward_reference(y0.clone(), x, U, V, sigma, cluster_of, ta)
    torch.testing.assert_close(ys, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(big[:, :d_out].isnan(), torch.zeros_like(big[:, :d_out], dtype=torch.bool))


def _named_configs():
    from jdlora.kernels import launch as L

    gpu = lambda c: type(c)(**{**c.__dict__, "programs": 8})  # noqa: E731
    return {
        "interpret-decode": (L.SHRINK_INTERPRET, L.SIGMA_INTERPRET, L.EXPAND_INTERPRET),
        "interpret-prefill": (L.SHRINK_INTERPRET_PREFILL, L.SIGMA_INTERPRET_PREFILL, L.EXPAND_INTERPRET),
        "gpu-decode": (gpu(L.SHRINK_DECODE), L.SIGMA_DECODE, L.EXPAND_DECODE),
        "gpu-prefill": (gpu(L.SHRINK_PREFILL), L.SIGMA_PREFILL, L.EXPAND_PREFILL),
    }


@pytest.mark.parametrize("name", ["interpret-decode", "interpret-prefill", "gpu-decode", "gpu-prefill"])
@pytest.mark.parametrize("diag", [False, True], ids=["full", "diag"])
def test_every_named_configuration_matches_the_reference(name, diag):
    """Each configuration, on decode-like and run-like batches (split and unsplit d_in, one and many
    adapters per block), against the reference that defines the numbers."""
    _backend("triton")
    from jdlora.kernels.launch import jd_lora_forward_triton

    configs = _named_configs()[name]
    for runs in (False, True):
        T = random.randint(20, 70)
        r = random.choice([8, 16, 48])
        x, U, V, sigma, cluster_of, ta = make_problem(T, 160, 72, r, random.randint(1, 4), 9, diag=diag, runs=runs)
        y0, untouched = poisoned_output(T, 72, torch.float32, cluster_of, ta)
        batch = prepare_batch(ta)
        y = jd_lora_forward_triton(y0.clone(), x, U, V, sigma, cluster_of, batch, scale=0.7, configs=configs)
        ref = jd_lora_forward_reference(y0.clone(), x, U, V, sigma, cluster_of, ta, scale=0.7)
        torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-5, equal_nan=True)
        for h, _ in batch._scratch.values():
            assert not h.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["interpret-decode", "interpret-prefill", "gpu-decode", "gpu-prefill"])
def test_a_batch_of_rows_equals_the_same_batch_given_per_token(backend, name):
    """One sort of the rows serves any tokens_per_row (prefill and decode of one generate call): the
    kernels find token m % S of row order[m // S], the reference repeats each row's adapter."""
    _backend(backend)
    rows, S = random.randint(2, 9), random.choice([2, 5, 8])
    T = rows * S
    x, U, V, sigma, cluster_of, _ = make_problem(T, 160, 72, 16, random.randint(1, 3), 7, diag=random.random() < 0.5)
    row_adapter = torch.randint(-1, 7, (rows,), device=DEVICE)
    token_adapter = row_adapter.repeat_interleave(S)
    y0, _ = poisoned_output(T, 72, torch.float32, cluster_of, token_adapter)
    per_row = prepare_batch(row_adapter).with_tokens_per_row(S)
    assert per_row.num_tokens == T and torch.equal(per_row.token_adapter, token_adapter.to(torch.int32))
    ref = jd_lora_forward_reference(y0.clone(), x, U, V, sigma, cluster_of, token_adapter, scale=0.7)
    if backend == "triton":
        from jdlora.kernels.launch import jd_lora_forward_triton

        y = jd_lora_forward_triton(y0.clone(), x, U, V, sigma, cluster_of, per_row, scale=0.7,
                                   configs=_named_configs()[name])
    else:
        y = jd_lora_forward(y0.clone(), x, U, V, sigma, cluster_of, per_row, scale=0.7, backend=backend)
    torch.testing.assert_close(y, ref, rtol=2e-5, atol=2e-5, equal_nan=True)


def test_prepare_batch_groups_tokens_by_adapter_stably_with_unadapted_tokens_last():
    ta = torch.tensor([3, -1, 0, 3, 2, -1, 0, 3], device=DEVICE)
    b = prepare_batch(ta)
    assert isinstance(b, JDBatch) and b.num_tokens == 8
    assert b.order.tolist() == [2, 6, 4, 0, 3, 7, 1, 5]
    assert b.sorted_adapter.tolist() == [0, 0, 2, 3, 3, 3, -1, -1]
    assert b.order.dtype == torch.int32 and b.sorted_adapter.dtype == torch.int32


def test_bad_shapes_are_rejected_with_the_offending_shape():
    x, U, V, sigma, cluster_of, ta = make_problem(5, 32, 16, 16, 2, 4)
    y = torch.zeros(5, 16, device=DEVICE)
    with pytest.raises(ValueError, match="V must be"):
        jd_lora_forward(y, x, U, V[:, :8], sigma, cluster_of, ta)
    with pytest.raises(ValueError, match="sigma must be"):
        jd_lora_forward(y, x, U, V, sigma[:, :4], cluster_of, ta)
    with pytest.raises(ValueError, match="share one dtype"):
        jd_lora_forward(y, x.half(), U, V, sigma, cluster_of, ta)
    with pytest.raises(ValueError, match="tokens"):
        jd_lora_forward(y, x, U, V, sigma, cluster_of, ta[:3])


def test_every_gpu_configuration_compiles_for_hopper_without_a_gpu():
    """The interpreter runs kernels that a GPU compiler may refuse; Triton's compiler and ptxas (in the triton
    wheel) build every configuration the GPU path launches into a cubin for compute capability 9.0 (H100/H200)."""
    triton = pytest.importorskip("triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"this triton has no ptxas ({ptxas}): nothing to compile a cubin with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter replaces the kernels
    script = os.path.join(os.path.dirname(__file__), "compile_kernels.py")
    done = subprocess.run([sys.executable, script, "90"], env=env, capture_output=True, text=True, timeout=900)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, "\n".join(lines[-3:]) + done.stderr[-2000:]
    compiled = [line for line in lines if line.startswith("ok sm_90 ")]
    # shrink and siblings' shrink per regime, dtype, cluster flag and split; expand and siblings' expand per regime,
    # dtype and flag; Sigma and siblings' Sigma per regime and variant
    assert len(compiled) == 2 * (2 * 2 * (2 * 2 + 2)) + 2 * 5 * 2, lines


def test_import_jdlora_does_not_import_triton():
    code = "import sys, jdlora, jdlora.kernels; assert 'triton' not in sys.modules, 'triton imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ GPU only (H200): real sizes, graphs


def factored_float64(y0, x, U, V, sigma, cluster_of, token_adapter, scale):
    """The update in float64 through the factors (a dense dW per adapter is too big at d = 4096)."""
    from jdlora.kernels.reference import jd_lora_delta_reference

    delta, active = jd_lora_delta_reference(x.double(), U.double(), V.double(), sigma.double(), cluster_of, token_adapter)
    return torch.where(active[:, None], y0.double() + scale * delta.double(), y0.double())


@pytest.mark.skipif(not ON_CUDA, reason="real sizes need the GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_real_sizes_match_float64_on_gpu(dtype):
    """d 4096 (d_out 4096 and 1024), ranks 16..128, up to 1024 adapters, 1..4096 tokens, full and diag."""
    from jdlora.kernels.reference import jd_lora_delta_reference  # noqa: F401

    bound = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5}[dtype]
    cases = [  # T, d_out, r, C, n, diag, runs
        (1, 4096, 16, 1, 1, False, False),
        (7, 1024, 128, 4, 1024, False, False),
        (64, 4096, 64, 8, 64, False, False),
        (64, 4096, 64, 1, 64, True, False),
        (256, 1024, 32, 3, 256, False, False),
        (300, 4096, 128, 8, 1024, True, False),
        (1024, 4096, 64, 8, 64, False, True),
        (4096, 4096, 16, 2, 256, False, True),
        (4096, 1024, 128, 1, 8, False, True),
    ]
    for T, d_out, r, C, n, diag, runs in cases:
        x, U, V, sigma, cluster_of, ta = make_problem(T, 4096, d_out, r, C, n, diag=diag, dtype=dtype, runs=runs)
        y0, untouched = poisoned_output(T, d_out, dtype, cluster_of, ta)
        y = jd_lora_forward(y0.clone(), x, U, V, sigma, cluster_of, ta, scale=0.5, backend="triton")
        ref = factored_float64(y0, x, U, V, sigma, cluster_of, ta, 0.5)
        assert torch.isnan(y[untouched]).all() and not torch.isnan(y[~untouched]).any()
        err = rel_err(y, ref, y0)
        assert err < bound, f"{dtype} T={T} d_out={d_out} r={r} C={C} n={n} diag={diag}: rel err {err:.2e}"
        y_ref = jd_lora_forward_reference(y0.clone(), x, U, V, sigma, cluster_of, ta, scale=0.5)
        assert rel_err(y, y_ref.double(), y0) < bound


def captured(forward) -> "torch.cuda.CUDAGraph":
    """``forward()`` run once on a side stream (compiles and warms up), then captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        forward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        forward()
    return g


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need the GPU")
@pytest.mark.parametrize("T", [1, 64, 1024])
def test_cuda_graph_capture_and_replay_with_new_adapters(T):
    """prepare_batch + two layers captured once; replays with fresh token_adapter and x match the reference."""
    n, d = 300, 4096
    ta_static = torch.randint(-1, n, (T,), device="cuda")
    x_static = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    layers = []
    for r, C, diag, d_out in [(64, 8, False, 4096), (16, 1, True, 1024)]:
        _, U, V, sigma, cluster_of, _ = make_problem(1, d, d_out, r, C, n, diag=diag, dtype=torch.bfloat16)
        layers.append((U, V, sigma, cluster_of, torch.randn(T, d_out, device="cuda", dtype=torch.bfloat16)))
    y_static = [torch.empty_like(l[4]) for l in layers]

    def forward():
        batch = prepare_batch(ta_static)
        for (U, V, sigma, cluster_of, y0), y in zip(layers, y_static):
            y.copy_(y0)
            jd_lora_forward(y, x_static, U, V, sigma, cluster_of, batch)

    g = captured(forward)
    for _ in range(3):
        ta_static.copy_(torch.randint(-1, n, (T,), device="cuda"))
        x_static.copy_(torch.randn(T, d, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        for (U, V, sigma, cluster_of, y0), y in zip(layers, y_static):
            ref = factored_float64(y0, x_static, U, V, sigma, cluster_of, ta_static, 1.0)
            assert rel_err(y, ref, y0) < 1e-2


def test_reference_keeps_its_precision_under_autocast_and_in_float64():
    """Called from an autocast region (PEFT layers under torch.autocast) or with float64 inputs."""
    gen = torch.Generator().manual_seed(123)
    T, d_in, d_out, r, C, n = 9, 24, 20, 8, 2, 5
    x = torch.randn(T, d_in, generator=gen, dtype=torch.float64)
    U = torch.randn(C, d_out, r, generator=gen, dtype=torch.float64)
    V = torch.randn(C, d_in, r, generator=gen, dtype=torch.float64)
    sigma = torch.randn(n, r, r, generator=gen, dtype=torch.float64)
    cluster_of = torch.tensor([0, 1, 1, -1, 0])
    ta = torch.tensor([0, 1, 2, 3, 4, -1, 4, 0, 2])
    y64 = jd_lora_forward(torch.zeros(T, d_out, dtype=torch.float64), x, U, V, sigma, cluster_of, ta)
    dense = torch.zeros(T, d_out, dtype=torch.float64)
    for t, a in enumerate(ta.tolist()):
        if a >= 0 and cluster_of[a] >= 0:
            c = int(cluster_of[a])
            dense[t] = U[c] @ sigma[a] @ V[c].T @ x[t]
    assert torch.allclose(y64, dense, rtol=1e-12, atol=1e-12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32 = jd_lora_forward(torch.zeros(T, d_out), x.float(), U.float(), V.float(), sigma.float(), cluster_of, ta)
    assert y32.dtype == torch.float32 and torch.allclose(y32.double(), dense, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="fp64: torch backend only"):
        jd_lora_forward(torch.zeros(T, d_out, dtype=torch.float64), x, U, V, sigma, cluster_of, ta, backend="triton")


# ------------------------------------------------------------------------------- jd_lora_linear


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("diag", [False, True], ids=["full", "diag"])
@pytest.mark.parametrize("T", [1, 13, 40])
def test_linear_is_the_base_layer_plus_the_update(backend, diag, T):
    """jd_lora_linear(x, W, b, ...) == x W^T + b + the per-token JD update (dense float64)."""
    from jdlora.kernels import jd_lora_linear

    _backend(backend)
    d_in, d_out, r, C, n = 48, 40, 8, 3, 7
    x, U, V, sigma, cluster_of, ta = make_problem(T, d_in, d_out, r, C, n, diag=diag, runs=T > 32)
    W = torch.randn(d_out, d_in, device=DEVICE) / d_in**0.5
    b = torch.randn(d_out, device=DEVICE)
    y = jd_lora_linear(x, W, b, U, V, sigma, cluster_of, prepare_batch(ta), scale=0.7, backend=backend)
    base = (x.double() @ W.double().t() + b.double()).to(x.dtype)
    ref = dense_float64(base, x, U, V, sigma, cluster_of, ta, 0.7)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_linear_rejects_a_weight_that_does_not_match():
    from jdlora.kernels import jd_lora_linear

    x, U, V, sigma, cluster_of, ta = make_problem(4, 16, 12, 4, 1, 3)
    with pytest.raises(ValueError, match=r"weight must be \[d_out=12, d_in=16\].*got \(12, 15\)"):
        jd_lora_linear(x, torch.zeros(12, 15, device=DEVICE), None, U, V, sigma, cluster_of, ta)


@pytest.mark.skipif(not ON_CUDA, reason="streams and CUDA graphs need the GPU")
@pytest.mark.parametrize("T", [1, 64, 1024])
def test_linear_overlapped_on_a_side_stream_matches_serial_eager_and_in_a_graph(T):
    """The side-stream branch gives the serial result, eagerly and captured with replays on new inputs."""
    from jdlora.kernels import jd_lora_linear

    n, d, d_out = 300, 4096, 1024
    _, U, V, sigma, cluster_of, _ = make_problem(1, d, d_out, 64, 8, n, dtype=torch.bfloat16)
    W = (torch.randn(d_out, d, device="cuda") / d**0.5).to(torch.bfloat16)
    ta_static = torch.randint(-1, n, (T,), device="cuda")
    x_static = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    y_static = torch.empty(T, d_out, device="cuda", dtype=torch.bfloat16)

    def forward():
        batch = prepare_batch(ta_static)
        y_static.copy_(jd_lora_linear(x_static, W, None, U, V, sigma, cluster_of, batch, overlap=True))

    forward()
    serial = jd_lora_linear(x_static, W, None, U, V, sigma, cluster_of, prepare_batch(ta_static), overlap=False)
    base = torch.nn.functional.linear(x_static, W)
    assert rel_err(y_static, serial.double(), base) < 1e-2  # split-K atomics: sums in any order
    g = captured(forward)
    for _ in range(3):
        ta_static.copy_(torch.randint(-1, n, (T,), device="cuda"))
        x_static.copy_(torch.randn(T, d, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        base = torch.nn.functional.linear(x_static, W)
        ref = factored_float64(base, x_static, U, V, sigma, cluster_of, ta_static, 1.0)
        assert rel_err(y_static, ref, base) < 1e-2


# ----- siblings: one shrink, one Sigma and one expand launch for modules that read the same x -------------


def _siblings(T, d_in, r, n, clusters, *, diag, dtype, runs=False):
    """Sibling modules (own U, V, Sigma, cluster_of; one rank) over one x and one batch of adapters:
    ``(x, the prepared batch, [(U, V, sigma, cluster_of) per sibling])``."""
    problems = [make_problem(T, d_in, 8 + 8 * s, r, C, n, diag=diag, dtype=dtype, runs=runs)
                for s, C in enumerate(clusters)]
    x, ta = problems[0][0], problems[0][5]
    return x, prepare_batch(ta), [p[1:5] for p in problems]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("diag", [False, True], ids=["full", "diag"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T,tokens_per_row", [(7, 1), (40, 4)], ids=["decode", "prefill-rows"])
@pytest.mark.parametrize("expands", ["each", "together"])
def test_siblings_shrunk_together_equal_each_forward_alone(backend, diag, dtype, T, tokens_per_row, expands):
    from jdlora.kernels import (
        expand_siblings_fusable, jd_lora_expand, jd_lora_expand_siblings, jd_lora_shrink_siblings, siblings_fusable,
    )

    _backend(backend)
    x, _, mods = _siblings(T, 32, 16, 6, (1, 3, 2), diag=diag, dtype=dtype)  # d_out 8, 16, 24: 1, 1 and 2 tiles
    batch = prepare_batch(torch.randint(-1, 6, (T // tokens_per_row,), device=DEVICE), tokens_per_row=tokens_per_row)
    Us, Vs, sigmas, cluster_ofs = zip(*mods)
    assert siblings_fusable(Vs, sigmas, cluster_ofs)
    y0 = [torch.randn(T, U.shape[1], device=DEVICE).to(dtype) for U in Us]
    alone = [jd_lora_forward(y.clone(), x, U, V, s, c, batch, scale=0.5, backend=backend)
             for y, (U, V, s, c) in zip(y0, mods)]
    for _ in range(2):  # on CUDA the second call launches directly (jdlora.kernels.fast_launch)
        ys = [y.clone() for y in y0]
        shrunk = jd_lora_shrink_siblings(x, Vs, sigmas, cluster_ofs, batch, backend=backend)
        if expands == "together":
            assert expand_siblings_fusable(ys, Us)
            jd_lora_expand_siblings(ys, Us, cluster_ofs, shrunk, scale=0.5)
        for i, (y, (U, V, s, c)) in enumerate(zip(ys, mods)):
            if expands == "each":
                assert jd_lora_expand(y, U, c, shrunk, i, scale=0.5) is y
            if ON_CUDA and backend == "triton":  # split-K sums meet by atomic adds, in any order
                tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]  # an ulp or two
                torch.testing.assert_close(y, alone[i], rtol=tol, atol=tol)
            else:
                assert torch.equal(y, alone[i]), f"sibling {i}"
    if backend == "triton":  # the siblings' scratch is left zeroed, like the per-layer one
        for h, _ in batch._scratch.values():
            assert not h.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_siblings_expanded_together_and_outputs_of_other_strides_each_alone(backend):
    from jdlora.kernels import expand_siblings_fusable, jd_lora_expand_siblings, jd_lora_shrink_siblings

    _backend(backend)
    x, batch, mods = _siblings(9, 32, 16, 5, (2, 1), diag=False, dtype=torch.float32)
    Us, Vs, sigmas, cluster_ofs = zip(*mods)
    alone = [jd_lora_forward(torch.zeros(9, U.shape[1], device=DEVICE), x, U, V, s, c, batch, backend=backend)
             for U, V, s, c in mods]
    ys = [torch.zeros(9, U.shape[1], device=DEVICE) for U in Us]
    jd_lora_expand_siblings(ys, Us, cluster_ofs, jd_lora_shrink_siblings(x, Vs, sigmas, cluster_ofs, batch, backend=backend))
    for y, ref in zip(ys, alone):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    # A column-major output cannot share the launch: each sibling runs its own expand, same numbers.
    ys = [torch.zeros(9, Us[0].shape[1], device=DEVICE), torch.zeros(Us[1].shape[1], 9, device=DEVICE).T]
    assert not expand_siblings_fusable(ys, Us)
    jd_lora_expand_siblings(ys, Us, cluster_ofs, jd_lora_shrink_siblings(x, Vs, sigmas, cluster_ofs, batch, backend=backend))
    for y, ref in zip(ys, alone):
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="2 siblings were shrunk, got 1 outputs"):
        jd_lora_expand_siblings(ys[:1], Us[:1], cluster_ofs[:1],
                                jd_lora_shrink_siblings(x, Vs, sigmas, cluster_ofs, batch, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_siblings_shares_launches_among_siblings_of_one_rank_and_equals_each_forward(backend, monkeypatch):
    """Slices of one fused output (q, k, v, ...): siblings of one rank, dtype and layout share their launches (at
    most three at a time), any other runs its own; every slice the numbers of its own jd_lora_forward."""
    import jdlora.kernels as K

    _backend(backend)
    x, batch, mods = _siblings(9, 32, 16, 5, (2, 1, 1, 3, 1), diag=False, dtype=torch.float32)
    _, _, other = _siblings(9, 32, 8, 5, (2,), diag=False, dtype=torch.float32)  # rank 8: alone
    mods = mods[:2] + other + mods[2:]
    widths = [U.shape[1] for U, _, _, _ in mods]
    out = torch.zeros(9, sum(widths), device=DEVICE)
    starts = [sum(widths[:i]) for i in range(len(widths))]
    ys = [out[:, a:a + w] for a, w in zip(starts, widths)]  # column slices of one output, as TGI and vLLM have
    calls = []
    shrink = K.jd_lora_shrink_siblings
    monkeypatch.setattr(K, "jd_lora_shrink_siblings", lambda *a, **k: calls.append(len(a[1])) or shrink(*a, **k))
    Us, Vs, sigmas, cluster_ofs = zip(*mods)
    K.jd_lora_forward_siblings(ys, x, Us, Vs, sigmas, cluster_ofs, batch, scale=0.5, backend=backend)
    assert calls == [3, 2]  # five rank-16 siblings: three, then two; the rank-8 one alone
    for y, (U, V, sigma, c) in zip(ys, mods):
        alone = jd_lora_forward(torch.zeros_like(y), x, U, V, sigma, c, batch, scale=0.5, backend=backend)
        torch.testing.assert_close(y, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_later_sibling_shrink_invalidates_the_earlier_g(backend):
    from jdlora.kernels import jd_lora_expand, jd_lora_shrink_siblings

    _backend(backend)
    x, batch, mods = _siblings(5, 32, 16, 4, (2, 2), diag=False, dtype=torch.float32)
    Us, Vs, sigmas, cluster_ofs = zip(*mods)
    first = jd_lora_shrink_siblings(x, Vs, sigmas, cluster_ofs, batch, backend=backend)
    second = jd_lora_shrink_siblings(x, Vs, sigmas, cluster_ofs, batch, backend=backend)
    assert second.valid and not first.valid
    with pytest.raises(RuntimeError, match="overwrote"):
        jd_lora_expand(torch.zeros(5, Us[0].shape[1], device=DEVICE), Us[0], cluster_ofs[0], first, 0)


def test_an_unknown_backend_name_is_refused_by_the_siblings_shrink_too():
    from jdlora.kernels import jd_lora_shrink_siblings

    x, batch, mods = _siblings(3, 32, 16, 4, (1, 1), diag=False, dtype=torch.float32)
    Us, Vs, sigmas, cluster_ofs = zip(*mods)
    with pytest.raises(ValueError, match="backend must be"):
        jd_lora_shrink_siblings(x, Vs, sigmas, cluster_ofs, batch, backend="cuda")
    assert batch.sibling_calls == 0  # refused before anything changed


def test_siblings_of_other_ranks_dtypes_or_empty_banks_are_not_fused():
    from jdlora.kernels import siblings_fusable

    _, _, mods = _siblings(3, 32, 16, 4, (1, 2, 1, 1), diag=False, dtype=torch.float32)
    Us, Vs, sigmas, cluster_ofs = zip(*mods)
    assert siblings_fusable(Vs[:3], sigmas[:3], cluster_ofs[:3])
    assert not siblings_fusable(Vs, sigmas, cluster_ofs)  # four: more than the kernels' sibling axis
    _, _, other = _siblings(3, 32, 8, 4, (1,), diag=False, dtype=torch.float32)
    assert not siblings_fusable((Vs[0], other[0][1]), (sigmas[0], other[0][2]), cluster_ofs[:2])  # rank 16 and 8
    assert not siblings_fusable((Vs[0], Vs[1].half()), sigmas[:2], cluster_ofs[:2])
    assert not siblings_fusable((Vs[0], Vs[1][:0]), sigmas[:2], cluster_ofs[:2])
    assert not siblings_fusable((Vs[0], Vs[1].transpose(1, 2).contiguous().transpose(1, 2)), sigmas[:2],
                                cluster_ofs[:2])  # other strides
