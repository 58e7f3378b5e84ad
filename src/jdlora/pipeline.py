"""``jdlora.compress``: from LoRA adapters to a :class:`~jdlora.collection.JDLoraCollection`.

Streams module by module: only one module's A and B of each adapter are in memory at a time, so
peak memory grows with the number of adapters times one module, not with the number of modules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import torch
from tqdm.auto import tqdm

from .collection import AdapterInfo, CollectionModule, JDLoraCollection
from .compress import LoraStack, auto_rank, choose_clusters, compress_module
from .compress.clustering import SigmaKind
from .compress.jd import Solver
from .compress.settings import DEFAULT_TARGET_ERROR, SweepPoint
from .sources import open_adapters


def compress(
    adapters: Sequence,
    rank: int | Literal["auto"] = "auto",
    clusters: int | Literal["auto"] = 1,
    sigma: SigmaKind = "full",
    *,
    normalize: bool = True,
    solver: Solver = "qr",
    tol: float = 1e-3,
    ftol: float = 1e-5,
    max_iter: int = 100,
    max_rounds: int = 20,
    target_error: float = DEFAULT_TARGET_ERROR,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    allow_pickle: bool = False,
    token: str | None = None,
    progress: bool = True,
) -> JDLoraCollection:
    """Compresses a collection of LoRA adapters jointly (Compress then Serve, arXiv 2407.00066).

    Args:
        adapters: local PEFT LoRA folders, Hub repo ids (``"org/name"`` or ``"org/name@revision"``),
            or opened adapters (:class:`~jdlora.sources.LoraAdapter`, synthetic adapters, ...).
        rank: rank r of the shared bases, or ``"auto"`` (section 6.4: about n/2 + 7 up to 100 adapters,
            16 beyond).
        clusters: number of clusters per module, or ``"auto"``: the fewest of 1, 2, 4, ... whose error on
            a middle module is below ``target_error`` (section 6.4).
        sigma: ``"full"`` (JD-Full, r x r Sigma per adapter) or ``"diag"`` (JD-Diag, r values).
        normalize: scale every update to unit norm before the JD (each adapter weighs the same; the
            norms are folded back into Sigma). Off: the pooled error is minimized.
        solver: JD-Full solver: ``"qr"`` (Appendix A.2) or ``"eigen"`` (Appendix A.1).
        tol: tolerance of the convergence criterion (equation 19). ftol: also stop a JD (or the
            clustering rounds) when an iteration lowers the relative error by less than this.
        max_iter: iterations per JD.
        max_rounds: cap on clustering rounds (Appendix A.3).
        target_error: error target of the automatic cluster choice.
        device: where to compute; default CUDA when available, else CPU. Results live on the CPU.
        dtype: float32 (default) or float64.
        seed: seed of every random choice; the same inputs and seed give the same result.
        allow_pickle: accept adapters stored as pickle ``.bin`` files (unsafe: only for trusted files).
        token: Hub token for private repos.
        progress: show a progress bar.

    Returns:
        The compressed collection, with errors per module and per adapter and parameter counts.

    Example:
        ```python
        >>> import jdlora
        >>> collection = jdlora.compress(["./lora-a", "./lora-b", "org/lora-c"], rank=16)
        >>> print(collection.summary())
        ```
    """
    if sigma not in ("full", "diag"):
        raise ValueError(f"sigma must be 'full' or 'diag', got {sigma!r}.")
    sources = open_adapters(adapters, allow_pickle=allow_pickle, token=token)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module_names = sorted({m for s in sources for m in s.modules}, key=natural_key)
    if not module_names:
        raise ValueError("The adapters have no LoRA modules in common or otherwise: nothing to compress.")
    jd_kwargs = dict(sigma=sigma, normalize=normalize, solver=solver, tol=tol, ftol=ftol, max_iter=max_iter,
                     max_rounds=max_rounds, seed=seed)

    def load(module: str) -> tuple[LoraStack, list[int], list[int]]:
        ids = [i for i, s in enumerate(sources) if module in s.modules]
        stack = LoraStack.from_factors(
            [sources[i].read_module(module) for i in ids], [sources[i].scaling(module) for i in ids],
            dtype=dtype, device=device,
        )
        return stack, ids, [sources[i].modules[module][0] for i in ids]

    sweep: list[SweepPoint] = []
    if rank == "auto" or clusters == "auto":
        middle = middle_module(module_names, sources)
        stack, _, ranks = load(middle)
        rank = auto_rank(stack.n) if rank == "auto" else rank
        if clusters == "auto":
            clusters, sweep = choose_clusters(stack, ranks, rank, target=target_error, **jd_kwargs)
        del stack

    modules = {}
    for module in tqdm(module_names, desc="Compressing modules", unit="module", disable=not progress):
        stack, ids, _ = load(module)
        result = compress_module(stack, rank, clusters, **jd_kwargs)
        modules[module] = CollectionModule(_to_cpu(result), torch.tensor(ids))
        del stack

    infos = [
        AdapterInfo(
            name=s.name, origin=dict(s.origin), rank=getattr(s, "rank", None), alpha=getattr(s, "alpha", None),
            use_rslora=bool(getattr(s, "use_rslora", False)), module_ranks={m: shape[0] for m, shape in s.modules.items()},
        )
        for s in sources
    ]
    settings = dict(rank=rank, clusters=clusters, sigma=sigma, normalize=normalize, solver=solver, tol=tol, ftol=ftol,
                    max_iter=max_iter, max_rounds=max_rounds, target_error=target_error, seed=seed,
                    dtype=str(dtype).removeprefix("torch."))
    return JDLoraCollection(common_base_model(sources), infos, modules, sigma, settings, sweep)


def common_base_model(sources: Sequence) -> str | None:
    """The base model the collection is for: the first Hub-id-shaped name the adapters declare.

    Adapters may name the same model differently (``google/gemma-3-270m-it``, a local path, ...);
    the sources check already made sure they agree. A Hub id is what a model card can link to.
    """
    names = [s.base_model for s in sources if s.base_model]
    hub_ids = [n for n in names if re.fullmatch(r"[\w.-]+/[\w.-]+", n)]
    return (hub_ids or names or [None])[0]


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def middle_module(module_names: list[str], sources: Sequence) -> str:
    """A module from the middle of the network, among those most adapters have (section 6.4)."""
    counts = {m: sum(m in s.modules for s in sources) for m in module_names}
    most = max(counts.values())
    candidates = [m for m in module_names if counts[m] == most]
    return candidates[len(candidates) // 2]


def _to_cpu(result):
    for attr in ("U", "V", "sigma", "cluster", "sq_norms", "residuals"):
        setattr(result, attr, getattr(result, attr).cpu())
    return result
