"""``jdlora.compress``: from LoRA adapters to a :class:`~jdlora.collection.JDLoraCollection`.

Streams module by module: only one module's A and B of each adapter are in memory at a time, so
peak memory grows with the number of adapters times one module, not with the number of modules.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Literal

import torch
from tqdm.auto import tqdm

from .collection import AdapterInfo, CollectionModule, JDLoraCollection, safe_adapter_name
from .compress import CompressionSettings, LoraStack, choose_settings, compress_module, project_onto_bases
from .compress.auto import AutoChoice, ModuleSample, SweepPoint
from .errors import AdapterFormatError, IncompatibleAdaptersError, NonFiniteWeightsError, SettingsError
from .sources import check_compatible, open_adapter, open_adapters

if TYPE_CHECKING:
    from .distributed import RayEngine


def compress(
    adapters: Sequence,
    settings: CompressionSettings | None = None,
    *,
    device: torch.device | str | None = None,
    allow_pickle: bool = False,
    token: str | None = None,
    progress: bool = True,
    engine: Literal["local", "ray"] | RayEngine = "local",
    **overrides,
) -> JDLoraCollection:
    """Compresses a collection of LoRA adapters jointly (Compress then Serve, arXiv 2407.00066).

    Args:
        adapters: local PEFT LoRA folders, Hub repo ids (``"org/name"`` or ``"org/name@revision"``),
            or opened adapters (:class:`~jdlora.sources.LoraAdapter`, synthetic adapters, ...).
        settings: a :class:`~jdlora.compress.CompressionSettings` (default: every choice automatic).
        device: where to compute; default CUDA when available, else CPU. Results live on the CPU.
        allow_pickle: accept adapters stored as pickle ``.bin`` files (unsafe: only for trusted files).
        token: Hub token for private repos.
        progress: show a progress bar.
        engine: ``"local"`` (this process), or ``"ray"`` / a :class:`~jdlora.distributed.RayEngine`:
            every module a task on a Ray cluster, modules too large for one worker sharded, resumable
            through ``RayEngine(out=...)``, which also saves the result there (docs/scale.md).
        **overrides: fields of :class:`~jdlora.compress.CompressionSettings` that replace those of
            ``settings`` (``rank=16``, ``clusters=4``, ``sigma_kind="diag"``, ``dtype=torch.float64``, ...).

    With ``rank``, ``clusters`` or ``sigma_kind`` left ``"auto"`` (the default), they are chosen on
    ``search_modules`` modules spread over depth and module types (:func:`sample_modules`,
    :func:`~jdlora.compress.choose_settings`): the cheapest setting (parameters stored, then work per
    token) whose worst adapter's relative error, norm-weighted over those modules, is at most
    ``target_error`` (0.05, calibrated on our quality study, docs/quality.md); the collection's
    :attr:`choice` says what was chosen and why, or that nothing met the target and what it would take.

    Returns:
        The compressed collection, with errors per module and per adapter and parameter counts.

    Example:
        ```python
        >>> import jdlora
        >>> collection = jdlora.compress(["./lora-a", "./lora-b", "org/lora-c"], rank=16)
        >>> print(collection.summary())
        ```
    """
    settings = (settings or CompressionSettings()).replace(**overrides)
    if isinstance(adapters, (str, os.PathLike)):
        raise SettingsError(f"adapters={str(adapters)!r} is one path: pass a list of adapters, e.g. [{str(adapters)!r}].")
    if not (adapters := list(adapters)):
        raise SettingsError("No adapters to compress: pass a list of PEFT LoRA folders or Hub repo ids "
                            "(e.g. jdlora.compress(['./lora-a', './lora-b'])).")
    sources = open_adapters(adapters, allow_pickle=allow_pickle, token=token)
    _check_unique_names(sources)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    module_names = sorted({m for s in sources for m in s.modules}, key=natural_key)
    if not module_names:
        raise AdapterFormatError("The adapters have no LoRA modules: nothing to compress.")

    def load(module: str) -> tuple[LoraStack, list[int], list[int]]:
        stack, ids = read_stack(sources, module, dtype=settings.dtype, device=device)
        return stack, ids, [sources[i].modules[module][0] for i in ids]

    sweep: list[SweepPoint] = []
    choice: AutoChoice | None = None
    if settings.is_auto:
        samples = []
        for module in sample_modules(module_names, sources, settings.search_modules):
            stack, ids, ranks = load(module)
            sq_norms = stack.sq_norms()  # an overflowing update must be named before the search measures NaNs
            check_finite(module, [sources[i].name for i in ids], sq_norms, torch.zeros_like(sq_norms))
            samples.append(ModuleSample(module, stack, ranks, ids))
        with tqdm(desc=f"Choosing settings on {len(samples)} modules", unit="setting", disable=not progress) as bar:
            settings, choice, sweep = choose_settings(samples, settings, progress=bar)
        del samples, stack

    infos = _adapter_infos(sources)
    if engine != "local":  # distributed: Ray tasks, finished modules staged for resuming (jdlora.distributed)
        from .distributed import resolve_engine
        from .distributed.engine import compress_modules

        engine = resolve_engine(engine)
        modules = compress_modules(engine, sources, module_names, settings, infos=infos, progress=progress)
    else:
        modules = {}
        for module in tqdm(module_names, desc="Compressing modules", unit="module", disable=not progress):
            stack, ids, _ = load(module)
            result = compress_module(stack, settings)
            check_finite(module, [sources[i].name for i in ids], result.sq_norms, result.residuals, result.sigma,
                         result.U, result.V)
            modules[module] = CollectionModule(_to_cpu(result), torch.tensor(ids))
            del stack

    collection = JDLoraCollection(common_base_model(sources), infos, modules, settings.sigma_kind, settings, sweep,
                                  choice)
    if engine != "local" and engine.out is not None:
        engine.finish(collection, progress=progress)  # the normal save, then the staging area removed
    return collection


def read_stack(sources: Sequence, module: str, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None) -> tuple[LoraStack, list[int]]:
    """``module`` of every source that has it, stacked with each LoRA scaling folded into B; and their indices."""
    ids = [i for i, s in enumerate(sources) if module in s.modules]
    stack = LoraStack.from_factors([sources[i].read_module(module) for i in ids],
                                   [sources[i].scaling(module) for i in ids], dtype=dtype, device=device)
    return stack, ids


def check_finite(module: str, names: Sequence[str], sq_norms: torch.Tensor, residuals: torch.Tensor,
                 *tensors: torch.Tensor) -> None:
    """Refuses a module's result unless every number is finite, naming the adapters at fault.

    Inputs are checked as they are read, but an update can still overflow (huge but finite factors), and
    a NaN would then be saved silently as an error of ``nan``.
    """
    bad = ~(torch.isfinite(sq_norms) & torch.isfinite(residuals))
    if bool(bad.any()) or not all(bool(torch.isfinite(t).all()) for t in tensors):
        culprits = [n for n, b in zip(names, bad.tolist()) if b]
        raise NonFiniteWeightsError(
            f"Module {module}: the compression is not finite (NaN or Inf), because of "
            + (f"adapter(s) {', '.join(map(repr, culprits[:5]))}, whose update overflows" if culprits
               else "values too large for the dtype")
            + ". Their weights are corrupted or absurdly large: check or leave out those adapters"
            + (", or compress in float64." if not culprits else ".")
        )


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


def most_shared_modules(module_names: list[str], sources: Sequence) -> list[str]:
    """The modules that the most adapters have, in ``module_names``' order."""
    counts = {m: sum(m in s.modules for s in sources) for m in module_names}
    most = max(counts.values())
    return [m for m in module_names if counts[m] == most]


def middle_module(module_names: list[str], sources: Sequence) -> str:
    """A module from the middle of the network, among those most adapters have (section 6.4)."""
    candidates = most_shared_modules(module_names, sources)
    return candidates[len(candidates) // 2]


def module_kind(name: str) -> str:
    """A module's name without its layer number(s): ``model.layers.3.self_attn.q_proj`` -> ``model.layers.#.self_attn.q_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "#", name)


def sample_modules(module_names: list[str], sources: Sequence, count: int) -> list[str]:
    """``count`` modules the automatic settings are judged on, among those most adapters have: spread over
    depth (the k-th pick at depth (k + 1/2) / count) and over module kinds (q, k, v, ... in turn).
    Deterministic; all of them when there are at most ``count``.
    """
    candidates = most_shared_modules(module_names, sources)
    if len(candidates) <= count:
        return candidates
    by_kind: dict[str, list[str]] = {}
    for m in candidates:  # natural order: each kind's modules by depth
        by_kind.setdefault(module_kind(m), []).append(m)
    kinds = list(by_kind)
    chosen: list[str] = []
    for k in range(count):
        options = by_kind[kinds[k % len(kinds)]]
        position = min(int((k + 0.5) / count * len(options)), len(options) - 1)
        # When a kind's pick is taken already (few layers), the nearest free one of that kind, else any.
        free = sorted((m for m in options if m not in chosen), key=lambda m: abs(options.index(m) - position)) or \
            [m for m in candidates if m not in chosen]
        chosen.append(free[0])
    return sorted(chosen, key=natural_key)


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
    # Every new row is computed first and the collection changed only once all of them exist, so a failure
    # (a NaN in the last module, a bad file) leaves the collection exactly as it was.
    updates = {}
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
        check_finite(module, [sources[i].name for i in ids], sq_norms, residuals, sigma)
        updates[module] = dict(
            sigma=torch.cat([c.sigma, sigma.to(c.sigma)]), cluster=torch.cat([c.cluster, cluster.to(c.cluster)]),
            sq_norms=torch.cat([c.sq_norms, sq_norms.to(c.sq_norms)]),
            residuals=torch.cat([c.residuals, residuals.to(c.residuals)]),
            adapter_ids=torch.cat([entry.adapter_ids, torch.tensor(ids, dtype=torch.long) + start]),
        )
    infos = _adapter_infos(sources)
    for module, fields in updates.items():  # only assignments from here on
        entry = collection.modules[module]
        entry.adapter_ids = fields.pop("adapter_ids")
        for attr, value in fields.items():
            setattr(entry.compression, attr, value)
    collection.adapters.extend(infos)
    errors = collection.adapter_errors()
    added = {info.name: errors[info.name] for info in collection.adapters[start:]}
    target = collection.settings.target_error
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


def recompress(collection: JDLoraCollection, new_adapters: Sequence = (), *,
               adapters_dir: str | os.PathLike | None = None, **overrides) -> JDLoraCollection:
    """Compresses the collection's original adapters and ``new_adapters`` again, from scratch.

    The originals are re-opened from each adapter's recorded origin: a Hub adapter from its repo id at its
    recorded revision; a local one from the folder it was compressed from (in the same process), else from
    ``adapters_dir / <its folder name>`` (origins record folder names, never local paths). A re-opened
    adapter must have the sha256 its origin records. Settings are the collection's
    (:attr:`~jdlora.JDLoraCollection.settings`, its dtype included); ``overrides`` replace them (e.g.
    ``clusters="auto"``); ``token`` goes to the Hub.

    Raises:
        AdapterFormatError: an original cannot be found (pass ``adapters_dir``, or pass it in ``new_adapters``
            after removing it), or its weights changed since it was compressed.

    Example:
        ```python
        >>> collection = JDLoraCollection.from_pretrained("./my-collection")
        >>> fresh = jdlora.recompress(collection, ["./new-lora"], adapters_dir="./adapters")
        ```
    """
    specs = []
    for info in collection.adapters:
        origin = info.origin
        if "repo_id" in origin:
            spec = open_adapter(origin["repo_id"], name=info.name, revision=origin.get("revision"),
                                subfolder=origin.get("subfolder"), token=overrides.get("token"))
        elif "folder" in origin:
            spec = open_adapter(_original_folder(info, adapters_dir), name=info.name)
        else:
            raise AdapterFormatError(
                f"Adapter {info.name!r} has no folder or Hub origin to re-open (origin: {origin}). "
                "Remove it, or recompress from the original adapters with jdlora.compress()."
            )
        if origin.get("sha256") and spec.sha256 != origin["sha256"]:
            raise AdapterFormatError(
                f"Adapter {info.name!r}: {spec.weights_file} has sha256 {spec.sha256[:12]}..., but the adapter was "
                f"compressed from weights with sha256 {origin['sha256'][:12]}...: it is another adapter, or it changed. "
                "Pass the right adapters_dir, or remove_adapters() it and pass the new one in new_adapters."
            )
        specs.append(spec)
    token = overrides.pop("token", None)
    return compress([*specs, *new_adapters], collection.settings.replace(**overrides), token=token)


def _original_folder(info: AdapterInfo, adapters_dir: str | os.PathLike | None) -> Path:
    """Where a local original is: the folder it was read from in this process, else under ``adapters_dir``."""
    if adapters_dir is None and info.local_folder is not None and info.local_folder.is_dir():
        return info.local_folder
    folder = info.origin["folder"]
    if adapters_dir is None:
        raise AdapterFormatError(
            f"Adapter {info.name!r} was compressed from a local folder named {folder!r}; the collection records only "
            "that name (never a local path). Pass adapters_dir=, the folder that holds it."
        )
    path = Path(adapters_dir) / folder
    if not path.is_dir():
        raise AdapterFormatError(f"Adapter {info.name!r}: no folder {path} (its origin records the folder name "
                                 f"{folder!r}). Pass the adapters_dir that holds it.")
    return path


def _adapter_infos(sources: Sequence) -> list[AdapterInfo]:
    return [
        AdapterInfo(
            name=safe_adapter_name(s.name), origin=dict(s.origin), rank=getattr(s, "rank", None),
            alpha=getattr(s, "alpha", None), use_rslora=bool(getattr(s, "use_rslora", False)),
            module_ranks={m: shape[0] for m, shape in s.modules.items()},
            local_folder=getattr(s, "folder", None) if "folder" in s.origin else None,
        )
        for s in sources
    ]
