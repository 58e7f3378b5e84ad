"""The stacked tensors a mixed-adapter batch gathers from, and the one counter that says they changed.

- :class:`AdapterGroup`: the Sigma-bank row of each adapter of one rank and Sigma kind, shared by every layer.
- :class:`BasesBank` (per layer and rank) and :class:`SigmaBank` (per layer and group): the stacked bases and
  Sigmas; :class:`~jdlora.tuner.layer.JDLoraLayer` keeps its dict entries as views of their rows.
- :func:`epoch`: a number that changes whenever any bank tensor is replaced (grown, rebuilt, moved), any bank
  is made, or a group gains rows. What is built from banks -- the siblings' launch plans, the outputs one
  sibling keeps for another (:mod:`~jdlora.tuner.siblings`) -- is valid while it stays the same: one integer
  compare per forward instead of comparing every bank tensor. Values written in place do not change it:
  kernels read them at launch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["AdapterGroup", "BasesBank", "SigmaBank", "epoch", "grown", "mark_changed"]

_epoch = 0


def epoch() -> int:
    """The current bank epoch (see the module docstring)."""
    return _epoch


def mark_changed() -> None:
    """A new :func:`epoch`: for changes that replace no bank tensor but make the banks stale (a layer's dicts
    replaced by a load; its banks dropped)."""
    global _epoch
    _epoch += 1


class AdapterGroup:
    """Row numbers shared by every layer for the adapters of one rank and Sigma kind.

    A token that uses adapter ``a`` reads row ``rows[a]`` of the Sigma bank of this group in every
    layer; a layer the adapter does not touch has a zero row whose cluster is -1. Rows of deleted
    adapters are reused.
    """

    def __init__(self, rank: int, kind: str):
        self.rank, self.kind = rank, kind
        self.key = f"r{rank}-{kind}"
        self.rows: dict[str, int] = {}
        self.free: list[int] = []
        self.size = 0  # rows ever allocated (free ones included)

    def add(self, names: list[str]) -> list[int]:
        rows = []
        size = self.size
        for name in names:
            if name not in self.rows:
                if self.free:
                    self.rows[name] = self.free.pop()
                else:
                    self.rows[name] = self.size
                    self.size += 1
            rows.append(self.rows[name])
        if self.size != size:  # every layer's Sigma bank of this group must grow before its next use
            mark_changed()
        return rows

    def remove(self, name: str) -> None:
        row = self.rows.pop(name, None)
        if row is not None:
            self.free.append(row)


class _Bank:
    """Setting any attribute (a tensor replaced, or the bank made) changes the :func:`epoch`."""

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        mark_changed()


class BasesBank(_Bank):
    """All bases of one rank in one layer: ``U [C, d_out, r]``, ``V [C, d_in, r]``, slot -> basis key."""

    def __init__(self, U: Tensor, V: Tensor):
        self.U, self.V = U, V
        self.keys: list[Optional[str]] = [None] * U.shape[0]


class SigmaBank(_Bank):
    """The Sigmas of one :class:`AdapterGroup` in one layer, and each row's bases slot (-1: none)."""

    def __init__(self, group: AdapterGroup, sigma: Tensor, cluster_of: Tensor):
        self.group, self.sigma, self.cluster_of = group, sigma, cluster_of


def grown(t: Tensor, rows: int, fill: float = 0) -> Tensor:
    """``t`` with at least ``rows`` rows (capacity doubles), new rows set to ``fill``."""
    if t.shape[0] >= rows:
        return t
    capacity = max(rows, 2 * t.shape[0], 4)
    out = torch.empty((capacity, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[: t.shape[0]] = t
    out[t.shape[0]:] = fill
    return out
