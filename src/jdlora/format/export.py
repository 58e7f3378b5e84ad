"""Exporting one compressed adapter as a standard PEFT LoRA folder (for engines without JD-LoRA)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..collection import JDLoraCollection


def export_lora(collection: JDLoraCollection, name: str, path: str | os.PathLike) -> Path:
    """Writes adapter ``name`` as a plain LoRA: ``B' = U_c Sigma_i``, ``A' = V_c^T``, alpha = r (scaling 1).

    Stock PEFT loads the folder without jdlora, and its delta weights equal the compressed adapter's
    ``U_c Sigma_i V_c^T`` (Sigma already holds the original LoRA scaling). Modules of lower rank are
    zero-padded to the largest rank, which leaves ``B' A'`` unchanged and keeps one ``r`` in the config.
    """
    from ..sources import write_lora_folder

    index = collection.index(name)
    tensors = {}
    for module, entry in collection.modules.items():
        row = entry.row_of(index)
        if row is None:
            continue
        c = entry.compression
        cluster = int(c.cluster[row])
        sigma = c.sigma[row] if c.sigma.dim() == 3 else torch.diag(c.sigma[row])
        tensors[module] = (c.V[cluster].T.contiguous(), (c.U[cluster] @ sigma).contiguous())
    rank = max(a.shape[0] for a, _ in tensors.values())
    padded = {
        m: (torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0])), torch.nn.functional.pad(b, (0, rank - b.shape[1])))
        for m, (a, b) in tensors.items()
    }
    return write_lora_folder(path, padded, r=rank, lora_alpha=rank, base_model=collection.base_model)
