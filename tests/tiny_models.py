"""The tiny Llama that the tuner, sibling and compile tests share (tests/ is on sys.path, like hub_server)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

# hidden 64, 4 query heads and 2 key/value heads of 16: q, o 64 x 64, k, v 32 x 64; gate, up 96 x 64
TINY_LLAMA = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, pad_token_id=0)


def tiny_llama() -> LlamaForCausalLM:
    """:data:`TINY_LLAMA` with seed-0 weights, in eval mode."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).eval()
