#!/usr/bin/env python
"""Speed and memory of ``jdlora.compress`` on Mistral-7B-shaped collections (issue 2).

Collections of synthetic rank-16 LoRA adapters on q, k and v of Mistral-7B (32 layers; q 4096 x 4096,
k and v 1024 x 4096: 96 modules), ``synthetic_adapters(n, mistral_7b_modules(), rank=16, seed=0)``.

- Up to ``--max-folders`` (100) adapters, the collection is written as real PEFT folders (the
  writing is not timed) and ``jdlora.compress`` reads it back through the streaming reader of
  :mod:`jdlora.sources`: the time includes opening, hashing (sha256 of each weights file, for the
  manifest) and reading (from the page cache, when the files were just written).
- Beyond, the synthetic adapter objects are passed themselves: they generate each module's factors
  on demand (1000 adapters would be about 38 GB of safetensors), so the time includes generation.

Configurations: ``r64`` is JD-Full rank 64 with one cluster; ``r16c`` is JD-Full rank 16 with the
cluster counts of the paper's Appendix E (1 for n=10, 7 for n=100, 25 for n=500 and n=1000).

Each (n, config) runs in a fresh subprocess so that peak memories do not mix. Reported per run:
wall time of ``jdlora.compress``, peak host RSS (``ru_maxrss``) and the peak minus the RSS after
imports, one module's inputs (the largest module, q: ``n * 16 * (4096 + 4096) * 4`` bytes), the
pooled and mean per-adapter errors, the parameters saved ratio, and a breakdown of the time
(reading or generation, stacking, JD calls and iterations, cluster assignment and k-means,
hashing, clustering rounds). On CUDA also ``torch.cuda.max_memory_allocated``.

Usage::

    python benchmarks/compress_speed.py --modules 3                      # quick smoke run
    python benchmarks/compress_speed.py --json results.json              # the full benchmark
    python benchmarks/compress_speed.py --device cuda --json gpu.json    # on a GPU

``--ray`` benchmarks the Ray engine instead (``jdlora.compress(..., engine=RayEngine(...))``, docs/scale.md):
``--ray-adapters`` (10,000) synthetic rank-``--ray-lora-rank`` (8) adapters on ``--ray-modules`` (6) square
modules of width ``--ray-hidden`` (256), JD-Full rank 16, one cluster, on a local Ray cluster of 1 then 2
CPUs (``--ray-workers``), each in a fresh process: wall time, time per module, peak RSS of every worker
process; then one module sharded across 2 actors (``worker_memory`` half its factors)::

    python benchmarks/compress_speed.py --ray --json ray.json

``--profile FILE`` runs cProfile around ``jdlora.compress`` (best with one size, one config and
``--modules 1``) and writes the top functions by cumulative time to FILE.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LORA_RANK = 16
SEED = 0
# Appendix E of the paper: clusters used at rank 16 for each collection size.
PAPER_CLUSTERS = {10: 1, 100: 7, 500: 25, 1000: 25}
CONFIGS = {
    "r64": "JD-Full rank 64, 1 cluster",
    "r16c": "JD-Full rank 16, clusters as in Appendix E",
}
GIB = 2**30


def clusters_for(n: int) -> int:
    """Appendix E's count for n; for other sizes the count of the largest listed size not above n."""
    listed = [k for k in sorted(PAPER_CLUSTERS) if k <= n]
    return PAPER_CLUSTERS[listed[-1]] if listed else 1


def config_settings(config: str, n: int) -> tuple[int, int]:
    """``(rank, clusters)`` of a configuration for n adapters."""
    if config == "r64":
        return 64, 1
    if config == "r16c":
        return 16, clusters_for(n)
    raise ValueError(f"Unknown config {config!r}; use one of {', '.join(CONFIGS)}.")


def benchmark_modules(limit: int | None) -> dict[str, tuple[int, int]]:
    from jdlora.synthetic import mistral_7b_modules

    modules = mistral_7b_modules()
    return dict(list(modules.items())[:limit]) if limit else modules


def input_bytes(n: int, modules: dict[str, tuple[int, int]]) -> int:
    """Bytes of the largest module's float32 factors for n rank-16 adapters (what one step holds)."""
    return max(n * LORA_RANK * (d_out + d_in) * 4 for d_out, d_in in modules.values())


def folder_bytes(n: int, modules: dict[str, tuple[int, int]]) -> int:
    return n * sum(LORA_RANK * (d_out + d_in) * 4 for d_out, d_in in modules.values())


# ----- memory -------------------------------------------------------------------------------------


def current_rss() -> int:
    """Resident set size now, in bytes (Linux /proc; elsewhere the high-water mark)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return peak_rss()


def peak_rss() -> int:
    """High-water mark of the resident set size, in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----- time breakdown -----------------------------------------------------------------------------


class Breakdown:
    """Wraps the library's stages in timers (benchmark-side monkeypatching; the library is untouched).

    Stages: ``read`` (``read_module``: safetensors reads, or generation of synthetic factors),
    ``stack`` (``LoraStack.from_factors``, including the copy to the device), ``jd`` (every JD call
    of :func:`jdlora.compress.clustering.jd_cluster`: the single-cluster start and each cluster's JD
    per round, or one batched call for all clusters per round where the library batches them;
    iterations are counted per cluster), ``assign`` (cluster reassignment errors), ``kmeans``,
    ``hash`` (sha256 of each weights file for the manifest). On CUDA each timer synchronizes, so
    these numbers are honest there too (at the price of a few synchronizations).
    """

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.jd_iterations = 0
        self._undo = []

    def _sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def _wrap(self, owner, attr: str, stage: str, sync: bool, on_result=None, prop: bool = False):
        original = owner.__dict__[attr]
        fn = original.fget if prop else original
        is_classmethod = isinstance(original, classmethod)
        if is_classmethod:
            fn = original.__func__

        def timed(*args, **kwargs):
            if sync:
                self._sync()
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
                if sync:
                    self._sync()
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
                self.calls[stage] = self.calls.get(stage, 0) + 1
            if on_result is not None:
                on_result(result)
            return result

        wrapped = property(timed) if prop else classmethod(timed) if is_classmethod else timed
        setattr(owner, attr, wrapped)
        self._undo.append((owner, attr, original))

    def install(self):
        import importlib

        # `import jdlora.compress.clustering as ...` fails: the attribute jdlora.compress is the function.
        clustering = importlib.import_module("jdlora.compress.clustering")
        from jdlora.compress.stack import LoraStack
        from jdlora.sources import LoraAdapter
        from jdlora.synthetic import SyntheticAdapter

        def count_iterations(result):
            self.jd_iterations += len(result.history) - 1

        self._wrap(LoraAdapter, "read_module", "read", sync=False)
        self._wrap(SyntheticAdapter, "read_module", "read", sync=False)
        self._wrap(LoraAdapter, "sha256", "hash", sync=False, prop=True)
        self._wrap(LoraStack, "from_factors", "stack", sync=True)
        # jd_cluster looks these up as module globals at call time.
        self._wrap(clustering, "jd", "jd", sync=True, on_result=count_iterations)
        if "_jd_full_clusters" in vars(clustering):  # the JD of all clusters batched (default on CUDA)
            self._wrap(clustering, "_jd_full_clusters", "jd", sync=True,
                       on_result=lambda results: [count_iterations(r) for r in results])
        self._wrap(clustering, "assignment_errors", "assign", sync=True)
        self._wrap(clustering, "kmeans", "kmeans", sync=True)
        return self

    def uninstall(self):
        for owner, attr, original in reversed(self._undo):
            setattr(owner, attr, original)
        self._undo.clear()


# ----- one run, in its own process ----------------------------------------------------------------


def run_one(spec: dict) -> dict:
    """Compresses one collection; called in a fresh subprocess (see :func:`main`)."""
    import gc

    import torch

    import jdlora
    from jdlora.synthetic import synthetic_adapters

    device = spec["device"]
    cuda = device.startswith("cuda")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if cuda:  # create the CUDA context before the baseline, so that it does not count as compression memory
        torch.zeros(1, device=device)
        torch.cuda.synchronize()
    modules = benchmark_modules(spec["modules"])
    n, rank, clusters = spec["n"], spec["rank"], spec["clusters"]
    if spec["folders"]:
        adapters = [str(Path(spec["folders"]) / f"synthetic-{i:05d}") for i in range(n)]
        source = "folders"
    else:
        # Generated on the compression device: on a GPU machine, CPU generation would dominate the time.
        adapters = synthetic_adapters(n, modules, rank=LORA_RANK, seed=SEED, device=device)
        source = "synthetic"
    breakdown = Breakdown(cuda).install()
    gc.collect()
    baseline_rss, baseline_peak = current_rss(), peak_rss()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_baseline = torch.cuda.memory_allocated()
    loadavg_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    usage0 = os.times()
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    collection = jdlora.compress(
        adapters, rank=rank, clusters=clusters, device=device, seed=SEED, progress=spec["progress"]
    )
    if cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
    usage1 = os.times()
    peak = peak_rss()
    breakdown.uninstall()

    counts = collection.parameter_counts()
    histories = [m.compression.history for m in collection.modules.values()]
    rounds = [len(h) - 1 for h in histories]
    used_clusters = [m.compression.num_clusters for m in collection.modules.values()]
    result = dict(
        n=n, config=spec["config"], rank=rank, clusters=clusters, source=source, modules=len(collection.modules),
        device=device_name(device), torch=torch.__version__, threads=torch.get_num_threads(),
        seconds=wall, seconds_per_module=wall / len(collection.modules),
        cpu_seconds=(usage1.user + usage1.system) - (usage0.user + usage0.system),
        peak_rss=peak, baseline_rss=baseline_rss, peak_rss_at_baseline=baseline_peak,
        peak_over_baseline=peak - baseline_rss, module_inputs=input_bytes(n, modules),
        error=collection.error, mean_adapter_error=collection.mean_adapter_error,
        saved_ratio=counts["saved_ratio"], parameters_original=counts["original"],
        parameters_compressed=counts["compressed"],
        clusters_used=[min(used_clusters), max(used_clusters)],
        rounds_mean=sum(rounds) / len(rounds), rounds_max=max(rounds),
        stage_seconds=breakdown.seconds, stage_calls=breakdown.calls, jd_iterations=breakdown.jd_iterations,
        loadavg_before=loadavg_before, loadavg_after=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )
    if cuda:
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        result["cuda_baseline_allocated"] = cuda_baseline
    if profiler is not None:
        import io
        import pstats

        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).sort_stats("cumulative")
        stats.print_stats(40)
        out.write("\n--- by internal time ---\n")
        stats.sort_stats("tottime").print_stats(25)
        Path(spec["profile"]).write_text(out.getvalue())
    return result


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"


def write_folders(spec: dict) -> dict:
    """Writes the first ``n`` synthetic adapters as PEFT folders (in its own process; not timed)."""
    from jdlora.synthetic import save_adapters, synthetic_adapters

    modules = benchmark_modules(spec["modules"])
    start = time.perf_counter()
    save_adapters(synthetic_adapters(spec["n"], modules, rank=LORA_RANK, seed=SEED), spec["root"])
    return dict(seconds=time.perf_counter() - start)


# ----- driver -------------------------------------------------------------------------------------


def use_checkout() -> None:
    """Benchmarks the jdlora of this checkout (``src/`` beside ``benchmarks/``), not whatever is installed."""
    src = REPO / "src"
    if (src / "jdlora").is_dir():
        sys.path.insert(0, str(src))


def checkout_version() -> str:
    """``git describe`` of the checkout (with ``-dirty`` when src/ has local edits), or 'unknown'."""
    try:
        return subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty", "--exclude", "*"], capture_output=True,
            text=True, timeout=10,
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def in_subprocess(mode: str, spec: dict) -> dict:
    """Runs ``mode`` with ``spec`` in a fresh Python process; its result comes back through a file."""
    with tempfile.TemporaryDirectory(prefix="jdlora-bench-") as tmp:
        out = Path(tmp) / "result.json"
        spec = dict(spec, out=str(out))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", mode, json.dumps(spec)]
        proc = subprocess.run(cmd)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{mode} {spec} failed with exit status {proc.returncode}.")
        return json.loads(out.read_text())


def fmt_gib(nbytes: float) -> str:
    return f"{nbytes / GIB:.2f}"


def result_bytes(r: dict) -> int:
    """Size of the compressed collection in memory: its parameters in float32 (bases and Sigmas)."""
    return r["parameters_compressed"] * 4


def markdown_table(results: list[dict]) -> str:
    cuda = any("cuda_max_allocated" in r for r in results)
    head = ["n", "config", "rank", "clusters", "source", "modules", "threads", "time (s)", "s/module",
            "peak RSS (GiB)", "peak − baseline (GiB)", "one module's inputs (GiB)", "result (GiB)",
            "peak − baseline − inputs − result (GiB)"]
    head += ["CUDA max allocated (GiB)"] if cuda else []
    head += ["pooled error", "mean adapter error", "params saved", "load avg before/after", "device"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        load = "-"
        if r.get("loadavg_before") and r.get("loadavg_after"):
            load = f"{r['loadavg_before'][0]:.1f}/{r['loadavg_after'][0]:.1f}"
        row = [str(r["n"]), r["config"], str(r["rank"]), str(r["clusters"]), r["source"], str(r["modules"]),
               str(r["threads"]), f"{r['seconds']:.1f}", f"{r['seconds_per_module']:.2f}", fmt_gib(r["peak_rss"]),
               fmt_gib(r["peak_over_baseline"]), fmt_gib(r["module_inputs"]), fmt_gib(result_bytes(r)),
               fmt_gib(r["peak_over_baseline"] - r["module_inputs"] - result_bytes(r))]
        row += [fmt_gib(r["cuda_max_allocated"]) if "cuda_max_allocated" in r else "-"] if cuda else []
        row += [f"{r['error']:.4f}", f"{r['mean_adapter_error']:.4f}", f"{r['saved_ratio']:.1%}", load, r["device"]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def breakdown_table(results: list[dict]) -> str:
    stages = ["read", "hash", "stack", "jd", "assign", "kmeans"]
    head = ["n", "config", "time (s)", "read/generate (s)", "sha256 (s)", "stack (s)", "JD (s)", "JD calls",
            "JD iterations", "assign (s)", "k-means (s)", "other (s)", "rounds mean/max", "CPU s / wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        sec = r["stage_seconds"]
        other = r["seconds"] - sum(sec.get(s, 0.0) for s in stages)
        row = [str(r["n"]), r["config"], f"{r['seconds']:.1f}", f"{sec.get('read', 0):.1f}",
               f"{sec.get('hash', 0):.1f}", f"{sec.get('stack', 0):.1f}", f"{sec.get('jd', 0):.1f}",
               str(r["stage_calls"].get("jd", 0)), str(r["jd_iterations"]), f"{sec.get('assign', 0):.1f}",
               f"{sec.get('kmeans', 0):.1f}", f"{other:.1f}", f"{r['rounds_mean']:.1f}/{r['rounds_max']}",
               f"{r['cpu_seconds'] / r['seconds']:.2f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ----- the Ray engine (--ray) -----------------------------------------------------------------------------


def ray_modules(count: int, hidden: int) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{i}.self_attn.q_proj": (hidden, hidden) for i in range(count)}


def run_ray(spec: dict) -> dict:
    """One Ray run in this (fresh) process: a local cluster of ``spec["workers"]`` CPUs."""
    import ray
    import torch

    import jdlora
    from jdlora.distributed import RayEngine
    from jdlora.distributed.engine import module_bytes

    ray.init(num_cpus=spec["workers"], include_dashboard=False, log_to_driver=False)
    modules = ray_modules(spec["modules"], spec["hidden"])
    adapters = jdlora.synthetic_adapters(spec["n"], modules, rank=spec["lora_rank"], seed=SEED)
    one_module = module_bytes(spec["n"], spec["lora_rank"], spec["hidden"], spec["hidden"], torch.float32)
    worker_memory = -(-one_module // spec["shards"]) if spec["shards"] > 1 else 64 * GIB
    stats: list[dict] = []
    baseline = peak_rss()
    start = time.perf_counter()
    collection = jdlora.compress(adapters, rank=spec["rank"], clusters=spec["clusters"], progress=spec["progress"],
                                 engine=RayEngine(worker_memory=worker_memory, on_module=stats.append))
    seconds = time.perf_counter() - start
    workers: dict[str, int] = {}
    for s in stats:
        for pid, peak in s["workers"].items():
            workers[str(pid)] = max(workers.get(str(pid), 0), peak)
    ray.shutdown()
    return dict(spec, seconds=seconds, module_seconds=[s["seconds"] for s in stats],
                module_cpu_seconds=[s["cpu_seconds"] for s in stats],
                shard_counts=[s["shards"] for s in stats], worker_peak_rss=workers, driver_peak_rss=peak_rss(),
                driver_baseline_rss=baseline, module_inputs=one_module, error=collection.error,
                mean_adapter_error=collection.mean_adapter_error)


def ray_table(results: list[dict]) -> str:
    rows = ["| run | CPUs | modules | wall s | s per module (median) | CPU s per module (median) | adapters/s | "
            "peak RSS per worker, GiB | driver peak RSS, GiB | error (pooled / mean) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        per_module = sorted(r["module_seconds"])[len(r["module_seconds"]) // 2]
        cpu = sorted(r["module_cpu_seconds"])[len(r["module_cpu_seconds"]) // 2]
        peaks = ", ".join(fmt_gib(p) for p in sorted(r["worker_peak_rss"].values()))
        kind = f"{r['shards']} shards" if r["shards"] > 1 else "modules as tasks"
        rows.append(f"| {kind} | {r['workers']} | {r['modules']} | {r['seconds']:.1f} | {per_module:.1f} | {cpu:.1f} | "
                    f"{r['n'] / r['seconds']:.0f} | {peaks} | {fmt_gib(r['driver_peak_rss'])} | "
                    f"{r['error']:.4f} / {r['mean_adapter_error']:.4f} |")
    return "\n".join(rows)


def main_ray(args) -> int:
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    header = dict(date=date, command=" ".join([Path(sys.executable).name, *sys.argv]), nproc=os.cpu_count(),
                  cpu=cpu_model(), python=platform.python_version(), checkout=checkout_version())
    print(f"# jdlora Ray engine benchmark, {date}, {header['nproc']} CPUs ({header['cpu']})", flush=True)
    base = dict(n=args.ray_adapters, modules=args.ray_modules, hidden=args.ray_hidden, lora_rank=args.ray_lora_rank,
                rank=16, clusters=1, progress=args.progress, shards=1)
    specs = [dict(base, workers=int(w)) for w in args.ray_workers.split(",")]
    specs.append(dict(base, workers=2, modules=1, shards=2))
    results = []
    for spec in specs:
        print(f"{spec['n']} adapters, {spec['modules']} modules {spec['hidden']}x{spec['hidden']}, "
              f"{spec['workers']} CPU(s), {spec['shards']} shard(s) ...", flush=True)
        r = in_subprocess("ray", spec)
        results.append(r)
        print(f"  {r['seconds']:.1f} s; worker peaks (GiB): "
              f"{', '.join(fmt_gib(p) for p in r['worker_peak_rss'].values())}", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(header, results=results), indent=2) + "\n")
    print("\n" + ray_table(results))
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,100,500,1000", help="collection sizes, comma-separated")
    parser.add_argument("--configs", default="r64,r16c", help=f"configurations: {', '.join(CONFIGS)}")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--workdir", default=None, help="where to write the PEFT folders (default: a temp dir)")
    parser.add_argument("--modules", type=int, default=None, help="only the first N modules (quick runs)")
    parser.add_argument("--max-folders", type=int, default=100,
                        help="collections up to this size are read from PEFT folders on disk (default 100)")
    parser.add_argument("--keep-folders", action="store_true",
                        help="keep the PEFT folders (a later run with the same --workdir reuses them)")
    parser.add_argument("--json", default=None, help="write the raw results here (updated after every run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in each run (default: torch's default, the core count)")
    parser.add_argument("--progress", action="store_true", help="show jdlora's progress bar per run")
    parser.add_argument("--profile", default=None, help="cProfile the compression; write the top functions here")
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="print the tables of saved --json results (several files are merged) and exit")
    parser.add_argument("--ray", action="store_true", help="benchmark the Ray engine (see above)")
    parser.add_argument("--ray-adapters", type=int, default=10_000)
    parser.add_argument("--ray-modules", type=int, default=6)
    parser.add_argument("--ray-hidden", type=int, default=256)
    parser.add_argument("--ray-lora-rank", type=int, default=8)
    parser.add_argument("--ray-workers", default="1,2", help="CPUs of the local Ray cluster, one run each")
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    use_checkout()
    if args._child:
        mode, spec = args._child[0], json.loads(args._child[1])
        result = {"run": run_one, "write": write_folders, "ray": run_ray}[mode](spec)
        Path(spec["out"]).write_text(json.dumps(result))
        return 0
    if args.ray:
        return main_ray(args)
    if args.report:
        results = [r for f in args.report for r in json.loads(Path(f).read_text())["results"]]
        print(markdown_table(results) + "\n\n" + breakdown_table(results))
        return 0

    sizes = [int(s) for s in args.sizes.split(",") if s]
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        config_settings(c, 1)  # validates the name
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    modules = benchmark_modules(args.modules)

    header = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]), nproc=os.cpu_count(), cpu=cpu_model(),
        python=platform.python_version(), modules=len(modules), device=device, checkout=checkout_version(),
        jdlora=str(Path(sys.modules["jdlora"].__file__).parent),
    )
    print(f"# jdlora compression benchmark, {header['date']}, {header['nproc']} CPUs ({header['cpu']}), "
          f"device {device}, {len(modules)} modules, jdlora from {header['jdlora']} ({header['checkout']})", flush=True)

    folder_sizes = [n for n in sizes if n <= args.max_folders]
    root = None
    written = 0
    own_root = args.workdir is None
    results: list[dict] = []
    try:
        if folder_sizes:
            need = max(folder_sizes)
            root = Path(args.workdir or tempfile.mkdtemp(prefix="jdlora-adapters-")) / f"adapters-{len(modules)}m"
            marker = root / "WRITTEN.json"  # written last: the folders are complete and match these settings
            expected = dict(modules=len(modules), lora_rank=LORA_RANK, seed=SEED)
            done = json.loads(marker.read_text()) if marker.exists() else {}
            if done.get("n", 0) >= need and all(done.get(k) == v for k, v in expected.items()):
                print(f"Reusing the {done['n']} PEFT folders in {root}", flush=True)
            else:
                root.mkdir(parents=True, exist_ok=True)
                marker.unlink(missing_ok=True)
                free = shutil.disk_usage(root).free
                if folder_bytes(need, modules) * 1.1 > free:
                    raise SystemExit(f"Writing {need} adapters needs about {fmt_gib(folder_bytes(need, modules))} "
                                     f"GiB, but {root} has {fmt_gib(free)} GiB free.")
                print(f"Writing {need} PEFT folders ({fmt_gib(folder_bytes(need, modules))} GiB) to {root} ...",
                      flush=True)
                # Adapter i of synthetic_adapters(n) does not depend on n, so the first n folders of the
                # largest collection are the collection of size n.
                info = in_subprocess("write", dict(n=need, modules=args.modules, root=str(root)))
                marker.write_text(json.dumps(dict(expected, n=need)) + "\n")
                print(f"  written in {info['seconds']:.0f} s", flush=True)
            written = need
        for n in sizes:
            for config in configs:
                rank, clusters = config_settings(config, n)
                profile = args.profile
                if profile and len(sizes) * len(configs) > 1:  # one file per run
                    profile = str(Path(profile).with_stem(f"{Path(profile).stem}-{n}-{config}"))
                spec = dict(n=n, config=config, rank=rank, clusters=clusters, device=device, modules=args.modules,
                            folders=str(root) if n <= args.max_folders else None, progress=args.progress,
                            profile=profile, threads=args.threads)
                print(f"n={n} {config} (rank {rank}, {clusters} clusters) ...", flush=True)
                r = in_subprocess("run", spec)
                results.append(r)
                print(f"  {r['seconds']:.1f} s, peak RSS {fmt_gib(r['peak_rss'])} GiB "
                      f"({fmt_gib(r['peak_over_baseline'])} over baseline; inputs of one module "
                      f"{fmt_gib(r['module_inputs'])}), error {r['error']:.4f} / {r['mean_adapter_error']:.4f}, "
                      f"saved {r['saved_ratio']:.1%}", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps(dict(header, results=results), indent=2) + "\n")
    finally:
        if root is not None and written and not args.keep_folders:
            shutil.rmtree(root.parent if own_root else root, ignore_errors=True)
    print("\n" + markdown_table(results) + "\n\n" + breakdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
