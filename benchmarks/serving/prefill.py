"""Where a serving-study prefill's device time goes, per path (issue 13): one batch's prefill, timed and profiled.

The graph-decode study (:mod:`.run`) spends most of its time in prefills (10 new tokens after ~130 prompt
tokens), and the prefills run eagerly on every path. This runs the study's prefill alone: the same model
(Mistral-7B shapes, random bf16 weights), paths and collection as :mod:`.run`, one batch of ``--rows``
prompts of ``--width`` tokens (the study's batches: 171 rows of up to 160 tokens at batch 256, 64 at
batch 64), and reports per path the median device time of ``--reps`` prefills (CUDA events; the forward
with ``logits_to_keep=1`` and no cache) and one prefill's kernels under ``torch.profiler`` by kind
(:func:`.graph.kernel_times`) and by name (the largest first), and where the GPU sat idle in another
profiled prefill with the host's activity (:func:`.graph.device_idle`)::

    PYTHONPATH=src python -m benchmarks.serving.prefill --out DIR                  # the H200
    PYTHONPATH=src python -m benchmarks.serving.prefill --out DIR --tiny --device cpu   # smoke run

Paths: ``base``; ``jd`` (the synthetic 1,024-adapter collection, 7 clusters, rank 64: the study's setting at
1,024); ``multi-lora`` (61 rank-16 slots, the study's K at 1,024, the batch's adapters already resident).
Writes ``prefill.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..kernels import time_eager
from .engine import BasePath
from .graph import device_idle, idle_line, kernel_times
from .jd import JDPath, synthetic_collection
from .model import adapted_modules, build_model, model_config
from .multilora import LoraStore, MultiLoraPath
from .settings import PAPER_SETTINGS, slots_for


def prefill_inputs(rows: int, width: int, vocab: int, device, seed: int = 0):
    """The study's prefill inputs for ``rows`` prompts of ``width`` tokens (no padding: every row full)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (rows, width), generator=gen).to(device)
    mask = torch.ones(rows, width, dtype=torch.long, device=device)
    position = torch.arange(width, device=device).expand(rows, width)
    return dict(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False, logits_to_keep=1)


def measure(path, inputs: dict, reps: int, device: torch.device, top: int = 12) -> dict:
    """Median seconds of ``reps`` prefills (device time on CUDA: :func:`benchmarks.kernels.time_eager`) and one
    prefill's kernels by kind and name."""
    from torch.profiler import ProfilerActivity, profile

    def once():
        with torch.no_grad():
            path.forward(**inputs)

    once()  # compiles, allocator growth (time_eager runs it once more before timing)
    out = {"median_s": time_eager([once], reps, device)}
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            once()
            torch.cuda.synchronize()
        kernels = kernel_times(prof, top=top)
        out["top_kernels"] = kernels.pop("top")
        out["kernels_ms"] = kernels
        # another prefill with the host's activity too (not in the kernel sums: CPU ops carry their kernels' time)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            once()
            torch.cuda.synchronize()
        out["idle"] = device_idle(prof)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny random Mistral (CPU smoke runs)")
    p.add_argument("--shapes", default="171x160,64x160", help="rows x width of each prefill, comma-separated")
    p.add_argument("--adapters", type=int, default=1024, help="collection size (its paper setting and K)")
    p.add_argument("--paths", default="base,jd,multi-lora")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    config = model_config(args.tiny)
    model = build_model(config, device, dtype)
    modules = adapted_modules(config)
    setting = PAPER_SETTINGS[args.adapters][0]
    slots = slots_for(args.adapters, setting)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
               "adapters": args.adapters, "setting": setting.label, "slots": slots, "command": " ".join(
                   ["python -m benchmarks.serving.prefill", *(argv or [])]), "runs": []}
    gen = torch.Generator().manual_seed(1)
    for name in args.paths.split(","):
        if name == "base":
            path = BasePath(model)
            pick = args.adapters
        elif name == "jd":
            collection = synthetic_collection(modules, args.adapters, setting, device=device).to("cpu")
            path = JDPath(model, collection, dtype=dtype)
            pick = args.adapters
        elif name == "multi-lora":
            store = LoraStore(modules, slots, dtype=dtype, pin=cuda, fill_device=device)
            path = MultiLoraPath(model, store, slots, device)
            pick = slots  # at most K distinct adapters per batch (the study's scheduler)
        else:
            raise SystemExit(f"unknown path {name!r}")
        for rows, width in shapes:
            adapters = torch.randint(0, pick, (rows,), generator=gen).tolist()
            path.begin_batch(adapters)
            run = {"path": name, "rows": rows, "width": width, "tokens": rows * width,
                   "distinct": len(set(adapters)) if name != "base" else 0,
                   **measure(path, prefill_inputs(rows, width, config.vocab_size, device), args.reps, device)}
            results["runs"].append(run)
            kinds = run.get("kernels_ms", {})
            print(f"{name:>10} {rows}x{width}: {run['median_s'] * 1e3:8.1f} ms"
                  + (f"  gemm {kinds['gemm']:.1f} lora {kinds['lora']:.1f} attention {kinds['attention']:.1f} "
                     f"other {kinds['other']:.1f} ms" if kinds else ""), flush=True)
            for k in run.get("top_kernels", [])[:6]:
                print(f"{'':>14}{k['ms']:8.2f} ms  x{k['count']:<5} {k['name'][:90]}", flush=True)
            if run.get("idle"):
                print(f"{'':>14}{idle_line(run['idle'])}", flush=True)
            (out / "prefill.json").write_text(json.dumps(results, indent=1))
        path.close()
        del path
        if cuda:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
