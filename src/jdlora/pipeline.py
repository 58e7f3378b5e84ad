"""``jdlora.compress``: from LoRA adapters to a :class:`~jdlora.collection.JDLoraCollection`.

Streams module by module: only one module's A and B of each adapter are in memory at a time, so
peak memory grows with the number of adapters times one module, not with the number of modules.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from .collection import AdapterInfo, CollectionModule, JDLoraCollection, safe_adapter_name
from .compress import LoraStack, auto_rank, choose_clusters, compress_module, project_onto_bases
from .compress.clustering import SigmaKind
from .compress.jd import Solver
from .compress.settings import DEFAULT_TARGET_ERROR, SweepPoint
from .errors import AdapterFormatError, IncompatibleAdaptersError
from .sources import check_compatible, open_adapter, open_adapters

if TYPE_CHECKING:
    from .distributed import RayEngine


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
    engine: Literal["local", "ray"] | RayEngine = "local",
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
        engine: ``"local"`` (this process), or ``"ray"`` / a :class:`~jdlora.distributed.RayEngine`:
            every module a task on a Ray cluster, modules too large for one worker sharded, resumable
            through ``RayEngine(out=...)``, which also saves the result there (docs/scale.md).

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
    _check_unique_names(sources)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module_names = sorted({m for s in sources for m in s.modules}, key=natural_key)
    if not module_names:
        raise ValueError("The adapters have no LoRA modules in common or otherwise: nothing to compress.")
    jd_kwargs = dict(sigma=sigma, normalize=normalize, solver=solver, tol=tol, ftol=ftol, max_iter=max_iter,
                     max_rounds=max_rounds, seed=seed)

    def load(module: str) -> tuple[LoraStack, list[int], list[int]]:
        stack, ids = read_stack(sources, module, dtype=dtype, device=device)
        return stack, ids, [sources[i].modules[module][0] for i in ids]

    sweep: list[SweepPoint] = []
    if rank == "auto" or clusters == "auto":
        middle = middle_module(module_names, sources)
        stack, _, ranks = load(middle)
        rank = auto_rank(stack.n) if rank == "auto" else rank
        if clusters == "auto":
            clusters, sweep = choose_clusters(stack, ranks, rank, target=target_error, **jd_kwargs)
        del stack

    infos = _adapter_infos(sources)
    if engine != "local":  # distributed: Ray tasks, staged in the output folder (jdlora.distributed)
        from .distributed import resolve_engine
        from .distributed.engine import compress_modules

        engine = resolve_engine(engine)
        modules = compress_modules(engine, sources, module_names, rank=rank, clusters=clusters, jd_kwargs=jd_kwargs,
                                   dtype=dtype, infos=infos, progress=progress)
    else:
        modules = {}
        for module in tqdm(module_names, desc="Compressing modules", unit="module", disable=not progress):
            stack, ids, _ = load(module)
            result = compress_module(stack, rank, clusters, **jd_kwargs)
            modules[module] = CollectionModule(_to_cpu(result), torch.tensor(ids))
            del stack

    settings = dict(rank=rank, clusters=clusters, sigma=sigma, normalize=normalize, solver=solver, tol=tol, ftol=ftol,
                    max_iter=max_iter, max_rounds=max_rounds, target_error=target_error, seed=seed,
                    dtype=str(dtype).removeprefix("torch."))
    collection = JDLoraCollection(common_base_model(sources), infos, modules, sigma, settings, sweep)
    if engine != "local" and engine.out is not None:
        collection.save_pretrained(engine.out, progress=progress)  # replaces the staging area
    return collection


def read_stack(sources: Sequence, module: str, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> tuple[LoraStack, list[int]]:
    """``module`` of every source that has it, stacked with each LoRA scaling folded into B; and their indices."""
    ids = [i for i, s in enumerate(sources) if module in s.modules]
    stack = LoraStack.from_factors([sources[i].read_module(module) for i in ids],
                                   [sources[i].scaling(module) for i in ids], dtype=dtype, device=device)
    return stack, ids


def common_base_model(sources: Sequence) -> str | None:
    """The base model the collection is for: the first Hub-id-shaped name the adapters declare.

    Adapters may name the same model differently (``google/gemma-3-270m-it``, a local path, ...);
    the sources check already made sure they agree. A Hub id is what a model card can link to.
    """
    names = [s.base_model for s in sources if s.base_model]
    hub_ids = [n for n in names if re.fullmatch(r"[\w.-]+/[\w.-]+", n)]
    return (hub_ids or names or [None])[0]


def _check_unique_names(sources: Sequence) -> None:
    seen: dict[str, str] = {}
    for s in sources:
        safe = safe_adapter_name(s.name)
        if safe in seen:
            raise IncompatibleAdaptersError(
                f"Adapters {seen[safe]!r} and {s.name!r} both become the adapter name {safe!r} "
                "(names keep only letters, digits, '_' and '-'). Rename one of them."
            )
        seen[safe] = s.name


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


def add_adapters(collection: JDLoraCollection, adapters: Sequence, *, allow_pickle: bool = False,
                 token: str | None = None, engine: Literal["local", "ray"] | RayEngine = "local") -> dict[str, float]:
    """Adds new LoRAs to ``collection`` by projecting them onto its bases (see ``JDLoraCollection.add_adapters``).

    ``engine="ray"`` (or a :class:`~jdlora.distributed.RayEngine`) projects every module as Ray tasks.
    """
    sources = open_adapters(adapters, allow_pickle=allow_pickle, token=token)
    _check_unique_names(sources)
    _check_fits_collection(collection, sources)
    start = len(collection.adapters)
    if engine != "local":
        from .distributed import resolve_engine
        from .distributed.engine import project_modules

        projected = project_modules(resolve_engine(engine), collection, sources)
    for module, entry in collection.modules.items():
        if not any(module in s.modules for s in sources):
            continue
        c = entry.compression
        if engine != "local":
            sq_norms, sigma, cluster, residuals, ids = projected[module]
        else:
            stack, ids = read_stack(sources, module, dtype=c.U.dtype, device=c.U.device)
            sigma, cluster, residuals = project_onto_bases(stack, c.U, c.V, collection.sigma_kind)
            sq_norms = stack.sq_norms()
        c.sigma = torch.cat([c.sigma, sigma.to(c.sigma)])
        c.cluster = torch.cat([c.cluster, cluster.to(c.cluster)])
        c.sq_norms = torch.cat([c.sq_norms, sq_norms.to(c.sq_norms)])
        c.residuals = torch.cat([c.residuals, residuals.to(c.residuals)])
        entry.adapter_ids = torch.cat([entry.adapter_ids, torch.tensor(ids, dtype=torch.long) + start])
    collection.adapters.extend(_adapter_infos(sources))
    errors = collection.adapter_errors()
    added = {info.name: errors[info.name] for info in collection.adapters[start:]}
    target = collection.settings.get("target_error", DEFAULT_TARGET_ERROR)
    worse = {name: e for name, e in added.items() if e > target}
    if worse:
        warnings.warn(
            f"{len(worse)} added adapter(s) have errors above the collection's target {target}: "
            + ", ".join(f"{n} {e:.3f}" for n, e in sorted(worse.items(), key=lambda kv: -kv[1])[:5])
            + ". Their directions are not in the shared bases; run jdlora.recompress(collection) to recompute them.",
            stacklevel=3,
        )
    return added


def _check_fits_collection(collection: JDLoraCollection, sources: Sequence) -> None:
    existing = set(collection.adapter_names)
    for s in sources:
        name = safe_adapter_name(s.name)
        if name in existing:
            raise IncompatibleAdaptersError(f"The collection already has an adapter named {name!r}; rename the new one.")
        for module, (_, d_out, d_in) in s.modules.items():
            if module not in collection.modules:
                raise IncompatibleAdaptersError(
                    f"Adapter {s.name!r} adapts {module}, which the collection has no bases for. "
                    "Use jdlora.recompress(collection, new_adapters) to compress it together with the others."
                )
            c = collection.modules[module].compression
            if (d_out, d_in) != (c.U.shape[1], c.V.shape[1]):
                raise IncompatibleAdaptersError(
                    f"Adapter {s.name!r}, module {module}: shape {(d_out, d_in)} does not match the collection's "
                    f"{(c.U.shape[1], c.V.shape[1])}."
                )
    if collection.base_model and any(s.base_model for s in sources):
        anchor = SimpleNamespace(name="the collection", base_model=collection.base_model, modules={})
        check_compatible([anchor, *sources])


def recompress(collection: JDLoraCollection, new_adapters: Sequence = (), **overrides) -> JDLoraCollection:
    """Compresses the collection's original adapters and ``new_adapters`` again, from scratch.

    The originals are re-opened from each adapter's recorded origin (local path, or Hub repo id at its
    recorded revision). Settings default to the collection's; ``overrides`` replace them (e.g.
    ``clusters="auto"``).

    Raises:
        AdapterFormatError: an original cannot be opened again (pass it in ``new_adapters`` instead).
    """
    specs = []
    for info in collection.adapters:
        origin = info.origin
        if "path" in origin:
            specs.append(open_adapter(origin["path"], name=info.name))
        elif "repo_id" in origin:
            specs.append(open_adapter(origin["repo_id"], name=info.name, revision=origin.get("revision"),
                                      subfolder=origin.get("subfolder"), token=overrides.get("token")))
        else:
            raise AdapterFormatError(
                f"Adapter {info.name!r} has no path or Hub origin to re-open (origin: {origin}). "
                "Remove it, or recompress from the original adapters with jdlora.compress()."
            )
    keys = ("rank", "clusters", "sigma", "normalize", "solver", "tol", "ftol", "max_iter", "max_rounds",
            "target_error", "seed")
    settings = {k: collection.settings[k] for k in keys if k in collection.settings}
    settings.update(overrides)
    return compress([*specs, *new_adapters], **settings)


def _adapter_infos(sources: Sequence) -> list[AdapterInfo]:
    return [
        AdapterInfo(
            name=safe_adapter_name(s.name), origin=dict(s.origin), rank=getattr(s, "rank", None),
            alpha=getattr(s, "alpha", None), use_rslora=bool(getattr(s, "use_rslora", False)),
            module_ranks={m: shape[0] for m, shape in s.modules.items()},
        )
        for s in sources
    ]
