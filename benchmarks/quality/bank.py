"""Many adapters in one model, routed per batch row: how the zoo is trained and evaluated in batches.

A :class:`LoraBank` holds, for every target module, the stacked factors of n adapters,
``A [n, r, d_in]`` and ``B [n, d_out, r]``, and adds ``B[a] @ A[a] @ x`` to the module's output for
each batch row x of adapter a (``-1``: no adapter). Any per-adapter low-rank update fits this shape:
a LoRA (``B`` carries the scaling), a JD-compressed adapter (``B = U_c Sigma_i``, ``A = V_c^T``), a
per-adapter SVD (``B = U_i S_i``, ``A = V_i^T``). So every method of the study is evaluated by the
same code, in mixed batches of all its adapters.

The gathers ``A[rows]`` cost ``batch x r x d`` per module: nothing next to the 135M model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn


class LoraBank(nn.Module):
    """Stacked low-rank updates of n adapters for the modules of ``model`` named in ``factors``.

    Args:
        factors: ``{module name: (A [n, r, d_in], B [n, d_out, r])}``.
        scale: multiplies every update (a LoRA's ``alpha / r`` when ``B`` does not carry it).
        trainable: make the factors parameters (training); otherwise plain tensors.
    """

    def __init__(self, factors: Mapping[str, tuple[Tensor, Tensor]], *, scale: float = 1.0, trainable: bool = False):
        super().__init__()
        self.scale = scale
        self.names = list(factors)
        self.n = next(iter(factors.values()))[0].shape[0]
        self.A = nn.ParameterList() if trainable else []
        self.B = nn.ParameterList() if trainable else []
        for a, b in factors.values():
            if a.shape[0] != self.n or b.shape[0] != self.n or a.shape[1] != b.shape[2]:
                raise ValueError(f"Factors of shapes {tuple(a.shape)} and {tuple(b.shape)} do not fit n={self.n}.")
            self.A.append(nn.Parameter(a) if trainable else a)
            self.B.append(nn.Parameter(b) if trainable else b)
        self.rows: Tensor | None = None

    def factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{module: (A, B)}`` (detached)."""
        return {name: (a.detach(), b.detach()) for name, a, b in zip(self.names, self.A, self.B)}

    def _delta(self, i: int, x: Tensor) -> Tensor:
        rows = self.rows
        keep = (rows >= 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        safe = rows.clamp_min(0)
        A, B = self.A[i][safe], self.B[i][safe]  # [batch, r, d_in], [batch, d_out, r]
        h = torch.bmm(x.reshape(len(rows), -1, x.shape[-1]), A.transpose(1, 2).to(x.dtype))
        y = torch.bmm(h, B.transpose(1, 2).to(x.dtype))
        return y.view(*x.shape[:-1], -1) * (keep * self.scale)

    @contextlib.contextmanager
    def attached(self, model: nn.Module) -> Iterator[LoraBank]:
        """Adds the bank's updates to ``model``'s modules while inside the block (set :attr:`rows` first)."""
        modules = dict(model.named_modules())
        missing = [n for n in self.names if n not in modules]
        if missing:
            raise KeyError(f"The model has no module {missing[0]!r} (and {len(missing) - 1} more missing).")
        handles = []
        for i, name in enumerate(self.names):
            def hook(module, args, output, i=i):
                return output + self._delta(i, args[0])
            handles.append(modules[name].register_forward_hook(hook))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


@contextlib.contextmanager
def merged(model: nn.Module, deltas: Mapping[str, Tensor]) -> Iterator[None]:
    """Adds dense ``deltas`` ({module: [d_out, d_in]}) to the weights inside the block (one update for all rows, e.g. TIES)."""
    modules = dict(model.named_modules())
    originals = {}
    try:
        for name, delta in deltas.items():
            w = modules[name].weight
            originals[name] = w.detach().clone()
            w.data += delta.to(w.device, w.dtype)
        yield
    finally:
        for name, w in originals.items():
            modules[name].weight.data.copy_(w)


def peft_init(n: int, modules: Mapping[str, tuple[int, int]], rank: int, alpha: float, seeds: list[int],
              device: torch.device | str = "cpu") -> dict[str, tuple[Tensor, Tensor]]:
    """Fresh LoRA factors as PEFT initializes them: A Kaiming-uniform (a = sqrt(5)), B zero.

    Adapter k draws its A from its own generator seeded with ``seeds[k]``, so no two adapters share an
    initialization. The LoRA scaling ``alpha / rank`` is the bank's ``scale``.
    """
    out = {}
    for m, (d_out, d_in) in modules.items():
        A = torch.empty(n, rank, d_in)
        for k in range(n):
            g = torch.Generator().manual_seed(seeds[k] * 1000003 + zlib_crc(m))
            bound = 1.0 / d_in ** 0.5  # kaiming_uniform_(a=sqrt(5)) on [rank, d_in]: bound = 1/sqrt(fan_in)
            A[k].uniform_(-bound, bound, generator=g)
        out[m] = (A.to(device), torch.zeros(n, d_out, rank, device=device))
    return out


def zlib_crc(text: str) -> int:
    """A stable small integer of a string (Python's hash() changes between processes)."""
    import zlib

    return zlib.crc32(text.encode()) & 0xFFFF
