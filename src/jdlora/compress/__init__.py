"""The math of JD-LoRA compression: torch in, torch out (no PEFT, no Hub).

Each idea of the paper lives in one module:

- :mod:`.stack`: one module's LoRA updates as padded factors (norms, projections).
- :mod:`.jd`: JD-Full (Appendix A.1 case 1, A.2) and JD-Diag (Appendix A.1 case 2).
- :mod:`.clustering`: clustered JD (Appendix A.3).
- :mod:`.module`: normalization and the errors reported per module and adapter.
- :mod:`.baselines`: per-adapter SVD (equation 4) and TIES merging.
- :mod:`.settings`: :class:`CompressionSettings`, the one typed settings object.
- :mod:`.auto`: choosing rank, clusters and Sigma kind automatically (section 6.4, recalibrated).
- :mod:`.threads`: how many CPU threads a module's products get.
"""

from .auto import AutoChoice, ModuleSample, SweepPoint, choose_settings, saved_ratio, sweep
from .baselines import SVDResult, TiesResult, svd_per_adapter, ties_merge
from .clustering import ClusterResult, assignment_errors, jd, jd_cluster, kmeans
from .jd import JDResult, jd_diag, jd_full, residuals, sigma_diag, sigma_full
from .module import ModuleCompression, compress_module, project_onto_bases
from .settings import DEFAULT_TARGET_ERROR, CompressionSettings
from .stack import LoraStack

__all__ = [
    "DEFAULT_TARGET_ERROR",
    "AutoChoice",
    "ClusterResult",
    "ModuleSample",
    "CompressionSettings",
    "JDResult",
    "LoraStack",
    "ModuleCompression",
    "SVDResult",
    "SweepPoint",
    "TiesResult",
    "assignment_errors",
    "choose_settings",
    "compress_module",
    "project_onto_bases",
    "jd",
    "jd_cluster",
    "jd_diag",
    "jd_full",
    "kmeans",
    "residuals",
    "saved_ratio",
    "sigma_diag",
    "sigma_full",
    "svd_per_adapter",
    "sweep",
    "ties_merge",
]
