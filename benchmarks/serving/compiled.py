"""``generate`` through the public API, compiled and eager: JD-LoRA with mixed adapters against the base (issue 13).

Usage::

    PYTHONPATH=src python -m benchmarks.serving.compiled --out DIR                    # H200, Mistral-7B shapes
    PYTHONPATH=src python -m benchmarks.serving.compiled --out DIR --tiny --device cpu   # smoke run

Set-up: Mistral-7B's shapes with random bf16 weights (:mod:`.model`), a batch of ``--batch`` prompts of
``--prompt`` random tokens (no padding), ``--new`` greedy tokens each (no early stop). The base model and
JD-LoRA are two models with the same weights in one process, **timed side by side**: per path, each one's
warm-up, then rounds of one call of each, the order reversed every other round (:func:`timed_calls`), so a
host whose speed drifts (eager walls are host time) weighs on both alike. Paths:

- *base, compiled*: ``generate(..., cache_implementation="static")``; on CUDA transformers compiles the
  decode step by itself (inductor, ``mode="reduce-overhead"``: CUDA graphs) and builds a new static cache
  per call, so the graph is recorded again each call;
- *base, compiled, one cache*: one ``StaticCache`` passed to every call and reset in between (what a
  server does: the recorded graph replays);
- *base, eager*: ``disable_compile=True`` with a dynamic cache; *eager_unfused*: the same with
  :data:`jdlora.tuner.siblings.ENABLED` off for the call (JD-LoRA: every layer its own three launches;
  the base model: eager once more, which shows the run-to-run spread);
- *prefill*: the eager prompt forward and first token alone (``max_new_tokens=1``), so that
  ``(wall - prefill) / (new - 1)`` is the time of one decode step;
- the same three with JD-LoRA (eager: q, k and v share one shrink, one Sigma and one expand launch,
  :mod:`jdlora.tuner.siblings`; ``JDLORA_FUSE_SIBLINGS=0`` runs each layer's own three, recorded as
  ``fuse_siblings`` in the results) (:mod:`.jd`'s synthetic collection at the paper's setting for the size,
  loaded by jdlora's tuner, bf16), ``adapter_names`` with ``--batch`` adapters drawn at random every call
  (distinct ones when the collection has enough): a new mix every call.

Every compiled path is warmed up (``--warmup`` calls: the first compiles) and then timed over ``--reps``
rounds (wall clock, synchronized); dynamo's count of compiled graphs before and after the timed calls
shows whether a new mix recompiled. Throughput = batch x new tokens / median wall. A path listed twice is timed
twice, the second time as ``name#2`` (``--paths eager,compiled_one_cache,eager``: eager before and after the
compiled paths in one process). ``--null-kernels`` times each JD collection's paths once more with its Triton launches
made no-ops (:func:`kernels_off`): where the time between the base and JD goes, kernels or everything else.
Writes ``compiled.json``: per collection, ``base`` and ``jd`` results per path and their ``ratio`` (JD / base
throughput).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from pathlib import Path

import torch

from jdlora.tuner import siblings

from .graph import device_idle, idle_line
from .jd import adapter_name, synthetic_collection
from .model import adapted_modules, build_model, model_config
from .settings import PAPER_SETTINGS, JDSetting


def graphs_compiled() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(calls: dict, device, warmup: int, reps: int, counts=None) -> dict:
    """``{subject: call}`` timed side by side: each subject's ``warmup`` calls, then ``reps`` rounds of one timed
    call per subject, the order reversed every other round (ABBA), so that a host whose speed drifts over the
    process (the H200 host's eager walls moved 440 -> 650 ms within one run) weighs on every subject alike.

    Per subject: the median wall of its ``reps`` calls (synchronized), the walls, the warm-up seconds, dynamo's
    graphs compiled during the warm-up and during the timed calls, and (``counts(subject)``: a dict of counters)
    the counters' increase over the timed calls."""
    out = {}
    for name, call in calls.items():
        g0 = graphs_compiled()
        t0 = time.perf_counter()
        for _ in range(warmup):
            call()
        sync(device)
        out[name] = {"warmup_s": time.perf_counter() - t0, "graphs_warmup": graphs_compiled() - g0, "walls_s": [],
                     "graphs_timed": 0, "launches": {}}
    names = list(calls)
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            before, g0 = counts(name) if counts else {}, graphs_compiled()
            sync(device)
            t = time.perf_counter()
            calls[name]()
            sync(device)
            out[name]["walls_s"].append(time.perf_counter() - t)
            out[name]["graphs_timed"] += graphs_compiled() - g0
            for key, value in (counts(name) if counts else {}).items():
                out[name]["launches"][key] = out[name]["launches"].get(key, 0) + value - before[key]
    for result in out.values():
        result["median_s"] = statistics.median(result["walls_s"])
    return out


@contextlib.contextmanager
def kernels_off():
    """JD-LoRA's Triton launches made no-ops, with the host code that prepares them: the same model, compiled graph
    and tuner Python without the kernels. So (JD - JD without kernels) is what the kernels and their launches cost,
    and (JD without kernels - base) what everything else costs (the tuner, graph inputs and guards, lost fusion).
    The outputs are the base model's then; the token counts stay fixed (``min_new_tokens``)."""
    from jdlora.kernels import launch
    from jdlora.kernels.sizes import block_rank

    names = ("jd_lora_forward_triton", "jd_lora_shrink_siblings_triton", "jd_lora_expand_triton")
    saved = {name: getattr(launch, name) for name in names}

    def shrink_siblings(x, Vs, sigmas, cluster_ofs, batch, **kwargs):  # the g its expands would read
        return batch.sibling_scratch(len(Vs), block_rank(Vs[0].shape[2]), x.device)[1]

    launch.jd_lora_forward_triton = lambda y, *args, **kwargs: y
    launch.jd_lora_shrink_siblings_triton = shrink_siblings
    launch.jd_lora_expand_triton = lambda y, *args, **kwargs: y
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(launch, name, function)


def launch_counts() -> dict:
    """Direct and normal Triton launches so far (:mod:`jdlora.kernels.fast_launch`; only once Triton is imported):
    what to look at when an eager path is slower than it was."""
    import sys

    counts = {"direct": 0, "normal": 0}
    if "jdlora.kernels.fast_launch" in sys.modules:
        from jdlora.kernels.fast_launch import LAUNCHERS

        for launcher in LAUNCHERS:
            counts["direct"] += launcher.hits
            counts["normal"] += launcher.misses
    return counts


def sibling_sets_off(model) -> int:
    """How many sets of sibling layers have their fusion turned off (:mod:`jdlora.tuner.siblings`)."""
    sets = {id(m._jd_siblings): m._jd_siblings for m in model.modules() if getattr(m, "_jd_siblings", None) is not None}
    return sum(not s.on for s in sets.values())


def path_calls(model, ids, args, mixes=None) -> dict:
    """The generate paths on ``model`` (a PeftModel when ``mixes`` draws adapter names per call): ``{path: (call,
    warm-up calls)}``."""
    from transformers import StaticCache

    common = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
    extra = (lambda: {"adapter_names": mixes()}) if mixes else (lambda: {})
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + args.new)

    def compiled():
        with torch.no_grad():
            model.generate(input_ids=ids, cache_implementation="static", **common, **extra())

    def one_cache():
        cache.reset()
        with torch.no_grad():
            model.generate(input_ids=ids, past_key_values=cache, **common, **extra())

    def eager():
        with torch.no_grad():
            model.generate(input_ids=ids, disable_compile=True, **common, **extra())

    def eager_unfused():  # each adapted layer its own three launches (the base model: eager again, a noise check)
        enabled, siblings.ENABLED = siblings.ENABLED, False
        try:
            eager()
        finally:
            siblings.ENABLED = enabled

    def prefill():  # the prompt's forward and the first token only: what the decode steps add comes on top
        with torch.no_grad():
            model.generate(input_ids=ids, disable_compile=True, max_new_tokens=1, do_sample=False, **extra())

    return {"eager": (eager, 1), "eager_unfused": (eager_unfused, 1), "compiled": (compiled, args.warmup),
            "compiled_one_cache": (one_cache, args.warmup), "prefill": (prefill, 1)}


def run_paths(subjects: dict, ids, args, device) -> dict:
    """Every path of ``args.paths`` for every subject (``{label: (model, mixes or None)}``), the subjects timed side
    by side (:func:`timed_calls`). Returns ``{label: {path: result}}``."""
    calls = {label: path_calls(model, ids, args, mixes) for label, (model, mixes) in subjects.items()}
    out = {label: {} for label in subjects}
    first = next(iter(subjects))
    # a path named again is timed again under "name#2", ...: e.g. eager before and after the compiled paths
    for path, name in zip(args.paths.split(","), args_paths(args)):
        warm = calls[first][path][1]
        timed = timed_calls({label: c[path][0] for label, c in calls.items()}, device, warm, args.reps,
                            counts=lambda label: launch_counts())  # a subject's calls add only its own
        for label, result in timed.items():
            result["sibling_sets_off"] = sibling_sets_off(subjects[label][0])
            result["tok_s"] = ids.shape[0] * (1 if path == "prefill" else args.new) / result["median_s"]
            out[label][name] = result
            print(f"  {label} {name}: {result['median_s'] * 1e3:.1f} ms  {result['tok_s']:.0f} tok/s  "
                  f"(walls {' '.join(f'{w * 1e3:.0f}' for w in result['walls_s'])}; warm-up {result['warmup_s']:.1f} s, "
                  f"graphs {result['graphs_warmup']} then {result['graphs_timed']}; launches {result['launches']})",
                  flush=True)
        if args.profile and device.type == "cuda":
            for label in subjects:
                out[label][name].update(profile_call(calls[label][path][0], device))
    return out


def profile_call(call, device) -> dict:
    """Where one more call's time goes: device and host (torch.profiler), where the device sat idle
    (:func:`.graph.device_idle`) and the host's Python (cProfile: cudagraph trees, aot wrappers, transformers' loop,
    the tuner)."""
    import cProfile
    import io
    import pstats

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        sync(device)
    idle = device_idle(prof)
    averages = prof.key_averages()
    table = averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60)
    host = averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    profiler = cProfile.Profile()
    profiler.enable()
    call()
    sync(device)
    profiler.disable()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats("tottime").print_stats(30)
    python = stream.getvalue()
    print(table, host, python, idle_line(idle) if idle else "", sep="\n", flush=True)
    return {"profile": table, "profile_host": host, "profile_python": python, "idle": idle}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=10)
    p.add_argument("--sizes", default="64,1024")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true",
                   help="profile one more call of each path (torch.profiler: device and host) and one with cProfile")
    p.add_argument("--paths", default="eager,compiled,compiled_one_cache,prefill")
    p.add_argument("--null-kernels", action="store_true",
                   help="time each JD path again with its Triton launches made no-ops (kernels_off)")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = model_config(args.tiny)
    model = build_model(config, device, dtype)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (args.batch, args.prompt), generator=gen).to(device)
    results = {"batch": args.batch, "prompt": args.prompt, "new": args.new, "device": str(device),
               "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "tiny": args.tiny, "fuse_siblings": siblings.ENABLED, "runs": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    jd_model = build_model(config, device, dtype)  # the same seed: the base's weights, for the adapters
    rng = random.Random(0)
    for n in (int(s) for s in args.sizes.split(",") if s):
        setting = PAPER_SETTINGS[n][0] if n in PAPER_SETTINGS else JDSetting(16)
        if args.tiny:
            setting = JDSetting(min(setting.rank, 16), min(setting.clusters, n))
        from jdlora.tuner import load_collection

        collection = synthetic_collection(adapted_modules(config), n, setting, device=device)
        peft = load_collection(jd_model, collection)
        for layer in peft.base_model.jd_layers().values():
            layer.jd_cast(dtype)
        names = [adapter_name(i) for i in range(n)]

        def mixes():
            return rng.sample(names, args.batch) if n >= args.batch else [rng.choice(names) for _ in range(args.batch)]

        runs = {f"jd_{n}": (peft, mixes)}
        if args.null_kernels:
            runs[f"jd_{n}_null"] = (peft, mixes)
        for key, jd in runs.items():
            null = key.endswith("_null")
            print(f"base and JD-LoRA, {n} adapters ({setting.label}{', kernels off' if null else ''})", flush=True)
            if null:
                torch._dynamo.reset()  # graphs recorded without the kernels
            with kernels_off() if null else contextlib.nullcontext():
                timed = run_paths({"base": (model, None), "jd": jd}, ids, args, device)
            results["runs"][key] = {"setting": setting.label + (", kernels off" if null else ""), **timed,
                                    "ratio": {path: timed["jd"][path]["tok_s"] / timed["base"][path]["tok_s"]
                                              for path in timed["jd"]}}
            (args.out / "compiled.json").write_text(json.dumps(results, indent=1))
        jd_model = peft.unload()
        del peft, collection
        torch._dynamo.reset()  # the next collection has other shapes: a fresh compile either way
    print("\n| path | " + " | ".join(f"{k}: base, JD (JD/base)" for k in results["runs"]) + " |")
    for path in args_paths(args):
        cells = [f"{r['base'][path]['tok_s']:.0f}, {r['jd'][path]['tok_s']:.0f} tok/s ({r['ratio'][path]:.2f}x)"
                 for r in results["runs"].values()]
        print(f"| {path} | " + " | ".join(cells) + " |")


def args_paths(args) -> list[str]:
    """The result names of ``args.paths``: a path named again is ``name#2``, ..."""
    names = []
    for path in args.paths.split(","):
        names.append(path if path not in names else f"{path}#{sum(n.split('#')[0] == path for n in names) + 1}")
    return names


if __name__ == "__main__":
    main()
