"""Tables (markdown) and plots (PNG) of the zoo and the study, from their JSON files.

Relative performance is the paper's ratio: a method's score on a task over the uncompressed LoRA's,
averaged over tasks. Tasks the LoRA did not learn (LoRA Rouge-L below ``LEARNED``) are left out of
the ratio (dividing by ~0 says nothing); how many were left out is printed with every table.
"""

from __future__ import annotations

from pathlib import Path

LEARNED = 0.2  # a LoRA Rouge-L below this: the task was not learned, its ratio is meaningless


def relative(scores: list[dict], lora: list[dict], metric: str, tasks: range | list[int] | None = None) -> tuple[float, int]:
    """Mean over learned tasks of ``score / lora score``; and how many tasks that is."""
    ks = [k for k in (tasks if tasks is not None else range(len(scores))) if lora[k]["rouge_l"] >= LEARNED]
    ratios = [scores[k][metric] / lora[k][metric] for k in ks if lora[k][metric] > 0]
    return (sum(ratios) / len(ratios) if ratios else float("nan")), len(ks)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def tasks_table(zoo: dict, study: dict) -> str:
    """Per task: category, base model and LoRA exact match / Rouge-L, validation losses."""
    lines = ["| # | task | category | base EM | base Rouge-L | LoRA EM | LoRA Rouge-L | val loss base -> LoRA |",
             "|---:|---|---|---:|---:|---:|---:|---|"]
    for k, name in enumerate(study["tasks"]):
        b, lo = study["base"][k], study["lora"][k]
        lines.append(f"| {k} | {name} | {zoo['categories'][k]} | {b['exact_match']:.2f} | {b['rouge_l']:.2f} | "
                     f"{lo['exact_match']:.2f} | {lo['rouge_l']:.2f} | {zoo['base_val'][k]:.2f} -> {zoo['best_val'][k]:.2f} |")
    return "\n".join(lines)


def table4(study: dict) -> str:
    """The paper's Table 4 at our scale: relative Rouge-L / exact match per collection size and method."""
    lora = study["lora"]
    lines = ["| n | method | rank | clusters | rel. Rouge-L (all learned) | rel. EM | rel. Rouge-L (first 10) | "
             "Rouge-L | EM | recon. error | params saved |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in study["sizes"]:
        base_rl = _mean(s["rouge_l"] for s in study["base"][:n])
        lora_rl = _mean(s["rouge_l"] for s in lora[:n])
        lines.append(f"| {n} | base model | | | | | | {base_rl:.3f} | {_mean(s['exact_match'] for s in study['base'][:n]):.3f} | | |")
        lines.append(f"| {n} | LoRA | 16 | | 1.000 | 1.000 | 1.000 | {lora_rl:.3f} | {_mean(s['exact_match'] for s in lora[:n]):.3f} | 0 | 0 |")
        for run in (r for r in study["runs"] if r["n"] == n):
            rl, count = relative(run["scores"], lora, "rouge_l")
            em, _ = relative(run["scores"], lora, "exact_match")
            rl10, _ = relative(run["scores"], lora, "rouge_l", range(min(10, n)))
            lines.append(
                f"| {n} | {run['method']} | {run['rank']} | {run['clusters'] if run['clusters'] is not None else ''} | "
                f"{rl:.3f} | {em:.3f} | {rl10:.3f} | {_mean(s['rouge_l'] for s in run['scores']):.3f} | "
                f"{_mean(s['exact_match'] for s in run['scores']):.3f} | {run['error']:.3f} | {run['saved_ratio']:.3f} |")
    return "\n".join(lines)


# The default target of the automatic settings (jdlora.compress.settings.DEFAULT_TARGET_ERROR), checked here.
TARGET = 0.05
# Per-adapter error bins of the calibration table.
ERROR_BINS = (0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)


def error_quality_table(study: dict) -> str:
    """What an adapter's own reconstruction error says about the skill it keeps (JD and SVD runs, learned tasks).

    The data behind ``DEFAULT_TARGET_ERROR``: per adapter of every run, its relative error and its
    Rouge-L relative to its LoRA, binned by error.
    """
    lora = study["lora"]
    pairs = []
    for run in (r for r in study["runs"] if r["kind"] in ("jd", "svd")):
        for i, (e, s) in enumerate(zip(run["adapter_errors"], run["scores"])):
            if lora[i]["rouge_l"] >= LEARNED:
                pairs.append((e, s["rouge_l"] / lora[i]["rouge_l"]))
    lines = ["| adapter error | adapters x runs | mean rel. Rouge-L | share >= 0.99 | share >= 0.95 |",
             "|---|---:|---:|---:|---:|"]
    for lo, hi in zip(ERROR_BINS, ERROR_BINS[1:]):
        rel = [r for e, r in pairs if lo <= e < hi]
        if rel:
            lines.append(f"| [{lo:.2f}, {hi:.2f}) | {len(rel)} | {_mean(rel):.3f} | "
                         f"{sum(r >= 0.99 for r in rel) / len(rel):.2f} | {sum(r >= 0.95 for r in rel) / len(rel):.2f} |")
    return "\n".join(lines)


def claims(study: dict) -> list[str]:
    """The paper's claims, checked on our zoo, each as one line saying whether it holds."""
    lora = study["lora"]
    out = []
    for run in (r for r in study["runs"] if r["method"].startswith("auto")):
        rl, count = relative(run["scores"], lora, "rouge_l")
        kind = f"JD-{run['sigma'].capitalize()} " if run.get("sigma") else ""
        met = run.get("choice") or {}
        judged = met.get("modules") or ([met["module"]] if met.get("module") else [])  # one module before 2026-12-04
        out.append(f"{run['method']} settings, n={run['n']} ({kind}rank {run['rank']}, {run['clusters']} clusters, "
                   f"saved {run['saved_ratio']:.3f}"
                   + (f", worst adapter target {'met' if met.get('met') else 'NOT met'} on {len(judged)} module(s)"
                      if met else "")
                   + f", worst adapter error over all modules {max(run['adapter_errors']):.3f}"
                   + f"): relative Rouge-L {rl:.3f} over {count} learned tasks -> the >= 0.99 claim "
                   f"{'holds' if rl >= 0.99 else 'does NOT hold'}")
    calibrated = [r for r in study["runs"] if r["kind"] in ("jd", "svd") and max(r["adapter_errors"]) <= TARGET]
    below = [(r["n"], r["method"], relative(r["scores"], lora, "rouge_l")[0]) for r in calibrated]
    below = [b for b in below if b[2] < 0.99]
    out.append(f"runs whose worst adapter error is <= {TARGET} (the default target): {len(calibrated)}; of them below "
               "0.99 relative Rouge-L: " + (", ".join(f"n={n} {m} ({v:.3f})" for n, m, v in below) if below else "none")
               + f" -> the calibration {'holds' if not below else 'does NOT hold everywhere'}")
    for run in (r for r in study["runs"] if " =SVD r" in r["method"]):
        svd = next((r for r in study["runs"] if r["n"] == run["n"] and r["method"] == run["method"].split(" =")[1]),
                   None)
        if svd is None:
            continue
        jd_rl, svd_rl = relative(run["scores"], lora, "rouge_l")[0], relative(svd["scores"], lora, "rouge_l")[0]
        out.append(f"n={run['n']}, equal stored parameters: {run['method'].split(' =')[0]} (saved {run['saved_ratio']:.3f}) "
                   f"{jd_rl:.3f} vs {svd['method']} (saved {svd['saved_ratio']:.3f}) {svd_rl:.3f} relative Rouge-L -> "
                   f"JD {'beats or ties' if jd_rl >= svd_rl - 0.005 else 'loses to'} per-adapter SVD here")
    low = [r for r in study["runs"] if r["kind"] == "jd" and r["error"] < 0.5]
    bad = [(r["n"], r["method"], relative(r["scores"], lora, "rouge_l")[0]) for r in low]
    bad = [b for b in bad if b[2] < 0.99]
    out.append(f"JD runs with reconstruction error < 0.5: {len(low)}; of them below 0.99 relative Rouge-L: "
               + (", ".join(f"n={n} {m} ({v:.3f})" for n, m, v in bad) if bad else "none")
               + f" -> the claim {'holds' if not bad else 'does NOT hold everywhere'}")
    # Where the rank holds every update (random error ~0), both are lossless: nothing to compare.
    rows = [r for r in study.get("trained_vs_random", []) if r["random"] > 1e-3]
    lower = sum(r["trained"] < r["random"] for r in rows)
    out.append(f"trained adapters reconstruct better than random ones of the same shapes in {lower} of {len(rows)} "
               f"lossy (n, rank) settings -> the G.9 claim {'holds' if lower == len(rows) else 'does NOT hold everywhere'}")
    return out


def trained_vs_random_table(study: dict) -> str:
    lines = ["| n | JD-Full rank | error, trained | error, random |", "|---:|---:|---:|---:|"]
    for r in study.get("trained_vs_random", []):
        lines.append(f"| {r['n']} | {r['rank']} | {r['trained']:.3f} | {r['random']:.3f} |")
    return "\n".join(lines)


def added_table(study: dict) -> str:
    """Adapters added by projection against the same adapters in the recompressed collection."""
    a = study.get("added")
    if not a:
        return "(not run)"
    n, k = a["n"], a["added"]
    lora = study["lora"]
    new = list(range(n - k, n))
    recompressed = next((r for r in study["runs"] if r["n"] == n and r["method"] == "auto"), None)
    lines = ["| adapters | compressed how | rel. Rouge-L | rel. EM | recon. error |", "|---|---|---:|---:|---:|"]
    lines.append(f"| the {k} added | compress {n - k}, add {k} (projection) | {relative(a['scores'], lora, 'rouge_l', new)[0]:.3f} | "
                 f"{relative(a['scores'], lora, 'exact_match', new)[0]:.3f} | {_mean(a['adapter_errors'][n - k:]):.3f} |")
    if recompressed:
        lines.append(f"| the same {k} | recompress all {n} | {relative(recompressed['scores'], lora, 'rouge_l', new)[0]:.3f} | "
                     f"{relative(recompressed['scores'], lora, 'exact_match', new)[0]:.3f} | "
                     f"{_mean(recompressed['adapter_errors'][n - k:]):.3f} |")
    lines.append(f"| the other {n - k} | compress {n - k}, add {k} | "
                 f"{relative(a['scores'], lora, 'rouge_l', range(n - k))[0]:.3f} | "
                 f"{relative(a['scores'], lora, 'exact_match', range(n - k))[0]:.3f} | {_mean(a['adapter_errors'][:n - k]):.3f} |")
    return "\n".join(lines)


def plot_figure3(study: dict, path: Path) -> Path:
    """Relative Rouge-L against reconstruction error, one point per (n, method) (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {10: "o", 50: "s", 100: "^"}
    colors = {"JD-Full": "tab:blue", "JD-Diag": "tab:orange", "auto": "tab:green", "SVD": "tab:purple",
              "TIES": "tab:red"}
    off_chart = []
    for run in study["runs"]:
        rl, _ = relative(run["scores"], study["lora"], "rouge_l")
        if run["error"] > 1:  # TIES: one update for all, errors of several times the update itself
            off_chart.append(f"{run['method']} n={run['n']}: error {run['error']:.1f}, {rl:.2f}")
            continue
        family = next((k for k in colors if run["method"].startswith(k)), "JD-Full")
        ax.scatter(run["error"], rl, marker=markers.get(run["n"], "x"), color=colors[family], s=36,
                   label=f"{family}" if run["n"] == study["sizes"][-1] else None)
    if off_chart:
        ax.text(0.98, 0.02, "off the chart:\n" + "\n".join(off_chart), transform=ax.transAxes, ha="right",
                va="bottom", fontsize=7, color="tab:red")
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color="gray", lw=0.8, ls="--")
    ax.axhline(0.99, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("reconstruction error (mean relative, per adapter)")
    ax.set_ylabel("performance relative to LoRA (Rouge-L)")
    ax.set_title("Figure 3 (our zoo): performance vs reconstruction error\nmarker: n = " +
                 ", ".join(f"{n} {m}" for n, m in markers.items()))
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_figure5(study: dict, path: Path, sigma: str = "full") -> Path:
    """Error against parameters saved on the middle module, one line per rank over cluster counts (Figure 5)."""
    from jdlora.compress.auto import SweepPoint
    from jdlora.plots import plot_sweep

    f5 = study["figure5"]
    points = [SweepPoint.from_dict(p) for p in f5["points"] if p.get("sigma_kind", p.get("sigma")) == sigma]
    return plot_sweep(points, path, title=f"Figure 5 (our zoo), JD-{sigma.capitalize()}: {f5['module']}, n = {f5['n']}")


def write_report(zoo: dict, study: dict, out_dir: Path) -> str:
    """Writes ``report.md``, ``figure3.png``, ``figure5.png`` (JD-Full) and ``figure5_diag.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_figure3(study, out_dir / "figure3.png")
    plot_figure5(study, out_dir / "figure5.png")
    plot_figure5(study, out_dir / "figure5_diag.png", "diag")
    learned = sum(lo["rouge_l"] >= LEARNED for lo in study["lora"])
    better = sum(lo["rouge_l"] > b["rouge_l"] + 0.05 for lo, b in zip(study["lora"], study["base"]))
    sim = study["similarity"]
    md = "\n\n".join([
        f"Zoo: {len(zoo['tasks'])} tasks, trained {zoo['date']} on {zoo['gpu'] or zoo['device']} in "
        f"{zoo['train_seconds']:.0f} s ({zoo['steps']} steps). Study: {study['date']} on {study['gpu'] or study['device']}, "
        f"{study['test_examples']} test examples per task, {study['seconds']:.0f} s.",
        f"Base model vs LoRA: mean Rouge-L {_mean(b['rouge_l'] for b in study['base']):.3f} -> "
        f"{_mean(lo['rouge_l'] for lo in study['lora']):.3f}, exact match "
        f"{_mean(b['exact_match'] for b in study['base']):.3f} -> {_mean(lo['exact_match'] for lo in study['lora']):.3f}; "
        f"the LoRA beats the base model by > 0.05 Rouge-L on {better} of {len(study['lora'])} tasks; "
        f"{learned} tasks are learned (LoRA Rouge-L >= {LEARNED}) and enter the relative scores.",
        f"Similarity before compression ({study['similarity_modules']} modules): |cos| of A matrices across adapters "
        f"mean {sim['A_mean']:.4f} (max {sim['A_max']:.4f}); of the updates B A: mean {sim['delta_mean']:.4f} "
        f"(max {sim['delta_max']:.4f}).",
        "### Table 4 (our zoo)\n\n" + table4(study),
        "### Claims\n\n" + "\n".join(f"- {c}" for c in claims(study)),
        "### An adapter's own error and the skill it keeps (every JD and SVD run)\n\n" + error_quality_table(study),
        "### Trained vs random adapters (Appendix G.9)\n\n" + trained_vs_random_table(study),
        "### New adapters without recompression\n\n" + added_table(study),
        "### Per task: base model and LoRA\n\n" + tasks_table(zoo, study),
    ])
    (out_dir / "report.md").write_text(md + "\n")
    return md
