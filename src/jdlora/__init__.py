"""jdlora: compress collections of LoRA adapters into shared bases and serve them together.

Implements "Compress then Serve: Serving Thousands of LoRA Adapters with Little Overhead"
(Brüel-Gabrielsson et al., arXiv 2407.00066).

Note: ``jdlora.compress`` is the function below; the math lives in the subpackage of the same
name, imported as ``from jdlora.compress import jd_full`` (or ``import jdlora.compress.jd``).
"""

from .collection import AdapterInfo, JDLoraCollection
from .pipeline import compress, recompress
from .sources import LoraAdapter, open_adapter, open_adapters
from .synthetic import synthetic_adapters
from .tuner.registration import register_when_peft_imported

register_when_peft_imported()  # JD-LoRA becomes a PEFT method as soon as PEFT is imported (not before)

__version__ = "0.1.0"

__all__ = [
    "AdapterInfo",
    "JDLoraCollection",
    "LoraAdapter",
    "compress",
    "open_adapter",
    "open_adapters",
    "recompress",
    "synthetic_adapters",
]
