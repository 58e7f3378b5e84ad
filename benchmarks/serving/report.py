"""The study's outputs: a markdown table and the paper's Figures 1 and 4 (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

PATH_LABELS = {
    "base": "base model",
    "multi-lora": "multi-LoRA (K slots, LRU)",
    "multi-lora-all": "multi-LoRA (all resident)",
    "jd": "JD-LoRA",
}


def _find(runs: list[dict], **match) -> dict | None:
    for run in runs:
        if "stats" in run and all(run.get(k) == v for k, v in match.items()):
            return run
    return None


def base_throughput(runs: list[dict], memory: str) -> float | None:
    base = _find(runs, path="base", memory=memory)
    return base["stats"]["requests_per_s"] if base else None


def relative_to_base(run: dict, runs: list[dict]) -> float | None:
    """Throughput over the base model's, measured in the same device call where :func:`merge` recorded it."""
    base = run.get("base_requests_per_s") or base_throughput(runs, run["memory"])
    return run["stats"]["requests_per_s"] / base if base else None


def markdown(results: dict) -> str:
    """One table of every run (measured, failed or skipped): by memory mode, collection size, path."""
    runs = results["runs"]
    memories = results["setup"]["memories"]
    order = list(PATH_LABELS)
    ordered = sorted(runs, key=lambda r: (memories.index(r["memory"]), r["adapters"], order.index(r["path"]),
                                          r.get("setting") or ""))
    lines = [
        "| memory | adapters | path | JD setting | K | req/s | tok/s | vs base | batches | mean batch | "
        "distinct/batch | loads | evictions | swap s | prefill s | decode s | sched s | wall s | peak GiB |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in ordered:
        k = run.get("slots") or (f"({run['matched_slots']})" if run.get("matched_slots") else "-")
        where = f"| {run['memory']} | {run['adapters'] or '-'} | {PATH_LABELS[run['path']]} " \
                f"| {run.get('setting') or '-'} | {k} "
        if "stats" not in run:
            lines.append(where + f"| {run.get('error') or run.get('skipped')} |" + " |" * 13)
            continue
        s = run["stats"]
        rel = relative_to_base(run, runs)
        rel = f"{rel:.2f}" if rel else "-"
        truncated = "*" if s.get("truncated") else ""
        peak = f"{run['peak_gib']:.1f}" if "peak_gib" in run else "-"
        lines.append(
            where + f"| {s['requests_per_s']:.1f}{truncated} | {s['tokens_per_s']:.0f} | {rel} | {s['batches']} "
            f"| {s['mean_batch']:.1f} | {s['mean_distinct_adapters']:.1f} | {s['loads']} | {s['evictions']} "
            f"| {s['swap_s']:.2f} | {s['prefill_s']:.2f} | {s['decode_s']:.2f} | {s['schedule_s']:.3f} "
            f"| {s['wall_s']:.2f} | {peak} |"
        )
    notes = ["", "K: multi-LoRA slots; in parentheses for JD-LoRA, the K of the multi-LoRA run with the same memory. "
             "JD setting of a multi-LoRA row: the setting whose memory its K matches.",
             "`*`: the run reached its time limit; throughput over the requests it finished."]
    if results.get("skipped_note"):
        notes.append(results["skipped_note"])
    return "\n".join(lines + notes) + "\n"


def figure1(results: dict, path: Path) -> None:
    """Throughput relative to the base model against unique adapters: JD-LoRA vs multi-LoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if "stats" in r and r.get("figure1")]
    primary = results["setup"]["memories"][0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"capped": "-", "uncapped": "--"}
    colors = {"jd": "tab:blue", "multi-lora": "tab:orange", "multi-lora-all": "tab:green"}
    for memory in ("capped", "uncapped"):
        if not base_throughput(results["runs"], memory):  # no base run in this memory mode: nothing to plot against
            continue
        for kind in ("jd", "multi-lora", "multi-lora-all"):
            points = sorted((r["adapters"], relative_to_base(r, results["runs"]), r) for r in runs
                            if r["path"] == kind and r["memory"] == memory)
            if not points:
                continue
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            cap = results["setup"]["memory_cap_gib"]
            label = f"{PATH_LABELS[kind]}, " + (f"{cap:g} GiB cap" if memory == "capped" else "no cap")
            ax.plot(xs, ys, styles[memory], marker="o", color=colors[kind], label=label)
            if memory == primary:
                for x, y, run in points:
                    note = {"jd": run.get("setting"), "multi-lora": f"K={run.get('slots')}"}.get(kind, "")
                    ax.annotate(note, (x, y), textcoords="offset points", xytext=(0, 6), fontsize=7, ha="center")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("unique adapters")
    ax.set_ylabel("throughput / base model throughput")
    ax.set_title(f"Serving throughput ({results['setup']['model']}, {results['setup']['device_name']})", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def figure4_points(results: dict) -> dict[str, list[tuple[int, float]]]:
    """``{setting: [(adapters, JD throughput / memory-matched multi-LoRA throughput)]}``.

    Runs with the memory cap (without it where there was no cap, e.g. on a CPU).
    """
    runs = results["runs"]
    primary = results["setup"]["memories"][0]
    out: dict[str, list[tuple[int, float]]] = {}
    for jd in runs:
        if jd["path"] != "jd" or jd["memory"] != primary or "stats" not in jd:
            continue
        multi = _find(runs, path="multi-lora", memory=primary, adapters=jd["adapters"], slots=jd["matched_slots"])
        if multi:
            ratio = jd["stats"]["requests_per_s"] / multi["stats"]["requests_per_s"]
            out.setdefault(jd["setting"], []).append((jd["adapters"], ratio))
    return {k: sorted(v) for k, v in out.items()}


def figure4(results: dict, path: Path) -> None:
    """JD-LoRA / memory-matched multi-LoRA throughput against unique adapters, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = figure4_points(results)
    for setting in sorted(points, key=lambda s: (" " not in s, int(s.split("r")[-1]), s)):
        xs, ys = zip(*points[setting])
        ax.plot(xs, ys, marker="o", label=setting)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(ScalarFormatter())
    ax.set_xlabel("unique adapters")
    ax.set_ylabel("throughput JD-LoRA / multi-LoRA (same memory)")
    cap = results["setup"]["memory_cap_gib"]
    ax.set_title("Throughput ratio, " + (f"{cap:g} GiB cap" if cap else "no memory cap"), fontsize=10)
    ax.legend(fontsize=7, title="JD-Full setting", title_fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def merge(parts: list[dict]) -> dict:
    """One study from several runs of the command (e.g. sizes split over device calls).

    The first part's setup is kept (the others must match it but for sizes and budgets); a measured
    run of a later part replaces a skipped or failed run of the same group, and each part's base-model
    runs are kept only where no earlier part measured one. Every run remembers the base model's
    throughput of its own part (``base_requests_per_s``): the base model varies by several percent
    from one device call to the next, so "vs base" compares runs of one call.
    """
    key = ("memory", "path", "adapters", "setting")
    merged = {"setup": dict(parts[0]["setup"]), "runs": [], "parts": [p["setup"].get("command") for p in parts]}
    for part in parts:
        bases = {m: base_throughput(part["runs"], m) for m in ("capped", "uncapped")}
        for run in part["runs"]:
            if "stats" in run and not run.get("base_requests_per_s") and bases.get(run["memory"]):
                run = {**run, "base_requests_per_s": bases[run["memory"]]}
            same = next((i for i, r in enumerate(merged["runs"]) if all(r.get(k) == run.get(k) for k in key)), None)
            if same is None:
                merged["runs"].append(run)
            elif "stats" not in merged["runs"][same] and "stats" in run:
                merged["runs"][same] = run
    return merged


def main(argv=None) -> None:
    """``python -m benchmarks.serving.report --out DIR a/results.json [b/results.json ...]``: merged table and figures."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--out", required=True)
    p.add_argument("results", nargs="+")
    args = p.parse_args(argv)
    results = merge([json.loads(Path(f).read_text()) for f in args.results])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    figure1(results, out / "figure1.png")
    figure4(results, out / "figure4.png")
    print(f"wrote {out}/results.json, results.md, figure1.png, figure4.png")


if __name__ == "__main__":
    main()
