"""Exceptions raised by jdlora.

One class per kind of failure a user can act on, in the manner of
`huggingface_hub.errors`. Every message names the file, adapter or module at
fault and says what to do next. All classes derive from `JDLoraError`, and from
the builtin a caller would otherwise expect (`ValueError`, `KeyError`, `FileExistsError`), so
`except ValueError` keeps working for code that does not know about jdlora.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "JDLoraError",
    "AdapterFormatError",
    "UnsafeAdapterError",
    "NonFiniteWeightsError",
    "IncompatibleAdaptersError",
    "UnknownAdapterError",
    "UnknownModuleError",
    "CollectionFormatError",
    "CollectionIntegrityError",
    "UnsafePathError",
    "TargetExistsError",
    "SettingsError",
    "PushError",
]


class JDLoraError(Exception):
    """Base class of every error jdlora raises on purpose."""


class AdapterFormatError(JDLoraError, ValueError):
    """An adapter cannot be read as a supported PEFT LoRA adapter.

    Raised for missing files, a config that is not a LoRA config, truncated or
    corrupted safetensors files, unpaired `lora_A`/`lora_B` tensors, and LoRA
    variants jdlora does not compress (DoRA, embedding or convolution LoRA,
    LoRA biases, `modules_to_save`).
    """


class UnsafeAdapterError(JDLoraError):
    """An adapter ships only a pickle (`adapter_model.bin`) and pickles were not allowed.

    Loading a pickle can run arbitrary code. jdlora loads it only when asked
    (`allow_pickle=True`), and then with `torch.load(..., weights_only=True)`.
    """


class NonFiniteWeightsError(JDLoraError, ValueError):
    """An adapter tensor holds NaN or Inf values, or values so large that only corruption explains them.

    Also raised when a compression result is not finite (e.g. an update whose norm overflows): the
    message names the adapter and the module.
    """


class IncompatibleAdaptersError(JDLoraError, ValueError):
    """Adapters that cannot be compressed together.

    Raised when they declare different base models, share a name, or disagree
    on the shape of one module.
    """


class _UnknownNameError(JDLoraError, KeyError):
    """A name that is not among the known ones; the message lists close matches."""

    kind = "name"

    def __init__(self, name: str, known: Iterable[str], *, where: str | None = None, missing_in: str | None = None):
        self.name, self.known, self.where, self.missing_in = name, sorted(known), where, missing_in
        close = difflib.get_close_matches(name, self.known, n=5, cutoff=0.5)
        place = f" in {where}" if where else ""
        if missing_in:  # the name is known to `where`; it is `missing_in` (e.g. the model) that lacks it
            headline = f"{missing_in[:1].upper()}{missing_in[1:]} has no {self.kind} {name!r}, which the {where} has: " \
                       "they were made for different models."
            place = f" in {missing_in}"
        else:
            headline = f"Unknown {self.kind} {name!r}{place}."
        if close:
            hint = "Did you mean: " + ", ".join(repr(c) for c in close) + "?"
        elif self.known:
            shown = ", ".join(repr(k) for k in self.known[:10])
            more = f" (and {len(self.known) - 10} more)" if len(self.known) > 10 else ""
            hint = f"Known {self.kind}s: {shown}{more}."
        else:
            hint = f"There are no {self.kind}s{place}."
        super().__init__(f"{headline} {hint}")

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0])

    def __reduce__(self):
        # Rebuild from our arguments, not from args (the message), so the error survives pickling.
        return (_rebuild, (type(self), self.name, self.known, self.where, self.missing_in))


def _rebuild(cls: type, name: str, known: list[str], where: str | None, missing_in: str | None = None):
    return cls(name, known, where=where, missing_in=missing_in)


class UnknownAdapterError(_UnknownNameError):
    """An adapter name that is not in the collection.

    Args:
        name: the name that was asked for.
        known: every adapter name that exists; close matches are suggested.
        where: optional description of the collection, used in the message.
    """

    kind = "adapter"


class UnknownModuleError(_UnknownNameError):
    """A module name that the adapter (or collection) does not adapt, or that the model lacks.

    Args:
        name: the module that was asked for, e.g. `model.layers.0.self_attn.q_proj`.
        known: every module the adapter adapts (or the model has); close matches are suggested.
        where: optional description of the adapter or collection, used in the message.
        missing_in: set when `where` has the module and it is this (e.g. "the model") that lacks it.
    """

    kind = "module"


class CollectionFormatError(JDLoraError, ValueError):
    """A saved compressed collection cannot be read.

    Raised for a missing or malformed manifest (`collection.json`), a format version newer than this
    jdlora understands, files the manifest names but the folder or repo lacks, and truncated or
    corrupted safetensors files. The message names the file.
    """


class CollectionIntegrityError(CollectionFormatError):
    """A file's sha256 differs from the one the manifest records: it was corrupted or replaced.

    Loading a Sigma against different bases would silently produce wrong adapters, so this is never a
    warning. Re-download the collection (or pass `force_download=True`), or re-save it.
    """


class UnsafePathError(CollectionFormatError):
    """A manifest or config names a path that would leave the collection's folder.

    Every name and path read from a collection (adapter names, module names, `subfolder`, bases and
    Sigma paths, origins) must be relative, free of `..`, and stay inside the collection's root once
    links are resolved. A collection downloaded from the Hub is untrusted input: such a path is
    refused before any file is opened or written. The message names the field and the value.
    """


class TargetExistsError(JDLoraError, FileExistsError):
    """A save would replace something that is not a jdlora collection (or not a PEFT LoRA folder).

    `save_pretrained` replaces a previous collection atomically, but never a regular file, a folder of
    other files, or a folder holding files the format does not own: the message names what is there.
    Save to a new folder, or move those files away first.
    """


class SettingsError(JDLoraError, ValueError):
    """A compression setting or argument is out of range: a rank or cluster count below 1 or not an integer,
    an unknown Sigma kind, a negative tolerance, no adapters at all. Raised when
    :class:`~jdlora.compress.CompressionSettings` is built (before any adapter is read) or by ``compress``;
    the message names the argument, the value given and what is accepted."""


class PushError(JDLoraError):
    """Publishing a collection to the Hub failed; the repository was left as it was.

    The commit is atomic: either every file landed or none did. The message says which step failed
    (creating the repo, listing it, or the commit) and keeps the server's error as the cause.
    """

