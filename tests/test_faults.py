"""Fault injection: every bad input or fault we know of, as a table (docs/safety.md shows the same table).

Each row of FAULTS is one fault: how the workspace is broken (``setup``), the API call and the ``jdlora``
command that meet it (``cli`` is None where no command does), the error class expected, and what its message
must name. Every row runs twice, through the API and through the command, and both runs check that nothing
on disk changed: not one file, folder or link under the workspace (which holds the collection, the input
adapters, a project folder and a "victim" folder that path traversal would hit).

The workspace (cwd of every row, so paths are written as a user types them):

    coll/                 a saved collection of adapters a0, a1, a2 (2 layers, rank 2, 2 clusters)
    adapters/a0 .. a3     the PEFT LoRA folders (a3 is not in the collection)
    project/              someone's project: notes.txt, src/main.py
    victim-lora/          a LoRA folder beside the collection that path traversal would overwrite
    bad/                  an empty folder (for the path bad/missing)
    file.txt              a regular file
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import jdlora
from jdlora.cli import main
from jdlora.collection import JDLoraCollection
from jdlora.errors import (
    AdapterFormatError,
    CollectionFormatError,
    CollectionIntegrityError,
    IncompatibleAdaptersError,
    NonFiniteWeightsError,
    SettingsError,
    TargetExistsError,
    UnknownAdapterError,
    UnknownModuleError,
    UnsafeAdapterError,
    UnsafePathError,
)
from jdlora.synthetic import llama_modules, save_adapters, synthetic_adapters

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*above the collection's target")]

MODULES = llama_modules(2, 48, 16)
LAST = list(MODULES)[-1]
INPUTS = ["adapters/a0", "adapters/a1", "adapters/a2"]
REPO = "jdlora-test/faults"


# ---------------------------------------------------------------------------------------- workspace


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """The workspace, built once; each test works on its own copy."""
    root = tmp_path_factory.mktemp("template") / "ws"
    root.mkdir()
    for folder, name in zip(save_adapters(synthetic_adapters(4, MODULES, rank=2, groups=2), root / "adapters"),
                            ["a0", "a1", "a2", "a3"]):
        folder.rename(folder.parent / name)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        jdlora.compress(INPUTS, rank=2, clusters=2, progress=False).save_pretrained("coll", progress=False)
    finally:
        os.chdir(cwd)
    (root / "project" / "src").mkdir(parents=True)
    (root / "project" / "notes.txt").write_text("my notes\n")
    (root / "project" / "src" / "main.py").write_text("print('hello')\n")
    shutil.copytree(root / "adapters" / "a3", root / "victim-lora")
    (root / "bad").mkdir()
    (root / "file.txt").write_text("a file\n")
    return root


@pytest.fixture
def ws(template, tmp_path, monkeypatch) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(template, root, symlinks=True)
    monkeypatch.chdir(root)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (hidden ones too): a file's sha256, a link's target, or "dir"."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "link -> " + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


# ----------------------------------------------------------------------------------- ways to break it


def load(path="coll", **kwargs) -> JDLoraCollection:
    return JDLoraCollection.from_pretrained(path, **kwargs)


def manifest_edit(change: Callable[[dict], Any]) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        manifest = json.loads((ws / "coll" / "collection.json").read_text())
        change(manifest)
        (ws / "coll" / "collection.json").write_text(json.dumps(manifest))
    return setup


def adapter_copy(name: str, change: Callable[[Path], Any], source: str = "adapters/a3") -> Callable[[Path], None]:
    """A copy of an input adapter at ``name``, then broken by ``change(folder)``."""
    def setup(ws: Path) -> None:
        shutil.copytree(ws / source, ws / name)
        change(ws / name)
    return setup


def config_edit(**fields) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(fields)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return change


def write_value(key: str, value: float) -> Callable[[Path], None]:
    """Overwrites the first float32 of tensor ``key`` in the file's data, as flipped bytes on disk would."""
    def change(folder: Path) -> None:
        path = folder / "adapter_model.safetensors"
        data = bytearray(path.read_bytes())
        (n,) = struct.unpack("<Q", data[:8])
        begin = json.loads(data[8:8 + n])[key]["data_offsets"][0]
        data[8 + n + begin:8 + n + begin + 4] = struct.pack("<f", value)
        path.write_bytes(bytes(data))
    return change


def tensor_edit(key: str, change_tensor: Callable[[torch.Tensor], Any]) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        tensors = load_file(folder / "adapter_model.safetensors")
        change_tensor(tensors[key])
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    return change


def lora_key(module: str, part: str) -> str:
    return f"base_model.model.{module}.{part}.weight"


def flip_byte(rel: str) -> Callable[[Path], None]:
    def setup(ws: Path) -> None:
        path = ws / "coll" / rel
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))
    return setup


def bases_of(ws: Path, adapter: str, module_index: int = 0) -> str:
    manifest = json.loads((ws / "coll" / "collection.json").read_text())
    entry = next(a for a in manifest["adapters"] if a["name"] == adapter)
    return manifest["modules"][module_index]["bases"][entry["clusters"][module_index]]["path"]


def link_bases_outside(ws: Path) -> None:
    """A bases file replaced by a link to a copy outside the collection: same bytes, so the sha256 matches."""
    rel = bases_of(ws, "a0")
    shutil.copy(ws / "coll" / rel, ws / "secret.safetensors")
    (ws / "coll" / rel).unlink()
    (ws / "coll" / rel).symlink_to(ws / "secret.safetensors")


def first_adapter(field: str, value) -> Callable[[dict], None]:
    return lambda m: m["adapters"][0].update({field: value})


def first_module(change: Callable[[dict], Any]) -> Callable[[dict], None]:
    return lambda m: change(m["modules"][0])


def pickle_only(folder: Path) -> None:
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()


def wider_adapter(ws: Path) -> None:
    (adapter,) = synthetic_adapters(1, llama_modules(2, 64, 16), rank=2)
    save_adapters([adapter], ws)[0].rename(ws / "wide-lora")


def with_renamed_adapter(name: str) -> JDLoraCollection:
    collection = load()
    collection.adapters[0].name = name
    return collection


class Overflowing:
    """An opened adapter whose update is finite but overflows float32 (huge factors, no file to check)."""

    def __init__(self, inner):
        self._inner, self.name = inner, "overflowing"

    def __getattr__(self, attr):
        return getattr(self._inner, attr)

    def read_module(self, module, dtype=torch.float32):
        a, b = self._inner.read_module(module, dtype)
        return a * 1e20, b * 1e20


def overflowing_compress(ws: Path):
    sources = synthetic_adapters(3, MODULES, rank=2)
    return jdlora.compress([Overflowing(sources[0]), *sources[1:]], rank=2, progress=False)


def tiny_llama(layers: int = 2):
    """A random Llama with the shapes of MODULES (hidden 48, key/value 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=32, num_hidden_layers=layers,
                                        num_attention_heads=3, num_key_value_heads=1, vocab_size=16))


def peft_load(*args, **kwargs):
    from peft import PeftModel

    return PeftModel.from_pretrained(tiny_llama(), *args, **kwargs)


def adapter_config_bases(rel: str) -> Callable[[Path], None]:
    """Points every bases entry of adapters/a0/adapter_config.json (what a PEFT subfolder load reads) at ``rel``."""
    def setup(ws: Path) -> None:
        path = ws / "coll" / "adapters" / "a0" / "adapter_config.json"
        config = json.loads(path.read_text())
        config["bases"] = {m: dict(entry, path=rel) for m, entry in config["bases"].items()}
        path.write_text(json.dumps(config))
    return setup


def nothing(ws: Path) -> None:
    pass


# ------------------------------------------------------------------------------------------- the table


@dataclass
class Fault:
    fault: str
    api: Callable[[], Any]
    cli: list[str] | None
    error: type[Exception]
    match: str
    setup: Callable[[Path], None] = nothing
    hub: bool = False


FAULTS = [
    # ---- data loss: a save never replaces what is not a collection ----------------------------------------
    Fault("save into a folder of other files",
          lambda: load().save_pretrained("project"), ["compress", *INPUTS, "--out", "project"],
          TargetExistsError, "project exists and is not a jdlora collection"),
    Fault("save onto a regular file",
          lambda: load().save_pretrained("file.txt"), ["compress", *INPUTS, "--out", "file.txt"],
          TargetExistsError, "file.txt exists and is a file"),
    Fault("compress ./adapters/* --out ./adapters (the inputs)",
          lambda: load().save_pretrained("adapters"), ["compress", *INPUTS, "--out", "adapters"],
          TargetExistsError, "adapters exists and is not a jdlora collection"),
    Fault("save onto a collection that also holds the user's files",
          lambda: load().save_pretrained("coll"), ["add", "coll", "adapters/a3"],
          TargetExistsError, "also holds notes.txt", setup=lambda ws: (ws / "coll" / "notes.txt").write_text("x")),
    Fault("save through a symbolic link",
          lambda: load().save_pretrained("link"), ["compress", *INPUTS, "--out", "link"],
          TargetExistsError, "link is a symbolic link", setup=lambda ws: (ws / "link").symlink_to(ws / "coll")),
    Fault("export a LoRA onto a folder of other files",
          lambda: load().export_lora("a0", "project"), ["export-lora", "coll", "a0", "project"],
          TargetExistsError, "project exists and is a folder holding notes.txt"),
    Fault("add an adapter with NaN in its last module",
          lambda: load().add_adapters(["nan-lora"]), ["add", "coll", "nan-lora"],
          NonFiniteWeightsError, "nan-lora",
          setup=adapter_copy("nan-lora", tensor_edit(lora_key(LAST, "lora_B"), lambda t: t.view(-1)[0].fill_(float("nan"))))),
    Fault("remove an unknown adapter along with a known one",
          lambda: load().remove_adapters(["a1", "a9"]), None, UnknownAdapterError, "a9"),
    # ---- security: a collection is untrusted input --------------------------------------------------------
    Fault("manifest adapter name ../../victim-lora",
          lambda: load(), ["add", "coll", "adapters/a3"],
          UnsafePathError, "adapter name '../../victim-lora'", setup=manifest_edit(first_adapter("name", "../../victim-lora"))),
    Fault("manifest adapter subfolder ../../outside-dir",
          lambda: load(adapters=["a0"]), ["export-lora", "coll", "a0", "out"],
          UnsafePathError, "'../../outside-dir'", setup=manifest_edit(first_adapter("subfolder", "../../outside-dir"))),
    Fault("manifest bases path /etc/passwd",
          lambda: load(), ["inspect", "coll"],
          UnsafePathError, "'/etc/passwd'",
          setup=manifest_edit(first_module(lambda m: m["bases"][0].update(path="/etc/passwd")))),
    Fault("manifest sigma path ../secret.safetensors",
          lambda: load(), ["inspect", "coll"],
          UnsafePathError, "'../secret.safetensors'",
          setup=manifest_edit(first_module(lambda m: m["sigma"].update(path="../secret.safetensors")))),
    Fault("manifest module name with /../",
          lambda: load(), ["inspect", "coll"],
          UnsafePathError, "module name 'model/../../x'", setup=manifest_edit(first_module(lambda m: m.update(name="model/../../x")))),
    Fault("bases file is a link out of the collection (sha256 matches)",
          lambda: load(), ["export-lora", "coll", "a0", "out"],
          UnsafePathError, "outside the collection", setup=link_bases_outside),
    Fault("origin folder ../elsewhere",
          lambda: load(), ["inspect", "coll"],
          UnsafePathError, "folder '../elsewhere'", setup=manifest_edit(first_adapter("origin", {"folder": "../elsewhere"}))),
    Fault("adapter config bases path ../victim-lora/... (PEFT subfolder load)",
          lambda: peft_load("coll", subfolder="adapters/a0"), None,
          UnsafePathError, "'../victim-lora/adapter_model.safetensors'",
          setup=adapter_config_bases("../victim-lora/adapter_model.safetensors")),
    Fault("in-memory adapter name ../../victim-lora, saved",
          lambda: with_renamed_adapter("../../victim-lora").save_pretrained("coll"), None,
          UnsafePathError, "adapter name '../../victim-lora'"),
    Fault("in-memory adapter name ../../victim-lora, pushed to the Hub",
          lambda: with_renamed_adapter("../../victim-lora").push_to_hub(REPO, progress=False), None,
          UnsafePathError, "adapter name '../../victim-lora'", hub=True),
    # ---- errors that must say what is wrong -----------------------------------------------------------------
    Fault("missing local path bad/missing (bad/ exists)",
          lambda: jdlora.compress(["bad/missing", *INPUTS], progress=False), ["compress", "bad/missing", *INPUTS],
          AdapterFormatError, "No adapter folder at .*bad/missing"),
    Fault("missing collection folder ./nope",
          lambda: load("./nope"), ["inspect", "./nope"], CollectionFormatError, "No collection folder at .*nope"),
    Fault("collection path is a file",
          lambda: load("file.txt"), ["inspect", "file.txt"], CollectionFormatError, "file.txt is a file"),
    Fault("nope/coll: no such folder, no such Hub repo",
          lambda: load("nope/coll"), ["inspect", "nope/coll"],
          CollectionFormatError, "not a local folder .* nor a Hub repo", hub=True),
    Fault("rank=0", lambda: jdlora.compress(INPUTS, rank=0, progress=False), ["compress", *INPUTS, "--rank", "0"],
          SettingsError, "rank=0 is not allowed"),
    Fault("rank=-1", lambda: jdlora.compress(INPUTS, rank=-1, progress=False), ["compress", *INPUTS, "--rank", "-1"],
          SettingsError, "rank=-1 is not allowed"),
    Fault('rank="16"', lambda: jdlora.compress(INPUTS, rank="16", progress=False), None,
          SettingsError, "rank='16' is not allowed"),
    Fault("clusters=0", lambda: jdlora.compress(INPUTS, rank=2, clusters=0, progress=False),
          ["compress", *INPUTS, "--clusters", "0"], SettingsError, "clusters=0 is not allowed"),
    Fault("no adapters", lambda: jdlora.compress([], progress=False), None, SettingsError, "No adapters to compress"),
    Fault('sigma="dense"', lambda: jdlora.compress(INPUTS, sigma="dense", progress=False), None,
          SettingsError, "sigma_kind='dense' is not allowed"),
    Fault("delta_weight of a module the collection lacks",
          lambda: load().delta_weight("a0", "model.layers.0.self_attn.q_prj"), None,
          UnknownModuleError, "Unknown module 'model.layers.0.self_attn.q_prj' in the collection. Did you mean"),
    Fault("bytes flipped in an adapter's tensor data (1.96e24)",
          lambda: jdlora.compress([*INPUTS, "flipped-lora"], progress=False), ["compress", *INPUTS, "flipped-lora"],
          NonFiniteWeightsError, "flipped-lora.*1.96e\\+24",
          setup=adapter_copy("flipped-lora", write_value(lora_key(LAST, "lora_A"), 1.96e24))),
    Fault("an update that overflows float32 (opened in memory)",
          lambda: overflowing_compress(None), None, NonFiniteWeightsError, "'overflowing'"),
    # ---- already handled before: kept here so that they stay handled ----------------------------------------
    Fault("adapter folder without adapter_config.json",
          lambda: jdlora.compress([*INPUTS, "empty-lora"], progress=False), ["compress", *INPUTS, "empty-lora"],
          AdapterFormatError, "empty-lora has no adapter_config.json", setup=lambda ws: (ws / "empty-lora").mkdir()),
    Fault("adapter_config.json is not JSON",
          lambda: jdlora.compress([*INPUTS, "bad-json"], progress=False), ["compress", *INPUTS, "bad-json"],
          AdapterFormatError, "adapter_config.json is not valid JSON",
          setup=adapter_copy("bad-json", lambda f: (f / "adapter_config.json").write_text("{nope"))),
    Fault("truncated adapter safetensors",
          lambda: jdlora.compress([*INPUTS, "cut-lora"], progress=False), ["compress", *INPUTS, "cut-lora"],
          AdapterFormatError, "cut-lora.*truncated",
          setup=adapter_copy("cut-lora", lambda f: (f / "adapter_model.safetensors").write_bytes(
              (f / "adapter_model.safetensors").read_bytes()[:-100]))),
    Fault("NaN in an adapter",
          lambda: jdlora.compress([*INPUTS, "nan-lora"], progress=False), ["compress", *INPUTS, "nan-lora"],
          NonFiniteWeightsError, "nan-lora",
          setup=adapter_copy("nan-lora", tensor_edit(lora_key(LAST, "lora_B"), lambda t: t.view(-1)[0].fill_(float("nan"))))),
    Fault("pickle-only adapter",
          lambda: jdlora.compress([*INPUTS, "pickle-lora"], progress=False), ["compress", *INPUTS, "pickle-lora"],
          UnsafeAdapterError, "pickle-lora.*allow_pickle", setup=adapter_copy("pickle-lora", pickle_only)),
    Fault("DoRA adapter",
          lambda: jdlora.compress([*INPUTS, "dora-lora"], progress=False), ["compress", *INPUTS, "dora-lora"],
          AdapterFormatError, "DoRA", setup=adapter_copy("dora-lora", config_edit(use_dora=True))),
    Fault("adapters for different base models",
          lambda: jdlora.compress([*INPUTS, "other-base"], progress=False), ["compress", *INPUTS, "other-base"],
          IncompatibleAdaptersError, "different base models",
          setup=adapter_copy("other-base", config_edit(base_model_name_or_path="org/another-model"))),
    Fault("module shapes that disagree",
          lambda: jdlora.compress([*INPUTS, "wide-lora"], progress=False), ["compress", *INPUTS, "wide-lora"],
          IncompatibleAdaptersError, "wide-lora", setup=wider_adapter),
    Fault("unknown adapter name",
          lambda: load(adapters=["a9"]), ["export-lora", "coll", "a9", "out"], UnknownAdapterError, "a9"),
    Fault("newer major format version",
          lambda: load(), ["inspect", "coll"], CollectionFormatError, "version 2.0.*Upgrade jdlora",
          setup=manifest_edit(lambda m: m.update(format_version="2.0"))),
    Fault("collection.json is not JSON",
          lambda: load(), ["inspect", "coll"], CollectionFormatError, "collection.json is not valid JSON",
          setup=lambda ws: (ws / "coll" / "collection.json").write_text("{nope")),
    Fault("a flipped byte in a bases file",
          lambda: load(), ["export-lora", "coll", "a0", "out"], CollectionIntegrityError, "bases/.*safetensors has sha256",
          setup=lambda ws: flip_byte(bases_of(ws, "a0"))(ws)),
    Fault("a flipped byte in a Sigma stack",
          lambda: load(), ["add", "coll", "adapters/a3"], CollectionIntegrityError, "sigma/.*safetensors has sha256",
          setup=flip_byte(f"sigma/{LAST}.safetensors")),
    Fault("a flipped byte in an adapter's own file",
          lambda: load(adapters=["a0"]), ["export-lora", "coll", "a0", "out"],
          CollectionIntegrityError, "adapters/a0/adapter_model.safetensors has sha256",
          setup=flip_byte("adapters/a0/adapter_model.safetensors")),
    Fault("a bases file is missing",
          lambda: load(), ["add", "coll", "adapters/a3"], CollectionFormatError, "is missing",
          setup=lambda ws: (ws / "coll" / bases_of(ws, "a0")).unlink()),
]


def _id(fault: Fault) -> str:
    return fault.fault


@pytest.mark.parametrize("fault", FAULTS, ids=_id)
def test_api_raises_the_named_error_and_changes_nothing(fault, ws, request):
    hub = request.getfixturevalue("hub") if fault.hub else None
    fault.setup(ws)
    before = snapshot(ws)
    with pytest.raises(fault.error, match=fault.match):
        fault.api()
    assert snapshot(ws) == before
    if hub is not None:
        assert not hub.commit_log, "nothing may reach the Hub"


@pytest.mark.parametrize("fault", [f for f in FAULTS if f.cli], ids=_id)
def test_command_exits_2_with_the_error_and_changes_nothing(fault, ws, request, capsys):
    if fault.hub:
        request.getfixturevalue("hub")
    fault.setup(ws)
    before = snapshot(ws)
    assert main(fault.cli) == 2
    err = capsys.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("jdlora: error: ")]
    assert len(message) == 1 and "Traceback" not in err, err
    assert re.search(fault.match, message[0]), err
    assert snapshot(ws) == before


# ------------------------------------------------------------------ faults that need more than a row


def test_failed_add_leaves_the_collection_as_it_was(ws):
    adapter_copy("nan-lora", tensor_edit(lora_key(LAST, "lora_B"), lambda t: t.view(-1)[0].fill_(float("nan"))))(ws)
    collection = load()
    errors, names = collection.adapter_errors(), collection.adapter_names
    rows = {m: e.adapter_ids.clone() for m, e in collection.modules.items()}
    with pytest.raises(NonFiniteWeightsError, match=f"nan-lora.*{LAST}"):
        collection.add_adapters(["adapters/a3", "nan-lora"])
    assert collection.adapter_names == names and collection.adapter_errors() == errors
    for module, entry in collection.modules.items():
        assert torch.equal(entry.adapter_ids, rows[module])
        assert len(entry.compression.sigma) == len(entry.compression.cluster) == len(rows[module])
    collection.save_pretrained("coll", progress=False)  # and it still saves (it failed with IndexError before)
    assert load().adapter_names == names


def test_a_killed_save_leaves_a_temporary_folder_that_the_next_save_removes(ws):
    """A real ``kill -9`` halfway through a save; the next save cleans up, and leaves other folders alone."""
    script = textwrap.dedent("""
        import time, jdlora.format.save as save
        from jdlora import JDLoraCollection
        real = save.save_file
        def slow(*args, **kwargs):
            real(*args, **kwargs)
            print("writing", flush=True)
            time.sleep(60)
        save.save_file = slow
        JDLoraCollection.from_pretrained("coll").save_pretrained("coll", progress=False)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.kill()
        child.wait()
    left = [p.name for p in ws.iterdir() if p.name.startswith(".coll.tmp-")]
    assert len(left) == 1, "the killed save left its temporary folder"
    live = ws / f".coll.tmp-{left[0].split('-')[1]}-{os.getpid()}-0123abcd"  # a save still running here
    foreign = [ws / ".coll.tmp-mine", ws / ".other.tmp-abcdef-1-0123abcd"]  # not ours to remove
    for folder in (live, *foreign):
        folder.mkdir()
    before = load().adapter_names
    load().save_pretrained("coll", progress=False)
    assert not (ws / left[0]).exists()
    assert live.is_dir() and all(f.is_dir() for f in foreign)
    assert load().adapter_names == before


def test_a_missing_local_path_fails_at_once_without_the_hub(ws, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "http://192.0.2.1:9")  # unroutable: a Hub lookup would hang and retry
    start = time.perf_counter()
    with pytest.raises(AdapterFormatError, match="No adapter folder"):
        jdlora.compress(["bad/missing"], progress=False)
    with pytest.raises(CollectionFormatError, match="No collection folder"):
        load("bad/missing")
    assert time.perf_counter() - start < 5


def test_an_id_that_is_no_folder_with_the_hub_unreachable_says_both(ws, monkeypatch):
    import huggingface_hub.constants as hfc

    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)  # as good as unreachable, without the client's retries
    with pytest.raises(CollectionFormatError, match="'cbad/nope' is not a local folder .* Hub is unreachable"):
        load("cbad/nope")  # it used to say "cbad/nope has no collection.json"
    with pytest.raises(AdapterFormatError, match="no local folder .*cbad.*Hub is unreachable"):
        jdlora.compress(["cbad/nope"], progress=False)


def test_origins_name_folders_never_local_paths(ws, capsys):
    text = "".join(p.read_text() for p in (ws / "coll").glob("*") if p.is_file())
    assert str(ws) not in text and "/adapters/a0" not in text
    manifest = json.loads((ws / "coll" / "collection.json").read_text())
    assert [a["origin"]["folder"] for a in manifest["adapters"]] == ["a0", "a1", "a2"]
    assert main(["inspect", "coll"]) == 0
    out = capsys.readouterr().out
    assert "a0" in out and str(ws) not in out


def test_local_paths_of_old_manifests_are_cut_to_folder_names(ws):
    manifest_edit(first_adapter("origin", {"path": "/home/alice/loras/a0", "sha256": "0" * 64}))(ws)
    assert load().adapters[0].origin == {"folder": "a0", "sha256": "0" * 64}
    load().save_pretrained("coll", progress=False)
    assert "/home/alice" not in (ws / "coll" / "collection.json").read_text()
    assert "/home/alice" not in (ws / "coll" / "README.md").read_text()


def test_recompress_finds_local_originals_by_folder_name_and_checks_their_sha256(ws):
    collection = load()
    with pytest.raises(AdapterFormatError, match="folder named 'a0'.*adapters_dir="):
        jdlora.recompress(collection)
    again = jdlora.recompress(collection, adapters_dir="adapters")
    assert again.adapter_names == ["a0", "a1", "a2"] and again.settings["rank"] == 2
    shutil.rmtree(ws / "adapters" / "a1")
    shutil.copytree(ws / "adapters" / "a3", ws / "adapters" / "a1")  # another adapter under the same name
    with pytest.raises(AdapterFormatError, match="'a1'.*sha256"):
        jdlora.recompress(collection, adapters_dir="adapters")


def test_a_model_that_lacks_a_module_of_the_collection_says_so(ws):
    from peft import PeftModel

    lacking = r"The model has no module 'model\.layers\.1\.self_attn\.[qkv]_proj', which the collection"
    with pytest.raises(UnknownModuleError, match=lacking):
        PeftModel.from_pretrained(tiny_llama(layers=1), "coll")


def test_docs_list_every_fault_of_the_table():
    """docs/safety.md shows users this table: a row added here must be added there."""
    rows = {line.split("|")[1].strip() for line in (Path(__file__).parents[1] / "docs" / "safety.md").read_text()
            .splitlines() if line.startswith("| ")}
    assert [f.fault for f in FAULTS if f.fault not in rows] == []
