"""Tensor-parallel check of jdlora_tgi's sharded JD path: TP N against TP 1, eager and in CUDA graphs, and the
decode/prefill cost of base vs base + JD at each TP degree, with the all-reduce of row-parallel layers timed.

One transformer layer's seven adapted projections at Mistral-7B shapes (q 4096, k/v 1024, o 4096, gate/up
14336, down 4096 <- 14336), as TGI's four layers (q/k/v and gate/up one GEMM each), random weights, a collection
of 1,024 adapters (rank 16, 8 clusters, full Sigma). The JD parts of a fused layer run together, as the hooked
TGI runs them (``jd``), and each on its own (``jd_each``, checked equal, timed at TP 1).
Each rank builds its tables the way TGI's hooks do (:class:`JDRegistry`, ``ShardSpec.for_layer(type, rank,
world)``) and runs what an adapted TGI layer runs: column-parallel ``y = x W_shard^T`` then
:func:`apply_jd` into its output slice; row-parallel ``y = x_shard W_shard^T``, all-reduce, then
:func:`apply_jd` with the process group (``V_c^T x`` partial products all-reduced in float32 before Sigma and
U). Every rank also holds the unsharded (TP 1) tables and checks its part of each output against them.

    torchrun --nproc-per-node 2 integrations/tgi/scripts/tp_check.py            # NCCL, one GPU per rank
    torchrun --nproc-per-node 2 integrations/tgi/scripts/tp_check.py --small    # gloo on the CPU, tiny shapes
    python integrations/tgi/scripts/tp_check.py --emulate 2                      # one GPU: ranks in sequence,
                                                                                 # the all-reduce a sum

``--emulate`` is for a machine with one GPU: every rank's sharded tables and Triton launches run in one process,
one rank after the other, so the sharded math and kernels are checked on the GPU, but no collective runs and
nothing about TP speed can be learned from it (it prints per-rank compute only). Exit status 0 iff every check
passes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from jdlora.collection import AdapterInfo, CollectionModule, JDLoraCollection
from jdlora.compress import ModuleCompression
from gpu_check import build  # beside this script
from jdlora_tgi.cuda_graphs import CapturableStepRows
from jdlora_tgi.forward import apply_jd, apply_jd_siblings, row_finish, row_partial
from jdlora_tgi.registry import StepRows
from jdlora_tgi.sharding import ROW_PARALLEL_LAYERS, shard_bounds

MISTRAL = {"q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
           "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336)}
TINY = {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64),
        "gate_proj": (96, 64), "up_proj": (96, 64), "down_proj": (64, 96)}
FUSED = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))  # TGI's layers


def random_collection(n: int, shapes: dict, rank: int, clusters: int, seed: int = 0) -> JDLoraCollection:
    """Orthonormal random bases per cluster, random full Sigma, adapters spread over the clusters."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for lt, (d_out, d_in) in shapes.items():
        U = torch.linalg.qr(torch.randn(clusters, d_out, rank, generator=g))[0]
        V = torch.linalg.qr(torch.randn(clusters, d_in, rank, generator=g))[0]
        # scaled so that the update is as large as the base layer's output (x W^T with W ~ N(0, 1/d_in))
        sigma = torch.randn(n, rank, rank, generator=g) * (d_out**0.5 / rank)
        cluster = torch.arange(n) % clusters
        modules[f"model.layers.0.{lt}"] = CollectionModule(
            ModuleCompression(U, V, sigma, cluster, torch.ones(n), torch.zeros(n)), torch.arange(n))
    infos = [AdapterInfo(f"a{i}", rank=rank, alpha=rank) for i in range(n)]
    return JDLoraCollection("mistral-shaped", infos, modules, "full")


class Rank:
    """One rank's weights: base weight shards and sharded JD tables; ``forward`` runs the seven projections as
    TGI's four layers (q/k/v and gate/up each one GEMM into one output, as TGI fuses them)."""

    def __init__(self, coll, W: dict, device, dtype, world: int, rank: int, group=None):
        self.world, self.rank, self.group = world, rank, group
        self.registry = build({"org/collection": coll}, None, device, dtype, world, rank)  # as one TGI rank does
        shards = {}
        for lt, w in W.items():
            d_out, d_in = w.shape
            if world == 1:
                part = w
            elif lt in ROW_PARALLEL_LAYERS:
                part = w[:, slice(*shard_bounds(d_in, rank, world))]
            else:
                part = w[slice(*shard_bounds(d_out, rank, world))]
            shards[lt] = part.to(device, dtype).contiguous()
        self.layers = []  # (layer types, their shards stacked as one weight, each one's columns of the output)
        for names in FUSED:
            names = tuple(n for n in names if n in shards)
            widths = [shards[n].shape[0] for n in names]
            columns = [(sum(widths[:i]), sum(widths[:i + 1])) for i in range(len(names))]
            self.layers.append((names, torch.cat([shards[n] for n in names]), columns))

    def local_input(self, lt: str, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1 and lt in ROW_PARALLEL_LAYERS:
            return x[:, slice(*shard_bounds(x.shape[1], self.rank, self.world))].contiguous()
        return x

    def forward(self, xs: dict, step, jd: bool = True, collective: bool = True, together: bool = True) -> dict:
        """``{layer type: output}``: this rank's slice (column-parallel) or the reduced output (row-parallel).
        ``together``: the JD parts of a fused layer's types in one go (:func:`apply_jd_siblings`, what the hooked
        ``TensorParallelMultiAdapterLinear`` runs), else each its own :func:`apply_jd`."""
        out = {}
        for names, w, columns in self.layers:
            x = self.local_input(names[0], xs[names[0]])
            y = x @ w.T
            row = names[0] in ROW_PARALLEL_LAYERS and self.world > 1
            if row and collective:
                dist.all_reduce(y, group=self.group)
            if jd and (collective or not row):
                tables = [self.registry.tables[n] for n in names]
                if together and len(names) > 1:
                    apply_jd_siblings(tables, 0, y, x, step, columns)
                else:
                    for table, (a, b) in zip(tables, columns):
                        apply_jd(table, 0, y, x, step, a, b, process_group=self.group if row else None)
            for n, (a, b) in zip(names, columns):
                out[n] = y[:, a:b]
        return out


def line(text: str) -> None:
    """One write per line, so that the lines of several ranks sharing a stdout do not interleave."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def expected_slice(lt: str, ref: torch.Tensor, world: int, rank: int) -> torch.Tensor:
    if world == 1 or lt in ROW_PARALLEL_LAYERS:
        return ref
    return ref[:, slice(*shard_bounds(ref.shape[1], rank, world))]


def make_inputs(shapes, T, n, device, dtype, seed):
    """Adapter rows (-1: base rows, mixed with every cluster) and one input per TGI layer (its types share it)."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(-1, n, (T,), generator=g)
    xs = {}
    for names in FUSED:
        x = torch.randn(T, shapes[names[0]][1], generator=g).to(device, dtype)
        xs.update(dict.fromkeys(names, x))
    return picks.to(device=device, dtype=torch.int32), xs


def time_graph(fn, device, iters: int) -> float:
    """Median microseconds of one replay of ``fn`` captured in a CUDA graph (warmed up on a side stream)."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--small", action="store_true", help="tiny shapes and 40 adapters (CPU)")
    p.add_argument("--emulate", type=int, default=0, metavar="N", help="run N ranks in sequence in one process")
    p.add_argument("--adapters", type=int, default=1024)
    p.add_argument("--tokens", default="64,2048", help="batch sizes in tokens (decode, prefill)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--json", default="", help="write the timings here (rank 0)")
    args = p.parse_args()

    distributed = "RANK" in os.environ and not args.emulate
    cuda = torch.cuda.is_available() and not args.small
    if distributed:
        dist.init_process_group("nccl" if cuda else "gloo")
        world, me = dist.get_world_size(), dist.get_rank()
    else:
        world, me = (args.emulate or 1), 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes, n = (TINY, min(args.adapters, 40)) if args.small else (MISTRAL, args.adapters)
    tokens = [int(t) for t in args.tokens.split(",")] if not args.small else [16, 40]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4

    coll = random_collection(n, shapes, rank=16 if not args.small else 4, clusters=8 if not args.small else 3)
    g = torch.Generator().manual_seed(1)
    W = {lt: torch.randn(d_out, d_in, generator=g) / d_in**0.5 for lt, (d_out, d_in) in shapes.items()}
    tp1 = Rank(coll, W, device, dtype, 1, 0)
    if distributed:
        ranks = [Rank(coll, W, device, dtype, world, me, dist.group.WORLD)]
    else:
        ranks = [Rank(coll, W, device, dtype, world, r) for r in range(world)]
    say = print if me == 0 else (lambda *a, **k: None)
    say(f"TP {world} ({'torch.distributed ' + dist.get_backend() if distributed else 'emulated in one process'}), "
        f"{device} {dtype}, {n} adapters, shapes {'tiny' if args.small else 'Mistral-7B'}", flush=True)

    ok = True

    def report(label, err):
        nonlocal ok
        good = err < tol
        ok &= good
        line(f"[rank {me}] {'OK ' if good else 'BAD'} {label}: relative error {err:.2e} (tol {tol:.0e})")

    for T in tokens:
        rows, xs = make_inputs(shapes, T, n, device, dtype, seed=T)
        ref = tp1.forward(xs, StepRows(rows), together=False)
        base = tp1.forward(xs, StepRows(rows), jd=False)
        together = tp1.forward(xs, StepRows(rows))
        for lt in shapes:  # the fused layers' JD parts in one go == each its own
            report(f"T={T} {lt} together == each", relative_error(together[lt], ref[lt]))
        for lt in shapes:  # the JD update must be visible, or the comparison says nothing
            assert relative_error(base[lt], ref[lt]) > 10 * tol, f"JD update of {lt} too small to check"
        if distributed:
            out = ranks[0].forward(xs, StepRows(rows))
            for lt in shapes:
                report(f"T={T} {lt} TP{world} == TP1", relative_error(out[lt], expected_slice(lt, ref[lt], world, me)))
        else:
            outs = [r.forward(xs, StepRows(rows), collective=False) for r in ranks]
            step = StepRows(rows)
            for lt in shapes:
                if lt in ROW_PARALLEL_LAYERS and world > 1:  # the two all-reduces, as sums
                    y = sum(o[lt] for o in outs)
                    h = sum(row_partial(r.registry.tables[lt], 0, r.local_input(lt, xs[lt]), step.batch) for r in ranks)
                    row_finish(ranks[0].registry.tables[lt], 0, y, h, step.batch)
                else:
                    y = torch.cat([o[lt] for o in outs], dim=1)
                report(f"T={T} {lt} TP{world} (emulated) == TP1", relative_error(y, ref[lt]))

    if cuda:
        ok &= graphs_and_timings(args, shapes, n, device, dtype, tp1, ranks, world, me, distributed, tol, say)
    if distributed:
        flag = torch.tensor([int(ok)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
        dist.destroy_process_group()
    say("ALL OK" if ok else "FAILURES", flush=True)
    return 0 if ok else 1


def graphs_and_timings(args, shapes, n, device, dtype, tp1, ranks, world, me, distributed, tol, say) -> bool:
    """CUDA graphs with a static rows buffer (what ``JDLORA_TGI_CUDA_GRAPHS=1`` captures), then timings."""
    ok = True
    T = 64
    rows_buf = torch.full((T,), -1, dtype=torch.int32, device=device)
    step = CapturableStepRows(rows_buf)
    _, xs = make_inputs(shapes, T, n, device, dtype, seed=7)
    me_rank = ranks[0]
    outs = {}

    def jd_step():
        outs.update(me_rank.forward(xs, step, collective=distributed))

    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(s):
        jd_step()
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        jd_step()
    for trial in range(3):
        rows, new_xs = make_inputs(shapes, T, n, device, dtype, seed=100 + trial)
        rows_buf.copy_(rows)
        for lt in xs:
            xs[lt].copy_(new_xs[lt])
        graph.replay()
        torch.cuda.synchronize(device)
        ref = tp1.forward(xs, StepRows(rows))
        for lt in shapes:
            if not distributed and world > 1 and lt in ROW_PARALLEL_LAYERS:
                continue  # emulated: row-parallel outputs need the other ranks' partials (checked eagerly above)
            err = relative_error(outs[lt], expected_slice(lt, ref[lt], world, me))
            good = err < tol
            ok &= good
            line(f"[rank {me}] {'OK ' if good else 'BAD'} graph replay {trial} {lt}: relative error {err:.2e}")

    results = {"world": world, "distributed": distributed, "adapters": n, "tokens": {}}
    for T in [int(t) for t in args.tokens.split(",")]:
        rows, xs_t = make_inputs(shapes, T, n, device, dtype, seed=T)
        stepT = StepRows(rows)
        entry = {}
        if me == 0:  # TP 1 on this GPU, in the same run (the other ranks wait)
            entry["tp1_base_us"] = time_graph(lambda: tp1.forward(xs_t, stepT, jd=False), device, args.iters)
            entry["tp1_jd_each_us"] = time_graph(lambda: tp1.forward(xs_t, stepT, together=False), device, args.iters)
            entry["tp1_jd_us"] = time_graph(lambda: tp1.forward(xs_t, stepT), device, args.iters)
        if distributed:
            dist.barrier()
        if world > 1:
            entry[f"tp{world}_base_us"] = time_graph(lambda: me_rank.forward(xs_t, stepT, jd=False,
                                                                             collective=distributed), device, args.iters)
            entry[f"tp{world}_jd_us"] = time_graph(lambda: me_rank.forward(xs_t, stepT, collective=distributed),
                                                   device, args.iters)
            if distributed:
                y = torch.zeros(T, shapes["o_proj"][0], device=device, dtype=dtype)
                h = torch.zeros(T, 16, device=device, dtype=torch.float32)
                entry["allreduce_output_us"] = time_graph(lambda: dist.all_reduce(y), device, args.iters)
                entry["allreduce_jd_h_us"] = time_graph(lambda: dist.all_reduce(h), device, args.iters)
        results["tokens"][T] = entry
        say(f"T={T}: " + ", ".join(f"{k} {v:.1f}" for k, v in entry.items()), flush=True)
    if me == 0:
        note = "" if distributed else " (emulated: one rank's compute only, no collective)"
        say(f"per layer (7 projections), median of {args.iters} graph replays, microseconds{note}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    return ok


if __name__ == "__main__":
    started = time.perf_counter()
    code = main()
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
    sys.exit(code)
