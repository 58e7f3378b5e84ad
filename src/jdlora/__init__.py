"""jdlora: compress collections of LoRA adapters into shared bases and serve them together.

Implements "Compress then Serve: Serving Thousands of LoRA Adapters with Little Overhead"
(Brüel-Gabrielsson et al., arXiv 2407.00066).

Note: ``jdlora.compress`` is the function below; the math lives in the subpackage of the same
name, imported as ``from jdlora.compress import jd_full`` (or ``import jdlora.compress.jd``).
"""

__version__ = "0.1.0"

from . import tuner  # registers JD-LoRA with PEFT as soon as PEFT is imported (not before)
from .collection import AdapterInfo, JDLoraCollection
from .pipeline import compress, recompress
from .sources import LoraAdapter, open_adapter, open_adapters
from .synthetic import synthetic_adapters

_TUNER_NAMES = ("JDLoraConfig", "JDLoraModel")


def __getattr__(name: str):
    """``jdlora.JDLoraConfig`` & co., imported (with PEFT) on first use."""
    if name in _TUNER_NAMES:
        return getattr(tuner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdapterInfo",
    "JDLoraCollection",
    "JDLoraConfig",
    "JDLoraModel",
    "LoraAdapter",
    "compress",
    "open_adapter",
    "open_adapters",
    "recompress",
    "synthetic_adapters",
]
