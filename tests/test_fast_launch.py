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


def _toy_launcher():
    """A FastLauncher of :func:`_toy_kernel` whose compiled kernel records what it is run with (``direct``) and
    whose normal launch records its calls (``normal``): our side of every launch, checked where no GPU runs."""
    from triton.runtime.jit import JITFunction

    from jdlora.kernels.fast_launch import FastLauncher

    launcher = FastLauncher(JITFunction(_toy_kernel))
    normal, direct = [], []

    class Compiled:
        function, packed_metadata = "function", "metadata"

        def run(self, *launch):
            direct.append(launch)

    class Kernel:
        params, pre_run_hooks = launcher.kernel.params, []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: normal.append((grid, args, kwargs)) or Compiled()

    launcher.kernel = Kernel()
    launcher._device, launcher._stream = (lambda: 0), (lambda device: "stream")
    return launcher, normal, direct


def test_a_direct_launch_hands_triton_s_launcher_the_arguments_of_the_normal_launch():
    """The argument order of a direct launch, checked where no GPU runs: Triton's compiled kernel is replaced
    by a recorder (the CUDA tests above check the bits on a GPU)."""
    launcher, normal, direct = _toy_launcher()
    assert launcher._fast
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


def test_a_replay_hands_triton_s_launcher_what_the_direct_launch_of_the_new_tensors_would():
    from jdlora.kernels.replay import LaunchRecording

    launcher, normal, direct = _toy_launcher()
    w = torch.zeros(16)  # fixed: recorded as it is

    def call(x, y):  # two launches, x and y in several places, one fixed tensor
        launcher((2,), x, w, 16, 0.5, BLOCK=4, MODE="a", num_warps=2)
        launcher((3, 2), y, x, 16, 1.5, BLOCK=8, MODE="b", num_warps=4)

    x, y = torch.zeros(16), torch.zeros(16)
    call(x, y)  # compiles both: normal launches
    with LaunchRecording(x, y) as recording:
        call(x, y)
    assert recording.complete and len(direct) == 2
    x2, y2 = torch.ones(16), torch.ones(16)
    call(x2, y2)
    expected = direct[-2:]
    recording.replay(x2, y2)
    assert direct[-2:] == expected  # the same tensors (by identity), grids, options and stream
    assert direct[-2][9] is x2 and direct[-2][10] is w and direct[-1][9] is y2 and direct[-1][10] is x2
    assert len(normal) == 2 and launcher.hits == 6


def test_a_replay_of_a_launch_that_compiled_during_the_recording_takes_a_three_dimensional_grid():
    """A recorded launch may be the kernel's normal launch for a new shape (it compiled then) while the launcher
    already launches directly: its replay is direct, and a direct launch takes all three grid dimensions (the
    H200 run of session 10 failed here with a one-dimensional grid: "function takes exactly 44 arguments")."""
    from jdlora.kernels.replay import LaunchRecording

    launcher, normal, direct = _toy_launcher()
    w = torch.zeros(16)
    for _ in range(2):  # compiled, then launched directly: the launcher is proven
        launcher((2,), torch.zeros(16), w, 16, 0.5, BLOCK=4, MODE="a", num_warps=2)
    x = torch.zeros(8)
    with LaunchRecording(x) as recording:
        launcher((2,), x, w, 8, 0.5, BLOCK=4, MODE="a", num_warps=2)  # a new size: Triton's normal launch
    assert recording.complete and len(normal) == 2
    x2 = torch.ones(8)
    recording.replay(x2)
    assert direct[-1][:4] == (2, 1, 1, "stream") and direct[-1][9] is x2 and len(normal) == 2


def test_a_recording_is_incomplete_when_a_slot_went_as_a_copy_or_nothing_launched():
    from jdlora.kernels.replay import LaunchRecording, Replays

    launcher, normal, direct = _toy_launcher()
    w = torch.zeros(16)
    x = torch.zeros(16)
    with LaunchRecording(x) as recording:
        launcher((2,), x.clone(), w, 16, 0.5, BLOCK=4, MODE="a", num_warps=2)  # a copy of x: not replayable
    assert not recording.complete
    with LaunchRecording(x) as recording:
        pass  # the torch reference: nothing launched
    assert not recording.complete
    replays = Replays()
    with replays.record("batch", x):
        pass
    assert not replays.on and not replays.replay("batch", x)  # stops trying


def test_replays_are_kept_per_context_object_and_layout():
    from jdlora.kernels.replay import Replays

    launcher, normal, direct = _toy_launcher()
    replays = Replays(max_recordings=2)
    context, other = object(), object()

    def call(x):
        if not replays.replay(context, x):
            with replays.record(context, x):
                launcher((2,), x, x, 16, 0.5, BLOCK=4, MODE="a", num_warps=2)

    x = torch.zeros(16)
    call(x)
    call(torch.ones(16))  # same layout: replayed
    assert replays.replayed == 1 and direct[-1][9] is not x
    assert not replays.replay(other, x)  # another context
    assert not replays.replay(context, torch.zeros(8))  # another shape
    assert not replays.replay(context, torch.zeros(17)[1:])  # unaligned
    assert not replays.replay(context, torch.zeros(16, dtype=torch.float64))
    assert not replays.replay(context, torch.zeros(32)[::2])  # other strides
    call(torch.zeros(8))
    call(torch.zeros(4))  # a third layout: the kept ones start over
    assert replays.replay(context, torch.zeros(4)) and not replays.replay(context, torch.zeros(16))


def test_a_replay_launches_through_the_launcher_when_a_direct_launch_may_not_go_ahead():
    """Launch hooks set after the recording (a profiler), or another current device: the replay goes through the
    launcher, which takes Triton's normal launch; the same when the kernel was never launched directly yet."""
    from jdlora.kernels.replay import LaunchRecording

    launcher, normal, direct = _toy_launcher()
    w = torch.zeros(16)
    x = torch.zeros(16)
    with LaunchRecording(x) as first:  # compiles: a normal launch, recorded with its compiled kernel
        launcher((2,), x, w, 16, 0.5, BLOCK=4, MODE="a", num_warps=2)
    first.replay(torch.ones(16))  # not proven yet: through the launcher, which launches directly and proves it
    assert len(normal) == 1 and len(direct) == 1
    first.replay(torch.ones(16))
    assert len(direct) == 2
    knobs = launcher._knobs
    old = knobs.launch_enter_hook
    try:
        knobs.launch_enter_hook = lambda *a: None
        first.replay(torch.ones(16))
    finally:
        knobs.launch_enter_hook = old
    assert len(normal) == 2 and len(direct) == 2
    launcher._device = lambda: 1
    first.replay(torch.ones(16))
    assert len(direct) == 2 and len(normal) == 3  # device 1 never compiled: normal launch


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
