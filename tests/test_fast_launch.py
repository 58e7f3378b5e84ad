"""jdlora.kernels.fast_launch: the direct launch of our compiled kernels gives the normal launch's bits.

On CPU (TRITON_INTERPRET=1, set by conftest.py) the kernels are interpreted: every launch must take the
normal path. On CUDA, mixed batches of several shapes and dtypes (aligned and unaligned inputs, one
token, one and several clusters) must give bit-identical outputs through both launches, and calls after
the first must really go the direct way.
"""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from jdlora.kernels import prepare_batch  # noqa: E402

ON_CUDA = torch.cuda.is_available()


def _launchers():
    from jdlora.kernels import expand, shrink, sigma

    return shrink._shrink_launch, sigma._sigma_launch, expand._expand_launch


def _problem(T, d_in, d_out, r, C, n, dtype, *, diag=False, unaligned=False, device="cuda"):
    x = torch.randn(T, d_in + 1, device=device).to(dtype)
    x = x[:, 1:] if unaligned else x[:, :d_in]  # x[:, 1:]: its address is 2 or 4 bytes off 16
    U = (torch.randn(C, d_out, r, device=device) / r**0.5).to(dtype)
    V = (torch.randn(C, d_in, r, device=device) / d_in**0.5).to(dtype)
    sigma = (torch.randn(*((n, r) if diag else (n, r, r)), device=device) / r**0.5).to(dtype)
    cluster_of = torch.randint(0, C, (n,), device=device)
    cluster_of[0] = -1  # an adapter without an update here
    token_adapter = torch.randint(-1, n, (T,), device=device)
    y0 = torch.randn(T, d_out, device=device).to(dtype)
    return y0, x, U, V, sigma, cluster_of, prepare_batch(token_adapter)


def _run(problem, configs):
    from jdlora.kernels.launch import jd_lora_forward_triton

    y0, *rest = problem
    return jd_lora_forward_triton(y0.clone(), *rest, scale=0.7, configs=configs)


def test_the_launch_key_separates_what_triton_specializes_on():
    from jdlora.kernels.fast_launch import keyable, launch_key

    base = torch.zeros(64, dtype=torch.float16)

    def key(tensors=(base,), scalars=(3,), constexprs=None, device=0):
        return launch_key(device, tensors, scalars, constexprs or {"BLOCK": 16, "num_warps": 4})

    assert key() == key() and hash(key()) == hash(key())
    assert key() != key((base[1:],))  # 16-byte aligned or not
    assert key((base, base[1:])) != key((base[1:], base))  # which tensor is not
    assert key() != key((base.float(),))  # dtype
    assert key((torch.nn.Parameter(base, requires_grad=False),)) == key()
    assert key(scalars=(3,)) != key(scalars=(5,))  # scalars by value: finer than Triton's buckets
    assert len({key(scalars=(1,)), key(scalars=(True,)), key(scalars=(1.0,))}) == 3  # equal values, other kinds
    assert key(constexprs={"BLOCK": 32, "num_warps": 4}) != key() != key(constexprs={"BLOCK": 16, "num_warps": 8})
    assert key(device=1) != key()
    assert launch_key(0, (base, 3), (), {}) is None  # a non-tensor where the kernel takes a pointer
    assert keyable(key()) and keyable(key(scalars=(1, 0.5, False)))
    assert not keyable(key(scalars=("tf32",))) and not keyable(key(scalars=(None,))) and not keyable(None)


def _toy_kernel(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr, MODE: tl.constexpr):  # read as source only
    pass


def test_a_direct_launch_hands_triton_s_launcher_the_arguments_of_the_normal_launch():
    """The argument order of a direct launch, checked where no GPU runs: Triton's compiled kernel is replaced
    by a recorder (the CUDA tests above check the bits on a GPU)."""
    from triton.runtime.jit import JITFunction

    from jdlora.kernels.fast_launch import FastLauncher

    kernel = JITFunction(_toy_kernel)  # a real JITFunction (triton.jit gives an interpreted one here)
    launcher = FastLauncher(kernel)
    assert launcher._fast
    normal, direct = [], []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *launch):
            direct.append(launch)

    class Kernel:  # kernel[grid](...): Triton's normal launch, which compiles and returns the compiled kernel
        params, pre_run_hooks = kernel.params, []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: normal.append((grid, args, kwargs)) or Compiled()

    launcher.kernel = Kernel()
    launcher._device, launcher._stream = (lambda: 0), (lambda device: "stream")
    x, y = torch.zeros(16), torch.zeros(16)

    def launch(*args, grid=(3, 2)):
        launcher(grid, *args, BLOCK=4, MODE="m", num_warps=2)

    launch(x, y, 16, 0.5)
    launch(x, y, 16, 0.5)
    assert len(normal) == 1 and launcher.hits == 1
    (launched,) = direct
    assert launched[:7] == (3, 2, 1, "stream", "function", "metadata", None)
    assert launched[9:] == (x, y, 16, 0.5, 4, "m")  # the arguments, then the constexprs in signature order
    launch(x[1:], y, 16, 0.5)  # unaligned
    launch(x, y, 17, 0.5)  # another size
    launch(x, y, 16, 1)  # an int where a float was
    assert len(normal) == 4 and launcher.hits == 1
    launch(x, y, 16, 0.5, grid=(5,))  # the grid is not part of the key
    assert launcher.hits == 2 and direct[-1][:3] == (5, 1, 1)


@pytest.mark.skipif(ON_CUDA or os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter only")
def test_under_the_interpreter_every_launch_is_a_normal_one():
    from jdlora.kernels.launch import pick_configs

    launchers = _launchers()
    hits = [ln.hits for ln in launchers]
    problem = _problem(5, 32, 24, 8, 2, 4, torch.float32, device="cpu")
    y = _run(problem, pick_configs(5, 32, torch.device("cpu")))
    y_again = _run(problem, pick_configs(5, 32, torch.device("cpu")))
    assert torch.equal(y, y_again)
    assert [ln.hits for ln in launchers] == hits


def _deterministic(configs):
    """The same configurations without split-K: atomic float adds would make the bits run-dependent."""
    shrink_cfg, sigma_cfg, expand_cfg = configs
    return dataclasses.replace(shrink_cfg, programs=1), sigma_cfg, expand_cfg


CASES = [  # T, d_in, d_out, r, C, n, dtype, diag, unaligned
    (1, 4096, 4096, 64, 1, 8, torch.bfloat16, False, False),
    (64, 4096, 1024, 64, 8, 64, torch.bfloat16, False, False),
    (64, 4096, 1024, 64, 8, 64, torch.bfloat16, False, True),
    (37, 1000, 520, 16, 3, 10, torch.float16, True, False),
    (300, 512, 768, 32, 2, 16, torch.float32, False, True),
]


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=[f"T{c[0]}-d{c[1]}-{str(c[6])[6:]}{'-diag' if c[7] else ''}"
                                             f"{'-unaligned' if c[8] else ''}" for c in CASES])
def test_direct_launch_gives_the_normal_launchs_bits_and_is_taken_after_the_first_call(case):
    from jdlora.kernels.launch import pick_configs

    T, d_in, d_out, r, C, n, dtype, diag, unaligned = case
    problem = _problem(T, d_in, d_out, r, C, n, dtype, diag=diag, unaligned=unaligned)
    configs = _deterministic(pick_configs(T, d_in, problem[1].device))
    launchers = _launchers()
    fast = [ln._fast for ln in launchers]
    assert all(fast), "the direct launch is off (JDLORA_FAST_LAUNCH=0, or a Triton this module does not know)"
    try:
        for ln in launchers:
            ln._fast = False
        y_normal = _run(problem, configs)
    finally:
        for ln, f in zip(launchers, fast):
            ln._fast = f
    _run(problem, configs)  # the first call of this specialization may compile: a normal launch
    hits = [ln.hits for ln in launchers]
    y_direct = _run(problem, configs)
    assert [ln.hits - h for ln, h in zip(launchers, hits)] == [1, 1, 1]
    assert torch.equal(y_direct, y_normal)


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
def test_direct_launches_captured_in_a_cuda_graph_replay_the_same_bits():
    from jdlora.kernels.launch import pick_configs

    problem = _problem(64, 4096, 1024, 64, 8, 64, torch.bfloat16)
    configs = _deterministic(pick_configs(64, 4096, problem[1].device))
    expected = _run(problem, configs)
    _run(problem, configs)
    hits = [ln.hits for ln in _launchers()]
    y0, *rest = problem
    y = y0.clone()
    from jdlora.kernels.launch import jd_lora_forward_triton

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        jd_lora_forward_triton(y, *rest, scale=0.7, configs=configs)
    assert all(ln.hits > h for ln, h in zip(_launchers(), hits))  # captured through the direct launch
    y.copy_(y0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expected)


def test_the_host_benchmark_runs_our_direct_launch_path():
    """benchmarks/host.py measures our eager Python through the direct launches (Triton's kernels made no-ops):
    it must still reach them after changes to the launcher (it stops, saying so, when a kernel never did)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "JDLORA_FAST_LAUNCH")}
    env["PYTHONPATH"] = os.pathsep.join([str(root / "src"), str(root)])
    out = subprocess.run([sys.executable, "-m", "benchmarks.host", "--only", "layer", "--calls", "20", "--repeats", "1"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "JD adds per layer" in out.stdout
