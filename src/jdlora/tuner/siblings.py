"""Sibling layers that read the same input (q, k, v; gate, up): one shrink and one Sigma launch for all.

Why: in an eager mixed-batch forward every adapted layer costs three Triton launches, and each launch costs
tens of microseconds of host time (``benchmarks/RESULTS.md``). q, k and v of an attention block read the
same hidden states, so their shrinks ``V_s[c_s]^T x`` and Sigmas can run as one launch each
(:func:`jdlora.kernels.jd_lora_shrink_siblings`); each layer then runs only its own expand: 5 launches for
q, k and v instead of 9, 4 instead of 6 for gate and up.

How, in eager mode (under ``torch.compile``, :meth:`Siblings.traced` does the same with state dynamo can trace:
one custom-op node for the siblings' shrink and Sigma, one expand node per module):

- :func:`link_siblings` (run by :class:`~jdlora.tuner.model.JDLoraModel` after each injection) gives the
  JD-LoRA children of one parent whose names form a group of :data:`SIBLING_GROUPS` one shared
  :class:`Siblings`.
- The first sibling to run in a forward computes ``g_s`` for every sibling that can use it (adapters of
  the same group in its banks, enabled, not merged, banks of one rank, dtype and layout) and keeps them,
  keyed by its input tensor (identity and ``_version``; identity alone for tensors made under
  ``torch.inference_mode``, which keep no version) and the kernel batch (identity and the version of its rows). A sibling whose input, batch or banks are not those of the kept result runs its own three
  launches: the numbers are the same either way (the fused kernels give each sibling the bits of its own
  forward).
- A kept result that a sibling never took (it got another input, or did not run) turns fusion off for
  that set of siblings for good: it would only add work.
- ``JDLORA_FUSE_SIBLINGS=0`` (read at import; or :data:`ENABLED` set to False) turns it off everywhere.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..kernels import MAX_SIBLINGS, JDBatch, ShrunkSiblings, jd_lora_shrink_siblings, siblings_fusable

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
    """The siblings' ``g`` of one forward, and who may still take it."""

    x: weakref.ref
    x_version: int
    batch: JDBatch
    rows_version: int
    shrunk: ShrunkSiblings
    banks: dict  # layer -> (sibling index, the (V, sigma, cluster_of) it was computed with)
    pending: set = field(default_factory=set)


class Siblings:
    """JD-LoRA layers of one parent that read the same input; see the module docstring."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.on = True  # off for good once a kept result went untaken
        self._kept: dict[str, _Kept] = {}  # adapter group key -> the current forward's g
        self._fusable: dict[str, tuple[list, bool]] = {}  # group key -> (the banks checked, siblings_fusable)
        self._traced: dict[str, tuple] = {}  # under torch.compile: group key -> (x, g, positions, siblings left)

    def traced(self, layer, group_key: str, x: Tensor, xin: Tensor, batch: JDBatch) -> tuple[ShrunkSiblings, int] | None:
        """:meth:`shrunk` under ``torch.compile``, with state that dynamo traces: no weak references, versions or
        sets. The first sibling called on ``x`` computes every sibling's g (one graph node); the others take it
        when called on the same ``x`` (the same graph value), and the last one clears it, so nothing outlives the
        graph. The graph then holds one shrink-and-Sigma node for q, k and v and an expand node per module, instead
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

    def shrunk(self, layer, group_key: str, x: Tensor, xin: Tensor, batch: JDBatch) -> tuple[ShrunkSiblings, int] | None:
        """``(g of the siblings, layer's index in it)`` for ``layer``'s adapters of ``group_key`` on input ``x``
        (``xin``: x flattened and in the banks' dtype), computed now for every sibling that can use it or
        kept from a sibling that ran before with the same ``x`` and ``batch``; None: ``layer`` runs alone."""
        kept = self._kept.get(group_key)
        if kept is not None:
            if layer in kept.pending and self._fits(kept, layer, group_key, x, batch):
                kept.pending.discard(layer)
                if not kept.pending:
                    del self._kept[group_key]
                return kept.shrunk, kept.banks[layer][0]
            del self._kept[group_key]
            if kept.pending:  # a sibling did not take its g: their inputs differ (or it did not run)
                self.on = False
                return None
        banks = {}  # member -> (index, (V, sigma, cluster_of))
        for m in self.layers:
            tensors = _banks(m, group_key)
            if tensors is not None:
                banks[m] = (len(banks), tensors)
        if len(banks) < 2 or layer not in banks:
            return None
        tensors = [t for _, ts in banks.values() for t in ts]
        known = self._fusable.get(group_key)
        if known is None or len(known[0]) != len(tensors) or any(a is not b for a, b in zip(known[0], tensors)):
            Vs, sigmas, cluster_ofs = zip(*(ts for _, ts in banks.values()))
            known = self._fusable[group_key] = (tensors, siblings_fusable(Vs, sigmas, cluster_ofs))
        if not known[1] or tensors[0].dtype != xin.dtype:
            return None
        Vs, sigmas, cluster_ofs = tensors[0::3], tensors[1::3], tensors[2::3]
        shrunk = jd_lora_shrink_siblings(xin, Vs, sigmas, cluster_ofs, batch)
        self._kept[group_key] = _Kept(weakref.ref(x), _version(x), batch, _version(batch.row_adapter), shrunk, banks,
                                      set(banks) - {layer})
        return shrunk, banks[layer][0]

    @staticmethod
    def _fits(kept: _Kept, layer, group_key: str, x: Tensor, batch: JDBatch) -> bool:
        if kept.x() is not x or _version(x) != kept.x_version or batch is not kept.batch:
            return False
        if _version(batch.row_adapter) != kept.rows_version or not kept.shrunk.valid:
            return False
        bank = layer._jd_banks.get(group_key)
        if bank is None:
            return False
        V, sigma, cluster_of = kept.banks[layer][1]
        return layer._jd_bases[bank.group.rank].V is V and bank.sigma is sigma and bank.cluster_of is cluster_of


def _version(t: Tensor) -> int:
    """``t._version``; -1 for tensors made under ``torch.inference_mode``, which keep no version counter (those
    are matched by identity alone: a change in place between two siblings' calls goes unseen)."""
    return -1 if t.is_inference() else t._version


def _banks(layer, group_key: str) -> tuple | None:
    """``(V, sigma, cluster_of)`` of ``layer``'s banks for ``group_key`` (made current) if its mixed-batch
    forward uses them (adapters enabled, none merged), else None."""
    bank = layer._jd_banks.get(group_key)
    if bank is None or layer.disable_adapters or layer.merged:
        return None
    if layer._jd_untied:
        layer._jd_retie()  # rebuilds the banks
        bank = layer._jd_banks[group_key]
    layer._jd_grow(bank, bank.group.size)
    return layer._jd_bases[bank.group.rank].V, bank.sigma, bank.cluster_of


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
