"""The Ray engine: every module of a compression a Ray task, finished modules staged as they complete.

The driver submits one task per module not finished yet, waits for them in completion order
(``ray.wait``), writes each result into the staging area of the output folder (:mod:`.staging`) and
shows progress. A module whose stacked factors exceed ``RayEngine.worker_memory`` runs as a
coordinator task that shards its adapters across :class:`~.sharded.ShardActor` actors. Ray re-runs a
task whose worker died (``max_retries``); a coordinator whose shard actor died is re-run the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import resource
import sys
import time
from collections.abc import Sequence

import ray
import torch
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from tqdm.auto import tqdm

from ..collection import CollectionModule
from ..compress import CompressionSettings, LoraStack, compress_module, project_onto_bases
from . import RayEngine
from .sharded import ShardActor, _Shards, compress_module_sharded
from .staging import Staging


def connect(engine: RayEngine) -> None:
    """``ray.init(address=engine.address)`` unless this process is connected already."""
    if not ray.is_initialized():
        ray.init(address=engine.address)


def worker_peak() -> tuple[int, int]:
    """``(pid, peak RSS in bytes)`` of this worker process (Linux reports ``ru_maxrss`` in KiB)."""
    import os

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return os.getpid(), peak if sys.platform == "darwin" else peak * 1024


def _device(engine: RayEngine) -> str:
    return "cuda" if engine.num_gpus else "cpu"


def module_bytes(n: int, r_max: int, d_out: int, d_in: int, dtype: torch.dtype) -> int:
    """Bytes of one module's stacked factors (a ``LoraStack``): ``n * r_max * (d_out + d_in)`` values."""
    return n * r_max * (d_out + d_in) * torch.empty((), dtype=dtype).element_size()


def shard_count(engine: RayEngine, sources: Sequence, module: str, dtype: torch.dtype) -> int:
    """1, or the number of shards a module needs so that each fits ``engine.worker_memory``.

    A module small enough for the span reduction (``n * r_max <= d / 2``) is never sharded: its
    factors are at most ``d^2`` values.
    """
    shapes = [s.modules[module] for s in sources if module in s.modules]
    n, r_max = len(shapes), max(r for r, _, _ in shapes)
    d_out, d_in = shapes[0][1], shapes[0][2]
    size = module_bytes(n, r_max, d_out, d_in, dtype)
    if size <= engine.worker_memory or n * r_max * 2 <= min(d_out, d_in):
        return 1
    return min(n, math.ceil(size / engine.worker_memory))


# ----- tasks ----------------------------------------------------------------------------------------------


@ray.remote
def _compress_module_task(sources, module: str, settings: CompressionSettings, device: str):
    from ..pipeline import _to_cpu, check_finite, read_stack

    start, cpu = time.perf_counter(), time.process_time()
    stack, ids = read_stack(sources, module, dtype=settings.dtype, device=device)
    result = compress_module(stack, settings)
    check_finite(module, [sources[i].name for i in ids], result.sq_norms, result.residuals, result.sigma,
                 result.U, result.V)
    entry = CollectionModule(_to_cpu(result), torch.tensor(ids))
    pid, peak = worker_peak()
    return entry, {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu, "shards": 1,
                   "workers": {pid: peak}}


@ray.remote(num_cpus=0)
def _compress_sharded_task(sources, module: str, shards: int, settings: CompressionSettings, device: str,
                           num_cpus: float, num_gpus: float):
    """Coordinator of one sharded module: creates its shard actors and drives the reduced JD."""
    from ..pipeline import check_finite

    start = time.perf_counter()
    ids = [i for i, s in enumerate(sources) if module in s.modules]
    bounds = [len(ids) * s // shards for s in range(shards + 1)]
    parts = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    r_max = max(sources[i].modules[module][0] for i in ids)
    _, d_out, d_in = sources[ids[0]].modules[module]
    # All shards at once or none (a placement group): shards of several modules each holding part of
    # the cluster would wait for one another forever. SPREAD puts them on different nodes where it can.
    bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
    group = placement_group([bundle] * shards, strategy="SPREAD")
    ray.get(group.ready())
    try:
        actors = [
            ray.remote(ShardActor).options(
                num_cpus=num_cpus, num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=s),
            ).remote(sources, module, part, r_max, settings.dtype, device, settings.normalize)
            for s, part in enumerate(parts)
        ]
        handle = _Shards(actors, [len(p) for p in parts], r_max, d_out, d_in, settings.dtype)
        result = compress_module_sharded(handle, settings)
        check_finite(module, [sources[i].name for i in ids], result.sq_norms, result.residuals, result.sigma,
                     result.U, result.V)
        usage = handle.call("usage")
        for a in actors:
            ray.kill(a)
    finally:
        remove_placement_group(group)
    entry = CollectionModule(result, torch.tensor(ids))
    return entry, {"seconds": time.perf_counter() - start, "cpu_seconds": sum(u[2] for u in usage), "shards": shards,
                   "workers": {u[0]: u[1] for u in usage}}


@ray.remote
def _project_task(sources, module: str, ids: list[int], U: torch.Tensor, V: torch.Tensor, sigma_kind: str):
    stack = LoraStack.from_factors([sources[i].read_module(module) for i in ids],
                                   [sources[i].scaling(module) for i in ids], dtype=U.dtype)
    sigma, cluster, res = project_onto_bases(stack, U, V, sigma_kind)
    return stack.sq_norms(), sigma, cluster, res


# ----- the driver -----------------------------------------------------------------------------------------


def compress_modules(engine: RayEngine, sources: Sequence, module_names: list[str], settings: CompressionSettings, *,
                     infos: list, progress: bool = True) -> dict[str, CollectionModule]:
    """Compresses every module as a Ray task; returns ``{module: CollectionModule}`` in ``module_names`` order.

    With ``engine.out``, modules finished by an earlier run of the same inputs and settings are read
    from the staging area instead of recomputed, and each new one is staged as it completes.
    """
    dtype = settings.dtype
    if settings.sigma_kind != "full" or settings.solver != "qr":
        sharded = [m for m in module_names if shard_count(engine, sources, m, dtype) > 1]
        if sharded:
            raise ValueError(
                f"Module {sharded[0]} ({len(sharded)} module(s) in all) exceeds RayEngine.worker_memory = "
                f"{engine.worker_memory:,} bytes and must be sharded, which runs JD-Full with the QR solver only "
                f"(got sigma_kind={settings.sigma_kind!r}, solver={settings.solver!r}). Use those, or raise "
                "worker_memory."
            )
    staging = None
    done: dict[str, CollectionModule] = {}
    if engine.out is not None:
        staging = Staging.open(engine.out, run_fingerprint(infos, module_names, settings))
        done = {m: e for m, e in staging.finished().items() if m in module_names}
    todo = [m for m in module_names if m not in done]
    n_adapters = len(sources)
    bar = tqdm(total=len(module_names), initial=len(done), desc="Compressing modules (Ray)", unit="module",
               disable=not progress)
    if done:
        bar.write(f"Resuming: {len(done)} of {len(module_names)} modules already finished in {staging.root}.")
    if todo:
        connect(engine)
        device = _device(engine)
        counts = {m: shard_count(engine, sources, m, dtype) for m in todo}
        _check_capacity(engine, max(counts.values()), max(counts, key=counts.get))
        sources_ref = ray.put(list(sources))
        pending = {}
        for module in todo:
            shards = counts[module]
            if shards == 1:
                task = _compress_module_task.options(num_cpus=engine.num_cpus, num_gpus=engine.num_gpus,
                                                     max_retries=engine.max_retries)
                ref = task.remote(sources_ref, module, settings, device)
            else:
                task = _compress_sharded_task.options(max_retries=engine.max_retries, retry_exceptions=[RayActorError])
                ref = task.remote(sources_ref, module, shards, settings, device, engine.num_cpus, engine.num_gpus)
            pending[ref] = module
        start, finished_now = time.perf_counter(), 0
        try:
            while pending:
                (ref,), _ = ray.wait(list(pending), num_returns=1)
                module = pending.pop(ref)
                entry, stats = _get(ref)
                if staging is not None:
                    staging.write(module, entry)
                done[module] = entry
                finished_now += 1
                # whole adapters (all their modules) per second: the collection's throughput
                rate = finished_now / len(module_names) * n_adapters / (time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix({"adapters/s": f"{rate:.1f}"})
                if engine.on_module is not None:
                    engine.on_module({"module": module, "adapters": len(entry.adapter_ids), **stats})
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            bar.close()
    else:
        bar.close()
    return {m: done[m] for m in module_names}


def project_modules(engine: RayEngine, collection, sources: Sequence) -> dict[str, tuple]:
    """``add_adapters`` through Ray: each module's projection onto the bases a task (chunks of adapters
    that fit ``worker_memory``; the projection is per adapter). Returns
    ``{module: (sq_norms, sigma, cluster, residuals, ids)}`` for the modules the new adapters have."""
    connect(engine)
    sources_ref = ray.put(list(sources))
    pending = {}
    for module, entry in collection.modules.items():
        ids = [i for i, s in enumerate(sources) if module in s.modules]
        if not ids:
            continue
        c = entry.compression
        r_max = max(sources[i].modules[module][0] for i in ids)
        size = module_bytes(len(ids), r_max, c.U.shape[1], c.V.shape[1], c.U.dtype)
        chunks = max(1, min(len(ids), math.ceil(size / engine.worker_memory)))
        bounds = [len(ids) * s // chunks for s in range(chunks + 1)]
        U, V = ray.put(c.U.cpu()), ray.put(c.V.cpu())
        task = _project_task.options(num_cpus=engine.num_cpus, max_retries=engine.max_retries)
        refs = [task.remote(sources_ref, module, ids[a:b], U, V, collection.sigma_kind)
                for a, b in zip(bounds[:-1], bounds[1:])]
        pending[module] = (refs, ids)
    out = {}
    for module, (refs, ids) in pending.items():
        parts = [_get(ref) for ref in refs]
        out[module] = (*(torch.cat([p[i] for p in parts]) for i in range(4)), ids)
    return out


def _check_capacity(engine: RayEngine, shards: int, module: str) -> None:
    """A sharded module needs all its shards at once: fail now, not hang, when the cluster cannot hold them."""
    cpus = ray.cluster_resources().get("CPU", 0)
    if shards > 1 and shards * engine.num_cpus > cpus:
        raise ValueError(
            f"Module {module} needs {shards} shards of RayEngine.worker_memory = {engine.worker_memory:,} bytes "
            f"running at once ({shards * engine.num_cpus:g} CPUs at num_cpus={engine.num_cpus:g}), but the Ray "
            f"cluster has {cpus:g} CPUs. Add nodes, or raise worker_memory if the workers have the RAM."
        )


def _get(ref):
    """``ray.get``, re-raising a task's own exception (a jdlora error naming the adapter) as itself."""
    try:
        return ray.get(ref)
    except RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def run_fingerprint(infos: list, module_names: list[str], settings: CompressionSettings) -> str:
    """Identifies a run's inputs (adapter names, origins with sha256, ranks) and settings, for resuming."""
    from .. import __version__

    payload = {
        "jdlora": __version__,
        "adapters": [[i.name, i.origin, i.module_ranks, i.alpha, i.use_rslora] for i in infos],
        "modules": module_names,
        "settings": {k: str(v) for k, v in sorted(settings.to_dict().items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
