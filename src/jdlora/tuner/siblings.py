"""Sibling layers that read the same input (q, k, v; gate, up): their JD-LoRA in three launches for all.

Why: in an eager mixed-batch forward every adapted layer costs three Triton launches, and each launch costs
tens of microseconds of host time (``benchmarks/RESULTS.md``). q, k and v of an attention block read the
same hidden states, so their shrinks ``V_s[c_s]^T x`` and Sigmas can run as one launch each
(:func:`jdlora.kernels.jd_lora_shrink_siblings`), and once every sibling's base output exists, their expands
too (:func:`jdlora.kernels.jd_lora_expand_siblings`): 3 launches for q, k and v instead of 9, 3 instead of 6
for gate and up.

How, in eager mode (under ``torch.compile``, :meth:`Siblings.traced` shares the shrink and Sigma with state dynamo
can trace: one custom-op node for the siblings' shrink and Sigma, then each layer its own base output and expand node):

- :func:`link_siblings` (run by :class:`~jdlora.tuner.model.JDLoraModel` after each injection) gives the
  JD-LoRA children of one parent whose names form a group of :data:`SIBLING_GROUPS` one shared
  :class:`Siblings`.
- The first sibling called in a forward computes the output of every sibling that can take part (adapters
  enabled, none merged): each one's base layer on the same ``x``, then per adapter group the fused launches
  for the siblings whose banks fit them (one rank, dtype and layout) and each other sibling's own three. It
  returns its own output and keeps the others', keyed by the input (identity and ``_version``; identity
  alone for tensors made under ``torch.inference_mode``, which keep no version), the :class:`MixedBatch` and
  its mix, and each sibling's banks. A sibling called with all of those unchanged returns its kept output;
  any other call runs alone, so the numbers are those of each layer's own forward either way (the fused
  kernels give each sibling the bits of its own launches).
- A kept output that its sibling never took (it got another input, or did not run) turns fusion off for
  that set of siblings for good: it would only add work.
- ``JDLORA_FUSE_SIBLINGS=0`` (read at import; or :data:`ENABLED` set to False) turns it off everywhere.
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass

from torch import Tensor, nn

from ..kernels import (
    KERNEL_DTYPES, MAX_SIBLINGS, JDBatch, ShrunkSiblings, jd_lora_expand_siblings, jd_lora_shrink_siblings, siblings_fusable,
)

__all__ = ["SIBLING_GROUPS", "ENABLED", "Siblings", "link_siblings"]

# Child names that read the same input in the models transformers ships (Llama, Mistral, Qwen, Gemma, ...;
# BERT-like; T5; diffusers attention). A group is fused only for children that all exist and are adapted.
SIBLING_GROUPS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
    ("to_q", "to_k", "to_v"),
    ("w1", "w3"),
)
ENABLED = os.environ.get("JDLORA_FUSE_SIBLINGS", "1") != "0"


@dataclass
class _Kept:
    """The outputs the first sibling of a forward computed for the others, and what they were computed from."""

    x: weakref.ref
    x_version: int
    batch: object  # the MixedBatch
    mix: int  # batch.mixes when computed
    outputs: dict  # sibling -> its output, until it takes it
    banks: dict  # sibling -> the bank tensors its output was computed with

    def take(self, layer, x: Tensor, batch) -> Tensor | None:
        """``layer``'s output if it is called on what it was computed from (it is then no longer kept)."""
        out = self.outputs.pop(layer, None)
        if (out is None or self.x() is not x or _version(x) != self.x_version or batch is not self.batch
                or batch.mixes != self.mix or not _same_banks(_bank_tensors(layer), self.banks[layer])):
            return None
        return out


class Siblings:
    """JD-LoRA layers of one parent that read the same input; see the module docstring."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.on = True  # off for good once a kept output went untaken
        self._kept: _Kept | None = None  # the current forward's outputs for the siblings yet to run
        self._plan: tuple[list, list[_Step]] | None = None  # (the members and bank tensors it is for, the steps)
        self._traced: dict[str, tuple] = {}  # under torch.compile: group key -> (x, g, positions, siblings left)

    def traced(self, layer, group_key: str, x: Tensor, xin: Tensor, batch: JDBatch) -> tuple[ShrunkSiblings, int] | None:
        """``(g of the siblings, layer's index in it)`` under ``torch.compile`` (None: ``layer`` runs alone), with
        state that dynamo traces: no weak references, versions or sets. The first sibling called on ``x`` computes
        every sibling's g (one graph node); the others take it when called on the same ``x`` (the same graph value),
        and the last one clears it, so nothing outlives the graph. The graph then holds one shrink-and-Sigma node for q, k and v and an expand node per module, instead
        of three nodes of three launches each."""
        index = layer._jd_sibling_index
        state = self._traced.get(group_key)
        if state is not None:
            kept_x, shrunk, positions, left = state
            if kept_x is x and index in positions:
                if left > 1:
                    self._traced[group_key] = (kept_x, shrunk, positions, left - 1)
                else:
                    del self._traced[group_key]
                return shrunk, positions[index]
            del self._traced[group_key]
        members, tensors = [], []
        for m in self.layers:
            banks = _banks(m, group_key)
            if banks is not None:
                members.append(m._jd_sibling_index)
                tensors.append(banks)
        if len(members) < 2 or index not in members:
            return None
        Vs, sigmas, cluster_ofs = zip(*tensors)
        if not siblings_fusable(Vs, sigmas, cluster_ofs) or Vs[0].dtype != xin.dtype:
            return None
        shrunk = jd_lora_shrink_siblings(xin, Vs, sigmas, cluster_ofs, batch)
        positions = {m: p for p, m in enumerate(members)}
        self._traced[group_key] = (x, shrunk, positions, len(members) - 1)
        return shrunk, positions[index]

    def forward(self, layer, x: Tensor, batch) -> Tensor | None:
        """``layer``'s mixed-batch output for input ``x`` and the :class:`MixedBatch` ``batch``: kept from the
        sibling that ran first on the same input, or computed now with every sibling's; None: ``layer`` runs
        alone (it cannot take part, or fusion has just turned off)."""
        kept = self._kept
        if kept is not None:
            out = kept.take(layer, x, batch)
            if out is not None:
                if not kept.outputs:
                    self._kept = None
                return out
            self._kept = None  # a sibling did not take its output: their inputs differ (or one did not run)
            self.on = False
            return None
        members = [m for m in self.layers if _takes_part(m)]
        if len(members) < 2 or layer not in members:
            return None
        outputs = self._run(members, x, batch)
        own = outputs.pop(layer)
        self._kept = _Kept(weakref.ref(x), _version(x), batch, batch.mixes, outputs,
                           {m: _bank_tensors(m) for m in outputs})
        return own

    def _run(self, members: list, x: Tensor, batch) -> dict:
        """Every member's output on ``x``: its base layer's, plus its adapters' updates, fused per adapter group
        for the members whose banks allow it, each member's own launches for the rest."""
        steps = self._steps(members)
        outputs, flat = {}, {}
        for m in members:
            out = m.base_layer(x)
            if not out.is_contiguous():
                out = out.contiguous()
            outputs[m], flat[m] = out, out.view(-1, out.shape[-1])
        kernel_outputs = all(y.dtype in KERNEL_DTYPES for y in flat.values())  # else each layer's float32 fallback
        x2 = x.reshape(-1, x.shape[-1])
        tokens_per_row = math.prod(x.shape[1:-1])
        for step in steps:
            prepared = batch.prepared(step.group, tokens_per_row, x.device)
            if prepared is None:
                continue
            if not (step.fused and kernel_outputs):
                for m, bank in step.entries:
                    m._jd_group_forward(bank, flat[m], x2, prepared)
                continue
            xin = x2 if x2.dtype == step.Vs[0].dtype else x2.to(step.Vs[0].dtype)
            shrunk = jd_lora_shrink_siblings(xin, step.Vs, step.sigmas, step.cluster_ofs, prepared)
            jd_lora_expand_siblings([flat[m] for m, _ in step.entries], step.Us, step.cluster_ofs, shrunk, check=False)
        return outputs

    def _steps(self, members: list) -> list[_Step]:
        """The members' adapter groups as :class:`_Step` s, made anew only when a bank tensor was replaced (the
        banks made current first: retied, grown to their group)."""
        for m in members:
            if m._jd_untied:
                m._jd_retie()
            for bank in m._jd_banks.values():
                if bank.sigma.shape[0] < bank.group.size:
                    m._jd_grow(bank, bank.group.size)
        tensors = [t for m in members for t in (m, *_bank_tensors(m))]
        if self._plan is not None and _same_banks(tensors, self._plan[0]):
            return self._plan[1]
        groups: dict[str, list] = {}  # group key -> [(member, bank)], in the siblings' order
        for m in members:
            for key, bank in m._jd_banks.items():
                groups.setdefault(key, []).append((m, bank))
        steps = []
        for entries in groups.values():
            rank = entries[0][1].group.rank
            Us = [m._jd_bases[rank].U for m, _ in entries]
            Vs = [m._jd_bases[rank].V for m, _ in entries]
            sigmas = [bank.sigma for _, bank in entries]
            cluster_ofs = [bank.cluster_of for _, bank in entries]
            fused = (len(entries) > 1 and Us[0].dtype in KERNEL_DTYPES and siblings_fusable(Vs, sigmas, cluster_ofs)
                     and all(U.dtype == Us[0].dtype and U.stride()[1:] == Us[0].stride()[1:] for U in Us))
            steps.append(_Step(entries[0][1].group, entries, fused, Us, Vs, sigmas, cluster_ofs))
        self._plan = (tensors, steps)
        return steps


@dataclass
class _Step:
    """One adapter group of the siblings' forward: one fused shrink, Sigma and expand for ``entries`` (``fused``),
    or each entry's own launches."""

    group: object  # the AdapterGroup
    entries: list  # [(member, its bank of the group)]
    fused: bool
    Us: list
    Vs: list
    sigmas: list
    cluster_ofs: list


def _takes_part(layer) -> bool:
    """Whether ``layer``'s mixed-batch forward applies its banks (it has some, adapters enabled, none merged)."""
    return bool(layer._jd_banks) and not layer.disable_adapters and not layer.merged


def _banks(layer, group_key: str) -> tuple | None:
    """``(V, sigma, cluster_of)`` of ``layer``'s banks for ``group_key`` (made current) if its mixed-batch
    forward uses them, else None."""
    bank = layer._jd_banks.get(group_key)
    if bank is None or not _takes_part(layer):
        return None
    if layer._jd_untied:
        layer._jd_retie()  # rebuilds the banks
        bank = layer._jd_banks[group_key]
    layer._jd_grow(bank, bank.group.size)
    return layer._jd_bases[bank.group.rank].V, bank.sigma, bank.cluster_of


def _bank_tensors(layer) -> tuple:
    """The tensors ``layer``'s mixed-batch forward reads, and whether it applies them (what a kept output
    depends on besides the input and the batch)."""
    if not _takes_part(layer):
        return (None,)
    return tuple(t for b in layer._jd_banks.values() for t in (b.sigma, b.cluster_of, layer._jd_bases[b.group.rank].U,
                                                                 layer._jd_bases[b.group.rank].V))


def _same_banks(now: tuple, then: tuple) -> bool:
    return len(now) == len(then) and all(a is b for a, b in zip(now, then))


def _version(t: Tensor) -> int:
    """``t._version``; -1 for tensors made under ``torch.inference_mode``, which keep no version counter (those
    are matched by identity alone: a change in place between two siblings' calls goes unseen)."""
    return -1 if t.is_inference() else t._version


def link_siblings(model: nn.Module, layer_type: type) -> None:
    """Gives the children of each parent that are ``layer_type`` (JD-LoRA layers) and form a group of
    :data:`SIBLING_GROUPS` one :class:`Siblings` (kept as ``_jd_siblings`` on each), and unlinks layers that no
    longer have siblings."""
    for parent in model.modules():
        children = dict(parent.named_children())
        for names in SIBLING_GROUPS:
            layers = [children.get(n) for n in names]
            layers = [m for m in layers if isinstance(m, layer_type)]
            if len(layers) < 2 or len(layers) > MAX_SIBLINGS:
                for m in layers:
                    m._jd_siblings = None
                continue
            current = layers[0].__dict__.get("_jd_siblings")
            if current is None or current.layers != layers:
                shared = Siblings(layers)
                for i, m in enumerate(layers):
                    m._jd_siblings = shared
                    m._jd_sibling_index = i
