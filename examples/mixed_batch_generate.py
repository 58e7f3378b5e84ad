"""Load a compressed collection with PEFT and generate for a batch whose rows use different adapters.

    python examples/mixed_batch_generate.py                                  # offline demo, tiny random Llama
    python examples/mixed_batch_generate.py --base HuggingFaceTB/SmolLM2-135M-Instruct --collection org/coll

Without arguments it builds everything itself (a tiny random Llama, synthetic LoRAs compressed with
jdlora and saved as a collection), so it runs offline; the generated tokens are then meaningless, but each
row's are exactly those of that adapter run alone, which the script checks.
"""

import argparse
import tempfile
import time

import torch

import jdlora  # registers JD-LoRA with PEFT


def offline_demo(workdir: str):
    """A tiny random Llama and a saved collection of 8 synthetic LoRAs on its q/k/v/o projections."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from jdlora.synthetic import llama_modules, synthetic_adapters

    # A 128-wide model: splitting its tiny products across threads costs more than it saves (the threads
    # spin against each other, badly so on a busy machine), as jdlora.compress.threads explains for compression.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    base = LlamaForCausalLM(config).eval()
    adapters = synthetic_adapters(8, llama_modules(4, 128, 64, ("q_proj", "k_proj", "v_proj", "o_proj")), rank=8)
    collection = jdlora.compress(adapters, rank=16, clusters=2, progress=False)
    print(collection.summary(), "\n")
    collection.save_pretrained(workdir, progress=False)
    prompts = torch.randint(1, 256, (4, 12), generator=torch.Generator().manual_seed(1))
    return base, workdir, None, prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="base model (Hub id or folder); default: offline demo")
    parser.add_argument("--collection", help="compressed collection (Hub id or folder)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several rows)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    args = parser.parse_args()

    from peft import PeftModel

    if args.base:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(args.base).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.base, padding_side="left")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompts = args.prompt or ["Write a haiku about the sea.", "What is 17 * 23?", "Say hello in French."]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True)
        source = args.collection
    else:
        base, source, tokenizer, prompts = offline_demo(tempfile.mkdtemp(prefix="jdlora-mixed-"))
        inputs = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}

    # Every adapter of the collection, each under its own name, in one bulk load.
    start = time.perf_counter()
    model = PeftModel.from_pretrained(base, source)
    adapters = [name for name in model.peft_config if name != "default"]
    print(f"Loaded {len(adapters)} adapters in {time.perf_counter() - start:.2f} s")

    # One row per adapter (cycling), and one row on the base model.
    rows = len(inputs["input_ids"])
    names = [adapters[i % len(adapters)] for i in range(rows - 1)] + ["__base__"]
    pad = 0 if tokenizer is None else tokenizer.pad_token_id
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=pad)
    with torch.no_grad():
        mixed = model.generate(**inputs, adapter_names=names, **kw)
        for i, name in enumerate(names):
            row = {k: v[i : i + 1] for k, v in inputs.items()}
            if name == "__base__":
                with model.disable_adapter():
                    alone = model.generate(**row, **kw)
            else:
                model.set_adapter(name)
                alone = model.generate(**row, **kw)
            new = mixed[i, inputs["input_ids"].shape[1]:]
            text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer else new.tolist()
            same = torch.equal(mixed[i : i + 1, -alone.shape[1]:], alone) if tokenizer is None else None
            print(f"[{name}] {text}" + ("" if same is None else f"   (same as alone: {same})"))
            if same is False:
                raise SystemExit(f"row {i} ({name}) differs from a run with that adapter alone")


if __name__ == "__main__":
    main()
