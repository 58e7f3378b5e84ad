"""The serving loop shared by every configuration: arrivals, FIFO batching, static batches, greedy decode.

:class:`Server` serves the base model, multi-LoRA and JD-LoRA with the same loop, so only the
adapter path differs. A path has ``max_adapters`` (the scheduler's limit on distinct adapters per
batch, None for none), ``begin_batch(adapters)`` (e.g. swap adapters in), ``forward(**model_inputs)
-> logits``, ``counters()`` (adapter loads and evictions so far) and ``reset()``.

Per batch (static batching): prompts left-padded to the longest, one prefill forward with
``logits_to_keep=1`` (no full-vocabulary logits for the prompt), then greedy decode with the model's
own key/value cache (``DynamicCache``) until every request has ``new_tokens`` tokens, calling the
model's forward directly (not ``generate``). With ``decode="graph"`` the prefill writes into a static
cache and each decode step is one CUDA graph replay (:mod:`.graph`; paths then also have
``decode_rows(rows)``, a context in which the model's modules apply the batch's adapters to ``rows``
rows from tensors updated in place). Next tokens stay on the device; the batch's only host
synchronization is reading its tokens at the end (with ``profile``, every phase is also
synchronized, so its timer measures the device's work rather than the host's enqueueing).

Arrivals are replayed on the wall clock: a request can join a batch only after its arrival time. When
fewer than ``max_batch`` requests wait and more are coming, the server waits for more until the
oldest waiting request has waited ``max_wait`` seconds (the usual dynamic-batching window), so a
saturated server does not start with a batch of one.
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .graph import StaticDecoder
from .scheduler import FifoScheduler
from .workload import Request


class BasePath:
    """The base model alone: no adapters (the ceiling of every other configuration)."""

    kind = "base"
    max_adapters = None

    def __init__(self, model: nn.Module):
        self.model = model

    def begin_batch(self, adapters: Sequence[int]) -> None:
        pass

    def forward(self, **inputs) -> Tensor:
        return self.model(**inputs).logits

    def decode_rows(self, rows: int):
        """Graph decode (:mod:`.graph`): nothing to set for ``rows`` rows without adapters."""
        return nullcontext()

    def counters(self) -> dict[str, int]:
        return {}

    def reset(self) -> None:
        pass

    def close(self) -> nn.Module:
        return self.model


class PhaseTimer:
    """Seconds per phase; with ``sync``, the device is synchronized around each phase.

    With ``events`` (CUDA), the device's own time of a phase is also recorded (CUDA events around it,
    read by :meth:`collect` after the batch's synchronization, so timing adds no synchronization):
    ``device_seconds[phase]``, and per batch (one entry per :meth:`collect`) ``device_batches[phase]``.
    """

    def __init__(self, sync: bool, events: bool = False):
        self.sync = sync
        self.events = events
        self.seconds: dict[str, float] = defaultdict(float)
        self.device_seconds: dict[str, float] = defaultdict(float)
        self.device_batches: dict[str, list[float]] = defaultdict(list)
        self._pending: list[tuple[str, object, object]] = []

    @contextmanager
    def __call__(self, phase: str):
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        if self.events:
            begin = torch.cuda.Event(enable_timing=True)
            begin.record()
        try:
            yield
        finally:
            if self.events:
                end = torch.cuda.Event(enable_timing=True)
                end.record()
                self._pending.append((phase, begin, end))
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - start

    def collect(self) -> None:
        """Adds the device time of the phases recorded so far (call after the device reached them)."""
        batch = defaultdict(float)
        for phase, begin, end in self._pending:
            batch[phase] += begin.elapsed_time(end) / 1000
        for phase, seconds in batch.items():
            self.device_seconds[phase] += seconds
            self.device_batches[phase].append(round(seconds, 5))
        self._pending.clear()


def cache_argument(model: nn.Module) -> str:
    """The name of the key/value cache argument: ``cache`` (transformers >= 5.x) or ``past_key_values``."""
    inner = getattr(model, "model", model)
    return "cache" if "cache" in inspect.signature(type(inner).forward).parameters else "past_key_values"


def new_cache(config):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=config)
    except TypeError:  # older transformers
        return DynamicCache()


@dataclass
class Server:
    """What every run shares: the device, the model's config and the batch limits.

    Attributes:
        device: where the model runs. config: the model's config (for its cache).
        max_batch: most requests per batch. new_tokens: tokens generated per request.
        max_wait: seconds the oldest waiting request may wait for a fuller batch.
        profile: synchronize the device around every phase, so phase timers measure device work.
        cache_arg: the model's cache argument (see :func:`cache_argument`).
        decode: ``"eager"`` (the model's forward per step with a ``DynamicCache``) or ``"graph"``
            (:class:`~.graph.StaticDecoder`: a static cache, each step one CUDA graph replay on CUDA).
        max_len: longest prompt + new tokens (the static cache's columns; graph decode only).
        model: the served model (graph decode calls its modules directly).
    """

    device: torch.device
    config: object
    max_batch: int
    new_tokens: int = 10
    max_wait: float = 0.05
    profile: bool = False
    cache_arg: str = "cache"
    pad_id: int = 0
    decode: str = "eager"
    max_len: int = 0
    model: nn.Module | None = None
    decoder: StaticDecoder | None = None

    @classmethod
    def for_model(cls, model: nn.Module, **kwargs) -> Server:
        device = next(model.parameters()).device
        return cls(device=device, config=model.config, cache_arg=cache_argument(model), model=model, **kwargs)

    def static_decoder(self) -> StaticDecoder:
        """The graph decode's cache and graphs, built on first use (once per server)."""
        if self.decode != "graph":
            raise ValueError(f"the server decodes {self.decode!r}, not with graphs")
        if self.decoder is None:
            self.decoder = StaticDecoder(self.model, self.max_batch, self.max_len,
                                         capture=self.device.type == "cuda")
        return self.decoder

    def release(self) -> None:
        """Frees the graph decode's cache and graphs (e.g. before eager runs that need the memory)."""
        self.decoder = None

    def generate(self, path, prompts: Sequence[Sequence[int]], timer: PhaseTimer | None = None) -> list[list[int]]:
        """Greedy ``new_tokens`` tokens for each prompt with ``path`` (whose batch is already begun)."""
        timer = timer or PhaseTimer(False)
        rows, width = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(rows, width, dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every row's last token is in the last column
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        graph = self.decode == "graph"
        decoder = self.static_decoder() if graph else None
        cache = (decoder.prefill_cache(path, rows, width, self.new_tokens - 1) if graph else new_cache(self.config))
        common = {"use_cache": True, "logits_to_keep": 1, self.cache_arg: cache}
        with timer("prefill"):
            logits = path.forward(input_ids=ids, attention_mask=mask, position_ids=position, **common)
            token = logits[:, -1].argmax(-1)
        out = [token]
        position = position[:, -1:]
        if graph:
            with timer("decode"):
                decoder.load(token, position, mask)
                out += decoder.decode(path, self.new_tokens - 1)
            return torch.stack(out, dim=1).tolist()
        with timer("decode"):
            for _ in range(self.new_tokens - 1):
                mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
                position = position + 1
                logits = path.forward(input_ids=token[:, None], attention_mask=mask, position_ids=position, **common)
                token = logits[:, -1].argmax(-1)
                out.append(token)
        return torch.stack(out, dim=1).tolist()  # the batch's one host synchronization

    def serve(self, path, requests: Sequence[Request], *, time_limit: float | None = None,
              clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep) -> dict:
        """Serves ``requests`` (arrival times in seconds from now), fills in their results, returns the stats.

        Throughput is requests served over the wall time from the first arrival to the last completion.
        With ``time_limit``, no batch but the first starts after that many seconds: the stats then cover
        the requests served (``truncated``), so a configuration that crawls cannot eat the study's time.
        """
        scheduler = FifoScheduler(self.max_batch, path.max_adapters)
        pending = deque(sorted(requests, key=lambda r: r.arrival))
        sync = self.profile and self.device.type == "cuda"
        timer = PhaseTimer(sync, events=self.device.type == "cuda")
        sizes, distinct, decoded = [], [], []
        before = path.counters()
        idle = 0.0
        t0 = clock()
        truncated = False
        while pending or len(scheduler):
            now = clock() - t0
            if time_limit is not None and sizes and now > time_limit:
                truncated = True
                break
            with timer("schedule"):
                while pending and pending[0].arrival <= now:
                    scheduler.add([pending.popleft()])
            wait_until = None
            if not len(scheduler):
                wait_until = pending[0].arrival
            elif pending and len(scheduler) < self.max_batch and now < scheduler.waiting[0].arrival + self.max_wait:
                wait_until = min(pending[0].arrival, scheduler.waiting[0].arrival + self.max_wait)
            if wait_until is not None:
                sleep(max(0.0, wait_until - now))
                idle += clock() - t0 - now
                continue
            with timer("schedule"):
                batch = scheduler.next_batch()
            start = clock() - t0
            adapters = [r.adapter for r in batch]
            with timer("swap"):
                path.begin_batch(adapters)
            tokens = self.generate(path, [r.prompt for r in batch], timer)
            timer.collect()  # generate's tolist synchronized: the events are done
            finish = clock() - t0
            for request, toks in zip(batch, tokens):
                request.start, request.finish, request.tokens = start, finish, toks
            sizes.append(len(batch))
            distinct.append(len(set(adapters)))
            decoded.append(self.decoder.size_for(len(batch)) if self.decode == "graph" else len(batch))
        served = [r for r in requests if r.finish is not None]
        wall = max(r.finish for r in served) - min(r.arrival for r in requests)
        after = path.counters()
        served_tokens = sum(len(r.tokens) for r in served)
        steps = len(sizes) * (self.new_tokens - 1)
        return {
            "requests": len(served),
            "requests_offered": len(requests),
            "truncated": truncated,
            "tokens": served_tokens,
            "wall_s": wall,
            "requests_per_s": len(served) / wall,
            "tokens_per_s": served_tokens / wall,
            "batches": len(sizes),
            "mean_batch": sum(sizes) / len(sizes),
            "mean_distinct_adapters": sum(distinct) / len(distinct),
            "max_distinct_adapters": max(distinct),
            "loads": after.get("loads", 0) - before.get("loads", 0),
            "evictions": after.get("evictions", 0) - before.get("evictions", 0),
            "swap_s": timer.seconds["swap"],
            "prefill_s": timer.seconds["prefill"],
            "decode_s": timer.seconds["decode"],
            "decode": self.decode,
            "decode_steps": steps,
            "mean_decode_rows": sum(decoded) / len(decoded),  # graph decode: rows padded to a captured size
            "prefill_device_s": timer.device_seconds.get("prefill"),
            "decode_device_s": timer.device_seconds.get("decode"),
            "prefill_device_batches_s": timer.device_batches.get("prefill"),  # where a slow run lost its time
            "decode_step_ms": (timer.device_seconds["decode"] / steps * 1000
                               if steps and "decode" in timer.device_seconds else None),
            "schedule_s": timer.seconds["schedule"],
            "idle_s": idle,
            "mean_latency_s": sum(r.finish - r.arrival for r in served) / len(served),
            "timers": "cuda-synchronized" if sync else "host (enqueue time; one device sync per batch)",
            "device_timers": "CUDA events around prefill and decode of each batch" if timer.events else None,
        }
