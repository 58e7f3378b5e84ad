"""The served model: Mistral-7B's shapes with random weights (or a tiny one for CPU runs and tests)."""

from __future__ import annotations

import torch
from transformers import MistralConfig, MistralForCausalLM

from jdlora.synthetic import llama_modules

# Mistral-7B (Instruct v0.2, the paper's base model): no sliding window.
MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
                  rope_theta=1e6, sliding_window=None)
# Tiny, for CPU smoke runs and tests: k/v have 64 outputs, so JD rank 64 still fits.
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, sliding_window=None)


def model_config(tiny: bool = False) -> MistralConfig:
    return MistralConfig(**(TINY if tiny else MISTRAL_7B), pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_model(config: MistralConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0):
    """A randomly initialized model, created directly on ``device`` in ``dtype`` (no float32 copy)."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MistralForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def adapted_modules(config: MistralConfig) -> dict[str, tuple[int, int]]:
    """``{name: (d_out, d_in)}`` of q, k and v in every layer (the adapters' target modules)."""
    kv = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    return llama_modules(config.num_hidden_layers, config.hidden_size, kv)
