"""Print one test example of every task, grouped by category (used in the docs).

    python -m benchmarks.quality.show_tasks            # from the repository root
    python benchmarks/quality/show_tasks.py --markdown  # a Markdown table instead
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.quality.tasks import TASKS, task_splits  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.markdown:
        print("| task | category | instruction | input | output |\n| --- | --- | --- | --- | --- |")
    category = None
    for task in sorted(TASKS, key=lambda t: t.category):  # stable: keeps the suite's order within a category
        ex = task_splits(task, n_train=0, n_val=0, n_test=1, seed=args.seed)["test"][0]
        if args.markdown:
            cells = (f"`{task.name}`", task.category, task.instruction, f"`{ex.input}`", f"`{ex.output}`")
            print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
            continue
        if task.category != category:
            category = task.category
            print(f"\n== {category} ({sum(t.category == category for t in TASKS)} tasks)")
        print(f"{task.name:28s} {ex.input!r:60s} -> {ex.output!r}")
    if not args.markdown:
        print(f"\n{len(TASKS)} tasks")


if __name__ == "__main__":
    main()
