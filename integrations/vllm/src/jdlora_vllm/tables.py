"""The JD-LoRA weights of one vLLM LoRA layer, for every collection served, stacked for one kernel call per slice.

A vLLM LoRA layer can pack several model modules (``qkv_proj`` = q, k, v; ``gate_up_proj`` = gate, up) into
output slices. Per slice, :class:`JDSlice` holds::

    U          [C, d_out, r]   bases of every cluster of every collection, stored once
    V          [C, d_in, r]
    sigma      [n, r, r] / [n, r]   one Sigma per JD adapter served (n = all adapters of all collections)
    cluster_of [n] int32            cluster of each adapter in this module, -1: no update here

Rows are global to the worker (collection after collection, each in its own adapter order), so one per-token row
vector serves every layer. Collections of different ranks are zero-padded to the largest (exact: the padded
directions carry zeros) and diagonal Sigmas become full ones when a full collection is present.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

from jdlora.errors import IncompatibleAdaptersError
from jdlora.kernels import JDBatch, jd_lora_forward_siblings

__all__ = ["JDSlice", "JDLayer"]


@dataclass
class JDSlice:
    U: Tensor
    V: Tensor
    sigma: Tensor
    cluster_of: Tensor


class JDLayer:
    """JD-LoRA part of one vLLM LoRA layer: ``y[:, slice k] += U_c Sigma_a V_c^T x`` per token and slice."""

    def __init__(self, module_name: str, sub_modules: list[str], output_slices: tuple[int, ...], input_size: int,
                 device: torch.device, dtype: torch.dtype):
        self.module_name = module_name
        self.sub_modules = sub_modules  # model module names, one per output slice
        self.output_slices = tuple(output_slices)
        self.input_size = input_size
        self.device, self.dtype = device, dtype
        self.slices: list[JDSlice | None] = [None] * len(sub_modules)

    def build(self, collections: list[tuple[object, int]], num_rows: int) -> None:
        """Stacks every collection's modules of this layer; ``collections``: ``(JDLoraCollection, first row)``."""
        for k, module in enumerate(self.sub_modules):
            parts = [(c.modules[module], first) for c, first in collections if module in c.modules]
            self.slices[k] = self._stack(k, module, parts, num_rows) if parts else None

    def _stack(self, k: int, module: str, parts, num_rows: int) -> JDSlice:
        d_out = self.output_slices[k]
        rank = max(entry.compression.rank for entry, _ in parts)
        full = any(entry.compression.sigma.dim() == 3 for entry, _ in parts)
        sigma = torch.zeros((num_rows, rank, rank) if full else (num_rows, rank), dtype=torch.float32)
        cluster_of = torch.full((num_rows,), -1, dtype=torch.int32)
        Us, Vs, offset = [], [], 0
        for entry, first in parts:
            comp = entry.compression
            if comp.U.shape[1] != d_out or comp.V.shape[1] != self.input_size:
                raise IncompatibleAdaptersError(
                    f"JD-LoRA module {module!r} has bases for a {comp.V.shape[1]} -> {comp.U.shape[1]} layer, but the "
                    f"served model's {self.module_name} (slice {k}) is {self.input_size} -> {d_out}: the collection "
                    "was compressed for another base model. Serve it with the model its adapters were trained on."
                )
            r = comp.rank
            Us.append(torch.nn.functional.pad(comp.U, (0, rank - r)))
            Vs.append(torch.nn.functional.pad(comp.V, (0, rank - r)))
            s = comp.sigma.float()
            if full and s.dim() == 2:
                s = torch.diag_embed(s)
            rows = first + entry.adapter_ids.long()
            if full:
                sigma[rows, :r, :r] = s
            else:
                sigma[rows, :r] = s
            cluster_of[rows] = offset + comp.cluster.to(torch.int32)
            offset += comp.U.shape[0]
        to = dict(device=self.device, dtype=self.dtype)
        return JDSlice(torch.cat(Us).to(**to).contiguous(), torch.cat(Vs).to(**to).contiguous(),
                       sigma.to(**to), cluster_of.to(self.device))

    def add_to(self, y: Tensor, x: Tensor, batch: JDBatch) -> None:
        """In place: ``y[t, slice k] += U_c Sigma_a(t) V_c^T x[t]`` for every slice that has JD weights, the slices
        of a packed layer (q, k, v) in three launches for all where their weights allow
        (:func:`jdlora.kernels.jd_lora_forward_siblings`)."""
        ends = itertools.accumulate(self.output_slices)
        parts = [(y[:, end - size:end], jd) for size, end, jd in zip(self.output_slices, ends, self.slices)
                 if jd is not None]
        if parts:
            ys, jds = zip(*parts)
            jd_lora_forward_siblings(ys, x, [j.U for j in jds], [j.V for j in jds], [j.sigma for j in jds],
                                     [j.cluster_of for j in jds], batch)

    def nbytes(self) -> dict[str, int]:
        count = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
        live = [s for s in self.slices if s is not None]
        return {"bases": count([s.U for s in live] + [s.V for s in live]),
                "sigma": count([s.sigma for s in live] + [s.cluster_of for s in live])}
