"""A PEFT user gets LoRA's behaviour from JD-LoRA: every test runs stock PEFT LoRA the same way, as the
reference, on tiny models built from configs (Llama, OPT, Qwen2, an MLP; nothing is downloaded)."""

from __future__ import annotations

import copy
import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import jdlora
from jdlora.synthetic import llama_modules, synthetic_adapters
from jdlora.tuner import JDLoraConfig, load_collection

pytestmark = pytest.mark.usefixtures("one_thread")

ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)),
    "opt": lambda: OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=64,
                                            word_embed_proj_dim=32)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)),
}
METHODS = ["lora", "jdlora"]


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.relu, self.lin1 = nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8)

    def forward(self, x):
        return self.lin1(self.relu(self.lin0(x)))


def base_model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return (MLP() if arch == "mlp" else ARCHS[arch]()).eval()


def config(method: str, seed: int = 0, **kwargs):
    """A random (not identity) adapter of either method on q_proj/v_proj (lin0/lin1 for the MLP)."""
    if method == "lora":
        return LoraConfig(r=4, init_lora_weights=False, **kwargs)
    return JDLoraConfig(r=4, init_weights=False, bases_seed=seed, **kwargs)


def targets(arch: str) -> list[str]:
    return ["lin0", "lin1"] if arch == "mlp" else ["q_proj", "v_proj"]


def make(arch: str, method: str, seed: int = 0, name: str = "default", **kwargs):
    torch.manual_seed(seed + 100)
    return get_peft_model(base_model(arch), config(method, seed, target_modules=targets(arch), **kwargs),
                          adapter_name=name).eval()


def inputs(arch: str):
    gen = torch.Generator().manual_seed(1)
    if arch == "mlp":
        return {"x": torch.randn(3, 16, generator=gen)}
    return {"input_ids": torch.randint(1, 96, (3, 5), generator=gen)}


def out(model, arch: str, **kwargs):
    with torch.no_grad():
        result = model(**inputs(arch), **kwargs)
    return result if arch == "mlp" else result.logits


def same(a, b):
    return torch.allclose(a, b, atol=1e-6, rtol=0)


# ----- 1-4: loading what save_pretrained wrote -------------------------------------------------------


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("method", METHODS)
def test_from_pretrained_with_an_adapter_name_gives_that_adapter_its_weights(method, arch, tmp_path):
    model = make(arch, method)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(base_model(arch), tmp_path, adapter_name="foo")
    assert loaded.active_adapters == ["foo"] and list(loaded.peft_config) == ["foo"]
    assert same(out(loaded, arch), out(model, arch))
    assert not same(out(loaded, arch), out(base_model(arch), arch))  # not the base model's outputs


@pytest.mark.parametrize("method", METHODS)
def test_load_adapter_into_an_existing_adapter_loads_the_new_weights(method, tmp_path):
    first, second = make("llama", method, seed=0), make("llama", method, seed=1)  # other Sigma, other bases
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path / "first")
    loaded.load_adapter(tmp_path / "second", adapter_name="default")
    assert same(out(loaded, "llama"), out(second, "llama"))
    with pytest.raises(ValueError):  # a path that does not exist is not "all keys matched"
        loaded.load_adapter(tmp_path / "missing", adapter_name="default")


@pytest.mark.parametrize("method", METHODS)
def test_load_adapter_under_another_name_adds_a_second_adapter(method, tmp_path):
    first, second = make("llama", method, seed=0), make("llama", method, seed=1)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path / "first")
    loaded.load_adapter(tmp_path / "second", adapter_name="other")
    assert set(loaded.peft_config) == {"default", "other"} and loaded.active_adapters == ["default"]
    assert same(out(loaded, "llama"), out(first, "llama"))
    loaded.set_adapter("other")
    assert same(out(loaded, "llama"), out(second, "llama"))
    mixed = out(loaded, "llama", adapter_names=["default", "other", "__base__"])
    assert same(mixed[1], out(second, "llama")[1]) and same(mixed[0], out(first, "llama")[0])


@pytest.mark.parametrize("method", METHODS)
def test_peft_readers_and_a_given_config_read_a_saved_folder(method, tmp_path):
    model = make("mlp", method)
    model.save_pretrained(tmp_path)
    weights = load_peft_weights(str(tmp_path), device="cpu")
    assert weights and all(k.startswith("base_model.model.") for k in weights)
    # a config built by hand (for JD-LoRA with other placeholder bases): the weights file decides
    given = config(method, seed=7, target_modules=targets("mlp"))
    loaded = PeftModel.from_pretrained(base_model("mlp"), str(tmp_path), config=given)
    assert same(out(loaded, "mlp"), out(model, "mlp"))
    fresh = get_peft_model(base_model("mlp"), config(method, seed=7, target_modules=targets("mlp")))
    result = set_peft_model_state_dict(fresh, weights)
    assert not result.unexpected_keys
    assert same(out(fresh.eval(), "mlp"), out(model, "mlp"))
    reread = PeftConfig.from_pretrained(str(tmp_path))
    assert type(reread) is type(model.peft_config["default"])


# ----- 5-6: what save_pretrained writes --------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_modules_to_save_are_saved_and_loaded_for_sequence_classification(method, tmp_path):
    def classifier():
        torch.manual_seed(0)
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, num_labels=3, pad_token_id=0)).eval()

    torch.manual_seed(5)
    model = get_peft_model(classifier(), config(method, task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"]))
    head = model.base_model.model.score
    assert "score" in model.peft_config["default"].modules_to_save  # added by PEFT for SEQ_CLS
    with torch.no_grad():
        head.modules_to_save["default"].weight.normal_()
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(classifier(), tmp_path)
    assert same(out(loaded, "llama"), out(model, "llama"))


@pytest.mark.parametrize("method", METHODS)
def test_a_mixed_batch_gives_each_row_its_adapter_s_modules_to_save_head(method):
    """``adapter_names`` reach PEFT's ``modules_to_save`` wrappers too (the classifier head here): each row of a
    mixed batch equals that row run with its adapter alone, as with LoRA."""
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_labels=3, pad_token_id=0)).eval()
    torch.manual_seed(5)
    model = get_peft_model(base, config(method, task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"]))
    model.add_adapter("other", config(method, seed=1, task_type="SEQ_CLS", target_modules=["q_proj", "v_proj"]))
    head = model.base_model.model.score
    with torch.no_grad():
        for name in ("default", "other"):
            head.modules_to_save[name].weight.normal_()
    model.eval()
    mix = ["other", "__base__", "default"]
    mixed = out(model, "llama", adapter_names=mix)
    for i, name in enumerate(mix):  # the reference: the row alone, its adapter active (no adapter_names)
        row = {"input_ids": inputs("llama")["input_ids"][i:i + 1]}
        with torch.no_grad():
            if name == "__base__":
                with model.disable_adapter():
                    alone = model(**row).logits
            else:
                model.set_adapter(name)
                alone = model(**row).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, msg=lambda m: f"{method} {name}: {m}")


@pytest.mark.parametrize("method", METHODS)
def test_a_deleted_adapter_is_unknown_to_adapter_names_and_a_new_one_is_known(method):
    model = make("llama", method, name="kept")
    model.add_adapter("gone", config(method, seed=1, target_modules=targets("llama")))
    model.delete_adapter("gone")
    with pytest.raises(ValueError, match="non-existing adapter"):
        out(model, "llama", adapter_names=["kept", "gone", "kept"])
    model.add_adapter("new", config(method, seed=2, target_modules=targets("llama")))
    mixed = out(model, "llama", adapter_names=["new", "kept", "__base__"])
    model.set_adapter("new")
    assert same(mixed[0], out(model, "llama")[0])


@pytest.mark.parametrize("safe", [True, False])
def test_save_pretrained_writes_peft_layout_and_honours_safe_serialization(safe, tmp_path):
    written = {}
    for method in METHODS:
        model = make("mlp", method)
        model.add_adapter("second", config(method, seed=1, target_modules=targets("mlp")))
        model.save_pretrained(tmp_path / method, safe_serialization=safe)
        written[method] = sorted(str(p.relative_to(tmp_path / method)) for p in (tmp_path / method).rglob("*")
                                 if p.is_file())
    weights = "adapter_model.safetensors" if safe else "adapter_model.bin"
    assert written["jdlora"] == written["lora"]
    assert {"adapter_config.json", weights, f"second/adapter_config.json", f"second/{weights}"} <= set(
        written["jdlora"])
    saved = json.loads((tmp_path / "jdlora" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "JDLORA" and saved["bases_in_weights"] and "runtime_config" not in saved
    reloaded = PeftModel.from_pretrained(base_model("mlp"), tmp_path / "jdlora" / "second")
    model.set_adapter("second")
    assert same(out(reloaded, "mlp"), out(model, "mlp"))


# ----- 7-10: errors and initialisation as LoRA's --------------------------------------------------------


def test_unknown_adapter_names_raise_loras_message_naming_every_one():
    messages = {}
    for method in METHODS:
        model = make("llama", method, name="known")
        with pytest.raises(ValueError) as err:
            out(model, "llama", adapter_names=["known", "typo-b", "typo-a"])
        messages[method] = str(err.value)
    assert messages["lora"] == "Trying to infer with non-existing adapter(s): typo-a, typo-b"
    assert messages["jdlora"].startswith(messages["lora"])


@pytest.mark.parametrize("method", METHODS)
def test_random_init_follows_torch_manual_seed_and_two_adapters_differ(method):
    def sigma_or_b(model, name):
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if f".{name}" in n
                          and ("jd_sigma" in n or "lora_B" in n)])

    cfg = config(method, target_modules=targets("mlp"))
    torch.manual_seed(0)
    model = get_peft_model(base_model("mlp"), cfg)
    model.add_adapter("other", copy.deepcopy(cfg))
    assert not torch.equal(sigma_or_b(model, "default"), sigma_or_b(model, "other"))
    torch.manual_seed(0)
    again = get_peft_model(base_model("mlp"), cfg)
    assert torch.equal(sigma_or_b(again, "default"), sigma_or_b(model, "default"))


def test_a_failed_add_adapter_leaves_the_model_as_it_was():
    # each method's own failure: LoRA finds no target module; JD-LoRA's rank fits lin0 (16 in) but not lin1 (8 out)
    failing = {"lora": LoraConfig(r=4, target_modules=["missing"]),
               "jdlora": JDLoraConfig(r=12, target_modules=["lin0", "lin1"])}
    for method in METHODS:
        model = make("mlp", method)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError):
            model.add_adapter("bad", failing[method])
        after = model.state_dict()
        assert "bad" not in model.peft_config and after.keys() == before.keys(), method
        assert all(torch.equal(after[k], before[k]) for k in before), method
        model.add_adapter("bad", config(method, target_modules=targets("mlp")))  # the name is free again


def test_bias_set_after_construction_is_checked_when_the_adapter_is_injected(tmp_path):
    lora_config = config("lora", target_modules=["q_proj", "v_proj"])
    lora_config.bias = "all"
    lora = get_peft_model(base_model("opt"), lora_config)
    lora.save_pretrained(tmp_path)
    assert any(k.endswith(".bias") for k in load_peft_weights(str(tmp_path), device="cpu"))  # LoRA saves biases
    jd_config = config("jdlora", target_modules=["q_proj", "v_proj"])
    jd_config.bias = "all"  # JD-LoRA trains no bias: a clear error, not biases that train but are never saved
    with pytest.raises(ValueError, match="bias must be 'none'"):
        get_peft_model(base_model("opt"), jd_config)


# ----- 11: what a loaded model keeps -----------------------------------------------------------------


def test_a_model_loaded_from_a_collection_keeps_only_what_its_layers_use():
    modules = llama_modules(2, 32, 16, ("q_proj", "v_proj"))
    collection = jdlora.compress(synthetic_adapters(3, modules, rank=2, seed=0), rank=4, progress=False)
    ref = weakref.ref(collection)
    model = load_collection(base_model("llama"), collection)
    bases_from = JDLoraConfig(bases_from=collection)
    trained = get_peft_model(base_model("llama"), bases_from)
    assert all(c.runtime_config.collection is None and c.runtime_config.bases is None
               for m in (model, trained) for c in m.peft_config.values())
    del collection
    gc.collect()
    assert ref() is None  # neither model keeps the source collection alive
    assert len(model.peft_config) == 4 and len(trained.peft_config) == 1
    with pytest.raises(ValueError, match="released"):  # reusing the config: a clear error, not random bases
        get_peft_model(base_model("llama"), bases_from)


# ----- the package --------------------------------------------------------------------------------------


def test_jdloraconfig_imports_from_jdlora_without_importing_peft_first():
    code = ("import sys, jdlora\n"
            "assert 'peft' not in sys.modules\n"
            "config = jdlora.JDLoraConfig(r=2)\n"
            "from jdlora import JDLoraConfig\n"
            "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
            "assert PEFT_TYPE_TO_TUNER_MAPPING[config.peft_type].__name__ == 'JDLoraModel'\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # a tuner module imported first, before PEFT: registered all the same
    code = ("from jdlora.tuner.config import JDLoraConfig\n"
            "from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING\n"
            "assert PEFT_TYPE_TO_TUNER_MAPPING[JDLoraConfig().peft_type].__name__ == 'JDLoraModel'\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_constructing_a_config_registers_and_patches_nothing(monkeypatch):
    from jdlora.tuner import _peft_compat

    def fail():
        raise AssertionError("a config registered with PEFT")

    monkeypatch.setattr(_peft_compat, "register", fail)
    monkeypatch.setitem(_peft_compat._state, "done", False)
    methods = {name: getattr(PeftModel, name) for name in ("save_pretrained", "load_adapter", "push_to_hub")}
    JDLoraConfig(r=2, bases_from=None)
    assert {name: getattr(PeftModel, name) for name in methods} == methods


def test_a_config_saved_on_its_own_keeps_its_bases_source(tmp_path):
    JDLoraConfig(r=2, bases_from="org/collection", target_modules=["q_proj"]).save_pretrained(tmp_path)
    loaded = JDLoraConfig.from_pretrained(tmp_path)
    assert loaded.bases_from == "org/collection" and not loaded.bases_in_weights


def test_the_tuner_modules_import_each_other_without_a_cycle():
    import ast
    from pathlib import Path

    folder = Path(jdlora.__file__).parent / "tuner"
    graph = {}
    for path in folder.glob("*.py"):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                edges.update([node.module] if node.module else [a.name for a in node.names])
        graph[path.stem] = {e for e in edges if (folder / f"{e}.py").exists()}
    graph.pop("__init__")
    done, stack = set(), []

    def visit(name):
        assert name not in stack, f"import cycle: {' -> '.join(stack + [name])}"
        if name in done:
            return
        stack.append(name)
        for other in graph.get(name, ()):
            visit(other)
        stack.pop()
        done.add(name)

    for name in graph:
        visit(name)
    assert "_peft_compat" not in set().union(*graph.values())  # only the package's __init__ imports it
