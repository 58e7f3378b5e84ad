"""A stand-in for TGI 3.3.7's Rust router: drives a running ``text-generation-server`` over gRPC.

TGI's router and launcher are Rust (not buildable offline); this script makes the calls they make, in their
order (``backends/v3/src``): ``ServiceDiscovery``, ``Info``, ``Warmup`` (the router's warm-up batch), then the
batching loop: ``Prefill`` of waiting requests, ``Decode`` of the running batches (two batches: TGI
concatenates them), ``FilterBatch`` when requests finish. KV-cache blocks and slots are allocated as the
router's allocator does (block 0 reserved, one slot per token of ``input + max_new_tokens``).

It runs with TGI's Python (it imports TGI's generated stubs ``text_generation_server.pb``):

    python tgi_router.py --uds-path /tmp/tgi/sock --scenario scenario.json --out result.json

``scenario.json``: ``{"tokenizer": <tokenizer.json>, "phases": [[{"at": <decode steps of the running batch
before this wave joins>, "requests": [{"id", "adapter_id", "inputs", "max_new_tokens", "prefill_logprobs"}]},
...], ...]}``; each phase runs until its last request finishes. ``result.json``:
per request the prompt ids (when ``prefill_logprobs``), the generated ids and logprobs; the calls made,
with the request ids of each batch; the ``Info`` and ``Warmup`` answers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import grpc
from text_generation_server.pb import generate_pb2 as pb
from text_generation_server.pb import generate_pb2_grpc

WARMUP = {"max_input_tokens": 64, "max_prefill_tokens": 256, "max_total_tokens": 128}


def connect(uds_path: str, timeout: float, server_pid: int | None) -> generate_pb2_grpc.TextGenerationServiceStub:
    """Waits for the server's first shard socket (``<uds-path>-0``), as the launcher does; gives up early when
    the server process (``server_pid``) has exited."""
    deadline = time.time() + timeout
    while not Path(f"{uds_path}-0").exists():
        if time.time() > deadline:
            raise TimeoutError(f"no server socket {uds_path}-0 after {timeout:.0f}s")
        if server_pid is not None and not Path(f"/proc/{server_pid}").exists():
            raise RuntimeError(f"the server (pid {server_pid}) exited before opening {uds_path}-0")
        time.sleep(0.5)
    channel = grpc.insecure_channel(f"unix://{uds_path}-0")
    grpc.channel_ready_future(channel).result(timeout=timeout)
    return generate_pb2_grpc.TextGenerationServiceStub(channel)


class BlockAllocator:
    """The router's allocator without prefix caching: free blocks 1..n (0 is reserved for health checks),
    ``ceil(tokens / block_size)`` blocks per request, slots ``block * block_size + i`` for each token."""

    def __init__(self, n_blocks: int, block_size: int):
        self.free, self.block_size = list(range(n_blocks - 1, 0, -1)), block_size

    def allocate(self, tokens: int) -> tuple[list[int], list[int]]:
        n = -(-tokens // self.block_size)
        if n > len(self.free):
            raise RuntimeError(f"KV cache full: {n} blocks needed, {len(self.free)} free")
        blocks = [self.free.pop() for _ in range(n)]
        slots = [b * self.block_size + i for b in blocks for i in range(self.block_size)][:tokens]
        return blocks, slots

    def release(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))


def greedy(max_new_tokens: int) -> dict:
    return {"parameters": pb.NextTokenChooserParameters(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0,
                                                         do_sample=False, seed=0, repetition_penalty=1.0,
                                                         frequency_penalty=0.0),
            "stopping_parameters": pb.StoppingCriteriaParameters(max_new_tokens=max_new_tokens,
                                                                 ignore_eos_token=True)}


def warmup(stub, info) -> pb.WarmupResponse:
    """The router's warm-up batch (``client/grpc_client.rs``): requests of ``max_input_tokens`` "_test "
    words up to ``max_prefill_tokens``, no blocks (the server allocates them), no adapter."""
    w, requests, n = WARMUP, [], 0
    while n < w["max_prefill_tokens"]:
        truncate = min(w["max_input_tokens"], w["max_prefill_tokens"] - n)
        text = "_test " * truncate
        requests.append(pb.Request(id=0, inputs=text, input_chunks=pb.Input(chunks=[pb.InputChunk(text=text)]),
                                   truncate=truncate, add_special_tokens=True, prefill_logprobs=True, top_n_tokens=20,
                                   **greedy(w["max_total_tokens"] - truncate)))
        n += truncate
    batch = pb.Batch(id=0, requests=requests, size=len(requests), max_tokens=w["max_input_tokens"], max_blocks=0)
    return stub.Warmup(pb.WarmupRequest(batch=batch, max_input_tokens=w["max_input_tokens"],
                                        max_prefill_tokens=w["max_prefill_tokens"],
                                        max_total_tokens=w["max_total_tokens"]))


class Router:
    def __init__(self, stub, allocator: BlockAllocator, tokens_of):
        self.stub, self.allocator, self.tokens_of = stub, allocator, tokens_of
        self.results: dict[int, dict] = {}
        self.blocks: dict[int, list[int]] = {}
        self.calls: list[dict] = []
        self.next_batch_id = 1

    def request(self, r: dict) -> pb.Request:
        tokens = self.tokens_of(r["inputs"]) + r["max_new_tokens"]
        blocks, slots = self.allocator.allocate(tokens)
        self.blocks[r["id"]] = blocks
        self.results[r["id"]] = {"adapter_id": r["adapter_id"], "prompt_ids": None, "ids": [], "logprobs": []}
        adapter = {"adapter_id": r["adapter_id"]} if r["adapter_id"] else {}
        chunks = pb.Input(chunks=[pb.InputChunk(text=r["inputs"])])
        return pb.Request(id=r["id"], inputs=r["inputs"], input_chunks=chunks, truncate=64, add_special_tokens=True,
                          prefill_logprobs=r.get("prefill_logprobs", False), blocks=blocks, slots=slots,
                          **greedy(r["max_new_tokens"]), **adapter)

    def record(self, call: str, batches: list, generations, next_batch) -> pb.CachedBatch | None:
        """Stores the generations; finished requests leave the batch (``FilterBatch``) and free their blocks."""
        finished = []
        for g in generations:
            out = self.results[g.request_id]
            if g.HasField("prefill_tokens") and g.prefill_tokens.ids:
                out["prompt_ids"] = list(g.prefill_tokens.ids)
                out["prompt_logprobs"] = [float(x) for x in g.prefill_tokens.logprobs]
            out["ids"] += list(g.tokens.ids)
            out["logprobs"] += [float(x) for x in g.tokens.logprobs]
            if g.HasField("generated_text"):
                finished.append(g.request_id)
                self.allocator.release(self.blocks.pop(g.request_id))
        self.calls.append({"call": call, "batches": [list(b) for b in batches], "finished": finished})
        if next_batch is None:
            return None
        kept = [i for i in next_batch.request_ids if i not in finished]
        if len(kept) == len(next_batch.request_ids):
            return next_batch
        self.calls.append({"call": "FilterBatch", "batches": [kept], "finished": []})
        return self.stub.FilterBatch(pb.FilterBatchRequest(batch_id=next_batch.id, request_ids=kept)).batch

    def prefill(self, requests: list[dict]) -> pb.CachedBatch | None:
        reqs = [self.request(r) for r in requests]
        batch = pb.Batch(id=self.next_batch_id, requests=reqs, size=len(reqs),
                         max_tokens=sum(len(r.slots) for r in reqs), max_blocks=max(len(r.blocks) for r in reqs))
        self.next_batch_id += 1
        resp = self.stub.Prefill(pb.PrefillRequest(batch=batch))
        next_batch = resp.batch if resp.HasField("batch") else None
        return self.record("Prefill", [[r.id for r in reqs]], resp.generations, next_batch)

    def decode(self, batches: list[pb.CachedBatch]) -> pb.CachedBatch | None:
        resp = self.stub.Decode(pb.DecodeRequest(batches=batches))
        return self.record("Decode", [b.request_ids for b in batches], resp.generations,
                           resp.batch if resp.HasField("batch") else None)

    def run(self, waves: list[dict]) -> None:
        """The batching loop: a wave joins after ``at`` decode steps (its prefill runs alone, then the next
        ``Decode`` concatenates it with the running batch); a wave due while nothing runs starts at once."""
        waves, running, step = sorted(waves, key=lambda w: w["at"]), None, 0
        while waves or running is not None:
            if waves and (waves[0]["at"] <= step or running is None):
                joining = self.prefill(waves.pop(0)["requests"])
                batches = [b for b in (running, joining) if b is not None]
            else:
                batches = [running]
            running = self.decode(batches) if batches else None
            step += 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uds-path", required=True)
    p.add_argument("--scenario", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the server")
    p.add_argument("--server-pid", type=int, help="stop waiting if this process exits")
    args = p.parse_args()
    scenario = json.loads(args.scenario.read_text())

    t0 = time.time()
    stub = connect(args.uds_path, args.timeout, args.server_pid)
    urls = list(stub.ServiceDiscovery(pb.ServiceDiscoveryRequest()).urls)
    info = stub.Info(pb.InfoRequest())
    started = time.time() - t0
    stub.ClearCache(pb.ClearCacheRequest())
    t0 = time.time()
    warm = warmup(stub, info)
    warmed = time.time() - t0
    n_blocks = warm.max_supported_total_tokens // info.block_size if warm.HasField("max_supported_total_tokens") else 64

    from tokenizers import Tokenizer  # the router counts tokens with the model's tokenizer.json

    tokenizer = Tokenizer.from_file(str(Path(scenario["tokenizer"])))
    router = Router(stub, BlockAllocator(min(n_blocks, 4096), info.block_size),
                    lambda text: len(tokenizer.encode(text, add_special_tokens=True).ids))
    t0 = time.time()
    for waves in scenario["phases"]:
        router.run(waves)
    args.out.write_text(json.dumps({
        "urls": urls, "info": {"dtype": info.dtype, "device_type": info.device_type, "block_size": info.block_size,
                               "attention_impl": info.attention_impl, "support_chunking": info.support_chunking},
        "warmup": {"max_input_tokens": warm.max_input_tokens, "max_total_tokens": warm.max_total_tokens},
        "seconds": {"until_ready": started, "warmup": warmed, "requests": time.time() - t0},
        "calls": router.calls, "results": {str(k): v for k, v in router.results.items()}}, indent=1))


if __name__ == "__main__":
    main()
