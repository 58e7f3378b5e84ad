"""The model's JD-LoRA banks as views of a few flat tensors, so that a compiled step has a few inputs.

Why: ``torch.compile`` turns every tensor a traced function reads into a graph input, and each input
costs host time on every call of the compiled step (dynamo's guards and argument gathering, the runtime
wrappers), whatever runs on the device. A model with JD-LoRA on q, k, v of 32 layers keeps four bank
tensors per layer (bases ``U``, ``V``, Sigmas, cluster map): 384 inputs beside the base model's ~290
weights. Measured on this repository's 2-core CPU (dynamo alone, 32 tiny layers): +387 inputs cost
+0.8 ms per call. Dynamo gives one input to one tensor object however many modules reach it, so banks
that are views of one flat tensor per dtype and device, rebuilt inside the graph from plain integers
(:meth:`BankTensor.graph`), cost one input for all layers. Every layer reaches that flat tensor through the
model's one :class:`~jdlora.tuner.mixed.MixedBatch` (``storage``): reached through each layer's own
attributes, dynamo would add a Python guard per layer that the tensors are the same object.

How: a bank's tensors are :class:`BankTensor` attributes. Assigning one (``bank.U = t``) stores the
tensor as its own storage; :func:`pack_banks` copies every bank of the given layers into one flat
tensor per dtype and device and re-points them (and the PEFT dicts' views of them) there. Assigning a
new tensor (a bank that grows, a device move, a cast) makes that bank its own storage again: it can
never read stale values, it is only one more graph input until the next pack.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["BankTensor", "pack_banks", "packed_storage"]

_ALIGN_BYTES = 16  # the kernels' loads vectorize on 16-byte aligned pointers (Triton specializes on it)


class _Placed:
    """Where a bank tensor lives: ``flat`` (1-D) from ``offset``, contiguous ``shape``; ``view`` is that view."""

    __slots__ = ("view", "flat", "offset", "shape", "stride", "packed", "kind")

    def __init__(self, view: Tensor, flat: Tensor, offset: int, packed: bool):
        self.view, self.flat, self.offset, self.packed = view, flat, offset, packed
        self.shape, self.stride = tuple(view.shape), tuple(view.stride())
        self.kind = storage_kind(view)


def storage_kind(t: Tensor) -> str:
    """The key of the flat tensor that packs tensors like ``t`` (one per dtype and device)."""
    return f"{t.dtype}@{t.device}"


class BankTensor:
    """A bank's tensor attribute (a data descriptor): reading gives the tensor, assigning stores a new one.

    :meth:`graph` gives the same tensor for traced code, as a view of its flat storage built from
    integers, so a compiled graph reads the flat tensor (shared by every packed bank) as its input.
    """

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_placed_" + name

    def __get__(self, obj, objtype=None):
        if obj is None:
            return self
        return getattr(obj, self.slot).view

    def __set__(self, obj, value: Tensor) -> None:
        if not value.is_contiguous():
            value = value.contiguous()
        setattr(obj, self.slot, _Placed(value, value.view(-1), 0, False))

    def place(self, obj, flat: Tensor, offset: int) -> None:
        """Copies the current tensor into ``flat`` at ``offset`` and makes that view the bank's tensor."""
        old = self.__get__(obj)
        view = flat[offset: offset + old.numel()].view(old.shape)
        view.copy_(old)
        setattr(obj, self.slot, _Placed(view, flat, offset, True))

    def flat(self, obj) -> Tensor:
        """The storage the tensor is a view of (the tensor itself, flattened, when not packed)."""
        return getattr(obj, self.slot).flat

    def packed(self, obj) -> bool:
        return getattr(obj, self.slot).packed

    def graph(self, obj, storage: dict[str, Tensor]) -> Tensor:
        """The tensor rebuilt from integers on its flat storage, for traced code: packed banks take the flat
        tensor from ``storage`` (:func:`packed_storage`, reached by every layer through one object), so
        the graph has one input for all of them and no guard per layer that two tensors are the same."""
        placed = getattr(obj, self.slot)
        flat = storage.get(placed.kind, placed.flat) if placed.packed else placed.flat
        return flat.as_strided(placed.shape, placed.stride, placed.offset)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_banks(banks: Iterable[tuple[object, BankTensor]]) -> list[Tensor]:
    """Moves the given bank tensors (``(bank, descriptor)`` pairs) into one flat tensor per dtype and device.

    Returns the new flat tensors. Kinds already packed together are left alone: packing is
    for after the banks changed (adapters loaded, added or removed, a device move). The copy needs, for
    a moment, the banks' memory twice. Callers re-point what holds views of the old tensors (the PEFT
    dicts) afterwards.
    """
    banks = list(banks)
    by_kind: dict[tuple[torch.dtype, torch.device], list] = defaultdict(list)
    for bank, attr in banks:
        t = attr.__get__(bank)
        by_kind[(t.dtype, t.device)].append((bank, attr, t.numel()))
    flats = []
    for (dtype, device), items in by_kind.items():
        if len({id(attr.flat(b)) for b, attr, _ in items}) == 1 and items[0][1].packed(items[0][0]):
            continue  # this kind is packed already
        align = max(1, _ALIGN_BYTES // dtype.itemsize)
        total = sum(_round_up(n, align) for _, _, n in items)
        flat = torch.empty(total, dtype=dtype, device=device)
        offset = 0
        for bank, attr, n in items:
            attr.place(bank, flat, offset)
            offset += _round_up(n, align)
        flats.append(flat)
    return flats


def packed_storage(banks: Iterable[tuple[object, BankTensor]]) -> dict[str, Tensor]:
    """``{kind: flat}`` of the packed banks among ``banks``, right after :func:`pack_banks` (one flat per kind)."""
    storage = {}
    for bank, attr in banks:
        placed = getattr(bank, attr.slot)
        if placed.packed:
            storage.setdefault(placed.kind, placed.flat)
    return storage
