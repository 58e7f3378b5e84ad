"""Compression on a Ray cluster: ``jdlora.compress(..., engine="ray")`` (docs/scale.md).

- :mod:`.engine`: every module a Ray task, progress, resume from the output folder;
  ``add_adapters`` through the same tasks.
- :mod:`.sharded`: a module too large for one worker, its adapters sharded across Ray actors; the
  sums over adapters of the JD iterations are reduced, so the result equals the single-process one.
- :mod:`.staging`: each finished module written atomically into the output folder as it completes.

Ray is imported only when a distributed run starts: ``import jdlora`` does not import it
(``pip install "jdlora[ray]"``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class RayEngine:
    """Where and how a distributed compression runs; pass as ``jdlora.compress(..., engine=RayEngine(...))``.

    ``engine="ray"`` is ``RayEngine()``: the cluster at ``RAY_ADDRESS``, or a new local one.

    Attributes:
        address: the cluster for ``ray.init(address=...)`` (``"auto"``, ``"ray://head:10001"``,
            ``"10.0.0.1:6379"``); None: the one Ray is already connected to, ``RAY_ADDRESS``, or a
            local cluster started for this process.
        out: the output collection folder (new, empty, or a collection to replace). Each finished
            module is written to the staging area beside it (``.<out name>.jdlora-partial``) as it
            completes; a run restarted with the same inputs and settings skips those modules; the
            finished collection is saved to ``out`` and the staging area removed. None: nothing is
            written (no resume).
        worker_memory: bytes of one module's stacked factors (``n * r_max * (d_out + d_in)`` values)
            that one worker may hold. A larger module is sharded across ``ceil(bytes / worker_memory)``
            actors. Leave room for the JD's working memory (about as much again) under the worker's RAM.
        num_cpus: CPUs Ray reserves for each module task and each shard actor (Ray sets the task's
            ``OMP_NUM_THREADS`` to it).
        num_gpus: GPUs for each; with GPUs the workers compute on CUDA, else on their CPU (the
            ``device`` argument of ``compress`` applies to the local engine).
        max_retries: times Ray re-runs a module whose worker died (a killed process, a lost node).
        on_module: called on the driver with each finished module's statistics (a dict: module,
            adapters, seconds, cpu_seconds (of the task, or of all its shard actors), shards, and
            workers: ``{pid: peak RSS in bytes}``), e.g. for benchmarks.
    """

    address: str | None = None
    out: str | os.PathLike | None = None
    worker_memory: int = 4 * GIB
    num_cpus: float = 1
    num_gpus: float = 0
    max_retries: int = 3
    on_module: Callable[[dict], None] | None = None


    def finish(self, collection, *, progress: bool = True) -> None:
        """Saves the finished collection to :attr:`out` and removes the staging area."""
        from .staging import finish

        finish(collection, self.out, progress=progress)


def resolve_engine(engine) -> RayEngine:
    """``"ray"`` or a :class:`RayEngine` -> a :class:`RayEngine`."""
    if engine == "ray":
        return RayEngine()
    if isinstance(engine, RayEngine):
        return engine
    raise ValueError(f"engine must be 'local', 'ray' or a jdlora.distributed.RayEngine, got {engine!r}.")


__all__ = ["RayEngine", "resolve_engine"]
