"""TGI's own CUDA-graph path with JD-LoRA (``JDLORA_TGI_CUDA_GRAPHS=1``), end to end on one GPU.

``FlashCausalLM.warmup`` captures TGI's decode graphs (``CUDA_GRAPHS``, here 1,2,4,8) through
``cuda_graph_warmup``, hooked by jdlora_tgi to capture the JD path; then a batch mixing the base model, a
plain LoRA and three JD-LoRA adapters of one collection runs through ``generate_token`` (prefill, decode,
``filter`` of finished requests, as TGI's server does). Every decode step's logits are computed three times
on the same KV cache: without adapters, eagerly (graphs hidden), then as TGI runs it (graph replay where
TGI and jdlora_tgi choose one). Printed per step: the graph replayed (if any), the max relative error
graph vs eager, and the adapters' effect (eager with vs without adapters, which the error must stay far
below). PASS (exit 0) when every step matches, JD-only steps replayed a graph and plain-LoRA steps did not.

Real TGI 3.3.7 code: ``FlashCausalLM`` (``__init__``, ``warmup``, ``cuda_graph_warmup``, ``generate_token``,
``forward``), ``FlashCausalLMBatch`` (``from_pb``, ``filter``), ``FlashLlamaForCausalLM`` and its layers,
``KVCache``, adapter loading (``get_model_with_lora_adapters``), with jdlora_tgi's hooks and Triton kernels.
Replaced (docs/tgi.md, "Running TGI's own server offline"): the compiled kernel modules, by plain torch
(``tgi_standins.py``), and ``models.get_model``, whose flash-model imports fail with transformers 5, by
the call its llama branch makes (``FlashCausalLM(model_class=FlashLlamaForCausalLM, ...)``).

    integrations/tgi/scripts/graph_warmup_check.sh                           # H200 (installs TGI's deps)
    JDLORA_TGI_SERVER=/path/to/tgi/server PYTHONPATH=src:integrations/tgi/src \\
        python integrations/tgi/scripts/graph_warmup_check.py --cpu-dry-run  # CPU: all but capture/replay

``--cpu-dry-run`` makes TGI take its CUDA code paths on the CPU (``tgi_standins.pretend_cuda_system``),
sizes the KV cache from a fixed budget, builds the model through TGI's CPU branch, and leaves
``CUDA_GRAPHS`` unset: every step is eager vs eager.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from tiny_llama import projection_modules, write_tiny_llama  # beside this script

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]

# (adapter id, prompt words, max_new_tokens); "coll:<name>" are JD adapters, "plain" a plain LoRA. With
# filtering of finished requests: decode steps 1-2 have 5 requests with plain LoRA (eager), 3-4 have 4
# (graph 4), 5-6 have 3 (graph 4, one padding row).
REQUESTS = [("base", 5, 7), ("coll:synthetic-00000", 4, 7), ("coll:synthetic-00001", 6, 5), ("plain", 3, 3),
            ("coll:synthetic-00003", 5, 7)]
LLAMA = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 96, "max_position_embeddings": 512}
TOLERANCE = {"bfloat16": 5e-2, "float16": 2e-2, "float32": 1e-3}  # graph vs eager, relative to max |logit|


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="everything but capture/replay, on the CPU")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(TOLERANCE))
    p.add_argument("--graphs", default="1,2,4,8", help="CUDA_GRAPHS batch sizes")
    p.add_argument("--tgi-server", default=os.environ.get("JDLORA_TGI_SERVER") or os.environ.get("TGI_SERVER_PATH"),
                   help="TGI v3.3.7's server/ folder (default: $JDLORA_TGI_SERVER)")
    p.add_argument("--keep", type=Path, help="write the model and adapters here instead of a temp dir")
    return p.parse_args()


# ----- setting up TGI ------------------------------------------------------------------------------------


def import_tgi(args):
    """Environment as the launcher sets it, stand-ins for the kernel modules, hooks, then TGI's modules."""
    os.environ.update(ATTENTION="paged", PREFIX_CACHING="0", PREFILL_CHUNKING="0", JDLORA_TGI_CUDA_GRAPHS="1",
                      HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    os.environ.setdefault("CUDA_MEMORY_FRACTION", "0.1")  # KV cache sized from 10% of the GPU
    if args.cpu_dry_run:
        os.environ.pop("CUDA_GRAPHS", None)
    else:
        os.environ["CUDA_GRAPHS"] = args.graphs
    if not args.tgi_server or not (Path(args.tgi_server) / "text_generation_server").is_dir():
        sys.exit("set JDLORA_TGI_SERVER (or --tgi-server) to TGI v3.3.7's server/ folder")
    for path in (args.tgi_server, str(HERE), str(REPO / "src"), str(REPO / "integrations" / "tgi" / "src")):
        if path not in sys.path:
            sys.path.insert(0, path)

    from loguru import logger

    logger.remove()  # TGI's modules log at import; its CLI does the same with LOG_LEVEL
    logger.add(sys.stderr, level=os.environ.get("LOG_LEVEL", "INFO"))
    import tgi_standins

    stood_in = tgi_standins.install()
    if args.cpu_dry_run:
        tgi_standins.pretend_cuda_system()
    import jdlora_tgi

    jdlora_tgi.install()
    from text_generation_server import models
    from text_generation_server.models import flash_causal_lm
    from text_generation_server.models.custom_modeling.flash_llama_modeling import (
        FlashLlamaForCausalLM,
    )
    from text_generation_server.models.globals import set_adapter_to_index
    from text_generation_server.pb import generate_pb2
    from text_generation_server.utils.adapter import parse_lora_adapters
    from text_generation_server.utils.prefill_chunking import set_max_prefill_tokens
    from text_generation_server.utils.speculate import set_speculate

    status = jdlora_tgi.status()
    assert status["hook_active"] and all(v for v in status["modules"].values() if v is not None), status
    print(f"kernel modules stood in by plain torch: {', '.join(stood_in) or 'none'}")
    return SimpleNamespace(models=models, flash=flash_causal_lm, FlashLlamaForCausalLM=FlashLlamaForCausalLM,
                           pb=generate_pb2, set_adapter_to_index=set_adapter_to_index,
                           parse_lora_adapters=parse_lora_adapters, set_max_prefill_tokens=set_max_prefill_tokens,
                           set_speculate=set_speculate)


def flash_llama_factory(tgi, dry_run: bool):
    """A ``get_model`` that returns what TGI's llama branch returns (models/__init__.py, ``model_type ==
    LLAMA`` with ``FLASH_ATTENTION``): ``FlashCausalLM(model_class=FlashLlamaForCausalLM, ...)``."""
    flash = tgi.flash

    def get_model(model_id, lora_adapter_ids, revision, sharded, quantize, speculate, dtype, kv_cache_dtype,
                  trust_remote_code, max_input_tokens):
        tgi.set_speculate(speculate or 0)
        kwargs = {"model_id": model_id, "model_class": tgi.FlashLlamaForCausalLM, "revision": revision,
                  "quantize": quantize, "speculator": None, "dtype": getattr(torch, dtype),
                  "kv_cache_dtype": getattr(torch, kv_cache_dtype or dtype), "trust_remote_code": trust_remote_code,
                  "lora_adapter_ids": lora_adapter_ids}
        if not dry_run:
            return flash.FlashCausalLM(**kwargs)
        # CPU: FlashCausalLM.__init__ takes cuda:<rank> or raises, except on TGI's Intel branch, which keeps
        # the model on the CPU; its thread pinning is left out.
        saved = flash.SYSTEM, flash.init_cpu_threads_env
        flash.SYSTEM, flash.init_cpu_threads_env = "ipex", lambda **kw: None
        try:
            return flash.FlashCausalLM(**kwargs)
        finally:
            flash.SYSTEM, flash.init_cpu_threads_env = saved

    return get_model


# ----- a tiny llama, one JD-LoRA collection, one plain LoRA -----------------------------------------------


def write_assets(root: Path) -> dict[str, Path]:
    """Random flash-llama weights + a word-level tokenizer, a JD collection of 6 synthetic adapters
    (jdlora.compress, rank 8, 2 clusters) and one plain LoRA, on all seven projections of both layers."""
    import jdlora
    from jdlora.synthetic import save_adapters, synthetic_adapters

    base = root / "base"
    write_tiny_llama(base, LLAMA)
    modules = projection_modules(LLAMA)

    # alpha = 16 r: updates that move the logits far beyond the graph-vs-eager tolerance
    adapters = synthetic_adapters(6, modules, rank=8, alpha=128, groups=2, seed=1, base_model=str(base))
    collection = jdlora.compress(adapters, rank=8, clusters=2, sigma="full", max_iter=20, max_rounds=3, device="cpu",
                                 progress=False)
    collection.save_pretrained(root / "collection", progress=False)
    plain = synthetic_adapters(1, modules, rank=8, alpha=128, seed=2, base_model=str(base))
    (plain_dir,) = save_adapters(plain, root / "plain")
    return {"base": base, "collection": root / "collection", "plain": plain_dir}


# ----- TGI batches ---------------------------------------------------------------------------------------


def pb_request(pb, rid: int, adapter: str, words: int, max_new: int, block: int | None):
    text = " ".join(f"w{(rid * 7 + j) % 90}" for j in range(words))
    blocks = {"blocks": [block], "slots": list(range(16 * block, 16 * block + 16))} if block is not None else {}
    return pb.Request(
        id=rid, inputs=text, input_chunks=pb.Input(chunks=[pb.InputChunk(text=text)]), truncate=64,
        parameters=pb.NextTokenChooserParameters(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0,
                                                 repetition_penalty=1.0, frequency_penalty=0.0, seed=0),
        stopping_parameters=pb.StoppingCriteriaParameters(max_new_tokens=max_new, ignore_eos_token=True),
        adapter_id=adapter, **blocks)


def warmup_batch(pb):
    """Like the router's warmup batch: base model, blocks left to TGI (16 blocks: room for the check's)."""
    reqs = [pb_request(pb, 100 + i, "", 16, 16, None) for i in range(8)]
    return pb.Batch(id=0, requests=reqs, size=len(reqs), max_tokens=256, max_blocks=16)


def check_batch(pb):
    """The mixed batch; request i uses block i + 1 (TGI's graph replays write padding rows into block 0)."""
    reqs = [pb_request(pb, i, a, w, n, i + 1) for i, (a, w, n) in enumerate(REQUESTS)]
    return pb.Batch(id=1, requests=reqs, size=len(reqs), max_tokens=16 * len(reqs), max_blocks=1)


# ----- recording decode steps ----------------------------------------------------------------------------


@dataclass
class Step:
    adapters: list[str]
    replayed: list[int]  # sizes of the graphs replayed (TGI replays at most one per step)
    error: float  # max |graph - eager| / max |eager|
    effect: float  # JD rows: max |eager - no adapters| / max |eager|


class CountingGraph:
    """Wraps a captured ``torch.cuda.CUDAGraph`` in TGI's ``cuda_graphs[bs]["graph"]``; logs replays."""

    def __init__(self, graph, bs: int, log: list):
        self.graph, self.bs, self.log = graph, bs, log

    def replay(self):
        self.log.append(self.bs)
        return self.graph.replay()


class StepRecorder:
    """Replaces ``model.forward`` (the instance's): each decode step runs TGI's (hooked) ``forward`` with no
    adapters and eagerly, then as TGI would; the last run's K/V stay in the cache and its logits are used."""

    def __init__(self, model, names: dict[int, str]):
        self.model, self.names, self.steps, self.replays = model, names, [], []
        for bs, graph in model.cuda_graphs.items():
            graph["graph"] = CountingGraph(graph["graph"], bs, self.replays)
        model.forward = self.forward

    def forward(self, batch, adapter_data):
        run = type(self.model).forward
        if batch.cu_seqlen_prefill is not None:
            return run(self.model, batch, adapter_data)
        graphs, self.model.cuda_graphs = self.model.cuda_graphs, {}
        try:
            plain = run(self.model, batch, None)[0].float().clone()
            eager = run(self.model, batch, adapter_data)[0].float().clone()
        finally:
            self.model.cuda_graphs = graphs
        before = len(self.replays)
        out = run(self.model, batch, adapter_data)
        logits = out[0].float()
        adapters = [self.names.get(int(i), "base") for i in batch.adapter_meta.adapter_indices.tolist()]
        jd = torch.tensor([a.startswith("coll:") for a in adapters], device=logits.device)
        scale = eager.abs().max()
        effect = float((eager - plain)[jd].abs().max() / eager[jd].abs().max()) if jd.any() else 0.0
        self.steps.append(Step(adapters, self.replays[before:], float((logits - eager).abs().max() / scale), effect))
        return out


# ----- the check -----------------------------------------------------------------------------------------


def run(args, tgi, root: Path) -> bool:
    pb, models = tgi.pb, tgi.models
    paths = write_assets(root)
    if args.cpu_dry_run:  # the KV cache from a fixed budget instead of the host's free memory
        tgi.flash.get_free_memory = lambda device, fraction: 32 << 20
    models.get_model = flash_llama_factory(tgi, args.cpu_dry_run)
    adapter_to_index = {}
    t0 = time.time()
    model = models.get_model_with_lora_adapters(
        str(paths["base"]), tgi.parse_lora_adapters(f"coll={paths['collection']},plain={paths['plain']}"),
        None, False, None, None, args.dtype, None, False, 64, adapter_to_index)
    tgi.set_adapter_to_index(adapter_to_index)
    print(f"model on {model.device} ({model.dtype}), adapters {adapter_to_index}, loaded in {time.time() - t0:.1f}s")

    tgi.set_max_prefill_tokens(256)
    t0 = time.time()
    warm = model.batch_type.from_pb(warmup_batch(pb), model.tokenizer, model.dtype, model.device)
    model.warmup(warm, 64, 128)
    graphs = {bs: "jdlora_rows" in g for bs, g in sorted(model.cuda_graphs.items())}
    print(f"warmup in {time.time() - t0:.1f}s: KV cache {model.kv_cache[0].key.shape[0]} blocks; "
          f"CUDA graphs {graphs or 'none'} (True: captured with the JD path)")
    assert model.kv_cache[0].key.shape[0] > len(REQUESTS), "KV cache too small for the check's blocks"

    recorder = StepRecorder(model, {i: a for a, i in adapter_to_index.items()})
    batch = model.batch_type.from_pb(check_batch(pb), model.tokenizer, model.dtype, model.device)
    tokens = {r.id: [] for r in check_batch(pb).requests}
    while batch is not None:  # TGI's server: Prefill, then Decode + FilterBatch of finished requests
        generations, batch, _ = model.generate_token(batch)
        for gen in generations:
            tokens[gen.request_id] += gen.tokens.token_ids
        if batch is not None:
            kept = [g.request_id for g in generations if g.generated_text is None]
            batch = batch.filter(kept) if kept else None

    return report(args, model, recorder, graphs, tokens)


def report(args, model, recorder: StepRecorder, graphs: dict[int, bool], tokens: dict[int, list]) -> bool:
    """Prints one line per decode step; True when every check holds."""
    tol, ok = TOLERANCE[args.dtype], True
    print(f"{'step':>4} {'bs':>3}  {'graph':>5}  {'expected':>8}  {'rel err':>9}  {'JD effect':>9}  adapters")
    for n, s in enumerate(recorder.steps, 1):
        fits = [bs for bs in model.cuda_graphs if bs >= len(s.adapters)]
        expected = [] if "plain" in s.adapters or not fits else [min(fits)]  # plain LoRA: eager
        good = s.error <= tol and (args.cpu_dry_run or s.replayed == expected)
        ok &= good
        graph, want = (s.replayed or ["-"])[0], (expected or ["-"])[0]
        print(f"{n:>4} {len(s.adapters):>3}  {graph!s:>5}  {want!s:>8}  {s.error:9.2e}  {s.effect:9.2e}  "
              f"{','.join(a.split(':')[-1] for a in s.adapters)}{'' if good else '   <-- FAIL'}")
    with_plain = [bool(s.replayed) for s in recorder.steps if "plain" in s.adapters]
    without = [bool(s.replayed) for s in recorder.steps if "plain" not in s.adapters]
    effect = min(s.effect for s in recorder.steps)
    n_steps = max(n for _, _, n in REQUESTS) - 1
    print(f"steps without plain LoRA (JD + base) that replayed a graph: {sum(without)}/{len(without)}; "
          f"steps with plain LoRA that replayed one: {sum(with_plain)}/{len(with_plain)}; "
          f"graph replays {recorder.replays}")
    print(f"tolerance {tol:g}; smallest JD effect {effect:.2e} (must be > 3x tolerance); decode steps "
          f"{len(recorder.steps)} (expected {n_steps})")
    ok &= effect > 3 * tol and len(recorder.steps) == n_steps
    ok &= all(len(t) == n for t, (_, _, n) in zip(tokens.values(), REQUESTS))
    if args.cpu_dry_run:
        print("capture/replay skipped (--cpu-dry-run): eager vs eager")
    else:
        ok &= bool(graphs) and all(graphs.values())
    return bool(ok)


def main() -> int:
    args = parse_args()
    tgi = import_tgi(args)
    import transformers
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
          f"transformers {transformers.__version__}, {gpu}")
    if args.keep:
        ok = run(args, tgi, args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="jdlora-graph-check-") as tmp:
            ok = run(args, tgi, Path(tmp))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
