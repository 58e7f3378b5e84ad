"""Sibling layers that read the same input (q, k, v; gate, up): their JD-LoRA in three launches for all.

Why: in an eager mixed-batch forward every adapted layer costs three Triton launches, and each launch costs
tens of microseconds of host time (``benchmarks/RESULTS.md``); in a CUDA graph each is a few microseconds of
latency, one kernel waiting for the last. q, k and v of an attention block read the
same hidden states, so their shrinks ``V_s[c_s]^T x`` and Sigmas can run as one launch each
(:func:`jdlora.kernels.jd_lora_shrink_siblings`), and once every sibling's base output exists, their expands
too (:func:`jdlora.kernels.jd_lora_expand_siblings`): 3 launches for q, k and v instead of 9, 3 instead of 6
for gate and up.

How (in eager mode; under ``torch.compile`` :meth:`Siblings.traced` does the same with state dynamo can trace, so
that the graph holds one shrink-and-Sigma node and one expand node for the siblings):

- :func:`link_siblings` (run by :class:`~jdlora.tuner.model.JDLoraModel` after each injection) gives the
  JD-LoRA children of one parent whose names form a group of :data:`SIBLING_GROUPS` one shared
  :class:`Siblings`.
- The first sibling called in a forward computes the output of every sibling that can take part (adapters
  enabled, none merged): each one's base layer on the same ``x``, then per adapter group the fused launches
  for the siblings whose banks fit them (one rank, dtype and layout) and each other sibling's own three. It
  returns its own output and keeps the others', keyed by the input (identity and ``_version``; identity
  alone for tensors made under ``torch.inference_mode``, which keep no version), the :class:`MixedBatch` and
  its mix, and the banks (:func:`~jdlora.tuner.banks.epoch`, one integer for all). A sibling called with all
  of those unchanged returns its kept output; if something changed in between (a new mix, new banks, a
  sibling called twice), it and the siblings after it in that forward run alone, so the numbers are those of
  each layer's own forward either way (the fused kernels give each sibling the bits of its own launches).
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

from . import banks
from ..kernels import KERNEL_DTYPES, MAX_SIBLINGS, jd_lora_expand_siblings, jd_lora_shrink_siblings, siblings_fusable
from ..kernels.replay import Replays
from .mixed import worth_recording

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
    epoch: int  # banks.epoch() when computed
    outputs: dict  # sibling -> its output, until it takes it

    def same_input(self, x: Tensor) -> bool:
        return self.x() is x and _version(x) == self.x_version

    def take(self, layer, batch) -> Tensor | None:
        """``layer``'s output, if it was computed for it and nothing it depends on changed since (the batch, its
        mix, any bank); it is then no longer kept."""
        out = self.outputs.pop(layer, None)
        if out is None or batch is not self.batch or batch.mixes != self.mix or banks.epoch() != self.epoch:
            return None
        return out


class Siblings:
    """JD-LoRA layers of one parent that read the same input; see the module docstring."""

    def __init__(self, layers: list[nn.Module]):
        self.layers = layers
        self.on = True  # off for good once a kept output went untaken
        self._kept: _Kept | None = None  # the current forward's outputs for the siblings yet to run
        self._plan: tuple[int, list, list[_Step]] | None = None  # (the bank epoch and members it is for, the steps)
        self._traced: tuple | None = None  # under torch.compile: (x, {sibling index: output yet to be taken})

    def forward(self, layer, x: Tensor, batch) -> Tensor | None:
        """``layer``'s mixed-batch output for input ``x`` and the :class:`MixedBatch` ``batch``: kept from the
        sibling that ran first on the same input, or computed now with every sibling's; None: ``layer`` runs
        alone (it cannot take part, or fusion has just turned off)."""
        kept = self._kept
        if kept is not None:
            if kept.same_input(x):  # the forward the outputs were computed in
                out = kept.take(layer, batch)
                if out is not None:
                    if not kept.outputs:
                        self._kept = None
                    return out
                kept.outputs.clear()  # stale (a new mix or banks, or a sibling called twice): the rest run alone
                return None
            self._kept = None
            if kept.outputs:  # a sibling did not take its output: their inputs differ (or one did not run)
                self.on = False
                return None
        members = [m for m in self.layers if _takes_part(m)]
        if len(members) < 2 or layer not in members:
            return None
        outputs = dict(zip(members, self._run(members, x, batch, self._steps(members))))
        own = outputs.pop(layer)
        self._kept = _Kept(weakref.ref(x), _version(x), batch, batch.mixes, banks.epoch(), outputs)
        return own

    def traced(self, layer, x: Tensor, batch) -> Tensor | None:
        """:meth:`forward` under ``torch.compile``, with state that dynamo traces: no weak references, versions,
        sets or cached plans. The first sibling called on ``x`` computes every output (one shrink-and-Sigma node
        and one expand node for all); the others take theirs when called on the same ``x`` (the same graph value),
        and the last one clears the state, so nothing outlives the graph."""
        index = layer._jd_sibling_index
        if self._traced is not None:
            kept_x, outputs = self._traced
            if kept_x is x and index in outputs:
                out = outputs.pop(index)
                if not outputs:
                    self._traced = None
                return out
            self._traced = None
        members = [m for m in self.layers if _takes_part(m)]
        indices = [m._jd_sibling_index for m in members]
        if len(members) < 2 or index not in indices:
            return None
        _make_current(members)
        outputs = dict(zip(indices, self._run(members, x, batch, _make_steps(members))))
        own = outputs.pop(index)
        self._traced = (x, outputs)
        return own

    def _run(self, members: list, x: Tensor, batch, steps: list[_Step]) -> list[Tensor]:
        """Every member's output on ``x``, in ``members``' order: its base layer's, plus its adapters' updates,
        fused per adapter group for the members whose banks allow it, each member's own launches for the rest."""
        outputs, flat = [], []
        for m in members:
            out = m.base_layer(x)
            if not out.is_contiguous():
                out = out.contiguous()
            outputs.append(out)
            flat.append(out.view(-1, out.shape[-1]))
        kernel_outputs = all(y.dtype in KERNEL_DTYPES for y in flat)  # else each layer's float32 fallback
        x2 = x.reshape(-1, x.shape[-1])
        tokens_per_row = math.prod(x.shape[1:-1])
        for step in steps:
            prepared = batch.prepared(step.group, tokens_per_row, x.device)
            if prepared is None:
                continue
            if not (step.fused and kernel_outputs):
                for i, m, bank in step.entries:
                    m._jd_group_forward(bank, flat[i], x2, prepared)
                continue
            xin = x2 if x2.dtype == step.Vs[0].dtype else x2.to(step.Vs[0].dtype)
            step.launch(xin, [flat[i] for i, _, _ in step.entries], prepared)
        return outputs

    def _steps(self, members: list) -> list[_Step]:
        """:func:`_make_steps`, made anew only when the members or the :func:`~jdlora.tuner.banks.epoch` changed
        (after :func:`_make_current`, which may replace bank tensors)."""
        plan = self._plan
        if plan is None or plan[0] != banks.epoch() or plan[1] != members:
            _make_current(members)
            steps = _make_steps(members)
            for step in steps:
                if step.fused:  # the others run each member's own forward, with the layer's replays
                    step.replays = Replays()
            self._plan = plan = (banks.epoch(), members, steps)
        return plan[2]


@dataclass
class _Step:
    """One adapter group of the siblings' forward: one fused shrink, Sigma and expand for ``entries`` (``fused``),
    or each entry's own launches."""

    group: object  # the AdapterGroup
    entries: list  # [(position among the members, member, its bank of the group)]
    fused: bool
    Us: list
    Vs: list
    sigmas: list
    cluster_ofs: list
    # Eager plans (Siblings._steps): recordings of the fused launches, per kernel batch and layout of x and the
    # outputs. A plan lives as long as its banks, so a recording is replayed only with the banks it was made with.
    replays: Replays | None = None

    def launch(self, x: Tensor, ys: list[Tensor], batch) -> None:
        """``ys[s] += U_s Sigma_s V_s^T x`` for the batch's rows: the three fused launches, replayed from a recording
        of an earlier call with the same batch and layouts when there is one (no launch arguments built anew), for
        the batches :func:`~jdlora.tuner.mixed.worth_recording` names."""
        if self.replays is None or not worth_recording(batch):  # traced by dynamo (custom ops' nodes), or a prefill
            self._launch(x, ys, batch)
        elif self.replays.replay(batch, x, *ys):
            batch.sibling_calls += 1  # as the call would: a g of an earlier shrink on this batch is overwritten
        else:
            with self.replays.record(batch, x, *ys):
                self._launch(x, ys, batch)

    def _launch(self, x: Tensor, ys: list[Tensor], batch) -> None:
        shrunk = jd_lora_shrink_siblings(x, self.Vs, self.sigmas, self.cluster_ofs, batch)
        jd_lora_expand_siblings(ys, self.Us, self.cluster_ofs, shrunk, check=False)


def _make_current(members: list) -> None:
    """Makes the members' banks current: retied to their dicts (after a load that replaced tensors), every Sigma
    bank grown to its adapter group (adapters added through other layers)."""
    for m in members:
        m._jd_retie_if_needed()
        for bank in m._jd_banks.values():
            if bank.sigma.shape[0] < bank.group.size:
                m._jd_grow(bank, bank.group.size)


def _make_steps(members: list) -> list[_Step]:
    """The members' adapter groups as :class:`_Step` s (their banks current: :func:`_make_current`)."""
    groups: dict[str, list] = {}  # group key -> [(position, member, bank)], in the siblings' order
    for i, m in enumerate(members):
        for key, bank in m._jd_banks.items():
            groups.setdefault(key, []).append((i, m, bank))
    steps = []
    for entries in groups.values():
        rank = entries[0][2].group.rank
        Us = [m._jd_bases[rank].U for _, m, _ in entries]
        Vs = [m._jd_bases[rank].V for _, m, _ in entries]
        sigmas = [bank.sigma for _, _, bank in entries]
        cluster_ofs = [bank.cluster_of for _, _, bank in entries]
        fused = (len(entries) > 1 and Us[0].dtype in KERNEL_DTYPES and siblings_fusable(Vs, sigmas, cluster_ofs)
                 and all(U.dtype == Us[0].dtype and U.stride()[1:] == Us[0].stride()[1:] for U in Us))
        steps.append(_Step(entries[0][2].group, entries, fused, Us, Vs, sigmas, cluster_ofs))
    return steps


def _takes_part(layer) -> bool:
    """Whether ``layer``'s mixed-batch forward applies its banks (it has some, adapters enabled, none merged)."""
    return len(layer._jd_banks) > 0 and not layer.disable_adapters and not layer.merged


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
