"""The in-memory compressed collection: per module, shared bases per cluster and a Sigma per adapter."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .compress import AutoChoice, CompressionSettings, ModuleCompression, SweepPoint
from .compress.auto import original_parameters, saved_ratio
from .errors import UnknownAdapterError, UnknownModuleError


def safe_adapter_name(name: str) -> str:
    """A name usable as a PEFT adapter name and as a folder name: ``org/repo`` -> ``org--repo``.

    PEFT keys adapters in ``nn.ModuleDict`` s, which refuse dots, and the format stores each adapter in
    ``adapters/<name>/``; so only letters, digits, ``_`` and ``-`` are kept.
    """
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name.replace("/", "--"))
    return safe or "adapter"


@dataclass
class AdapterInfo:
    """What the collection knows of one original adapter.

    Attributes:
        name: unique name in the collection (the PEFT adapter name it loads under).
        origin: where it came from: ``{"folder": <folder name>}`` or ``{"repo_id", "revision", "subfolder"}``,
            plus ``"sha256"`` of its original weights file when known. Saved and published, so it never
            holds a local path.
        rank: its LoRA rank. alpha: its LoRA alpha. use_rslora: whether its scaling was alpha/sqrt(r).
        module_ranks: ``{module: r_i}`` (ranks can differ per module through ``rank_pattern``).
        local_folder: run-time only (never saved): the local folder it was compressed from, which
            :func:`jdlora.recompress` re-opens in the same process.
    """

    name: str
    origin: dict = field(default_factory=dict)
    rank: int | None = None
    alpha: float | None = None
    use_rslora: bool = False
    module_ranks: dict[str, int] = field(default_factory=dict)
    local_folder: Path | None = field(default=None, repr=False, compare=False)


@dataclass
class CollectionModule:
    """One module of the collection: its compression and which adapters its Sigma rows belong to.

    Attributes:
        compression: bases, Sigma, clusters and errors (see :class:`~jdlora.compress.ModuleCompression`).
        adapter_ids: ``[m]`` index in :attr:`JDLoraCollection.adapters` of each Sigma row.
    """

    compression: ModuleCompression
    adapter_ids: Tensor

    def row_of(self, adapter_id: int) -> int | None:
        """Sigma row of an adapter, or None when the adapter has no update for this module."""
        hits = (self.adapter_ids == adapter_id).nonzero()
        return int(hits[0]) if len(hits) else None


class JDLoraCollection:
    """A compressed LoRA collection: ``dW_i ~ U_c Sigma_i V_c^T`` per module.

    Built by :func:`jdlora.compress`. Every adapter keeps its own name; an adapter that had no
    update for a module has no Sigma there.

    Attributes:
        base_model: the base model all adapters were trained for (or None if they did not say).
        adapters: one :class:`AdapterInfo` per adapter, in collection order.
        modules: ``{module name: CollectionModule}``, in model order.
        sigma_kind: ``"full"`` or ``"diag"``.
        settings: the :class:`~jdlora.compress.CompressionSettings` used, the automatic choices
            resolved (an integer rank and cluster count, ``"full"`` or ``"diag"``).
        sweep: the settings tried by the automatic choice, if any.
        choice: what the automatic choice picked and why (:class:`~jdlora.compress.AutoChoice`), if any.
    """

    def __init__(
        self,
        base_model: str | None,
        adapters: list[AdapterInfo],
        modules: dict[str, CollectionModule],
        sigma_kind: str,
        settings: CompressionSettings | dict | None = None,
        sweep: list[SweepPoint] | None = None,
        choice: AutoChoice | None = None,
    ):
        self.base_model = base_model
        self.adapters = adapters
        self.modules = modules
        self.sigma_kind = sigma_kind
        if not isinstance(settings, CompressionSettings):  # a manifest's dict, or an older version's
            settings = CompressionSettings.from_dict({"sigma_kind": sigma_kind, **(settings or {})})
        self.settings = settings
        self.sweep = [p if isinstance(p, SweepPoint) else SweepPoint.from_dict(p) for p in sweep or []]
        self.choice = AutoChoice.from_dict(choice) if isinstance(choice, dict) else choice
        # Where it was loaded from ({"path_or_repo_id", "revision"}), if it was.
        self.source: dict | None = None

    def __len__(self) -> int:
        return len(self.adapters)

    def __repr__(self) -> str:
        return (
            f"JDLoraCollection(adapters={len(self)}, modules={len(self.modules)}, sigma={self.sigma_kind!r}, "
            f"rank={self.settings.rank}, clusters={self.settings.clusters}, error={self.error:.4f})"
        )

    @property
    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def index(self, name: str) -> int:
        """Position of adapter ``name``; raises :class:`~jdlora.errors.UnknownAdapterError` listing close matches."""
        for i, adapter in enumerate(self.adapters):
            if adapter.name == name:
                return i
        raise UnknownAdapterError(name, self.adapter_names)

    # ----- reconstruction -------------------------------------------------------------------------

    def module(self, module: str) -> CollectionModule:
        """One module's entry; raises :class:`~jdlora.errors.UnknownModuleError` listing close matches."""
        try:
            return self.modules[module]
        except KeyError:
            raise UnknownModuleError(module, self.modules, where="the collection") from None

    def sigma(self, name: str, module: str) -> Tensor | None:
        """Sigma of adapter ``name`` in ``module`` (``[r, r]`` or ``[r]``), None if it lacks the module."""
        entry = self.module(module)
        row = entry.row_of(self.index(name))
        return None if row is None else entry.compression.sigma[row]

    def delta_weight(self, name: str, module: str) -> Tensor | None:
        """Dense reconstructed update ``U_c Sigma_i V_c^T`` (d_out x d_in) of one adapter and module.

        Raises:
            UnknownAdapterError, UnknownModuleError: a name the collection does not have (close matches listed).
        """
        entry = self.module(module)
        row = entry.row_of(self.index(name))
        return None if row is None else entry.compression.delta_weight(row)

    # ----- errors ---------------------------------------------------------------------------------

    @property
    def error(self) -> float:
        """Pooled relative error over every module and adapter: ``sum ||dW - R||^2 / sum ||dW||^2``."""
        res = sum(m.compression.residuals.sum().item() for m in self.modules.values())
        norms = sum(m.compression.sq_norms.sum().item() for m in self.modules.values())
        return res / norms if norms else 0.0

    def adapter_errors(self) -> dict[str, float]:
        """Relative error of each adapter over all its modules: ``sum_m ||dW - R||^2 / sum_m ||dW||^2``."""
        res = torch.zeros(len(self), dtype=torch.float64)
        norms = torch.zeros(len(self), dtype=torch.float64)
        for entry in self.modules.values():
            res.index_add_(0, entry.adapter_ids.cpu(), entry.compression.residuals.double().cpu())
            norms.index_add_(0, entry.adapter_ids.cpu(), entry.compression.sq_norms.double().cpu())
        return {a.name: (res[i] / norms[i]).item() if norms[i] > 0 else 0.0 for i, a in enumerate(self.adapters)}

    @property
    def mean_adapter_error(self) -> float:
        """Mean over adapters of :meth:`adapter_errors` (every adapter weighs the same)."""
        errors = list(self.adapter_errors().values())
        return sum(errors) / len(errors) if errors else 0.0

    def module_errors(self) -> dict[str, dict[str, float]]:
        """``{module: {"error": pooled, "mean_adapter_error": mean of per-adapter errors}}``."""
        return {
            name: {"error": m.compression.error, "mean_adapter_error": m.compression.mean_adapter_error}
            for name, m in self.modules.items()
        }

    # ----- sizes ----------------------------------------------------------------------------------

    def parameter_counts(self) -> dict[str, float]:
        """Parameters before (the LoRAs' A and B) and after (bases + Sigmas), and the saved ratio."""
        original = compressed = 0
        for module, entry in self.modules.items():
            c = entry.compression
            ranks = [self.adapters[i].module_ranks.get(module, self.adapters[i].rank or 0) for i in entry.adapter_ids.tolist()]
            original += original_parameters(ranks, c.U.shape[1], c.V.shape[1])
            compressed += c.num_parameters()
        return {"original": original, "compressed": compressed, "saved_ratio": saved_ratio(original, compressed)}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> JDLoraCollection:
        """Moves (and casts floating tensors of) every module in place; returns self."""
        for entry in self.modules.values():
            c = entry.compression
            for attr in ("U", "V", "sigma", "sq_norms", "residuals"):
                setattr(c, attr, getattr(c, attr).to(device=device, dtype=dtype))
            c.cluster = c.cluster.to(device)
            entry.adapter_ids = entry.adapter_ids.to(device)
        return self

    # ----- saving, loading, publishing (jdlora.format) ----------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, *, progress: bool = True) -> Path:
        """Saves the collection in the jdlora format (docs/format.md), atomically.

        Example:
            ```python
            >>> collection.save_pretrained("./my-collection")
            ```
        """
        from .format import save_collection

        return save_collection(self, save_directory, progress=progress)

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        adapters: Sequence[str] | None = None,
        token: str | bool | None = None,
        verify: bool = True,
        force_download: bool = False,
        cache_dir: str | os.PathLike | None = None,
    ) -> JDLoraCollection:
        """Loads a saved collection from a folder or a Hub repo; with ``adapters=[...]``, only those.

        Only the bases the requested adapters use and their own Sigma are read (or downloaded). See
        :func:`jdlora.format.load_collection` for the arguments and errors.

        Example:
            ```python
            >>> collection = JDLoraCollection.from_pretrained("org/my-collection", adapters=["math"])
            ```
        """
        from .format import load_collection

        return load_collection(path_or_repo_id, revision=revision, adapters=adapters, token=token, verify=verify,
                               force_download=force_download, cache_dir=cache_dir)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        revision: str | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        create_pr: bool = False,
        token: str | bool | None = None,
        progress: bool = True,
    ):
        """Publishes the collection to the Hub in one atomic commit; see :func:`jdlora.format.push_collection`.

        Unchanged files are not uploaded again. Returns the ``CommitInfo`` (None if nothing changed).
        """
        from .format import push_collection

        return push_collection(self, repo_id, private=private, revision=revision, commit_message=commit_message,
                               commit_description=commit_description, create_pr=create_pr, token=token,
                               progress=progress)

    def export_lora(self, name: str, path: str | os.PathLike) -> Path:
        """Writes adapter ``name`` as a standard PEFT LoRA folder (``B' = U Sigma``, ``A' = V^T``)."""
        from .format import export_lora

        return export_lora(self, name, path)

    # ----- changing the set of adapters ------------------------------------------------------------

    def add_adapters(self, adapters: Sequence, **kwargs) -> dict[str, float]:
        """Projects new LoRAs onto the existing bases (``Sigma_new = U^T dW V``) and adds them.

        This is the paper's "serve new LoRAs compressed right away" path: no recompression. Each new
        adapter joins, per module, the cluster whose bases reconstruct it best. Warns when an adapter's
        error exceeds the collection's target (``settings.target_error``): then run
        :func:`jdlora.recompress`. Keyword arguments go to :func:`jdlora.sources.open_adapters`.
        All or nothing: when any adapter fails (a bad file, NaN, a shape), the collection is unchanged.

        Returns:
            ``{name: relative error}`` of each added adapter.
        """
        from .pipeline import add_adapters

        return add_adapters(self, adapters, **kwargs)

    def remove_adapters(self, names: Sequence[str]) -> None:
        """Removes adapters (their Sigma rows); the shared bases stay as they are.

        All or nothing: an unknown name raises :class:`~jdlora.errors.UnknownAdapterError` and nothing is removed.
        """
        if isinstance(names, str):
            names = [names]
        drop = {self.index(name) for name in names}  # every name checked before anything changes
        keep = [i for i in range(len(self.adapters)) if i not in drop]
        new_index = torch.full((len(self.adapters),), -1, dtype=torch.long)
        new_index[keep] = torch.arange(len(keep))
        updates = {}
        for module, entry in self.modules.items():
            rows = new_index[entry.adapter_ids.cpu()] >= 0
            c = entry.compression
            updates[module] = (dict(sigma=c.sigma[rows], cluster=c.cluster[rows], sq_norms=c.sq_norms[rows],
                                    residuals=c.residuals[rows]), new_index[entry.adapter_ids.cpu()[rows]])
        for module, (fields, ids) in updates.items():  # only assignments from here on: nothing can fail halfway
            for attr, value in fields.items():
                setattr(self.modules[module].compression, attr, value)
            self.modules[module].adapter_ids = ids
        self.modules = {m: e for m, e in self.modules.items() if len(e.adapter_ids)}
        self.adapters = [self.adapters[i] for i in keep]

    def summary(self) -> str:
        """A plain-text table: settings, sizes and errors, then the worst adapters."""
        counts = self.parameter_counts()
        ranks = sorted({m.compression.rank for m in self.modules.values()})
        clusters = sorted({m.compression.num_clusters for m in self.modules.values()})
        lines = [
            f"adapters            {len(self)}",
            f"modules             {len(self.modules)}",
            f"base model          {self.base_model}",
            f"sigma               {self.sigma_kind}",
            f"rank                {_fmt_set(ranks)}",
            f"clusters            {_fmt_set(clusters)}",
            f"parameters before   {counts['original']:,}",
            f"parameters after    {counts['compressed']:,}",
            f"parameters saved    {counts['saved_ratio']:.1%}",
            f"error (pooled)      {self.error:.4f}",
            f"error (mean/adapter){self.mean_adapter_error:>7.4f}",
        ]
        errors = sorted(self.adapter_errors().items(), key=lambda kv: -kv[1])
        if errors:
            lines.append("worst adapters      " + ", ".join(f"{n} {e:.3f}" for n, e in errors[:5]))
        if self.choice is not None:
            lines.append("automatic choice    " + self.choice.reason)
        return "\n".join(lines)


def _fmt_set(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"
