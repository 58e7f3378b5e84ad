"""GPU check of jdlora_tgi's JD path at real sizes: Triton kernels vs a float64 reference, the row-parallel
split, and CUDA-graph capture with a static rows buffer (what ``JDLORA_TGI_CUDA_GRAPHS=1`` does in TGI).

Runs without TGI (its server needs CUDA attention kernels from the Hub): it drives the same objects TGI's
hooks drive (JDRegistry, JDLayerTable, StepRows / CapturableStepRows, apply_jd).

    PYTHONPATH=src:integrations/tgi/src python integrations/tgi/scripts/gpu_check.py          # H200
    TRITON_INTERPRET=1 PYTHONPATH=... python integrations/tgi/scripts/gpu_check.py --small    # CPU smoke
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from jdlora.collection import AdapterInfo, CollectionModule, JDLoraCollection
from jdlora.compress import ModuleCompression
from jdlora_tgi.cuda_graphs import CapturableStepRows
from jdlora_tgi.forward import apply_jd, row_finish, row_partial
from jdlora_tgi.naming import JDSource
from jdlora_tgi.registry import JDRegistry, StepRows
from jdlora_tgi.sharding import ShardSpec, shard_bounds


def collection(n, shapes, rank, clusters, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for name, (d_out, d_in) in shapes.items():
        U = torch.linalg.qr(torch.randn(clusters, d_out, rank, generator=g))[0]
        V = torch.linalg.qr(torch.randn(clusters, d_in, rank, generator=g))[0]
        s = torch.randn(n, rank, rank, generator=g) if sigma == "full" else torch.randn(n, rank, generator=g)
        modules[name] = CollectionModule(ModuleCompression(U, V, s, torch.randint(0, clusters, (n,), generator=g),
                                                           torch.ones(n), torch.zeros(n)), torch.arange(n))
    return JDLoraCollection("x", [AdapterInfo(f"a{i}", rank=rank, alpha=rank) for i in range(n)], modules, sigma)


def build(colls, shapes, device, dtype, world=1, rank=0):
    registry = JDRegistry()
    for key, coll in colls.items():
        source = JDSource(key)
        registry._collections[source] = coll
        for name in coll.adapter_names:
            row = registry.register_adapter(f"{key}:{name}", source, name)
            for module, entry in coll.modules.items():
                lt = module.split(".")[-1]
                table = registry.table(lt, 1, ShardSpec.for_layer(lt, rank, world))
                table.device, table.dtype = device, dtype
                table.add(0, source, entry.compression, entry.adapter_ids, coll.index(name), row)
    registry.build()
    return registry


def reference(colls, rows_meta, module, x):
    """float64 ``U_c Sigma_a V_c^T x`` per token from the collections' own factors (zeros for -1)."""
    xd = x.double()
    d_out = colls[next(iter(colls))].modules[module].compression.U.shape[1]
    out = torch.zeros(x.shape[0], d_out, dtype=torch.float64, device=x.device)
    for t, meta in enumerate(rows_meta):
        if meta is None:
            continue
        key, name = meta
        entry = colls[key].modules[module]
        k = entry.row_of(colls[key].index(name))
        comp = entry.compression
        c = int(comp.cluster[k])
        S = comp.sigma[k].double().to(x.device)
        S = torch.diag(S) if S.dim() == 1 else S
        U, V = comp.U[c].double().to(x.device), comp.V[c].double().to(x.device)
        out[t] = U @ (S @ (V.T @ xd[t]))
    return out.cpu()


def check(label, got, ref, tol):
    err = ((got.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    ok = err < tol
    print(f"{'OK ' if ok else 'BAD'} {label}: relative error {err:.2e} (tol {tol:.0e})", flush=True)
    return ok


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="tiny sizes (CPU, TRITON_INTERPRET=1)")
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.small:
        shapes = {"m.q_proj": (64, 64), "m.k_proj": (32, 64), "m.down_proj": (64, 96)}
        sizes, n1, n2, r1, r2 = [8, 40], 12, 5, 8, 4
    else:  # Llama-3-8B shapes
        shapes = {"m.q_proj": (4096, 4096), "m.k_proj": (1024, 4096), "m.down_proj": (4096, 14336)}
        sizes, n1, n2, r1, r2 = [64, 2048], 256, 64, 16, 8
    colls = {"org/full": collection(n1, shapes, r1, 4, "full", 0), "diag": collection(n2, shapes, r2, 2, "diag", 1)}
    registry = build(colls, shapes, device, dtype)
    metas = [(k, n) for k, c in colls.items() for n in c.adapter_names]
    row_of = {m: registry._row_by_id[f"{m[0]}:{m[1]}"] for m in metas}
    mem = registry.memory()
    print(f"device {device} {dtype}; {mem['adapters']} adapters, JD {mem['total_bytes'] / 2**20:.1f} MiB "
          f"(plain LoRA {mem['lora_equivalent_bytes'] / 2**20:.1f} MiB)", flush=True)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = True
    g = torch.Generator().manual_seed(5)
    for T in sizes:
        picks = torch.randint(-1, len(metas), (T,), generator=g).tolist()
        token_meta = [metas[i] if i >= 0 else None for i in picks]
        rows = torch.tensor([row_of[m] if m else -1 for m in token_meta], dtype=torch.int32, device=device)
        step = StepRows(rows)
        for module, (d_out, d_in) in shapes.items():
            lt = module.split(".")[-1]
            x = torch.randn(T, d_in, generator=g).to(device, dtype)
            y = torch.zeros(T, d_out, device=device, dtype=dtype)
            apply_jd(registry.tables[lt], 0, y, x, step, 0, d_out)
            ref = reference(colls, token_meta, module, x)
            ok &= check(f"T={T} {lt} one rank", y, ref, tol)
        # row-parallel: 2 ranks' partial V^T x summed (the all-reduce), then Sigma and U on the full sum
        module, (d_out, d_in) = "m.down_proj", shapes["m.down_proj"]
        x = torch.randn(T, d_in, generator=g).to(device, dtype)
        shards = [build(colls, {module: shapes[module]}, device, dtype, 2, r).tables["down_proj"] for r in range(2)]
        h = sum(row_partial(t, 0, x[:, slice(*shard_bounds(d_in, r, 2))].contiguous(), step.batch)
                for r, t in enumerate(shards))
        y = torch.zeros(T, d_out, device=device, dtype=dtype)
        row_finish(shards[0], 0, y, h, step.batch)
        ok &= check(f"T={T} down_proj 2-rank split", y, reference(colls, token_meta, module, x), tol)
    if cuda:
        ok &= graph_check(registry, colls, metas, row_of, shapes, device, dtype, tol)
    print("ALL OK" if ok else "FAILURES", flush=True)
    return 0 if ok else 1


def graph_check(registry, colls, metas, row_of, shapes, device, dtype, tol) -> bool:
    """Capture q/k/down with a static rows buffer; replay with other rows; compare to the reference."""
    bs = 32
    rows_buf = torch.full((bs,), -1, dtype=torch.int32, device=device)
    step = CapturableStepRows(rows_buf)
    xs = {m: torch.randn(bs, d_in, device=device, dtype=dtype) for m, (_, d_in) in shapes.items()}
    ys = {m: torch.zeros(bs, d_out, device=device, dtype=dtype) for m, (d_out, _) in shapes.items()}

    def layer_step():
        for m, (d_out, _) in shapes.items():
            ys[m].zero_()
            apply_jd(registry.tables[m.split(".")[-1]], 0, ys[m], xs[m], step, 0, d_out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        layer_step()  # compiles the kernels outside the capture, as TGI's warm-up forward does
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layer_step()
    ok = True
    g = torch.Generator().manual_seed(9)
    for trial in range(3):
        n = [bs, 7, 20][trial]  # batches smaller than the graph: padding rows stay -1
        picks = torch.randint(-1, len(metas), (n,), generator=g).tolist()
        token_meta = [metas[i] if i >= 0 else None for i in picks] + [None] * (bs - n)
        rows_buf.fill_(-1)
        rows_buf[:n].copy_(torch.tensor([row_of[m] if m else -1 for m in token_meta[:n]], dtype=torch.int32))
        for m in shapes:
            xs[m].copy_(torch.randn(xs[m].shape, generator=g).to(device, dtype))
        graph.replay()
        torch.cuda.synchronize()
        for m in shapes:
            ok &= check(f"graph replay {trial} ({n} tokens) {m.split('.')[-1]}", ys[m],
                        reference(colls, token_meta, m, xs[m]), tol)
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        graph.replay()
    torch.cuda.synchronize()
    print(f"graph replay of the JD path of q+k+down, {bs} tokens: {(time.perf_counter() - t0) * 1e4:.1f} us",
          flush=True)
    return ok


if __name__ == "__main__":
    sys.exit(main())
