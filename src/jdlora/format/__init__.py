"""The on-disk and Hub format of compressed collections (specified in docs/format.md).

- :mod:`.layout`: file names, the manifest, the format version.
- :mod:`.save`: atomic saving. :mod:`.load`: loading, whole or a few adapters, with integrity checks.
- :mod:`.hub`: pushing in one atomic commit. :mod:`.card`: the model card. :mod:`.export`: plain LoRA export.
"""

from .export import export_lora
from .hub import push_collection
from .layout import FORMAT_VERSION, read_manifest
from .load import adapter_config_kind, fetch_manifest, load_collection, read_adapter_config
from .save import save_collection

__all__ = ["FORMAT_VERSION", "adapter_config_kind", "export_lora", "fetch_manifest", "load_collection", "push_collection", "read_adapter_config", "read_manifest",
           "save_collection"]
