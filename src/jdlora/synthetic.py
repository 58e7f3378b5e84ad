"""Synthetic LoRA collections that stand in for real ones in the demo, tests and benchmarks.

Trained LoRAs of one base model share structure (paper, Appendix G.9): their updates overlap in a
few directions. Each synthetic adapter mixes, per module,

- directions shared by the whole collection (a global pool),
- directions shared within its group (``groups`` families, which clustering can find),
- its own random directions,
- and entry-wise noise,

with its own random magnitude and its own random generator. Weights are generated on demand, one
module at a time, from ``(seed, adapter, module)``, so a collection of any size costs no memory
until it is read, and reading it twice gives the same numbers.

With ``device`` (e.g. ``"cuda"``), the weights are generated on that device by its own random
generator (much faster for large collections) and returned there. The numbers then differ from the
CPU's (another generator), but are the same on every run on that kind of device.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

SYNTHETIC_BASE_MODEL = "jdlora/synthetic-base"


def llama_modules(
    num_layers: int, hidden: int, kv_hidden: int, targets: Sequence[str] = ("q_proj", "k_proj", "v_proj")
) -> dict[str, tuple[int, int]]:
    """``{module name: (d_out, d_in)}`` of a Llama/Mistral-shaped model's attention projections."""
    d_out = {"q_proj": hidden, "k_proj": kv_hidden, "v_proj": kv_hidden, "o_proj": hidden}
    d_in = {"o_proj": hidden}
    return {
        f"model.layers.{layer}.self_attn.{t}": (d_out[t], d_in.get(t, hidden))
        for layer in range(num_layers)
        for t in targets
    }


def mistral_7b_modules() -> dict[str, tuple[int, int]]:
    """q, k, v of Mistral-7B: 32 layers, q 4096 x 4096, k and v 1024 x 4096."""
    return llama_modules(32, 4096, 1024)


class _Pools:
    """Orthonormal shared directions per (module, pool), cached: they are the same for every adapter."""

    def __init__(self, seed: int, shared_rank: int, device: torch.device):
        self.seed, self.shared_rank, self.device = seed, shared_rank, device

    @lru_cache(maxsize=256)  # noqa: B019 - one instance per collection, bounded
    def get(self, module: str, pool: int, d: int) -> Tensor:
        gen = torch.Generator(self.device).manual_seed(_seed_of(self.seed, "pool", module, pool))
        pool_ = torch.randn(d, self.shared_rank, generator=gen, device=self.device)
        return torch.linalg.qr(pool_).Q.T.contiguous()  # [s, d]

    @lru_cache(maxsize=256)  # noqa: B019
    def pair(self, module: str, group: int, d: int) -> Tensor:
        """``[2s, d]``: the global pool over group ``group``'s pool."""
        return torch.cat([self.get(module, -1, d), self.get(module, group, d)])


class SyntheticAdapter:
    """One synthetic LoRA; implements the adapter-source interface of :mod:`jdlora.sources`."""

    def __init__(self, index: int, modules: dict[str, tuple[int, int]], rank: int, alpha: float, group: int,
                 pools: _Pools, sharing: float, noise: float, seed: int, base_model: str):
        self.index, self.rank, self.alpha, self.group = index, rank, alpha, group
        self.name = f"synthetic-{index:05d}"
        self.base_model = base_model
        self.use_rslora = False
        self.modules = {m: (rank, d_out, d_in) for m, (d_out, d_in) in modules.items()}
        self.origin = {"synthetic": {"seed": seed, "index": index, "group": group}}
        self._pools, self._sharing, self._noise, self._seed = pools, sharing, noise, seed
        gen = torch.Generator().manual_seed(_seed_of(seed, "magnitude", index))  # CPU: one number
        # Trained adapters differ in norm; normalization in the JD is there for that.
        self._magnitude = math.exp(0.5 * torch.randn(1, generator=gen).item())

    def scaling(self, module: str) -> float:
        return self.alpha / self.rank

    def read_module(self, module: str, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``(A [r, d_in], B [d_out, r])`` of ``module``, generated from ``(seed, adapter, module)``."""
        _, d_out, d_in = self.modules[module]
        gen = torch.Generator(self._pools.device).manual_seed(_seed_of(self._seed, "adapter", self.index, module))
        A = self._mix(gen, module, d_in, transpose=False)
        B = self._mix(gen, module, d_out, transpose=True) * (0.02 * self._magnitude)
        return A.to(dtype), B.to(dtype)

    def _mix(self, gen: torch.Generator, module: str, d: int, transpose: bool) -> Tensor:
        """``r`` directions: shared ones (global and group pools) plus the adapter's own and noise.

        In one draw and one GEMM (generation is launch-bound on a GPU): the shared part is
        ``randn(r, 2s) @ [global pool; group pool]``, and the own part and the noise, both Gaussian,
        add up to one Gaussian of the summed variance.
        """
        r, s, dev = self.rank, self._pools.shared_rank, self._pools.device
        side = module + ("B" if transpose else "A")
        draw = torch.randn(r, 2 * s + d, generator=gen, device=dev)
        own = math.sqrt((1 - self._sharing + self._noise**2) * s / d)
        out = torch.addmm(draw[:, 2 * s:], draw[:, : 2 * s], self._pools.pair(side, self.group, d),
                          beta=own, alpha=math.sqrt(self._sharing / 2))
        return out.T if transpose else out


def synthetic_adapters(
    n: int,
    modules: dict[str, tuple[int, int]] | None = None,
    *,
    rank: int | Sequence[int] = 16,
    alpha: float | None = None,
    groups: int = 4,
    shared_rank: int = 8,
    sharing: float = 0.6,
    noise: float = 0.05,
    seed: int = 0,
    base_model: str = SYNTHETIC_BASE_MODEL,
    device: torch.device | str | None = None,
) -> list[SyntheticAdapter]:
    """A synthetic collection of ``n`` LoRA adapters.

    Args:
        n: number of adapters.
        modules: ``{module name: (d_out, d_in)}``; default: q, k, v of a 4-layer model of width 256.
        rank: LoRA rank of every adapter, or one per adapter (cycled).
        alpha: LoRA alpha; default ``2 * rank``.
        groups: number of families; adapter i belongs to group ``i % groups``.
        shared_rank: directions per shared pool.
        sharing: fraction of each adapter's energy in shared directions (half global, half group).
        noise: entry-wise noise relative to the signal.
        seed: everything is a function of this seed.
        base_model: the ``base_model_name_or_path`` the adapters claim.
        device: where weights are generated and returned (default CPU). Generating on a GPU is much
            faster for large collections; the numbers differ between devices (each device's random
            generator), but are deterministic on each.
    """
    if not 0 <= sharing <= 1:
        raise ValueError(f"sharing must be in [0, 1], got {sharing}.")
    modules = modules or llama_modules(4, 256, 64)
    ranks = [rank] * n if isinstance(rank, int) else [rank[i % len(rank)] for i in range(n)]
    pools = _Pools(seed, shared_rank, torch.device(device or "cpu"))
    return [
        SyntheticAdapter(i, modules, ranks[i], alpha or 2 * ranks[i], i % max(groups, 1), pools, sharing, noise,
                         seed, base_model)
        for i in range(n)
    ]


def save_adapters(adapters: Sequence[SyntheticAdapter], root: str | Path) -> list[Path]:
    """Writes each adapter as a standard PEFT LoRA folder ``root/<name>``; returns the folders."""
    from .sources import write_lora_folder

    paths = []
    for adapter in adapters:
        tensors = {m: tuple(t.cpu() for t in adapter.read_module(m)) for m in adapter.modules}
        paths.append(write_lora_folder(
            Path(root) / adapter.name, tensors, r=adapter.rank, lora_alpha=adapter.alpha,
            base_model=adapter.base_model,
        ))
    return paths


def _seed_of(*parts) -> int:
    # Stable across processes (unlike hash()), so a collection is the same everywhere.
    return zlib.crc32(repr(parts).encode())
