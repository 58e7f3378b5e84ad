"""Every graph break and recompilation of ``generate`` with mixed adapters and a static cache, on this machine's
torch: transformers compiles the decode step (``fullgraph=False`` here, so dynamo goes on after a break and every
reason is listed, where tests/test_compile.py stops at the first). A check of a torch version before a GPU run.

    python -m benchmarks.serving.breaks [--device cuda] [--dtype bfloat16]

Prints the graphs compiled, dynamo's graph-break reasons with their counts, and whether each row equals that row
generated alone, eagerly. Exit status 1 when there is a break, a recompilation or a wrong row.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch
from transformers import CompileConfig

from jdlora.tuner import load_collection

from .jd import adapter_name, synthetic_collection
from .model import adapted_modules, build_model, model_config
from .settings import JDSetting


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--mixes", type=int, default=3)
    args = parser.parse_args(argv)
    model_shape = model_config(tiny=True)  # the serving benchmarks' tiny Mistral, 6 synthetic adapters in 2 clusters
    base = build_model(model_shape, "cpu", torch.float32)
    collection = synthetic_collection(adapted_modules(model_shape), 6, JDSetting(8, 2))
    model = load_collection(base, collection).to(args.device, getattr(torch, args.dtype))
    names = [adapter_name(i) for i in range(6)]
    graphs = []

    def backend(gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    config = CompileConfig(backend=backend, fullgraph=False, mode=None)
    config._compile_all_devices = True  # transformers' switch for compiling on CPU
    ids = torch.randint(3, model_shape.vocab_size, (3, 6)).to(args.device)
    wrong = 0

    def generate(ids, mix, **kwargs):
        with torch.no_grad():
            return model.generate(input_ids=ids, adapter_names=mix, max_new_tokens=4, min_new_tokens=4,
                                  do_sample=False, **kwargs)

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for _ in range(args.mixes):
        mix = random.sample(names, 2) + ["__base__"]
        random.shuffle(mix)
        out = generate(ids, mix, cache_implementation="static", compile_config=config)
        for i, name in enumerate(mix):
            wrong += not torch.equal(out[i], generate(ids[i:i + 1], [name])[0])
    breaks = dict(torch._dynamo.utils.counters["graph_break"])
    print(f"torch {torch.__version__} on {args.device} ({args.dtype}): {len(graphs)} graph(s) over {args.mixes} mixes, "
          f"{len(breaks)} graph-break reason(s), {wrong} wrong row(s)")
    for reason, count in breaks.items():
        print(f"--- {count}x: {reason}")
    ops = sorted({str(n.target) for gm in graphs for n in gm.graph.nodes if "jdlora" in str(n.target)})
    print("jdlora ops in the graphs:", ", ".join(ops) or "none")
    return int(bool(breaks) or len(graphs) != 1 or wrong > 0)


if __name__ == "__main__":
    sys.exit(main())
