#!/usr/bin/env python
"""Where the time of the clustered JD goes (issue 2: rank 16, 25 clusters, 1,000 adapters).

Compresses the first ``--modules`` modules of the Mistral-7B benchmark collection (q 4096 x 4096,
k and v 1024 x 4096; ``synthetic_adapters(n, mistral_7b_modules(), rank=16, seed=0)``, generated on
the device as in ``benchmarks/compress_speed.py``) with ``compress_module(stack, CompressionSettings(rank=rank, clusters=clusters))``,
and reports:

1. Wall time per stage of :func:`jdlora.compress.clustering.jd_cluster`, per module and in total
   (a warm-up module first, untimed): the single-cluster JD, k-means, the per-cluster JDs (batched
   ``_jd_full_clusters`` or the per-cluster loop), the reassignment errors, the assembly of the
   result, and the rest; with rounds and JD iterations. On CUDA every stage timer synchronizes.
2. On CUDA, the host syncs per stage of one module (``torch.cuda.set_sync_debug_mode``).
3. A ``torch.profiler`` trace of one module (``--profile-modules``): the top operators by self
   device time and by self CPU time.

Usage::

    PYTHONPATH=src python benchmarks/profile_clustering.py --device cuda --modules 4 --out prof.md
    PYTHONPATH=src python benchmarks/profile_clustering.py --device cpu --threads 1 --n 200 --modules 2

``--orth householder`` runs the QR iterations with Householder QR instead of Cholesky-QR2 (the
default off the CPU) and ``--batched off`` the per-cluster loop, to compare.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import os
import platform
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if (REPO / "src" / "jdlora").is_dir():
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

STAGES = ["single JD", "k-means", "cluster JD", "reassign", "fill empty", "gather", "last moves"]


class Stages:
    """Wall-clock timers around the stages of ``jd_cluster`` (module-global lookups, so patchable)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.iterations: dict[str, int] = {}
        self.current: str | None = None
        self._undo: list[tuple[object, str, object]] = []

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def wrap(self, module, name: str, stage, iterations=None):
        original = getattr(module, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if self.current is not None:  # nested: counted in the outer stage
                return original(*args, **kwargs)
            label = stage(self) if callable(stage) else stage
            self.sync()
            start = time.perf_counter()
            self.current = label
            try:
                result = original(*args, **kwargs)
            finally:
                self.current = None
                self.sync()
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - start
                self.calls[label] = self.calls.get(label, 0) + 1
            if iterations is not None:
                self.iterations[label] = self.iterations.get(label, 0) + iterations(result)
            return result

        setattr(module, name, timed)
        self._undo.append((module, name, original))

    def install(self):
        clustering = importlib.import_module("jdlora.compress.clustering")
        # The first `jd` call of a module is the single-cluster JD; later ones are per-cluster (loop).
        self.single_done = False

        def jd_stage(self_):
            if not self_.single_done:
                self_.single_done = True
                return "single JD"
            return "cluster JD"

        self.wrap(clustering, "jd", jd_stage, iterations=lambda r: len(r.history) - 1)
        self.wrap(clustering, "_jd_full_clusters", "cluster JD",
                  iterations=lambda rs: max(len(r.history) - 1 for r in rs))
        self.wrap(clustering, "kmeans", "k-means")
        self.wrap(clustering, "assignment_errors", "reassign")
        self.wrap(clustering, "_fill_empty_clusters", "fill empty")
        self.wrap(clustering, "_gather", "gather")
        self.wrap(clustering, "_keep_last_moves", "last moves")
        return self

    def new_module(self):
        self.single_done = False

    def uninstall(self):
        for module, name, original in reversed(self._undo):
            setattr(module, name, original)
        self._undo.clear()


def force_orth(kind: str):
    """``--orth``: Householder QR or Cholesky-QR2 in the QR iterations, whatever the device."""
    if kind == "auto":
        return
    jd = importlib.import_module("jdlora.compress.jd")
    clustering = importlib.import_module("jdlora.compress.clustering")
    patched = functools.partial(jd._qr_iterations, cholesky=kind == "cholesky")
    jd._qr_iterations = patched
    clustering._qr_iterations = patched


def load_stacks(n: int, modules: dict, device: str):
    from jdlora.pipeline import read_stack
    from jdlora.synthetic import synthetic_adapters

    adapters = synthetic_adapters(n, modules, rank=16, seed=0, device=device)
    return {name: read_stack(adapters, name, device=device)[0] for name in modules}


def compress(stack, args, batched):
    from jdlora.compress import CompressionSettings, compress_module

    clustering = importlib.import_module("jdlora.compress.clustering")
    original = clustering.jd_cluster
    if batched is not None:
        clustering.jd_cluster = functools.partial(original, batched=batched)
        module = importlib.import_module("jdlora.compress.module")
        module.jd_cluster = clustering.jd_cluster
    try:
        return compress_module(stack, CompressionSettings(rank=args.rank, clusters=args.clusters))
    finally:
        if batched is not None:
            clustering.jd_cluster = original
            importlib.import_module("jdlora.compress.module").jd_cluster = original


def count_syncs(stack, args, batched, stages: Stages) -> dict[str, int]:
    """Host syncs per stage for one module, from CUDA's sync debug mode (one warning per sync)."""
    counts: dict[str, int] = {}

    def record(message, category, *rest):
        label = stages.current or "other (outside the stages)"
        counts[label] = counts.get(label, 0) + 1

    previous = torch.cuda.get_sync_debug_mode()
    timers_sync, stages.cuda = stages.cuda, False  # the timers' own syncs are not the library's
    with warnings.catch_warnings():  # restores showwarning on exit
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            stages.new_module()
            compress(stack, args, batched)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
            stages.cuda = timers_sync
    return counts


def op_table(prof, key: str, top: int) -> str:
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=1000, help="adapters (default 1000)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--clusters", type=int, default=25)
    parser.add_argument("--modules", type=int, default=4, help="first N modules of Mistral-7B's q, k, v (default 4)")
    parser.add_argument("--profile-modules", type=int, default=1, help="modules under torch.profiler (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batched", choices=["auto", "on", "off"], default="auto",
                        help="clusters' JD batched (default: on CUDA) or one cluster after the other")
    parser.add_argument("--orth", choices=["auto", "cholesky", "householder"], default="auto",
                        help="QR of the iterations (default: Cholesky-QR2 off the CPU, Householder on it)")
    parser.add_argument("--top", type=int, default=30, help="operators per table")
    parser.add_argument("--out", default=None, help="also write the report here (markdown)")
    args = parser.parse_args(argv)

    from jdlora.synthetic import mistral_7b_modules

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.zeros(1, device=args.device)
    batched = {"auto": None, "on": True, "off": False}[args.batched]
    force_orth(args.orth)
    modules = dict(list(mistral_7b_modules().items())[: max(1, args.modules)])
    lines: list[str] = []

    def out(text: str = ""):
        print(text, flush=True)
        lines.append(text)

    device_name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else platform.processor() or "cpu"
    out(f"# profile_clustering: n={args.n}, rank {args.rank}, {args.clusters} clusters, {len(modules)} modules")
    out(f"{datetime.datetime.now().astimezone().isoformat(timespec='seconds')}; device {args.device} ({device_name}); "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, {os.cpu_count()} CPUs; batched "
        f"{args.batched}, orth {args.orth}; command: {' '.join([Path(sys.executable).name, *sys.argv])}")

    start = time.perf_counter()
    stacks = load_stacks(args.n, modules, args.device)
    if cuda:
        torch.cuda.synchronize()
    out(f"\nGenerated and stacked {len(stacks)} modules in {time.perf_counter() - start:.1f} s (not counted below).")

    stages = Stages(cuda).install()
    names = list(stacks)
    # Warm-up (CUDA context, cuBLAS/cuSOLVER handles, kernel selection), untimed: the last module.
    stages.new_module()
    compress(stacks[names[-1]], args, batched)
    stages.seconds.clear(), stages.calls.clear(), stages.iterations.clear()

    out("\n## Wall time per stage (s)\n")
    out("| module | total | " + " | ".join(STAGES) + " | other | rounds | iterations (single / clusters) | error |")
    out("|---|" + "---:|" * (len(STAGES) + 4) + "---:|")
    totals: dict[str, float] = {}
    for name in names:
        stages.new_module()
        before = dict(stages.seconds)
        before_it = dict(stages.iterations)
        stages.sync()
        t0 = time.perf_counter()
        result = compress(stacks[name], args, batched)
        stages.sync()
        wall = time.perf_counter() - t0
        spent = {s: stages.seconds.get(s, 0.0) - before.get(s, 0.0) for s in STAGES}
        its = {s: stages.iterations.get(s, 0) - before_it.get(s, 0) for s in ("single JD", "cluster JD")}
        other = wall - sum(spent.values())
        for s, v in [*spent.items(), ("other", other), ("total", wall)]:
            totals[s] = totals.get(s, 0.0) + v
        short = name.replace("model.layers.", "L").replace(".self_attn.", ".")
        out(f"| {short} | {wall:.2f} | " + " | ".join(f"{spent[s]:.2f}" for s in STAGES)
            + f" | {other:.2f} | {len(result.history) - 1} | {its['single JD']} / {its['cluster JD']} | "
            f"{result.mean_adapter_error:.4f} |")
    out(f"| **all** | **{totals['total']:.2f}** | " + " | ".join(f"{totals[s]:.2f}" for s in STAGES)
        + f" | {totals['other']:.2f} | | | |")
    out("\nCluster JD iterations: per batched call the most any cluster ran (all clusters advance together), "
        "summed over rounds; in the per-cluster loop, the sum over clusters.")
    per_module = totals["total"] / len(names)
    out(f"Mean {per_module:.2f} s per module; x 96 modules = {per_module * 96:.0f} s for the whole model "
        "(k and v are cheaper than q: take the mean over the first 3+ modules).")

    if cuda:
        counts = count_syncs(stacks[names[0]], args, batched, stages)
        out("\n## Host syncs of one module (torch.cuda sync debug mode)\n")
        out("| stage | syncs |")
        out("|---|---:|")
        for label, c in sorted(counts.items(), key=lambda kv: -kv[1]):
            out(f"| {label} | {c} |")

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    stages.uninstall()  # the profiler sees the library alone
    with profile(activities=activities) as prof:
        for name in names[: max(1, args.profile_modules)]:
            compress(stacks[name], args, batched)
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        out(f"\n## Top {args.top} operators by self CUDA time ({args.profile_modules} module(s))\n")
        out("```\n" + op_table(prof, "self_cuda_time_total", args.top) + "\n```")
    out(f"\n## Top {args.top} operators by self CPU time ({args.profile_modules} module(s))\n")
    out("```\n" + op_table(prof, "self_cpu_time_total", args.top) + "\n```")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"\nWrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
