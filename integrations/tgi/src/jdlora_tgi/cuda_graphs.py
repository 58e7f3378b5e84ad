"""CUDA graphs and adapters in TGI's ``FlashCausalLM`` (v3.3.7), and what jdlora_tgi does about it.

What TGI does: ``FlashCausalLM.warmup`` captures one graph per batch size in ``CUDA_GRAPHS`` (the launcher
passes ``1,2,4,8,16,32`` by default) with ``cuda_graph_warmup``, which calls ``self.model.forward`` *without*
``adapter_data``: the captured graphs contain no adapter computation. ``FlashCausalLM.forward`` replays a
graph for every decode step whose batch fits one, and then ignores ``adapter_data``. TGI's ``cli.serve``
means to turn graphs off when ``LORA_ADAPTERS`` is set, but it assigns a module global of ``cli`` that
``models.globals.CUDA_GRAPHS`` (read from the environment at import) never sees, and the launcher always
sets ``CUDA_GRAPHS``. So, with stock TGI 3.3.7 and default settings, decode steps of batches of up to 32
requests run the base model only, for plain LoRA and would for JD-LoRA (prefill is always eager, so the
first generated token carries the adapter and the following ones do not).

What jdlora_tgi does:

1. Always: a decode step whose batch uses any adapter (TGI index != 0) that no captured graph serves runs
   eagerly (``generate_token`` hides the graphs for that step). Base-model-only steps keep their graphs.
2. With ``JDLORA_TGI_CUDA_GRAPHS=1`` (default off): the graphs are captured *with* the JD-LoRA path, reading
   each token's JD row from a static ``[bs]`` buffer per graph; before a replay ``forward`` writes the rows
   of the step into it (-1 for padding, base and plain-LoRA tokens). Decode steps whose adapters are all
   JD-LoRA then replay graphs; steps with plain LoRA still run eagerly (1.).
"""

from __future__ import annotations

import functools
import os

import torch
from ._log import logger

from .registry import StepRows

__all__ = ["patch_flash_causal_lm", "capture_enabled", "CapturableStepRows"]

ROWS_KEY = "jdlora_rows"


def capture_enabled() -> bool:
    return os.environ.get("JDLORA_TGI_CUDA_GRAPHS", "0").lower() in {"1", "true", "yes"}


class CapturableStepRows(StepRows):
    """Rows from a static buffer; regroups tokens inside a graph capture so that replays regroup too."""

    def __init__(self, rows):
        super().__init__(rows)
        self._made_capturing = None

    @property
    def batch(self):
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if self._batch is None or self._made_capturing != capturing:
            from jdlora.kernels import prepare_batch

            self._batch, self._made_capturing = prepare_batch(self.rows), capturing
        return self._batch


def graph_serves(graph: dict, active: set, jd_indices: frozenset) -> bool:
    """Whether a captured graph computes the adapters ``active`` (TGI indices, base excluded)."""
    return not active or (ROWS_KEY in graph and active <= jd_indices)


def patch_flash_causal_lm(module) -> None:
    from .patches import _wrap

    cls = module.FlashCausalLM
    _wrap(cls, "generate_token", _make_generate_token)
    _wrap(cls, "forward", _make_forward)
    _wrap(cls, "cuda_graph_warmup", _make_cuda_graph_warmup)


def _registry(model):
    return getattr(model, "jdlora", None)


def _make_generate_token(original):
    warned = []

    @functools.wraps(original)
    def generate_token(self, batch):
        graphs = getattr(self, "cuda_graphs", None)
        meta = getattr(batch, "adapter_meta", None)
        if not graphs or meta is None:
            return original(self, batch)
        active = set(meta.adapter_set) - {0}
        registry = _registry(self)
        jd_indices = registry.jd_indices if registry is not None else frozenset()
        if all(graph_serves(g, active, jd_indices) for g in graphs.values()):
            return original(self, batch)
        if not warned:
            warned.append(True)
            logger.info("jdlora_tgi: decode steps that use adapters not captured in CUDA graphs run eagerly")
        self.cuda_graphs = {}
        try:
            return original(self, batch)
        finally:
            self.cuda_graphs = graphs

    return generate_token


def _make_forward(original):
    @functools.wraps(original)
    def forward(self, batch, adapter_data):
        graphs = getattr(self, "cuda_graphs", None)
        registry = _registry(self)
        if graphs and registry is not None and adapter_data is not None and batch.cu_seqlen_prefill is None:
            indices = adapter_data.meta.adapter_indices
            bs = indices.shape[0]
            fitting = [k for k in graphs if k >= bs]
            if fitting and ROWS_KEY in graphs[min(fitting)]:
                buffer = graphs[min(fitting)][ROWS_KEY]
                buffer.fill_(-1)
                buffer[:bs].copy_(registry.token_rows(indices))
        return original(self, batch, adapter_data)

    return forward


def _make_cuda_graph_warmup(original):
    @functools.wraps(original)
    def cuda_graph_warmup(self, bs, max_s, max_bt):
        registry = _registry(self)
        if not capture_enabled() or registry is None or not registry.adapters:
            return original(self, bs, max_s, max_bt)
        from text_generation_server.adapters import AdapterBatchData

        from .adapter import BatchJDLoraWeights

        rows = torch.full((bs,), -1, dtype=torch.int32, device=self.device)
        step = CapturableStepRows(rows)
        data = {lt: BatchJDLoraWeights(table=t, step=step, adapters={}) for lt, t in registry.tables.items()}
        adapter_data = AdapterBatchData(meta=None, data=data, prefill=False)
        model = self.model
        model.forward = functools.partial(type(model).forward, model, adapter_data=adapter_data)
        try:
            result = original(self, bs, max_s, max_bt)
        finally:
            del model.forward
        self.cuda_graphs[bs][ROWS_KEY] = rows
        return result

    return cuda_graph_warmup
