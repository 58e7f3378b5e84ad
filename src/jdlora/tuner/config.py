"""``JDLoraConfig``: the PEFT configuration of a JD-LoRA adapter (one Sigma per module, shared bases)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from . import registration


@dataclass
class JDLoraConfig(PeftConfig):
    """Configuration of a JD-LoRA adapter: ``dW = U_c Sigma V_c^T`` per adapted module (arXiv 2407.00066).

    The bases ``U_c [d_out, r]`` and ``V_c [d_in, r]`` are shared, fixed buffers (one pair per module
    and cluster of a compressed collection); each adapter owns only its small ``Sigma`` per module
    (``r x r``, or ``r`` values for JD-Diag). A new adapter (``get_peft_model``) gets fixed random
    orthonormal bases, or the bases of an existing collection (``bases_from``), and a zero Sigma,
    so the model starts out unchanged.

    Collections are usually not built from this config but loaded whole, with
    ``PeftModel.from_pretrained(base, "org/collection")`` or :func:`jdlora.tuner.load_collection`.

    Example:
        ```python
        >>> import jdlora  # registers JD-LoRA with PEFT
        >>> from peft import get_peft_model
        >>> from jdlora.tuner import JDLoraConfig
        >>> model = get_peft_model(base, JDLoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
        >>> model.print_trainable_parameters()  # 16 x 16 per module
        ```
    """

    r: int = field(default=8, metadata={"help": "Rank r of the bases; each Sigma is r x r (or r for diag)."})
    """Rank of the bases. With ``bases_from`` it is taken from the collection."""
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names (suffixes) or a regex of the modules to adapt (nn.Linear or Conv1D)."},
    )
    """Names (or name suffixes, e.g. ``["q_proj", "v_proj"]``) or a regex of the modules to adapt. Default:
    with ``bases_from``, the modules of the collection; else PEFT's LoRA defaults for known architectures."""
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    """Names or a regex of modules not to adapt, even if ``target_modules`` matches them."""
    sigma: Literal["full", "diag"] = field(default="full", metadata={"help": "'full' (JD-Full) or 'diag' (JD-Diag)."})
    """``"full"``: Sigma is a full ``r x r`` matrix (JD-Full); ``"diag"``: ``r`` values (JD-Diag)."""
    bases_from: Optional[Any] = field(
        default=None, metadata={"help": "Path or Hub id of a compressed collection whose bases a new adapter uses."}
    )
    """Train in an existing collection's subspace: a :class:`~jdlora.JDLoraCollection`, or the path / Hub id
    of a saved one. The new adapter uses that collection's bases (cluster ``bases_cluster``) and adds only
    ``r x r`` parameters per module, so it can be saved into the collection. An in-memory collection is
    kept out of the saved config (it is recorded by name only)."""
    bases_cluster: int = field(default=0, metadata={"help": "Which cluster's bases of `bases_from` to use."})
    """The cluster of ``bases_from`` whose bases the new adapter uses (in every module)."""
    bases_seed: int = field(default=0, metadata={"help": "Seed of the random orthonormal bases of a new adapter."})
    """Seed of the fixed random orthonormal bases of a new adapter without ``bases_from``; adapters with the
    same seed and rank share the same bases (stored once per layer)."""
    init_weights: bool = field(default=True, metadata={"help": "Start Sigma at zero (True) or random (False)."})
    """``True``: Sigma starts at zero, so the model starts unchanged. ``False``: random Sigma (for tests)."""
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the adapter path."})
    """Dropout probability on the adapter path's input while training."""
    fan_in_fan_out: bool = field(default=False, metadata={"help": "True for layers storing (fan_in, fan_out)."})
    """Set for layers that store their weight as ``(fan_in, fan_out)`` (GPT-2's ``Conv1D``); set automatically."""
    bias: str = field(default="none", metadata={"help": "Only 'none' is supported."})
    """Bias training is not supported: ``"none"`` only."""
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the JD-LoRA layers to train and save."}
    )
    """Modules besides the JD-LoRA layers to train and save (e.g. a classifier head)."""
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    """Only adapt the layers with these indices (see ``layers_pattern``)."""
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list, used with `layers_to_transform`."}
    )
    """The name of the ``nn.ModuleList`` of layers (``"layers"``, ``"h"``), used with ``layers_to_transform``."""
    # Written by jdlora.format into the adapter_config.json files of a saved collection (docs/format.md);
    # never set by hand.
    collection: Optional[str] = field(default=None, metadata={"help": "Root of a saved collection: its manifest."})
    """Set on a saved collection's root config (``"collection.json"``): the config stands for every adapter."""
    adapter_name: Optional[str] = field(default=None, metadata={"help": "This adapter's name in its collection."})
    """The adapter's name in its collection (per-adapter configs of a saved collection)."""
    collection_root: Optional[str] = field(default=None, metadata={"help": "Relative path to the collection root."})
    """Path from the adapter's folder to the collection root (``"../.."``)."""
    bases: Optional[dict] = field(default=None, metadata={"help": "{module: {path, sha256}} of the bases needed."})
    """``{module: {"path": "bases/<module>/<cluster>.safetensors", "sha256": ...}}``: the bases files this adapter
    needs, relative to the collection root; the only ones downloaded when it is loaded on its own."""
    jdlora_version: Optional[str] = field(default=None, metadata={"help": "Version of jdlora that wrote this."})
    """The jdlora version that wrote the config."""

    def __post_init__(self):
        super().__post_init__()
        registration.register()  # the PeftType member must exist (import jdlora normally did this)
        self.peft_type = PeftType[registration.PEFT_TYPE]
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.sigma not in ("full", "diag"):
            raise ValueError(f"sigma must be 'full' or 'diag', got {self.sigma!r}.")
        if self.bias != "none":
            raise ValueError(f"JD-LoRA does not train biases: bias must be 'none', got {self.bias!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        # Runtime-only state, never serialized and never deep-copied (see _Runtime).
        self._jd = _Runtime()
        if self.bases_from is not None and not isinstance(self.bases_from, str):
            self._jd.bases = self.bases_from
            self.bases_from = self.bases_from.settings.get("source")
            self.sigma = self._jd.bases.sigma_kind
            ranks = {m.compression.rank for m in self._jd.bases.modules.values()}
            if len(ranks) == 1:
                self.r = ranks.pop()
        if self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Loads the config like PEFT does, and remembers where it came from.

        JD-LoRA needs more than the config and one weights file (the collection's bases, its
        manifest), so the tuner must know the source; PEFT calls this for ``PeftModel.from_pretrained``
        and ``load_adapter`` before injecting the adapter.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        hub_keys = ("revision", "cache_dir", "token", "local_files_only", "force_download", "repo_type")
        config._jd.source = {
            "path_or_repo": str(pretrained_model_name_or_path),
            "subfolder": subfolder,
            **{k: kwargs[k] for k in hub_keys if k in kwargs},
        }
        if kwargs.get("adapters") is not None:  # PeftModel.from_pretrained(base, root, adapters=[...])
            config._jd.adapter_names = list(kwargs["adapters"])
        return config

    @property
    def is_collection_root(self) -> bool:
        """Whether this config stands for a whole collection (loaded in bulk) rather than one adapter."""
        return self._jd.collection is not None or bool(self.collection)


class _Runtime:
    """What a config knows at runtime only: an in-memory collection to load (``collection``, with
    ``adapter_names``), a collection to take bases from (``bases``), and where ``from_pretrained`` found
    the config (``source``); ``bulk`` marks members of a bulk-loaded collection. Shared, not copied, by
    ``copy.deepcopy`` (PEFT deep-copies configs)."""

    def __init__(self):
        self.collection = None
        self.adapter_names = None
        self.bases = None
        self.source = None
        self.bulk = False  # a member of a collection loaded in bulk (its Sigma is already in place)

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self
