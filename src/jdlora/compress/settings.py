"""The compression settings: one typed, frozen object that travels from the CLI to the manifest.

:class:`CompressionSettings` is what :func:`jdlora.compress` takes, what the math functions
(:func:`~jdlora.compress.jd.jd_full`, :func:`~jdlora.compress.clustering.jd_cluster`,
:func:`~jdlora.compress.module.compress_module`) read their options from, what
:attr:`jdlora.JDLoraCollection.settings` holds (with the automatic choices resolved), what the
manifest stores (:meth:`CompressionSettings.to_dict`) and what :func:`jdlora.recompress` starts from
(:meth:`CompressionSettings.from_dict`, which also reads the dicts older manifests stored).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import torch

from ..errors import SettingsError

SigmaKind = Literal["full", "diag"]
Solver = Literal["qr", "eigen"]
Auto = Literal["auto"]

# The worst adapter's relative error that the automatic settings keep under, each adapter's error
# norm-weighted over modules: sum_m ||dW_im - R_im||^2 / sum_m ||dW_im||^2 (over all modules in the
# calibration; over search_modules sampled ones in the search). Calibrated on the quality study
# (docs/quality.md, benchmarks/RESULTS.md): every compressed collection whose worst adapter stayed at or
# below 0.05 kept >= 99.3% of its LoRAs' Rouge-L; every one that kept less than 99% had a worst adapter at
# 0.097 or above; adapters below 0.04 kept 100.0% on average.
DEFAULT_TARGET_ERROR = 0.05
# Modules the automatic search judges each setting on (spread over depth and module types): one module
# is not enough (docs/quality.md), every module would make the search as slow as compressing many times.
DEFAULT_SEARCH_MODULES = 4
# Which adapter the target is checked on: 1.0 = the worst one (the quantile of the per-adapter errors).
DEFAULT_ERROR_QUANTILE = 1.0

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# Keys older manifests stored under another name.
_OLD_KEYS = {"sigma": "sigma_kind"}


@dataclass(frozen=True)
class CompressionSettings(Mapping):
    """How a collection is compressed (paper sections 3 and 6.4; Appendix A).

    Build it with keywords, change it with :func:`dataclasses.replace`. It is also a read-only
    mapping (``settings["rank"]``, ``dict(settings)``) with the values of :meth:`to_dict`, so code that
    read the untyped dict of earlier versions keeps working.

    Example:
        ```python
        >>> settings = CompressionSettings(rank=16, clusters=4, sigma_kind="diag")
        >>> collection = jdlora.compress(folders, settings)
        ```
    """

    rank: int | Auto = field(default="auto", metadata={"help": (
        "Rank r of the shared bases, or 'auto': the cheapest setting whose adapters stay under target_error.")})
    clusters: int | Auto = field(default="auto", metadata={"help": (
        "Clusters per module (Appendix A.3; 1 = plain JD), or 'auto' (chosen with the rank).")})
    sigma_kind: SigmaKind | Auto = field(default="full", metadata={"help": (
        "'full' (JD-Full: an r x r Sigma per adapter), 'diag' (JD-Diag: r values), or 'auto': both searched. "
        "JD-Full is the default: on our quality study JD-Diag needed about twice the rank for the same quality, "
        "and its solver is the slower one.")})
    normalize: bool = field(default=True, metadata={"help": (
        "Scale every update to unit norm before the JD, so every adapter weighs the same; off: the pooled "
        "error is minimized and large adapters dominate.")})
    solver: Solver = field(default="qr", metadata={"help": (
        "JD-Full solver: 'qr' (Appendix A.2) or 'eigen' (Appendix A.1).")})
    tol: float = field(default=1e-3, metadata={"help": "Tolerance of the convergence criterion (equation 19)."})
    ftol: float = field(default=1e-5, metadata={"help": (
        "Also stop a JD (or the clustering rounds) when an iteration lowers the relative error by less.")})
    max_iter: int = field(default=100, metadata={"help": "Iterations per JD."})
    max_rounds: int = field(default=20, metadata={"help": "Cap on clustering rounds (Appendix A.3)."})
    target_error: float = field(default=DEFAULT_TARGET_ERROR, metadata={"help": (
        "Relative error the automatic settings keep the adapters under (see error_quantile); add_adapters "
        "warns above it.")})
    error_quantile: float = field(default=DEFAULT_ERROR_QUANTILE, metadata={"help": (
        "Which adapter target_error is checked on: 1.0 the worst, 0.9 the 90th percentile of the "
        "per-adapter errors.")})
    search_modules: int = field(default=DEFAULT_SEARCH_MODULES, metadata={"help": (
        "How many modules (spread over depth and module types) the automatic settings are judged on; each "
        "adapter's error is norm-weighted over them.")})
    dtype: torch.dtype = field(default=torch.float32, metadata={"help": "float32 or float64."})
    seed: int = field(default=0, metadata={"help": "Seed of every random choice."})

    def __post_init__(self):
        for name in ("rank", "clusters"):
            value = getattr(self, name)
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                _invalid(name, value, f"a whole number >= 1 (e.g. {name}=16, not {name}='16') or {name}='auto'")
        _check_choice("sigma_kind", self.sigma_kind, ("full", "diag", "auto"))
        _check_choice("solver", self.solver, ("qr", "eigen"))
        if isinstance(self.dtype, str):  # "float64" or "torch.float64", as a manifest stores it
            object.__setattr__(self, "dtype", _DTYPES.get(self.dtype.removeprefix("torch."), self.dtype))
        if self.dtype not in _DTYPES.values():
            _invalid("dtype", self.dtype, "torch.float32 or torch.float64")
        for name in ("tol", "ftol"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) < 0:
                _invalid(name, getattr(self, name), "a number >= 0")
        for name in ("max_iter", "max_rounds", "search_modules"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                _invalid(name, getattr(self, name), "a positive integer")
        if not isinstance(self.target_error, (int, float)) or not 0 < self.target_error <= 1:
            _invalid("target_error", self.target_error, "a relative error in (0, 1]")
        if not isinstance(self.error_quantile, (int, float)) or not 0 < self.error_quantile <= 1:
            _invalid("error_quantile", self.error_quantile, "a quantile in (0, 1] (1 = the worst adapter)")

    @property
    def is_auto(self) -> bool:
        """Whether anything is left to the automatic choice."""
        return "auto" in (self.rank, self.clusters, self.sigma_kind)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, ``dtype`` as ``"float32"`` / ``"float64"``."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["dtype"] = str(self.dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CompressionSettings:
        """Reads :meth:`to_dict`, and the dicts earlier manifests stored (``sigma`` for the kind; keys
        this version does not know are ignored, missing ones take their defaults)."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in data.items():
            key = _OLD_KEYS.get(key, key)
            if key in known:
                values[key] = value
        return cls(**values)

    def replace(self, **changes) -> CompressionSettings:
        """A copy with ``changes`` (old names such as ``sigma`` accepted)."""
        return replace(self, **{_OLD_KEYS.get(k, k): v for k, v in changes.items()})

    # Read-only mapping over to_dict().
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[_OLD_KEYS.get(key, key)]

    def __iter__(self) -> Iterator[str]:
        return (f.name for f in fields(self))

    def __len__(self) -> int:
        return len(fields(self))


def _check_choice(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _invalid(name, value, " or ".join(repr(a) for a in allowed))


def _invalid(name: str, value, accepted: str) -> None:
    raise SettingsError(f"{name}={value!r} is not allowed: use {accepted}.")
