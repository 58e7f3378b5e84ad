#!/usr/bin/env python
"""The host time jdlora's own Python adds to an eager mixed-batch forward, measured without a GPU. Not a test.

Why: an eager decode step is host-bound (issue 13): each adapted layer costs tens of microseconds of Python
and launches, more than its kernels take on the GPU. Part of that is Triton's launcher and the CUDA driver,
which only a GPU shows (``benchmarks/kernels.py --qkv``, ``benchmarks/serving/compiled.py``); the rest is
ours -- the PEFT tuner's layers, :class:`~jdlora.tuner.mixed.MixedBatch`, the sibling fusion, the launch
functions, :class:`~jdlora.kernels.fast_launch.FastLauncher`'s key and cache and the launch replays of
:mod:`jdlora.kernels.replay` -- and that runs the same on any CPU. This benchmark runs exactly that code on CPU tensors with the Triton path forced, Triton's
compiled kernels replaced by a no-op (every launch after the first of a specialization goes through our
direct-launch path and stops where Triton's own launcher would start).

Two measurements, one thread, best of ``--repeats``:

- ``layer``: one eager forward of q, k and v tuner layers (a ``MixedBatch`` of ``--batch`` rows, one token
  each, ``--adapters`` adapters at rank 64, one cluster), the JD part per layer = (JD - base) / 3, with the
  sibling fusion on (3 launches for the three) and off (9);
- ``generate``: ``generate`` of a 32-layer tiny Llama (q, k, v adapted), ``--new`` tokens for ``--batch``
  rows with mixed ``adapter_names``, against the base model; the difference per decode step and per layer.

Usage::

    PYTHONPATH=src python -m benchmarks.host              # both (as a module: benchmarks/ must not shadow
                                                          # the `kernels` package transformers imports)
    PYTHONPATH=src python -m benchmarks.host --json OUT   # and write the numbers
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ["JDLORA_KERNELS"] = "triton"  # read when jdlora.kernels is imported
os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, so that the direct launch path runs

import torch  # noqa: E402
from torch import nn  # noqa: E402

from jdlora.kernels import launch  # noqa: E402 (imports every kernel, so that every launcher exists)
from jdlora.kernels.fast_launch import LAUNCHERS  # noqa: E402
from jdlora.tuner import siblings  # noqa: E402


class _NoKernel:
    """Stands in for Triton's compiled kernel: the direct launch calls ``run``, which does nothing."""

    function, packed_metadata = None, None

    def run(self, *launch_args):
        pass


class _Compiler:
    """Stands in for the ``@triton.jit`` kernel: ``kernel[grid](...)`` (the normal launch) returns a no-op
    kernel instead of compiling for a GPU."""

    def __init__(self, kernel):
        self.params = kernel.params
        self.pre_run_hooks = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: _NoKernel()


def free_launches() -> None:
    """Every Triton launch of jdlora becomes free past our own Python; CPU tensors take the Triton path."""
    launch._check_device = lambda x: None
    for launcher in LAUNCHERS:
        if not launcher._fast:
            raise SystemExit("the direct launch is off (JDLORA_FAST_LAUNCH=0?): nothing of ours to measure")
        launcher.kernel = _Compiler(launcher.kernel)
        launcher._device, launcher._stream = (lambda: 0), (lambda device: 0)


def best_us(call, calls: int, repeats: int) -> float:
    for _ in range(max(calls // 10, 20)):
        call()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - t) / calls)
    return best * 1e6


def layer_costs(args) -> dict:
    from jdlora.tuner.layer import AdapterGroup, Linear
    from jdlora.tuner.mixed import MixedBatch

    d, r, n = 64, 64, args.adapters  # a small d: the base GEMM's own CPU time stays out of the difference
    gen = torch.Generator().manual_seed(0)
    group = AdapterGroup(r, "full")
    names = [f"a{i}" for i in range(n)]
    rows = group.add(names)
    parent = nn.Module()
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = Linear(nn.Linear(d, d, bias=False))
        layer.add_bases("c0", torch.randn(d, r, generator=gen), torch.randn(d, r, generator=gen))
        layer.add_sigmas(group, names, rows, torch.randn(n, r, r, generator=gen), "c0")
        setattr(parent, name, layer)
    siblings.link_siblings(parent, Linear)
    layers = (parent.q_proj, parent.k_proj, parent.v_proj)
    batch = MixedBatch([names[i % n] for i in range(args.batch)])
    x = torch.randn(args.batch, 1, d, generator=gen)

    def base():
        for layer in layers:
            layer.base_layer(x)

    def jd():
        for layer in layers:
            layer(x, adapter_names=batch)

    out = {"base_qkv_us": best_us(base, args.calls, args.repeats)}
    enabled = siblings.ENABLED
    try:
        for fused in (True, False):
            siblings.ENABLED = fused
            jd_us = best_us(jd, args.calls, args.repeats)
            out["fused" if fused else "unfused"] = {"jd_qkv_us": jd_us, "per_layer_us": (jd_us - out["base_qkv_us"]) / 3}
    finally:
        siblings.ENABLED = enabled
    return out


def generate_costs(args) -> dict:
    import copy

    from transformers import LlamaConfig, LlamaForCausalLM

    import jdlora
    from jdlora.synthetic import llama_modules, synthetic_adapters
    from jdlora.tuner import load_collection

    layers = 32
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    modules = llama_modules(layers, 32, 16)
    collection = jdlora.compress(synthetic_adapters(8, modules, rank=4, seed=1), rank=4, clusters=1, progress=False)
    model = load_collection(copy.deepcopy(base), collection)
    names = collection.adapter_names
    ids = torch.randint(1, 64, (args.batch, 4), generator=torch.Generator().manual_seed(0))
    rng = random.Random(0)

    def run(m, **kw):
        with torch.no_grad():
            m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                       min_new_tokens=args.new, do_sample=False, pad_token_id=0, disable_compile=True, **kw)

    calls = {"base": lambda: run(base), "jd": lambda: run(model, adapter_names=rng.choices(names, k=args.batch))}
    for call in calls.values():
        call()
    best = {k: float("inf") for k in calls}
    for _ in range(args.repeats):
        for k, call in calls.items():
            t = time.perf_counter()
            call()
            best[k] = min(best[k], time.perf_counter() - t)
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        profiler.runcall(calls["jd"])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    added = best["jd"] - best["base"]
    return {"base_ms": best["base"] * 1e3, "jd_ms": best["jd"] * 1e3, "added_ms": added * 1e3,
            "added_per_layer_us": added / (args.new * 3 * layers) * 1e6, "layers": layers, "new": args.new}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--adapters", type=int, default=64)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--new", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", choices=("layer", "generate"))
    p.add_argument("--json", type=Path)
    p.add_argument("--profile", action="store_true", help="cProfile one more JD generate call")
    args = p.parse_args()
    torch.set_num_threads(1)
    free_launches()
    results = {"torch": torch.__version__, "batch": args.batch, "adapters": args.adapters}
    if args.only in (None, "layer"):
        results["layer"] = c = layer_costs(args)
        c["direct_launches"] = {launcher.name: launcher.hits for launcher in LAUNCHERS}
        if not all(c["direct_launches"].values()):  # then this measured Triton's normal path, not ours
            raise SystemExit(f"some kernels never launched directly: {c['direct_launches']}")
        print(f"q, k, v forward: base {c['base_qkv_us']:.1f} us; JD adds per layer "
              f"{c['fused']['per_layer_us']:.1f} us fused, {c['unfused']['per_layer_us']:.1f} us unfused", flush=True)
    if args.only in (None, "generate"):
        results["generate"] = c = generate_costs(args)
        print(f"generate, {c['layers']} layers x q, k, v, {c['new']} new tokens: base {c['base_ms']:.1f} ms, "
              f"JD {c['jd_ms']:.1f} ms: {c['added_ms']:.1f} ms more, {c['added_per_layer_us']:.1f} us per layer "
              "and token", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
