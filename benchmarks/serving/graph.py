"""Graph decode: every path's decode step replayed from a CUDA graph over a static key/value cache (issue 13).

:class:`StaticDecoder` is the serving loop's decode for ``Server(decode="graph")``, the same for the
base model, multi-LoRA and JD-LoRA:

- **Static key/value cache**: per layer, keys and values ``[max_batch, kv_heads, max_len, head_dim]``,
  allocated (zeroed) once per server and reused by every batch and path: a batch writes the columns it
  uses and the attention mask hides the rest, so nothing is reset between batches (stale columns hold
  finite values from earlier batches; a masked column gets weight 0).
- **Prefill** is the eager loop's own (the path's ``forward`` with a ``DynamicCache``, the real rows only,
  ``logits_to_keep=1``); its keys and values are then copied into the static cache.
- **Decode step**: the model's own modules (embedding, norms, q/k/v/o projections -- whatever adapter
  layer a path put there -- MLP, head) called by :meth:`StaticDecoder.step` with the cache written at one
  column (``index_copy_`` at a device index) and SDPA over all ``max_len`` columns under a boolean mask
  ``[B, 1, 1, max_len]``. Queries are grouped by key/value head (``[B, kv_heads, q_per_kv, head_dim]``),
  so grouped-query attention needs no repeated keys. Attending over all ``max_len`` columns (fixed
  shapes for the graph) reads the whole cache of the decode rows every step: at Mistral-7B's shapes
  23 MB per row at 176 columns, 5.9 GB at 256 rows (the live keys of a batch are ~85% of that). No host synchronization and no shape that depends
  on the batch's content: the step reads static buffers (next token, positions, write column, mask) and
  advances them in place, so one CUDA graph per (path, batch size) replays it.
- **Batch sizes**: a batch's decode runs at the smallest captured size that holds it (:data:`BUCKETS`
  up to ``max_batch``, as vLLM pads to its captured sizes); pad rows repeat the first row's adapter (no
  new adapter, no swap) and attend only to their own decode tokens. Prefill is not padded.
- **Adapters**: every per-batch choice is device data written in place before the replays: the path's
  ``decode_rows(rows)`` context (multi-LoRA: slot per row in a fixed tensor per size, slots swapped in
  place by ``index_copy_``; JD-LoRA: the tuner's ``MixedBatch``, one per size, updated in place).

Without ``capture`` (e.g. on the CPU) the same buffers and :meth:`StaticDecoder.step` run eagerly each
step, which is what the CPU tests compare with the eager loop.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor, nn

BUCKETS = (16, 32, 64, 96, 128, 192, 256, 384, 512)  # decode batch sizes captured (up to max_batch)
WARMUP_STEPS = 2  # eager steps on a side stream before a capture (cuBLAS workspaces, Triton compilation)


def buckets_for(max_batch: int) -> tuple[int, ...]:
    """The captured decode sizes for ``max_batch``: :data:`BUCKETS` below it, then ``max_batch`` itself."""
    return tuple(b for b in BUCKETS if b < max_batch) + (max_batch,)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class StaticDecoder:
    """Static key/value cache, static step inputs and one CUDA graph per (path, decode size).

    Args:
        model: a transformers Llama/Mistral-style causal LM (``model.model.layers[i].self_attn`` etc.).
        max_batch: rows of the cache (the largest batch).
        max_len: columns of the cache (longest prompt + new tokens), rounded up to a multiple of 16.
        capture: capture the decode step in CUDA graphs (False: run it eagerly, e.g. on the CPU).
    """

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, *, capture: bool):
        self.model = model
        self.inner = model.model
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.max_batch = max_batch
        self.max_len = -(-max_len // 16) * 16  # aligned mask rows for SDPA's fused kernels
        self.capture_graphs = capture
        self.sizes = buckets_for(max_batch)
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        shape = (max_batch, self.kv_heads, self.max_len, self.head_dim)
        layers = len(self.inner.layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        # the step's inputs, advanced in place by the step itself
        self.token = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros(max_batch, 1, 1, self.max_len, dtype=torch.bool, device=device)
        self.columns = torch.arange(self.max_len, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.owner = None  # the path whose graphs these are
        self.captures = 0
        self.rows = 0  # rows of the loaded batch

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def size_for(self, rows: int) -> int:
        """The smallest decode size that holds ``rows`` rows."""
        for size in self.sizes:
            if size >= rows:
                return size
        raise ValueError(f"a batch of {rows} rows exceeds the decoder's max_batch {self.max_batch}")

    # ----- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, rows: int) -> None:
        """One decode step for the first ``rows`` rows: advance the inputs, run the model, greedy token.

        Reads and writes only static buffers (capturable): the write column and positions move one
        on, the mask opens the new column, the next token is written back into ``token``.
        """
        token, position, mask = self.token[:rows], self.position[:rows], self.mask[:rows]
        self.column.add_(1)
        position.add_(1)
        mask.logical_or_(self.columns == self.column)  # the new column opens
        h = self.inner.embed_tokens(token)  # [B, 1, d]
        cos, sin = self.inner.rotary_emb(h, position)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        group = self.heads // self.kv_heads
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            keys, values = self.keys[i][:rows], self.values[i][:rows]
            keys.index_copy_(2, self.column, k)
            values.index_copy_(2, self.column, v)
            # query head j*group+g reads key/value head j (transformers' repeat_kv): group the queries
            q = q.reshape(rows, self.kv_heads, group, self.head_dim)
            o = nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
            h = h + attn.o_proj(o.reshape(rows, 1, self.heads * self.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(self.inner.norm(h))
        token.copy_(logits[:, -1].argmax(-1, keepdim=True))

    # ----- graphs -----------------------------------------------------------------------------------

    def _own(self, path) -> None:
        if self.owner is not path:  # another path's layers: its graphs do not apply
            self.drop_graphs()
            self.owner = path

    def drop_graphs(self) -> None:
        """Frees every captured graph (their memory pools too); e.g. when their path is closed."""
        self.graphs.clear()
        self.owner = None

    def capture(self, path, sizes: Sequence[int] | None = None) -> None:
        """Captures the decode step of ``path`` at every decode size (or ``sizes``), on dummy inputs.

        The path's batch must be begun with at least the largest size's rows of adapters
        (``path.begin_batch``); its ``decode_rows(size)`` context makes them device data the graph reads.
        """
        self._own(path)
        for size in sizes or self.sizes:
            if size in self.graphs:
                continue
            self._reset_inputs()
            with path.decode_rows(size):
                if not self.capture_graphs:  # no CUDA: the same step runs eagerly, so its shapes are checked here too
                    self.step(size)
                    continue
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(WARMUP_STEPS):
                        self.step(size)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.step(size)
            self.graphs[size] = graph
            self.captures += 1
        self._reset_inputs()
        if self.capture_graphs:
            torch.cuda.synchronize()

    def step_kernels(self, path, size: int) -> dict:
        """Where a decode step's device time goes: the step at ``size`` rows run once eagerly under
        ``torch.profiler`` (the same kernels a replay launches), kernel time by kind (:func:`kernel_times`).
        CUDA only."""
        from torch.profiler import ProfilerActivity, profile

        self._reset_inputs()
        with path.decode_rows(size):
            self.step(size)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                self.step(size)
                torch.cuda.synchronize()
        self._reset_inputs()
        return {**kernel_times(prof), "rows": size}

    def _reset_inputs(self) -> None:
        self.token.zero_()
        self.position.zero_()
        self.column.zero_()
        self.mask.zero_()
        self.mask[..., 0] = True

    # ----- one batch --------------------------------------------------------------------------------

    def prefill_cache(self, path, rows: int, width: int, steps: int):
        """The cache to pass to the batch's (eager) prefill: it writes the prompt's keys and values straight
        into the static cache (no second copy of them in memory).

        Captures the path's graph for this batch's decode size first if it is missing (the capture's
        warm-up steps write cache columns the batch then overwrites).
        """
        if width + steps > self.max_len:
            raise ValueError(f"prompt of {width} tokens + {steps} steps exceeds the static cache's {self.max_len} "
                             "columns: raise max_len")
        size = self.size_for(rows)
        self._own(path)
        if self.capture_graphs and size not in self.graphs:
            self.capture(path, [size])
        return prefill_cache(self.model.config, self.keys, self.values, rows, width)

    def load(self, first: Tensor, position: Tensor, attention_mask: Tensor) -> None:
        """Takes the batch prefilled through :meth:`prefill_cache` into the step's inputs (then :meth:`decode`).

        Args:
            first: ``[rows]`` the prefill's tokens. position: ``[rows, 1]`` the last prompt position of each row.
            attention_mask: ``[rows, width]`` the prompts' (left-padding) mask.
        """
        rows, width = attention_mask.shape
        size = self.size_for(rows)
        self.token[:rows, 0].copy_(first)
        self.token[rows:size].zero_()
        self.position[:rows].copy_(position)
        self.position[rows:size].zero_()
        self.column.fill_(width - 1)
        self.mask[:size].zero_()  # pad rows see only their own decode tokens
        self.mask[:rows, 0, 0, :width].copy_(attention_mask.bool())
        self.rows = rows

    def decode(self, path, steps: int) -> list[Tensor]:
        """``steps`` greedy tokens of the batch :meth:`load` took; one ``[rows]`` tensor per step."""
        rows = self.rows
        size = self.size_for(rows)
        graph = self.graphs.get(size)
        out = []
        with path.decode_rows(size):
            for _ in range(steps):
                if graph is None:
                    self.step(size)
                else:
                    graph.replay()
                out.append(self.token[:rows, 0].clone())
        return out


def prefill_cache(config, keys: list[Tensor], values: list[Tensor], rows: int, width: int):
    """A transformers ``DynamicCache`` whose ``update`` writes a prefill's keys and values into the first
    ``rows`` rows and ``width`` columns of the static ``keys``/``values`` and keeps nothing itself (the
    prefill's attention reads the keys and values it is given, as with an empty cache)."""
    from transformers import DynamicCache

    class IntoStatic(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            keys[layer_idx][:rows, :, :width].copy_(key_states)
            values[layer_idx][:rows, :, :width].copy_(value_states)
            return key_states, value_states

    try:
        return IntoStatic(config=config)
    except TypeError:  # older transformers
        return IntoStatic()


_LAUNCH_API = re.compile(r"^cu(da)?[A-Z]")  # CUDA runtime and driver calls (cudaLaunchKernel, cuLaunchKernelEx, ...)


def device_idle(prof, min_gap_us: float = 5.0, top: int = 8) -> dict | None:
    """Where the GPU sat idle in a ``torch.profiler`` run with CPU and CUDA activities (None without device
    activity): :func:`idle_summary` of its kernels, copies and memsets, each with the host time of the runtime
    call that launched it (matched by correlation id)."""
    device, launched, host_start = [], {}, None
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA:
            device.append((e.start_ns(), e.end_ns(), e.name(), e.correlation_id()))
        else:
            host_start = e.start_ns() if host_start is None else min(host_start, e.start_ns())
            if _LAUNCH_API.match(e.name()):
                launched[e.correlation_id()] = e.start_ns()
    if not device:
        return None
    return idle_summary([(s, t, name, launched.get(c)) for s, t, name, c in device], host_start, min_gap_us, top)


def idle_summary(activities: Sequence[tuple], host_start: int, min_gap_us: float = 5.0, top: int = 8) -> dict:
    """The device's idle time in a run, from ``activities`` ``(start_ns, end_ns, name, launch_ns or None)``
    (every stream) and the time the run's first host event began, in microseconds:

    - ``before_first_us``: from the first host event to the first device activity (the host's work before
      anything reaches the GPU, e.g. per-call set-up);
    - ``idle_us``: gaps of at least ``min_gap_us`` between busy intervals (activities on several streams merged);
    - ``host_bound_us``: the part of those gaps whose next activity was launched after the gap began (the host
      was late); the rest waited on something else (a launched activity queued behind a dependency);
    - ``by_next``: the ``top`` names of the activity after a gap by idle time (``name``, ``us``, ``gaps``,
      ``host_bound_us``): what the device waited for.
    """
    ordered = sorted(activities)
    first = ordered[0][0]
    idle = host_bound = 0.0
    by_next: dict[str, list] = {}
    busy_until = ordered[0][1]
    for start, end, name, launch in ordered[1:]:
        gap = (start - busy_until) / 1e3
        if gap >= min_gap_us:
            late = launch is not None and launch > busy_until
            idle += gap
            host_bound += gap if late else 0.0
            entry = by_next.setdefault(name, [0.0, 0, 0.0])
            entry[0] += gap
            entry[1] += 1
            entry[2] += gap if late else 0.0
        busy_until = max(busy_until, end)
    ranked = sorted(by_next.items(), key=lambda kv: -kv[1][0])[:top]
    return {"before_first_us": (first - host_start) / 1e3, "busy_span_us": (busy_until - first) / 1e3,
            "idle_us": idle, "host_bound_us": host_bound,
            "by_next": [{"name": n, "us": us, "gaps": k, "host_bound_us": hb} for n, (us, k, hb) in ranked]}


def idle_line(idle: dict, top: int = 4) -> str:
    """:func:`idle_summary`'s numbers in one line (milliseconds)."""
    nexts = "; ".join(f"{e['name'][:40]} {e['us'] / 1e3:.2f} ({e['gaps']}x)" for e in idle["by_next"][:top])
    return (f"device idle {idle['idle_us'] / 1e3:.2f} ms ({idle['host_bound_us'] / 1e3:.2f} host-bound) over "
            f"{idle['busy_span_us'] / 1e3:.1f} ms, host before the first activity {idle['before_first_us'] / 1e3:.2f} "
            f"ms; before: {nexts}")


def kernel_times(prof, top: int = 0) -> dict:
    """Kernel time of a ``torch.profiler`` run summed by kind, in milliseconds -- ``gemm`` (cuBLAS/CUTLASS),
    ``lora`` (jdlora's Triton kernels: JD-LoRA and multi-LoRA), ``attention`` (SDPA), ``other`` (norms,
    rotary, elementwise, copies) -- with ``total`` and the kernel count; with ``top``, also ``top``: the
    ``top`` largest kernels by name (``name``, ``ms``, ``count``)."""
    out = {"gemm": 0.0, "lora": 0.0, "attention": 0.0, "other": 0.0, "kernels": 0}
    named = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None)
        if us is None:  # older torch
            us = getattr(event, "cuda_time_total", 0.0)
        if not us:
            continue
        name = event.key.lower()
        kind = ("lora" if name.startswith("jd_") else
                "gemm" if any(k in name for k in ("gemm", "cutlass", "nvjet", "xmma", "cublas")) else
                "attention" if any(k in name for k in ("fmha", "attention", "flash", "attn")) else "other")
        out[kind] += us / 1000
        out["kernels"] += event.count
        named.append({"name": event.key, "ms": us / 1000, "count": event.count})
    out["total"] = sum(out[k] for k in ("gemm", "lora", "attention", "other"))
    if top:
        out["top"] = sorted(named, key=lambda k: -k["ms"])[:top]
    return out
