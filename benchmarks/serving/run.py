"""Serving throughput of JD-LoRA against standard multi-LoRA: the paper's Figures 1 and 4 (issues 8 and 13).

Usage::

    PYTHONPATH=src python -m benchmarks.serving.run --out DIR                 # the study, on one GPU
    PYTHONPATH=src python -m benchmarks.serving.run --out DIR --device cpu --tiny   # smoke run

Graph decode against a fast base (issue 13): both batch limits in one process and one device call
(the model, the adapter store and each collection built once; sizes in priority order; the time
budget skips what does not fit and lists it)::

    PYTHONPATH=src python -m benchmarks.serving.run --out OUT --max-batch 256,64 \\
        --sizes 1024,4,64,256,16 --eager-sizes 1024 --grid-sizes "" --requests 512 --run-limit 10 \\
        --time-budget 230 --step-kernels

The whole study takes longer than one 10-minute device call at the default batch size; split it by
collection size (``--sizes``, ``--grid-sizes``) into several calls and merge their results::

    ... run --out A --sizes 4,8,16,32,64,128 --grid-sizes ""
    ... run --out B --sizes 256,512,1024 --grid-sizes ""
    ... run --out C --sizes 1024 --grid-sizes 16,128,1024
    python -m benchmarks.serving.report --out DIR A/results.json B/results.json C/results.json

Set-up (paper section 6.3 and Appendix E, on one H200 instead of an H100):

- **Model**: Mistral-7B's shapes (transformers ``MistralConfig``: hidden 4096, 32 layers, 32 heads,
  8 key/value heads, intermediate 14336, vocabulary 32000, no sliding window), **random bf16
  weights** (no checkpoint is needed: throughput does not depend on the values), SDPA attention.
- **Adapters**: rank-16 LoRA (alpha 32) on q, k and v of every layer (96 modules), 4 to 1,024
  unique adapters. Synthetic: random A and B (values do not matter for throughput).
- **Requests**: ``--requests`` per run (default 1,024; the graph study above uses 512) for adapters drawn uniformly at random, Poisson
  arrivals at ``--rate`` per second (default 1000: far above the server's capacity, so the measured
  throughput is its capacity), 10 generated tokens each (greedy, no early stop). Prompts: the paper
  used Shakespeare sonnets; without a dataset here they are random token ids with sonnet-like
  lengths (normal, mean 130, sd 12, clipped to 100-160 tokens). Every configuration at one
  collection size gets the same requests (same arrivals, prompts and adapters).
- **Serving loop** (:mod:`.engine`), the same for every configuration: FIFO scheduler with at most
  ``--max-batch`` (256, vLLM's default ``max_num_seqs``) requests per batch and, for multi-LoRA, at most K distinct adapters per
  batch (requests whose adapter would exceed K wait, as in vLLM's scheduler); a 50 ms batching
  window while the queue is short; static batches: left padding, prefill with ``logits_to_keep=1``
  (the model's forward called directly), then greedy decode in one of two modes (``--decode``, default
  both, graph first; eager only at ``--eager-sizes``, default 1,024, when both run):

  - *graph* (:mod:`.graph`): a static key/value cache ``[max_batch, 8, 176, 128]`` per layer, allocated
    once (the prefill writes into it); each decode step is one CUDA graph replay, one graph per path and
    decode size (16, 32, 64, 96, 128, 192, 256 up to ``--max-batch``; a batch's decode is padded to the
    next size, its prefill is not), captured in the untimed warm-up. The step calls the model's own
    modules (q/k/v through whichever adapter layer the path installed) with SDPA over the static cache
    under a boolean mask; the per-batch adapter choice is device data written in place before the
    replays (multi-LoRA: the slot of each row, slots swapped in place; JD-LoRA: the tuner's
    ``MixedBatch``, one per decode size). No host synchronization inside a batch.
  - *eager*: transformers' ``DynamicCache`` and the model's forward per step (the issue-8 loop).

  Throughput = requests / (last completion - first arrival).
- **Configurations**:
  1. *base model* alone (the ceiling);
  2. *multi-LoRA* (:mod:`.multilora`): K adapter slots on the GPU, every adapter in pinned host
     memory, least-recently-used swapping, the gathered segmented LoRA kernel
     (:func:`jdlora.kernels.jd_lora_forward`, one slot per "cluster"). K matches JD-LoRA's memory
     by Appendix E (:mod:`.settings`; ``--k-rule formula``, the default, is ``ceil(Params_JD /
     Params_baseline)``; ``paper`` uses the paper's table, which differs at 256, 512 and 1,024
     adapters by one slot). Slots start empty in each run (first loads are counted as loads).
  3. *JD-LoRA* (:mod:`.jd`): the compressed collection fully resident, through jdlora's PEFT tuner
     (bulk ``load_collection``, ``adapter_names`` per batch row; Triton kernels on CUDA), with the
     paper's setting per size (Appendix E: JD-Full rank 16 for 4 and 8 adapters, 32 for 16, 64 for
     32 and 64; rank 16 with 7, 10 and 25 clusters for 128, 256 and 512; rank 64 with 7 clusters for
     1,024). **The collection is synthetic**: exactly the shapes compression would produce
     (orthonormal bases per module and cluster, a full Sigma per adapter, balanced random clusters),
     random values, because compressing 1,024 Mistral-sized adapters costs minutes of GPU time and
     throughput does not depend on the values. Bases and Sigmas are bf16 on the GPU.
  4. *multi-LoRA, all resident* (without the memory cap only): K = the number of adapters, all
     loaded before the run: what multi-LoRA does when memory is no constraint.
- **Memory**: runs with the paper's cap (``--memory-cap-gib``, 32 GiB like 40% of an 80 GB H100,
  through ``torch.cuda.set_per_process_memory_fraction``: the model takes 13.5 GiB, 1,024
  uncompressed adapters would take another 18 GiB) and without it (the H200's 141 GB).
- **Order and time**: Figure 1 first (capped: base, multi-LoRA and JD per size; JD also uncapped),
  then the uncapped multi-LoRA runs, then Figure 4's other (setting, size) pairs at
  ``--grid-sizes`` (default 16, 128 and 1,024; JD vs multi-LoRA with the K matched to that
  setting). A run stops starting new batches after ``--run-limit`` seconds (its throughput then
  covers the requests it finished, marked ``*``), and a run or group that would end after
  ``--time-budget`` seconds from the start is skipped and listed as skipped. Each path's first run
  (per batch limit and decode mode) starts with warm-up batches (Triton compilation, graph capture) and,
  on CUDA, one untimed rehearsal of the run itself; the process starts with one untimed run of the base
  model. ``prefill_device_batches_s`` lists each batch's prefill device time.
- **Timers**: without ``--profile``, the swap, prefill and decode times are host time (the device
  is synchronized once per batch); with it, every phase is synchronized and timed on the device's
  clock (throughput then includes the synchronizations). On CUDA, CUDA events around each batch's
  prefill and decode also give their device time (read after the batch's synchronization, so they
  add none): ``prefill_device_s``, ``decode_device_s`` and ``decode_step_ms`` (decode time / steps).
- **Floors**: at start the device's copy bandwidth (1 GiB device-to-device copy, bytes read + written
  per second) and bf16 matmul rate (8192^3) are measured; the report sets the base model's decode
  step against the weight-read floor (every parameter but the embedding table, read once per step, at
  that bandwidth) and the compute floor (2 flops per weight and row at that rate). With
  ``--step-kernels``, the warm-up of the base model and of the largest collection's paths also runs one
  decode step (eagerly: the kernels a replay launches) under ``torch.profiler`` and records its kernel
  time by kind (GEMM, LoRA kernels, attention, other): where a step's time goes.

What it does not model: static batching (no continuous batching: a batch decodes until all its
requests are done, and a new batch waits for the previous one); prefill runs eagerly (not in graphs),
with the same host work per adapted layer on both adapter paths. Graph decode pads a batch to the
next captured size (vLLM does the same with its capture sizes); eager decode is launch-bound (each
adapted layer adds three Triton launches and a little Python per step; JD also PEFT's hooks). The
static cache is sized for the longest prompt (160) + ``--new-tokens`` and counts against the cap.

Writes into ``--out``: ``results.json`` (setup and every run, after each run), ``results.md`` (the
table), ``figure1.png`` (throughput relative to the base model against unique adapters, JD-LoRA vs
multi-LoRA) and ``figure4.png`` (JD-LoRA / memory-matched multi-LoRA throughput against unique
adapters, one line per compression setting).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import report
from .engine import BasePath, Server
from .graph import buckets_for
from .jd import JDPath, synthetic_collection
from .model import adapted_modules, build_model, model_config
from .multilora import LoraStore, MultiLoraPath
from .settings import FIGURE4_SETTINGS, PAPER_SETTINGS, SIZES, JDSetting, slots_for
from .workload import SONNET_LENGTH, make_requests

GIB = 2**30


@dataclass
class Group:
    """Runs sharing one adapter path, built once (a collection loaded, slots allocated)."""

    path: str  # "base", "multi-lora", "multi-lora-all", "jd"
    adapters: int = 0
    setting: JDSetting | None = None
    slots: int | None = None
    memories: list[str] = field(default_factory=list)
    figure1: bool = True
    decodes: list[str] = field(default_factory=lambda: ["eager"])  # "graph", "eager" (engine.Server.decode)
    batches: list[int] = field(default_factory=lambda: [256])  # max batch sizes

    @property
    def runs(self) -> list[tuple[int, str, str]]:
        """(max batch, decode, memory) of each run, in order."""
        return [(b, d, m) for b in self.batches for d in self.decodes for m in self.memories]


def plan(args, memories: list[str]) -> list[Group]:
    """Every group in priority order: the base model, then per collection size (in ``--sizes``' order) the
    memory-matched multi-LoRA, JD-LoRA and multi-LoRA with every adapter resident, then Figure 4's grid.

    Each group runs in each decode mode of ``--decode`` (eager only at ``--eager-sizes`` when graph decode
    runs too; the grid in the first mode only) and each of its memory modes, on one built path.
    """
    primary = memories[0]
    eager_sizes = set(args.eager_sizes) if "graph" in args.decode else None

    def modes(n: int) -> list[str]:
        return [d for d in args.decode if d != "eager" or eager_sizes is None or n in eager_sizes]

    groups = [Group("base", memories=list(memories), decodes=list(args.decode), batches=list(args.max_batch))]
    for n in args.sizes:
        setting = PAPER_SETTINGS[n][0]
        k = slots_for(n, setting, args.k_rule)
        groups.append(Group("multi-lora", n, setting, k, list(memories), decodes=modes(n), batches=list(args.max_batch)))
        groups.append(Group("jd", n, setting, None, list(memories), decodes=modes(n), batches=list(args.max_batch)))
        if "uncapped" in memories:
            groups.append(Group("multi-lora-all", n, None, n, ["uncapped"], decodes=modes(n), batches=list(args.max_batch)))
    seen = {(g.adapters, g.slots) for g in groups if g.path == "multi-lora"}
    for n in args.grid_sizes:
        for setting in FIGURE4_SETTINGS:
            if setting == PAPER_SETTINGS.get(n, (None,))[0] or setting.clusters >= n:
                continue
            k = slots_for(n, setting, args.k_rule)
            if (n, k) not in seen:
                seen.add((n, k))
                groups.append(Group("multi-lora", n, setting, k, [primary], figure1=False, decodes=args.decode[:1],
                                    batches=list(args.max_batch[:1])))
            groups.append(Group("jd", n, setting, None, [primary], figure1=False, decodes=args.decode[:1],
                                    batches=list(args.max_batch[:1])))
    return groups


class Study:
    """Runs the plan and writes the results; see the module docstring."""

    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if self.cuda else torch.float32
        self.memories = (["capped", "uncapped"] if self.cuda and args.memory_cap_gib else ["uncapped"])
        if args.threads:
            torch.set_num_threads(args.threads)
        start = time.perf_counter()
        self.config = model_config(tiny=args.tiny)
        self.model = build_model(self.config, self.device, self.dtype, seed=args.seed)
        self.modules = adapted_modules(self.config)
        self.server = Server.for_model(self.model, max_batch=args.max_batch[0], new_tokens=args.new_tokens,
                                       max_wait=args.max_wait, profile=args.profile, decode=args.decode[0],
                                       max_len=SONNET_LENGTH[3] + args.new_tokens)
        self.store: LoraStore | None = None
        self._kernels = None  # the last graph warm-up's step_kernels
        self.seconds: dict[str, dict[str, float]] = {}  # group kind -> set-up, warm-up and run of its last run
        self.results = {"setup": self._setup(time.perf_counter() - start), "runs": []}
        if self.cuda:
            self.results["setup"]["device_measured"] = measure_device(self.device)
        self.results["setup"]["weight_bytes_per_step"] = weight_bytes_per_step(self.model)
        c = self.config
        cache_len = -(-(SONNET_LENGTH[3] + args.new_tokens) // 16) * 16  # graph.StaticDecoder's columns
        self.results["setup"]["static_cache_len"] = cache_len
        # what graph decode's attention reads per row and step: keys and values of every column and layer
        self.results["setup"]["kv_bytes_per_row_step"] = (cache_len * 2 * c.num_key_value_heads * c.num_hidden_layers
                                                         * (c.hidden_size // c.num_attention_heads) * self.dtype.itemsize)

    # ----- bookkeeping --------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _setup(self, init_s: float) -> dict:
        a = self.args
        versions = {"python": platform.python_version(), "torch": torch.__version__}
        for name in ("transformers", "peft", "triton"):
            try:
                versions[name] = __import__(name).__version__
            except ImportError:
                versions[name] = None
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip() or None
        except OSError:
            commit = None
        c = self.config
        return {
            "model": "tiny Mistral (random)" if a.tiny else "Mistral-7B shapes (random bf16 weights)",
            "model_config": {k: getattr(c, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                        "num_key_value_heads", "intermediate_size", "vocab_size")},
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device) if self.cuda else platform.processor() or "CPU",
            "device_memory_gib": (torch.cuda.get_device_properties(self.device).total_memory / GIB
                                  if self.cuda else None),
            "memory_cap_gib": a.memory_cap_gib if "capped" in self.memories else None,
            "memories": self.memories,
            "adapted_modules": len(self.modules),
            "lora_rank": 16,
            "requests_per_run": a.requests,
            "max_batch": list(a.max_batch),
            "new_tokens": a.new_tokens,
            "arrival_rate_per_s": a.rate,
            "max_wait_s": a.max_wait,
            "prompt_lengths": dict(zip(("mean", "std", "min", "max"), SONNET_LENGTH)),
            "sizes": list(a.sizes),
            "decode": list(a.decode),
            "eager_sizes": list(a.eager_sizes),
            "graph_decode_sizes": {b: list(buckets_for(b)) for b in a.max_batch},
            "grid_sizes": list(a.grid_sizes),
            "k_rule": a.k_rule,
            "run_limit_s": a.run_limit,
            "time_budget_s": a.time_budget,
            "profile": a.profile,
            "seed": a.seed,
            "model_init_s": init_s,
            "versions": versions,
            "commit": commit,
            "command": " ".join(sys.argv),
        }

    def write(self) -> None:
        self.results["elapsed_s"] = self.elapsed()
        skipped = [r for r in self.results["runs"] if r.get("skipped")]
        self.results["skipped_note"] = (f"{len(skipped)} run(s) skipped by the time budget "
                                        f"({self.args.time_budget:g} s)." if skipped else "")
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "results.md").write_text(report.markdown(self.results))

    def figures(self) -> None:
        report.figure1(self.results, self.out / "figure1.png")
        report.figure4(self.results, self.out / "figure4.png")

    # ----- running --------------------------------------------------------------------------------

    def set_memory(self, memory: str) -> None:
        if not self.cuda:
            return
        gc.collect()
        torch.cuda.empty_cache()  # cached blocks count against the cap
        total = torch.cuda.get_device_properties(self.device).total_memory
        fraction = self.args.memory_cap_gib * GIB / total if memory == "capped" else 1.0
        # the index: torch 2.11 refuses a device without one ("cuda")
        torch.cuda.set_per_process_memory_fraction(min(1.0, fraction), torch.cuda.current_device())

    def lora_store(self) -> LoraStore:
        if self.store is None:  # one store for the largest collection; smaller ones use its first rows
            n = max([*self.args.sizes, *self.args.grid_sizes])
            self.store = LoraStore(self.modules, n, dtype=self.dtype, pin=self.cuda, fill_device=self.device,
                                   seed=self.args.seed)
        return self.store

    def build(self, group: Group):
        if group.path == "base":
            return BasePath(self.model), 0
        if group.path == "jd":
            # drawn on the device (fast QR), kept on the host: the loaded model holds on to the collection
            collection = synthetic_collection(self.modules, group.adapters, group.setting, device=self.device,
                                              seed=self.args.seed).to("cpu")
            nbytes = sum((c.compression.U.numel() + c.compression.V.numel() + c.compression.sigma.numel())
                         for c in collection.modules.values()) * self.dtype.itemsize
            return JDPath(self.model, collection, dtype=self.dtype), nbytes
        store = self.lora_store()
        path = MultiLoraPath(self.model, store, group.slots, self.device)
        if group.path == "multi-lora-all":
            path.preload(range(group.adapters))
        nbytes = sum(t.numel() * t.element_size() for t in (*path.cache.U, *path.cache.V, path.cache.staging))
        return path, nbytes

    def warm_up(self, path, adapters: int) -> None:
        """One batch of each shape class the Triton kernels compile for, then the path's state is reset.

        Triton specializes on the token count (1, a multiple of 16, other) and the kernels pick a
        decode or prefill configuration (up to 128 tokens or more), so a first batch of a new class
        inside a timed run would compile there. Every class appears here: prefill of 101, 112, 144
        and 393 tokens, decode of 1, 3, 16 and ``max_batch`` tokens.
        """
        limit = min(max(adapters, 1), path.max_adapters or adapters or 1)
        graph = self.server.decode == "graph"
        if graph:  # built before the copy below, which must share it (one static cache)
            decoder = self.server.static_decoder()
        short = Server(**{**self.server.__dict__, "new_tokens": 2})
        max_batch = self.server.max_batch
        for rows, width in ((1, 101), (1, 112), (1, 144), (3, 131), (16, 130), (max_batch, 130)):
            rows = min(rows, max_batch)
            path.begin_batch([i % limit for i in range(rows)])
            short.generate(path, [[5] * width] * rows)
        agreement = None
        if graph:  # every decode size captured now, not inside a timed run
            path.begin_batch([i % limit for i in range(max_batch)])
            decoder.capture(path)
            agreement = self.graph_agreement(path, limit)
            if self.cuda and self.args.step_kernels and adapters in (0, max(self.args.sizes, default=0)):
                try:
                    self._kernels = decoder.step_kernels(path, max_batch)
                except Exception as error:  # a diagnostic: never the run's end
                    self._kernels = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
        path.reset()
        return agreement

    def graph_agreement(self, path, limit: int) -> float:
        """Fraction of rows whose first decoded token (the first graph replay's) equals the eager loop's, for one
        batch of (up to) 24 random prompts over ``limit`` adapters: a check that the replays read the batch's
        adapters. Only the first decode step is compared: with random weights the top logits are near-ties, so
        in bf16 a rounding difference between the two attention paths can flip a token, and every later token of
        that row follows from it (the whole sequences agreed on 65% of the tokens for the base model on the H200)."""
        requests = make_requests(min(24, self.server.max_batch), 1, rate=float("inf"), vocab_size=self.config.vocab_size, seed=self.args.seed + 2)
        prompts = [r.prompt for r in requests]
        path.begin_batch([i % limit for i in range(len(prompts))])
        graph = Server(**{**self.server.__dict__}).generate(path, prompts)
        eager = Server(**{**self.server.__dict__, "decode": "eager", "decoder": None}).generate(path, prompts)
        firsts = [g[1] == e[1] for g, e in zip(graph, eager) if len(g) > 1 and len(e) > 1]
        return sum(firsts) / len(firsts) if firsts else 1.0

    def run(self, group: Group, path, decode: str, memory: str, warm: bool) -> dict:
        record = self._record(group, decode, memory)
        self.set_memory(memory)
        start = time.perf_counter()
        if warm and (self.cuda or decode == "graph"):  # (CPU: nothing to compile, but the graph check runs)
            self._kernels = None
            record["graph_agreement"] = self.warm_up(path, group.adapters)
            if self._kernels:
                record["step_kernels_ms"] = self._kernels

        def new_requests():  # the same requests each time (one seed): the rehearsal's and the timed run's
            return make_requests(self.args.requests, max(group.adapters, 1), rate=self.args.rate,
                                 vocab_size=self.config.vocab_size, seed=self.args.seed)

        if warm and self.cuda:
            # One untimed rehearsal of the run: on the H200 the first run after the warm-up spent 0.6-1.0 s more in
            # prefill than the path's next run (2026-12-04, benchmarks/RESULTS.md), a one-time cost of the
            # workload's own shapes that the shape-class warm-up above does not pay.
            path.reset()
            self.server.serve(path, new_requests(), time_limit=self.args.run_limit)
        record["warmup_s"] = time.perf_counter() - start
        path.reset()  # every run starts with empty slots (or all resident), whatever ran before on this path
        requests = new_requests()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            allocator = allocator_counts()
        start = time.perf_counter()
        record["stats"] = self.server.serve(path, requests, time_limit=self.args.run_limit)
        if self.cuda:
            record["peak_gib"] = torch.cuda.max_memory_reserved() / GIB
            record["allocator"] = {k: v - allocator[k] for k, v in allocator_counts().items()}
        last = self.seconds.setdefault(f"{group.path}/{decode}/{self.server.max_batch}", {})
        last["run"] = time.perf_counter() - start
        if warm:
            last["warm-up"] = record["warmup_s"]
        return record

    def _record(self, group: Group, decode: str, memory: str, max_batch: int | None = None) -> dict:
        record = {"max_batch": max_batch or self.server.max_batch, "memory": memory, "decode": decode, "path": group.path, "adapters": group.adapters,
                  "setting": group.setting.label if group.setting else None, "slots": group.slots,
                  "figure1": group.figure1}
        if group.path == "jd":  # the multi-LoRA run with the same memory
            record["matched_slots"] = slots_for(group.adapters, group.setting, self.args.k_rule)
        return record

    def guess(self, kind: str, *, setup: bool, warm: bool) -> float:
        """Seconds the next run of this kind will take, from the last one (0 before any run)."""
        last = self.seconds.get(kind) or {}
        run = last.get("run", max((s["run"] for s in self.seconds.values()), default=0.0))
        return run + (last.get("warm-up", 0.0) if warm else 0.0) + (last.get("setup", 0.0) if setup else 0.0)

    def fits(self, seconds: float) -> bool:
        return self.elapsed() + seconds <= self.args.time_budget

    def use(self, max_batch: int, decode: str) -> None:
        """Sets the server's batch limit and decode mode; the static cache (sized by the batch) goes when
        either changes, and gives its memory back."""
        if (self.server.max_batch, self.server.decode) == (max_batch, decode):
            return
        if self.server.decoder is not None:
            self.server.release()
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.server.max_batch, self.server.decode = max_batch, decode

    def run_group(self, group: Group) -> None:
        """Builds the group's path, runs it in each (decode, memory) mode, records runs, errors and skips."""
        path, recorded = None, []
        first_batch, first_decode, first_memory = group.runs[0]
        if self.fits(self.guess(f"{group.path}/{first_decode}/{first_batch}", setup=True, warm=True)):
            try:
                start = time.perf_counter()
                self.set_memory(first_memory)
                path, nbytes = self.build(group)
                setup = time.perf_counter() - start
                warmed = set()
                for i, (batch, decode, memory) in enumerate(group.runs):
                    kind = f"{group.path}/{decode}/{batch}"
                    if i and not self.fits(self.guess(kind, setup=False, warm=kind not in warmed)):
                        break
                    self.use(batch, decode)
                    record = self.run(group, path, decode, memory, warm=kind not in warmed)
                    warmed.add(kind)
                    self.seconds[kind]["setup"] = setup
                    record.update(setup_s=setup, adapter_gib=nbytes / GIB)
                    recorded.append(record)
                    self.results["runs"].append(record)
                    self._log(record)
                    self.write()
            except Exception as error:  # e.g. out of memory: record it, go on with the next group
                traceback.print_exc()
                message = f"{type(error).__name__}: {str(error)[:200]}"
                for batch, decode, memory in group.runs[len(recorded):]:
                    self.results["runs"].append({**self._record(group, decode, memory, batch), "error": message})
                    recorded.append(None)
            finally:
                if self.server.decoder is not None:  # graphs of this path's layers: of no use after it
                    self.server.decoder.drop_graphs()
                if path is not None:
                    path.close()
                del path
                gc.collect()
                if self.cuda:
                    torch.cuda.empty_cache()
        for batch, decode, memory in group.runs[len(recorded):]:
            self.results["runs"].append({**self._record(group, decode, memory, batch), "skipped": "time budget"})
        self.write()

    def _log(self, record: dict) -> None:
        s = record["stats"]
        step = f" step {s['decode_step_ms']:6.2f} ms" if s.get("decode_step_ms") else ""
        print(f"[{self.elapsed():6.1f} s] B={record['max_batch']:<4} {record['decode']:>5} {record['memory']:>8} "
              f"{record['path']:>14} "
              f"n={record['adapters']:<5} "
              f"{record['setting'] or '':>9} K={record['slots'] or '-':<5} {s['requests_per_s']:8.2f} req/s "
              f"batches {s['batches']:3d} mean {s['mean_batch']:5.1f} loads {s['loads']:5d}"
              + step + (f" graph check {record['graph_agreement']:.2f}" if record.get("graph_agreement") is not None
                        else "") + (" (time limit)" if s["truncated"] else ""), flush=True)

    def warm_start(self, groups) -> None:
        """Serves one untimed run on the base model first: the first run of a process pays one-time costs
        (cuBLAS handles, allocator growth, lazy imports) that measured 2-4x slower on the H200."""
        base = next((g for g in groups if g.path == "base"), None)
        if not self.cuda or base is None:
            return
        path, _ = self.build(base)
        try:
            self.warm_up(path, 0)
            requests = make_requests(self.server.max_batch * 2, 1, rate=self.args.rate,
                                     vocab_size=self.config.vocab_size, seed=self.args.seed + 1)
            self.server.serve(path, requests, time_limit=self.args.run_limit)
            print(f"[{self.elapsed():6.1f} s] warm start done", flush=True)
        except Exception:  # the groups record the error themselves; the other modes may still run
            traceback.print_exc()
        finally:
            if self.server.decoder is not None:
                self.server.decoder.drop_graphs()
            path.close()

    def main(self) -> None:
        groups = plan(self.args, self.memories)
        print(f"[{self.elapsed():6.1f} s] model ready on {self.results['setup']['device_name']}; "
              f"{len(groups)} groups planned", flush=True)
        self.warm_start(groups)
        for group in groups:
            self.run_group(group)
        self.set_memory("uncapped")
        self.write()
        self.figures()
        print(f"[{self.elapsed():6.1f} s] wrote {self.out}/results.json, results.md, figure1.png, figure4.png",
              flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for results.json, results.md, figure1.png, figure4.png")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny random Mistral (CPU smoke runs)")
    p.add_argument("--sizes", type=_ints, help=f"collection sizes for Figure 1 (default {','.join(map(str, SIZES))})")
    p.add_argument("--grid-sizes", type=_ints, help="sizes at which Figure 4 tries every compression setting "
                   "(default 16,128,1024; tiny: 16; empty: none)")
    p.add_argument("--requests", type=int, help="requests per run (default 1024; tiny: 48)")
    p.add_argument("--max-batch", type=_ints, help="requests per batch; several (e.g. 256,64): each group runs at "
                   "each, in order (default 256; tiny: 8)")
    p.add_argument("--new-tokens", type=int, default=10)
    p.add_argument("--rate", type=float, default=1000.0, help="mean arrivals per second (Poisson)")
    p.add_argument("--max-wait", type=float, default=0.05, help="batching window in seconds")
    p.add_argument("--k-rule", choices=("formula", "paper"), default="formula",
                   help="multi-LoRA slots: Appendix E's ceil formula, or the paper's table")
    p.add_argument("--memory-cap-gib", type=float, default=32.0, help="GPU memory cap (0: uncapped runs only)")
    p.add_argument("--run-limit", type=float, default=20.0, help="seconds after which a run starts no new batch")
    p.add_argument("--time-budget", type=float, default=400.0,
                   help="seconds from the start after which no run starts (the rest is listed as skipped)")
    p.add_argument("--decode", type=_modes, default=("graph", "eager"),
                   help="decode modes in order: graph (static cache, CUDA graphs), eager (today's loop); "
                   "default graph,eager")
    p.add_argument("--eager-sizes", type=_ints, help="collection sizes of the eager runs after graph runs "
                   "(default 1024; tiny: the --sizes)")
    p.add_argument("--step-kernels", action="store_true",
                   help="graph decode, base model and the largest collection: profile one decode step's kernels "
                   "(torch.profiler, in the warm-up) to show where its time goes")
    p.add_argument("--profile", action="store_true", help="synchronize the device around every phase")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    tiny_defaults = {"sizes": (4, 32, 128, 1024), "grid_sizes": (16,), "requests": 48, "max_batch": (8,)}
    gpu_defaults = {"sizes": SIZES, "grid_sizes": (16, 128, 1024), "requests": 1024, "max_batch": (256,),
                    "eager_sizes": (1024,)}
    for key, value in (tiny_defaults if args.tiny else gpu_defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eager_sizes is None:
        args.eager_sizes = args.sizes
    unknown = [n for n in args.sizes if n not in PAPER_SETTINGS]
    if unknown:
        p.error(f"--sizes must be among the paper's sizes {list(PAPER_SETTINGS)}, got {unknown}")
    return args


def _modes(text: str) -> tuple[str, ...]:
    modes = tuple(x.strip() for x in text.split(",") if x.strip())
    if not modes or set(modes) - {"graph", "eager"} or len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"--decode takes graph and/or eager, comma-separated; got {text!r}")
    return modes


def measure_device(device: torch.device) -> dict:
    """The device's copy bandwidth and bf16 matmul rate, measured here (the floors of the decode step)."""
    n = 1 << 30  # bytes per buffer
    a = torch.empty(n // 2, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    x = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)

    def timed(fn, reps):
        fn()
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000 / reps

    copy_s = timed(lambda: b.copy_(a), 20)
    mm_s = timed(lambda: x @ x, 20)
    del a, b, x
    torch.cuda.empty_cache()
    return {"copy_gb_per_s": 2 * n / copy_s / 1e9,  # read + write
            "copy_note": "device-to-device copy of 1 GiB, bytes read + written per second",
            "matmul_tflop_per_s": 2 * 8192**3 / mm_s / 1e12,
            "matmul_note": "bf16 8192 x 8192 x 8192 matmul"}


def allocator_counts() -> dict[str, int]:
    """The CUDA caching allocator's counters that say a run was short of memory: ``num_alloc_retries`` (an
    allocation that failed, freed the cache and synchronized the device, then retried), ``num_device_alloc`` and
    ``num_device_free`` (cudaMalloc and cudaFree calls; a cudaFree synchronizes the device)."""
    stats = torch.cuda.memory_stats()
    return {k: int(stats.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step must read: every parameter but the embedding table (of which a
    step reads one row per token)."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv=None) -> None:
    Study(parse_args(argv)).main()


if __name__ == "__main__":
    main()
