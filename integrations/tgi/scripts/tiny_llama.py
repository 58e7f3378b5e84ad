"""A tiny random Llama as a model folder TGI's server loads (config, word-level tokenizer, safetensors).

Used by ``graph_warmup_check.py`` (on the GPU) and ``tests/test_tgi_e2e.py`` (TGI's CPU server), so that both
build the model the same way; each passes its own sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def projection_modules(c: dict) -> dict[str, tuple[int, int]]:
    """``{module: (d_out, d_in)}`` of the seven adapted projections of every layer of config ``c``."""
    h, kv, i = c["hidden_size"], c["num_key_value_heads"] * c["head_dim"], c["intermediate_size"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}
    return {f"model.layers.{layer}.{s}": shape
            for layer in range(c["num_hidden_layers"]) for s, shape in shapes.items()}


def write_tiny_llama(root: Path, c: dict, *, logit_scale: float = 1.0,
                     transformers4_tokenizer: bool = False) -> dict[str, torch.Tensor]:
    """Writes a random Llama of config ``c`` (hidden/intermediate sizes, heads, vocab) into ``root``; returns
    its weights (float32, seed 0).

    Args:
        logit_scale: gain of ``lm_head`` (larger: more peaked next-token distributions).
        transformers4_tokenizer: name the tokenizer class ``PreTrainedTokenizerFast`` in
            ``tokenizer_config.json``, as transformers 4.x (TGI 3.3.7's pin) expects; transformers 5 writes its own.
    """
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({
        **c, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32"}))
    vocab = {w: i for i, w in enumerate(["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(c["vocab_size"] - 3)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                            model_max_length=c["max_position_embeddings"]).save_pretrained(root)
    if transformers4_tokenizer:
        config = json.loads((root / "tokenizer_config.json").read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.pop("backend", None)
        (root / "tokenizer_config.json").write_text(json.dumps(config))

    g = torch.Generator().manual_seed(0)
    h = c["hidden_size"]
    weights = {f"{m}.weight": torch.randn(*shape, generator=g) / shape[1] ** 0.5
               for m, shape in projection_modules(c).items()}
    weights["model.embed_tokens.weight"] = torch.randn(c["vocab_size"], h, generator=g)
    weights["lm_head.weight"] = torch.randn(c["vocab_size"], h, generator=g) * logit_scale / h ** 0.5
    for name in ["model.norm"] + [f"model.layers.{layer}.{n}" for layer in range(c["num_hidden_layers"])
                                  for n in ("input_layernorm", "post_attention_layernorm")]:
        weights[f"{name}.weight"] = torch.ones(h)
    save_file(weights, root / "model.safetensors")
    return weights
