"""JD-LoRA serving: a compressed collection, fully resident, through jdlora's PEFT tuner.

Throughput does not depend on the weights' values, and compressing 1,024 Mistral-sized adapters costs
minutes of GPU time, so :func:`synthetic_collection` builds a :class:`~jdlora.JDLoraCollection` with
exactly the shapes compression would produce (per module and cluster, random orthonormal ``U``
``[d_out, r]`` and ``V`` ``[d_in, r]``; per adapter a random full ``Sigma`` ``[r, r]``; every
adapter in a random cluster, clusters of equal size) instead of compressing adapters. It is loaded
with :func:`jdlora.tuner.load_collection`, the tuner's bulk path, and every step runs the PeftModel
with ``adapter_names=[...]`` (one name per batch row): the tuner's mixed-batch layers, whose kernels
are :func:`jdlora.kernels.jd_lora_forward` (Triton on CUDA).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from jdlora.collection import AdapterInfo, CollectionModule, JDLoraCollection
from jdlora.compress import ModuleCompression

from .settings import LORA_RANK, JDSetting


def adapter_name(index: int) -> str:
    return f"adapter-{index:04d}"


def synthetic_collection(modules: dict[str, tuple[int, int]], num_adapters: int, setting: JDSetting, *,
                         device: str | torch.device = "cpu", seed: int = 0) -> JDLoraCollection:
    """A JD-Full collection of ``num_adapters`` adapters with the shapes of ``setting``, random values.

    Args:
        modules: ``{module name: (d_out, d_in)}``.
        num_adapters: adapters (named ``adapter-0000``, ...).
        setting: rank and number of clusters (at most ``num_adapters``).
        device: where the tensors are drawn and stay (float32).
        seed: seed of every draw.
    """
    r, c = setting.rank, setting.clusters
    if c > num_adapters:
        raise ValueError(f"{c} clusters need at least {c} adapters, got {num_adapters}")
    gen = torch.Generator(device=device).manual_seed(seed)
    adapters = [AdapterInfo(name=adapter_name(i), origin={"synthetic": True}, rank=LORA_RANK, alpha=2 * LORA_RANK)
                for i in range(num_adapters)]
    ids = torch.arange(num_adapters, device=device)
    out = {}
    for module, (d_out, d_in) in modules.items():
        U = torch.linalg.qr(torch.randn(c, d_out, r, device=device, generator=gen)).Q
        V = torch.linalg.qr(torch.randn(c, d_in, r, device=device, generator=gen)).Q
        sigma = torch.randn(num_adapters, r, r, device=device, generator=gen) / r
        order = torch.randperm(num_adapters, device=device, generator=gen)
        cluster = torch.empty_like(ids)
        cluster[order] = ids % c  # balanced: sizes differ by at most one
        norms = sigma.square().sum((1, 2))  # ||U Sigma V^T||^2 for orthonormal U, V: the error is 0
        out[module] = CollectionModule(ModuleCompression(U, V, sigma, cluster, norms, torch.zeros_like(norms)), ids)
    settings = {"rank": r, "clusters": c, "sigma": "full", "synthetic": True}
    return JDLoraCollection(None, adapters, out, "full", settings)


class JDPath:
    """The model with a compressed collection loaded by jdlora's PEFT tuner.

    Args:
        model: the base model (its adapted layers are replaced until :meth:`close`).
        collection: e.g. :func:`synthetic_collection`.
        dtype: the dtype of the bases and Sigmas on the device (the model's: no casts per step).
    """

    kind = "jd"
    max_adapters = None

    def __init__(self, model: nn.Module, collection: JDLoraCollection, dtype: torch.dtype | None = None):
        from jdlora.tuner import load_collection

        self.peft = load_collection(model, collection)
        self.names = collection.adapter_names
        if dtype is not None:
            for layer in self.peft.base_model.jd_layers().values():
                layer.jd_cast(dtype)  # the tuner keeps float32 under a bf16 base unless told otherwise
        self.row_names: list[str] = []

    def begin_batch(self, adapters: Sequence[int]) -> None:
        self.row_names = [self.names[a] for a in adapters]

    def forward(self, **inputs) -> Tensor:
        return self.peft(**inputs, adapter_names=self.row_names).logits

    @contextmanager
    def decode_rows(self, rows: int):
        """Graph decode (:mod:`.graph`): the tuner's layers apply the batch's adapters (its first ``rows`` rows,
        padded with the first row's) when called directly: the mix set by the tuner's ``adapter_names``
        hooks, as ``generate`` sets it. The tuner keeps one rows batch per batch size and rewrites it in
        place (:class:`jdlora.tuner.mixed.MixedBatch`), so a graph captured at ``rows`` rows stays valid
        while prefills of other sizes run in between."""
        names = (self.row_names + self.row_names[:1] * rows)[:rows]
        with self.peft.base_model._enable_peft_forward_hooks(adapter_names=names):
            yield

    def counters(self) -> dict[str, int]:
        return {}

    def reset(self) -> None:
        pass

    def close(self) -> nn.Module:
        """Removes every JD-LoRA layer; returns the base model."""
        model = self.peft.unload()
        self.peft = None
        gc.collect()
        return model
