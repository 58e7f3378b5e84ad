"""The study's outputs: a markdown table and the paper's Figures 1 and 4 (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

PATH_LABELS = {
    "base": "base model",
    "multi-lora": "multi-LoRA (K slots, LRU)",
    "multi-lora-all": "multi-LoRA (all resident)",
    "jd": "JD-LoRA",
}


def decode_of(run: dict) -> str:
    """The run's decode mode (runs recorded before graph decode existed were eager)."""
    return run.get("decode", "eager")


def primary_batch(results: dict) -> int | None:
    """The batch limit the figures show: the study's first (None for runs recorded before several existed)."""
    batches = results["setup"].get("max_batch")
    return batches[0] if isinstance(batches, list) else None


def primary_decode(results: dict) -> str:
    """The decode mode the figures show: the study's first (graph where it ran)."""
    return (results["setup"].get("decode") or ["eager"])[0]


def _find(runs: list[dict], **match) -> dict | None:
    decode = match.pop("decode", None)
    for run in runs:
        if "stats" in run and all(run.get(k) == v for k, v in match.items()) and decode in (None, decode_of(run)):
            return run
    return None


def base_throughput(runs: list[dict], memory: str, decode: str = "eager", max_batch: int | None = None) -> float | None:
    base = _find(runs, path="base", memory=memory, decode=decode, max_batch=max_batch)
    return base["stats"]["requests_per_s"] if base else None


def relative_to_base(run: dict, runs: list[dict]) -> float | None:
    """Throughput over the base model's (same memory and decode mode), measured in the same device call
    where :func:`merge` recorded it."""
    base = run.get("base_requests_per_s") or base_throughput(runs, run["memory"], decode_of(run), run.get("max_batch"))
    return run["stats"]["requests_per_s"] / base if base else None


def step_relative_to_base(run: dict, runs: list[dict]) -> float | None:
    """The base model's decode step over this run's (same memory and decode mode): > 1 is slower than base."""
    base = _find(runs, path="base", memory=run["memory"], decode=decode_of(run), max_batch=run.get("max_batch"))
    mine, theirs = run["stats"].get("decode_step_ms"), base and base["stats"].get("decode_step_ms")
    return theirs / mine if mine and theirs else None


def relative_to_matched(run: dict, runs: list[dict]) -> float | None:
    """A JD-LoRA run's throughput over the memory-matched multi-LoRA run's (same size, memory, decode)."""
    if run["path"] != "jd":
        return None
    multi = _find(runs, path="multi-lora", memory=run["memory"], adapters=run["adapters"],
                  slots=run.get("matched_slots"), decode=decode_of(run), max_batch=run.get("max_batch"))
    return run["stats"]["requests_per_s"] / multi["stats"]["requests_per_s"] if multi else None


def kernel_table(runs: list[dict]) -> list[str]:
    """Where a graph decode step's device time goes, per path (``step_kernels_ms``, from the warm-up)."""
    rows = [r for r in runs if isinstance(r.get("step_kernels_ms"), dict)]
    if not rows:
        return []
    lines = ["", "Kernel time of one decode step at the largest decode size (torch.profiler, the step run eagerly: the "
             "kernels a replay launches), ms; beside it the run's graph decode step (mean over its decode sizes):",
             "", "| max batch | memory | adapters | path | rows | gemm | LoRA kernels | attention | other | kernels total | count "
             "| graph step ms |", "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        k, s = r["step_kernels_ms"], r.get("stats") or {}
        if "error" in k:
            lines.append(f"| {r.get('max_batch') or '-'} | {r['memory']} | {r['adapters'] or '-'} | {PATH_LABELS[r['path']]} "
                         f"| {k['error']} |" + " |" * 7)
            continue
        step = f"{s['decode_step_ms']:.2f}" if s.get("decode_step_ms") else "-"
        lines.append(f"| {r.get('max_batch') or '-'} | {r['memory']} | {r['adapters'] or '-'} | {PATH_LABELS[r['path']]} "
                     f"| {k['rows']} | {k['gemm']:.2f} "
                     f"| {k['lora']:.2f} | {k['attention']:.2f} | {k['other']:.2f} | {k['total']:.2f} | {k['kernels']} "
                     f"| {step} |")
    return lines


def floors(results: dict) -> list[str]:
    """The base model's decode step against the step's floors (weights read at the measured copy bandwidth;
    2 flops per weight and token at the measured matmul rate), one line per base run with a step time."""
    setup = results["setup"]
    device, weights = setup.get("device_measured"), setup.get("weight_bytes_per_step")
    if not device or not weights:
        return []
    bandwidth = device["copy_gb_per_s"] * 1e9
    read_ms = weights / bandwidth * 1000
    lines = ["", f"Base decode step against its floors: {weights / 1e9:.2f} GB of weights per step (every "
             f"parameter but the embedding table) at the measured copy bandwidth {device['copy_gb_per_s']:.0f} GB/s "
             f"({device['copy_note']}) = **{read_ms:.2f} ms**; compute floor: 2 x weights x rows flops at the "
             f"measured {device['matmul_tflop_per_s']:.0f} TFLOP/s ({device['matmul_note']}); KV read: the keys and values "
             f"graph decode's attention reads per step (every one of the static cache's "
             f"{setup.get('static_cache_len', '?')} columns, for every decode row) at that bandwidth.", "",
             "| max batch | memory | decode | mean decode rows | base step ms | weight-read floor ms | step / floor | "
             "compute floor ms | KV read ms |", "|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for run in results["runs"]:
        s = run.get("stats") or {}
        if run["path"] != "base" or not s.get("decode_step_ms"):
            continue
        rows = s.get("mean_decode_rows", s["mean_batch"])
        compute_ms = weights / 2 * 2 * rows / (device["matmul_tflop_per_s"] * 1e12) * 1000  # bf16: 2 bytes/weight
        kv = setup.get("kv_bytes_per_row_step")
        kv_ms = f"{kv * rows / bandwidth * 1000:.2f}" if kv else "-"
        lines.append(f"| {run.get('max_batch') or '-'} | {run['memory']} | {decode_of(run)} | {rows:.0f} "
                     f"| {s['decode_step_ms']:.2f} | {read_ms:.2f} "
                     f"| {s['decode_step_ms'] / read_ms:.2f} | {compute_ms:.2f} | {kv_ms} |")
    return lines


def markdown(results: dict) -> str:
    """One table of every run (measured, failed or skipped): by memory mode, collection size, path."""
    runs = results["runs"]
    memories = results["setup"]["memories"]
    order = list(PATH_LABELS)
    decodes = ["graph", "eager"]
    batches = results["setup"].get("max_batch")
    batches = batches if isinstance(batches, list) else [batches]
    ordered = sorted(runs, key=lambda r: (batches.index(r.get("max_batch")) if r.get("max_batch") in batches else 0,
                                          decodes.index(decode_of(r)), memories.index(r["memory"]), r["adapters"],
                                          order.index(r["path"]), r.get("setting") or ""))
    lines = [
        "| max batch | decode | memory | adapters | path | JD setting | K | req/s | tok/s | vs base | vs multi-LoRA | "
        "decode rows | step ms | base step / step | batches | mean batch | distinct/batch | loads | evictions | "
        "swap s | prefill s | decode s | sched s | wall s | peak GiB | alloc retries |",
        "|---:|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|---:|",
    ]

    def ratio(x):
        return f"{x:.2f}" if x else "-"

    for run in ordered:
        k = run.get("slots") or (f"({run['matched_slots']})" if run.get("matched_slots") else "-")
        where = f"| {run.get('max_batch') or '-'} | {decode_of(run)} | {run['memory']} | {run['adapters'] or '-'} " \
                f"| {PATH_LABELS[run['path']]} " \
                f"| {run.get('setting') or '-'} | {k} "
        if "stats" not in run:
            lines.append(where + f"| {run.get('error') or run.get('skipped')} |" + " |" * 18)
            continue
        s = run["stats"]
        truncated = "*" if s.get("truncated") else ""
        peak = f"{run['peak_gib']:.1f}" if "peak_gib" in run else "-"
        retries = run.get("allocator", {}).get("num_alloc_retries", "-")
        step = f"{s['decode_step_ms']:.2f}" if s.get("decode_step_ms") else "-"
        rows = s.get("mean_decode_rows", s["mean_batch"])
        # device time of the phases where it was measured (CUDA events), host time otherwise
        prefill = s.get("prefill_device_s") if s.get("prefill_device_s") is not None else s["prefill_s"]
        decode = s.get("decode_device_s") if s.get("decode_device_s") is not None else s["decode_s"]
        lines.append(
            where + f"| {s['requests_per_s']:.1f}{truncated} | {s['tokens_per_s']:.0f} | {ratio(relative_to_base(run, runs))} "
            f"| {ratio(relative_to_matched(run, runs))} | {rows:.1f} | {step} | {ratio(step_relative_to_base(run, runs))} "
            f"| {s['batches']} | {s['mean_batch']:.1f} | {s['mean_distinct_adapters']:.1f} | {s['loads']} "
            f"| {s['evictions']} | {s['swap_s']:.2f} | {prefill:.2f} | {decode:.2f} | {s['schedule_s']:.3f} "
            f"| {s['wall_s']:.2f} | {peak} | {retries} |"
        )
    notes = ["", "K: multi-LoRA slots; in parentheses for JD-LoRA, the K of the multi-LoRA run with the same memory. "
             "JD setting of a multi-LoRA row: the setting whose memory its K matches.",
             "vs base: throughput over the base model's (same decode mode and memory); vs multi-LoRA (JD rows): over "
             "the memory-matched multi-LoRA run's. decode rows: mean rows per decode step (graph decode pads a batch "
             "to the next captured size). step ms: mean decode step on the device's clock (CUDA events around each "
             "batch's decode); base step / step: the base model's over this run's. prefill s and decode s: device "
             "time where measured (CUDA), host time otherwise. alloc retries: allocations that found the memory (cap) "
             "full, freed the allocator's cache and synchronized the device before retrying.",
             "`*`: the run reached its time limit; throughput over the requests it finished."]
    checks = [(r["path"], r["adapters"], r.get("max_batch"), r["graph_agreement"]) for r in runs
              if r.get("graph_agreement") is not None]
    if checks:
        notes.append("Graph decode check (warm-up, one batch of 24 prompts): fraction of rows whose first decoded token "
                     "(the first replay's) equals the eager loop's: " + ", ".join(f"{PATH_LABELS[p]} {n or ''} (batch {b}) {a:.2f}".replace("  ", " ")
                                                  for p, n, b, a in checks) + ".")
    if results.get("skipped_note"):
        notes.append(results["skipped_note"])
    return "\n".join(lines + notes + floors(results) + kernel_table(runs)) + "\n"


def figure1(results: dict, path: Path) -> None:
    """Throughput relative to the base model against unique adapters: JD-LoRA vs multi-LoRA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    decode, batch = primary_decode(results), primary_batch(results)
    runs = [r for r in results["runs"] if "stats" in r and r.get("figure1") and decode_of(r) == decode
            and r.get("max_batch") == batch]
    primary = results["setup"]["memories"][0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"capped": "-", "uncapped": "--"}
    colors = {"jd": "tab:blue", "multi-lora": "tab:orange", "multi-lora-all": "tab:green"}
    for memory in ("capped", "uncapped"):
        if not base_throughput(results["runs"], memory, decode, batch):  # no base run to plot against
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
    ax.set_title(f"Serving throughput, {decode} decode, batch {batch or ''} ({results['setup']['model']}, "
                 f"{results['setup']['device_name']})", fontsize=10)
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
    decode, batch = primary_decode(results), primary_batch(results)
    out: dict[str, list[tuple[int, float]]] = {}
    for jd in runs:
        if (jd["path"] != "jd" or jd["memory"] != primary or "stats" not in jd or decode_of(jd) != decode
                or jd.get("max_batch") != batch):
            continue
        multi = _find(runs, path="multi-lora", memory=primary, adapters=jd["adapters"], slots=jd["matched_slots"],
                      decode=decode, max_batch=batch)
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
    key = ("max_batch", "decode", "memory", "path", "adapters", "setting")
    merged = {"setup": dict(parts[0]["setup"]), "runs": [], "parts": [p["setup"].get("command") for p in parts]}
    for part in parts:
        for run in part["runs"]:
            base = base_throughput(part["runs"], run["memory"], decode_of(run), run.get("max_batch"))
            if "stats" in run and not run.get("base_requests_per_s") and base:
                run = {**run, "base_requests_per_s": base}
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
