"""``JDLoraConfig``: the PEFT configuration of a JD-LoRA adapter (one Sigma per module, shared bases)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

from ..format.layout import PEFT_TYPE


@dataclass
class JDLoraRuntimeConfig:
    """What a config knows at run time only; never saved (``JDLoraConfig.to_dict`` drops it), and shared,
    not copied, when PEFT deep-copies the config (it can hold a whole collection).

    The layers keep what they use; :class:`~jdlora.tuner.JDLoraModel` clears ``collection`` and ``bases``
    once the adapter is injected, so a loaded model does not keep the source collection alive.
    """

    collection: Any = None
    """An in-memory :class:`~jdlora.JDLoraCollection` to load in bulk (:func:`~jdlora.tuner.load_collection`)."""
    adapter_names: Optional[list[str]] = None
    """The adapters of ``collection`` (or of the saved collection) to load; None for all."""
    bases: Any = None
    """The in-memory collection of ``bases_from``."""
    source: Optional[dict] = None
    """Where ``from_pretrained`` found the config: ``{"path_or_repo", "subfolder", revision, token, ...}``."""
    bulk_member: bool = False
    """The config of an adapter loaded in bulk from a collection (its Sigma was put in place by the bulk load)."""
    pending_load: bool = False
    """A collection root just loaded in bulk by ``PeftModel.from_pretrained``, whose ``load_adapter`` call that
    follows has nothing left to read."""

    released: bool = False
    """``collection`` or ``bases`` were dropped once the adapter was injected (see :meth:`release`)."""

    def release(self) -> None:
        """Drops the references to source collections: the layers hold what they use."""
        self.released = self.released or self.collection is not None or self.bases is not None
        self.collection = self.bases = None

    def __deepcopy__(self, memo):
        return self


@dataclass
class JDLoraConfig(PeftConfig):
    """Configuration of a JD-LoRA adapter: ``dW = U_c Sigma V_c^T`` per adapted module (arXiv 2407.00066).

    The bases ``U_c [d_out, r]`` and ``V_c [d_in, r]`` are shared, fixed buffers (one pair per module
    and cluster of a compressed collection); each adapter owns only its small ``Sigma`` per module
    (``r x r``, or ``r`` values for JD-Diag). A new adapter (``get_peft_model``) gets fixed random
    orthonormal bases, or the bases of an existing collection (``bases_from``), and a zero Sigma,
    so the model starts out unchanged.

    Constructing a config has no side effects; ``import jdlora`` registered the method with PEFT.

    Example:
        ```python
        >>> from peft import get_peft_model
        >>> from jdlora import JDLoraConfig
        >>> model = get_peft_model(base, JDLoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
        >>> model.print_trainable_parameters()  # 16 x 16 per module
        ```
    """

    r: int = field(default=8, metadata={"help": "Rank r of the bases; each Sigma is r x r (or r values for diag). "
                                                "With `bases_from` it is taken from the collection."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Names (or name suffixes, e.g. ['q_proj', 'v_proj']) or a regex of the modules to adapt "
                          "(nn.Linear or Conv1D). Default: with `bases_from`, the modules of the collection; else "
                          "PEFT's LoRA defaults for known architectures."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Names or a regex of modules not to adapt, even if `target_modules` matches."}
    )
    sigma: Literal["full", "diag"] = field(
        default="full", metadata={"help": "'full': Sigma is a full r x r matrix (JD-Full); 'diag': r values (JD-Diag)."}
    )
    bases_from: Optional[Any] = field(
        default=None,
        metadata={"help": "Train in an existing collection's subspace: a JDLoraCollection, or the path / Hub id of a "
                          "saved one. The new adapter uses its bases (cluster `bases_cluster`) and adds only r x r "
                          "parameters per module. An in-memory collection is recorded by its source only."},
    )
    bases_cluster: int = field(default=0, metadata={"help": "The cluster of `bases_from` whose bases the adapter uses."})
    bases_seed: int = field(
        default=0,
        metadata={"help": "Seed of the fixed random orthonormal bases of a new adapter without `bases_from`; adapters "
                          "with the same seed and rank share the same bases (stored once per layer)."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: Sigma starts at zero, so the model starts unchanged. False: random Sigma from torch's "
                          "global generator (torch.manual_seed), as other PEFT methods do."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout probability on the adapter path's input."})
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True for layers storing (fan_in, fan_out), like GPT-2's Conv1D (set for you)."}
    )
    bias: str = field(default="none", metadata={"help": "Bias training is not supported: 'none' only."})
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the JD-LoRA layers to train and save (e.g. a classifier head)."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices (see `layers_pattern`)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the nn.ModuleList of layers ('layers', 'h'), for `layers_to_transform`."}
    )
    bases_in_weights: bool = field(
        default=False,
        metadata={"help": "Set by save_pretrained: the adapter's bases are stored in its adapter_model.safetensors "
                          "(keys `<module>.jd_U`, `<module>.jd_V`) and replace placeholder bases when the weights load "
                          "(see docs/format.md)."},
    )
    # Written by jdlora.format into the adapter_config.json files of a saved collection (docs/format.md).
    collection: Optional[str] = field(
        default=None, metadata={"help": "Set on a saved collection's root config ('collection.json'): the config "
                                        "stands for every adapter of the collection, loaded in bulk."}
    )
    adapter_name: Optional[str] = field(default=None, metadata={"help": "The adapter's name in its collection."})
    collection_root: Optional[str] = field(
        default=None, metadata={"help": "Path from the adapter's folder in a collection to the collection root."}
    )
    bases: Optional[dict] = field(
        default=None,
        metadata={"help": "{module: {path, sha256}}: the bases files of its collection this adapter needs, relative "
                          "to the collection root; the only ones downloaded when it is loaded on its own."},
    )
    jdlora_version: Optional[str] = field(default=None, metadata={"help": "The jdlora version that wrote the config."})
    runtime_config: JDLoraRuntimeConfig = field(
        default_factory=JDLoraRuntimeConfig, metadata={"help": "Run-time state (not saved)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = _peft_type()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if self.bases_from is not None and not isinstance(self.bases_from, str):
            collection = self.bases_from
            self.runtime_config.bases = collection
            self.bases_from = collection.settings.get("source")
            self.sigma = collection.sigma_kind
            ranks = {m.compression.rank for m in collection.modules.values()}
            if len(ranks) == 1:
                self.r = ranks.pop()
        self.check()

    def check(self) -> None:
        """Raises ValueError for values JD-LoRA cannot use. Runs at construction and again when the adapter is
        injected, so a field changed after construction (``config.bias = "all"``) cannot slip through."""
        if self.sigma not in ("full", "diag"):
            raise ValueError(f"sigma must be 'full' or 'diag', got {self.sigma!r}.")
        if self.bias != "none":
            raise ValueError(f"JD-LoRA does not train biases: bias must be 'none', got {self.bias!r}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r}.")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("runtime_config")
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Loads the config like PEFT does, and remembers where it came from (``runtime_config.source``):
        a collection's configs point at files beside them (its manifest, its bases)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        hub_keys = ("revision", "cache_dir", "token", "local_files_only", "force_download", "repo_type")
        config.runtime_config = JDLoraRuntimeConfig(
            source={"path_or_repo": str(pretrained_model_name_or_path), "subfolder": subfolder,
                    **{k: kwargs[k] for k in hub_keys if k in kwargs}},
            adapter_names=list(kwargs["adapters"]) if kwargs.get("adapters") is not None else None,
        )
        return config

    @property
    def is_collection_root(self) -> bool:
        """Whether this config stands for a whole collection (loaded in bulk) rather than one adapter."""
        return self.runtime_config.collection is not None or bool(self.collection)


def _peft_type() -> PeftType:
    try:
        return PeftType(PEFT_TYPE)
    except ValueError:
        raise RuntimeError(
            f"PEFT has no PeftType.{PEFT_TYPE}: JD-LoRA is registered by `import jdlora` (or `import jdlora.tuner`), "
            "which did not run or failed (see its warning)."
        ) from None

