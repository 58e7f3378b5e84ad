"""Compress a synthetic LoRA collection, save it, publish it, load it back (whole and one adapter), export one.

    HF_ENDPOINT=https://huggingface.co HF_TOKEN=hf_... python examples/publish_and_load.py your-name/jd-demo

The Hub endpoint comes from HF_ENDPOINT (the tests point it at a local Hub-protocol server).
"""

import argparse
import tempfile
from pathlib import Path

import jdlora
from jdlora import JDLoraCollection
from jdlora.synthetic import llama_modules, synthetic_adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("repo_id", help="Hub repo to publish to, e.g. your-name/jd-demo")
    parser.add_argument("--adapters", type=int, default=24)
    parser.add_argument("--workdir", default=None, help="where to save (default: a temporary folder)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="jdlora-example-"))

    # 1. A synthetic collection of rank-16 LoRAs on q/k/v of a 4-layer model, in families that share most of
    #    their directions (as trained LoRAs do), compressed jointly with the automatic settings: the cheapest
    #    rank and cluster count whose worst adapter keeps a relative error <= 0.05.
    adapters = synthetic_adapters(args.adapters, llama_modules(4, 256, 64), sharing=0.97, noise=0.01)
    collection = jdlora.compress(adapters)
    print(collection.summary())

    # 2. Save it (atomically) and publish it (one commit).
    local = collection.save_pretrained(workdir / "collection")
    info = collection.push_to_hub(args.repo_id)
    print(f"\nSaved to {local}; pushed to {info.commit_url if info else args.repo_id}")

    # 3. Load one adapter: only its own Sigma and the bases it uses are downloaded.
    name = collection.adapter_names[0]
    one = JDLoraCollection.from_pretrained(args.repo_id, adapters=[name])
    print(f"Loaded {one.adapter_names} ({len(one.modules)} modules)")

    # 4. Load the whole collection.
    whole = JDLoraCollection.from_pretrained(args.repo_id)
    print(f"Loaded {len(whole)} adapters, error {whole.error:.4f}")

    # 5. Export one adapter as a plain PEFT LoRA (loads without jdlora).
    path = whole.export_lora(name, workdir / f"{name}-lora")
    print(f"Exported {name} as a plain LoRA to {path}")


if __name__ == "__main__":
    main()
