"""The ``jdlora`` command."""

from __future__ import annotations

import argparse
import sys
import time

from .errors import JDLoraError


def _auto_int(value: str):
    return value if value == "auto" else int(value)


def _default(name: str):
    from .compress import CompressionSettings

    return CompressionSettings.__dataclass_fields__[name].default


def _add_compression_options(p: argparse.ArgumentParser) -> None:
    """The options of :class:`~jdlora.compress.CompressionSettings`, with its defaults (one home for them)."""
    p.add_argument("--rank", type=_auto_int, default=_default("rank"),
                   help=f"rank r of the shared bases, or 'auto' (default {_default('rank')})")
    p.add_argument("--clusters", type=_auto_int, default=_default("clusters"),
                   help=f"clusters per module, or 'auto' (default {_default('clusters')})")
    p.add_argument("--sigma", dest="sigma_kind", choices=["full", "diag", "auto"], default=_default("sigma_kind"),
                   help=f"JD-Full, JD-Diag, or 'auto' (default {_default('sigma_kind')})")
    p.add_argument("--no-normalize", dest="normalize", action="store_false",
                   help="minimize the pooled error instead of normalizing every adapter to unit norm")
    p.add_argument("--solver", choices=["qr", "eigen"], default=_default("solver"),
                   help=f"JD-Full solver (default {_default('solver')})")
    p.add_argument("--target-error", type=float, default=_default("target_error"),
                   help="the automatic settings keep every adapter's relative error (norm-weighted over "
                        "--search-modules modules) at most this (default "
                        f"{_default('target_error')}, calibrated on our quality study: docs/quality.md)")
    p.add_argument("--error-quantile", type=float, default=_default("error_quantile"),
                   help="check --target-error on this quantile of the adapters' errors (default "
                        f"{_default('error_quantile')}: the worst adapter)")
    p.add_argument("--search-modules", type=int, default=_default("search_modules"),
                   help="modules (spread over depth and module types) the automatic settings are judged on "
                        f"(default {_default('search_modules')})")
    p.add_argument("--tol", type=float, default=_default("tol"),
                   help=f"convergence tolerance, equation 19 (default {_default('tol')})")
    p.add_argument("--ftol", type=float, default=_default("ftol"),
                   help=f"also stop when an iteration lowers the error by less than this (default {_default('ftol')})")
    p.add_argument("--max-iter", type=int, default=_default("max_iter"),
                   help=f"iterations per JD (default {_default('max_iter')})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    p.add_argument("--seed", type=int, default=_default("seed"))


def _settings(args):
    """The :class:`~jdlora.compress.CompressionSettings` of the parsed options."""
    import torch

    from .compress import CompressionSettings

    return CompressionSettings(
        rank=args.rank, clusters=args.clusters, sigma_kind=args.sigma_kind, normalize=args.normalize,
        solver=args.solver, tol=args.tol, ftol=args.ftol, max_iter=args.max_iter, target_error=args.target_error,
        error_quantile=args.error_quantile, search_modules=args.search_modules,
        dtype=torch.float64 if args.float64 else torch.float32, seed=args.seed)


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+", metavar="SRC",
                   help="PEFT LoRA folders or Hub repo ids (org/name or org/name@revision)")
    p.add_argument("--allow-pickle", action="store_true", help="accept pickle .bin adapters (trusted files only)")
    p.add_argument("--token", default=None, help="Hub token for private repos")


def _add_ray_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster (docs/scale.md): ADDRESS for ray.init (e.g. auto, ray://head:10001); "
                        "none: RAY_ADDRESS or a local cluster. Put it after the sources, or write --ray=ADDRESS. "
                        "With --out, finished modules are kept beside it and a rerun resumes")
    p.add_argument("--worker-memory", type=float, default=4.0, metavar="GIB",
                   help="with --ray: GiB of one module's factors a worker may hold; larger modules are sharded "
                        "(default 4)")


def _engine(args, out=None):
    """The engine of --ray (None without it)."""
    if args.ray is None:
        return None
    from .distributed import GIB, RayEngine

    return RayEngine(address=args.ray or None, out=out, worker_memory=int(args.worker_memory * GIB))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jdlora", description="Compress collections of LoRA adapters into shared bases (arXiv 2407.00066)."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compress", help="compress LoRA adapters jointly, print a summary, save and push",
                       description="Compress LoRA adapters jointly (JD-Full/JD-Diag, clustering), print a summary, "
                                   "and optionally save the collection (--out) and publish it (--push).")
    _add_source_options(p)
    _add_compression_options(p)
    p.add_argument("--out", default=None, help="save the compressed collection to this folder")
    p.add_argument("--push", default=None, metavar="ORG/REPO", help="publish the collection to this Hub repo")
    p.add_argument("--private", action="store_true", help="create the Hub repo as private")
    _add_ray_options(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser("push", help="publish a saved collection to the Hub (one atomic commit)",
                       description="Publish a saved collection to a Hub repo in one commit; unchanged files are "
                                   "not uploaded again.")
    p.add_argument("collection", metavar="DIR")
    p.add_argument("repo_id", metavar="ORG/REPO")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--message", default=None, help="commit message")
    p.add_argument("--token", default=None)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("inspect", help="show a collection's adapters, clusters, errors and sizes",
                       description="Show a saved collection (folder or Hub repo): settings, sizes, and a table of "
                                   "adapters. For a Hub repo only the manifest is downloaded.")
    p.add_argument("collection", metavar="DIR|REPO")
    p.add_argument("--revision", default=None)
    p.add_argument("--token", default=None)
    p.add_argument("--all", action="store_true", help="list every adapter (default: the first 50)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("add", help="add LoRA adapters to a saved collection (projected onto its bases)",
                       description="Project new LoRA adapters onto a saved collection's bases and save it again. "
                                   "Warns when an adapter's error exceeds the collection's target.")
    p.add_argument("collection", metavar="DIR")
    _add_source_options(p)
    _add_ray_options(p)
    p.set_defaults(func=cmd_add)

    p = sub.add_parser("export-lora", help="write one adapter of a collection as a plain PEFT LoRA folder",
                       description="Write one adapter of a collection (folder or Hub repo) as a standard PEFT LoRA "
                                   "folder (B' = U Sigma, A' = V^T) that loads without jdlora.")
    p.add_argument("collection", metavar="DIR|REPO")
    p.add_argument("name", metavar="NAME")
    p.add_argument("out", metavar="OUT")
    p.add_argument("--revision", default=None)
    p.add_argument("--token", default=None)
    p.set_defaults(func=cmd_export_lora)

    p = sub.add_parser("tune", help="sweep rank, clusters and Sigma kind on a middle module (Figure 5)",
                       description="Sweep rank and cluster count on a middle module, print each setting's errors and "
                                   "cost, the cheapest setting whose worst adapter meets the target, and save a plot "
                                   "of error against parameters saved (the paper's Figure 5).")
    _add_source_options(p)
    p.add_argument("--ranks", default="4,8,16,32,64",
                   help="comma-separated ranks to try (default 4,8,16,32,64; clamped to what the module can use)")
    p.add_argument("--max-clusters", type=int, default=None, help="largest cluster count tried (default: n)")
    p.add_argument("--plot", default="jdlora-tune.png", help="PNG path of the plot (default jdlora-tune.png)")
    p.add_argument("--sigma", dest="sigma_kind", choices=["full", "diag", "auto"], default=_default("sigma_kind"),
                   help="JD-Full, JD-Diag, or 'auto': both")
    p.add_argument("--no-normalize", dest="normalize", action="store_false")
    p.add_argument("--target-error", type=float, default=_default("target_error"))
    p.add_argument("--error-quantile", type=float, default=_default("error_quantile"))
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=_default("seed"))
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("demo", help="compress a built-in synthetic collection (no input needed)",
                       description="Generate a synthetic LoRA collection, compress it with automatic settings "
                                   "and print the summary.")
    p.add_argument("--adapters", type=int, default=64, help="number of synthetic adapters (default 64)")
    p.add_argument("--layers", type=int, default=4, help="layers of the synthetic model (default 4)")
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the synthetic model (default 512)")
    p.add_argument("--plot", default=None, help="also save the tuning sweep plot to this PNG")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except JDLoraError as err:
        print(f"jdlora: error: {err}", file=sys.stderr)
        return 2


def cmd_compress(args) -> int:
    from .format.save import check_save_target
    from .pipeline import compress

    if args.out:  # refuse a target that is not a collection now, not after minutes of compression
        check_save_target(args.out)
    start = time.perf_counter()
    engine = _engine(args, out=args.out)
    collection = compress(args.sources, _settings(args), device=args.device, allow_pickle=args.allow_pickle,
                          token=args.token, **({"engine": engine} if engine else {}))
    _print_collection(collection, time.perf_counter() - start)
    if engine and args.out:  # the engine saved it
        print(f"\nSaved to {args.out}")
    elif args.out:
        print(f"\nSaved to {collection.save_pretrained(args.out)}")
    if args.push:
        info = collection.push_to_hub(args.push, private=args.private or None, token=args.token)
        print(f"Pushed to {args.push}" + (f": {info.commit_url}" if info else " (nothing changed)"))
    return 0


def cmd_push(args) -> int:
    from .collection import JDLoraCollection

    collection = JDLoraCollection.from_pretrained(args.collection)
    info = collection.push_to_hub(args.repo_id, private=args.private or None, revision=args.revision,
                                  create_pr=args.create_pr, commit_message=args.message, token=args.token)
    print(f"Pushed {len(collection)} adapters to {args.repo_id}" + (f": {info.commit_url}" if info else
                                                                     " (nothing changed)"))
    if info and info.pr_url:
        print(f"Pull request: {info.pr_url}")
    return 0


def cmd_inspect(args) -> int:
    from .format import fetch_manifest

    manifest = fetch_manifest(args.collection, revision=args.revision, token=args.token)
    counts = manifest.get("parameter_counts", {})
    modules, adapters = manifest["modules"], manifest["adapters"]
    mid = len(modules) // 2
    print(f"collection          {args.collection}")
    print(f"format version      {manifest['format_version']}")
    print(f"base model          {manifest.get('base_model')}")
    print(f"sigma               {manifest['sigma']}")
    print(f"adapters            {len(adapters)}")
    print(f"modules             {len(modules)}")
    print(f"rank                {sorted({m['rank'] for m in modules})}")
    print(f"clusters            {sorted({m['clusters'] for m in modules})}")
    print(f"parameters before   {counts.get('original', 0):,}")
    print(f"parameters after    {counts.get('compressed', 0):,}")
    print(f"parameters saved    {counts.get('saved_ratio', 0.0):.1%}")
    print(f"error (pooled)      {manifest.get('error', 0.0):.4f}")
    print(f"error (mean/adapter){manifest.get('mean_adapter_error', 0.0):>7.4f}")
    if manifest.get("choice"):
        print(f"automatic choice    {manifest['choice']['reason']}")
    print()
    shown = adapters if args.all else adapters[:50]
    print(_table(["adapter", "modules", f"cluster ({modules[mid]['name'] if modules else '-'})", "error", "source"],
                 [[a["name"], sum(c is not None for c in a["clusters"]),
                   "-" if a["clusters"][mid] is None else a["clusters"][mid], f"{a['error']:.4f}",
                   a.get("origin", {}).get("repo_id") or a.get("origin", {}).get("folder") or "-"] for a in shown]))
    if len(shown) < len(adapters):
        print(f"... and {len(adapters) - len(shown)} more (--all)")
    return 0


def cmd_add(args) -> int:
    from .collection import JDLoraCollection
    from .format.save import check_save_target

    check_save_target(args.collection)  # refuse before the work, not after it
    collection = JDLoraCollection.from_pretrained(args.collection)
    engine = _engine(args)
    added = collection.add_adapters(args.sources, allow_pickle=args.allow_pickle, token=args.token,
                                    **({"engine": engine} if engine else {}))
    print(_table(["added adapter", "error"], [[n, f"{e:.4f}"] for n, e in added.items()]))
    collection.save_pretrained(args.collection)
    print(f"Saved {len(collection)} adapters to {args.collection}")
    return 0


def cmd_export_lora(args) -> int:
    from .collection import JDLoraCollection

    collection = JDLoraCollection.from_pretrained(args.collection, adapters=[args.name], revision=args.revision,
                                                  token=args.token)
    print(f"Wrote {collection.export_lora(args.name, args.out)}")
    return 0


def cmd_tune(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from .compress import CompressionSettings
    from .compress.auto import cluster_counts, evaluate_setting, original_parameters, rank_ladder, stored_parameters
    from .pipeline import middle_module, natural_key, read_stack
    from .plots import plot_sweep
    from .sources import open_adapters

    sources = open_adapters(args.sources, allow_pickle=args.allow_pickle, token=args.token)
    module_names = sorted({m for s in sources for m in s.modules}, key=natural_key)
    module = middle_module(module_names, sources)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    stack, ids = read_stack(sources, module, device=device)
    lora_ranks = [sources[i].modules[module][0] for i in ids]
    n = stack.n
    settings = CompressionSettings(normalize=args.normalize, target_error=args.target_error,
                                   error_quantile=args.error_quantile, seed=args.seed)
    # Ranks beyond the module's stacked rank (or its width) are lossless already and repeat the largest one.
    top = rank_ladder(stack)[-1]
    asked = sorted({int(r) for r in args.ranks.split(",")})
    ranks = sorted({min(r, top) for r in asked})
    if ranks != asked:
        print(f"Ranks above {top} (the most {module} can use with {n} adapters: lossless) are tried as {top}.")
    counts = [k for k in cluster_counts(n) if args.max_clusters is None or k <= args.max_clusters]
    kinds = ["full", "diag"] if args.sigma_kind == "auto" else [args.sigma_kind]
    budget = original_parameters(lora_ranks, stack.d_out, stack.d_in)
    grid = [(kind, r, k) for kind in kinds for r in ranks for k in counts]
    affordable = [(kind, r, k) for kind, r, k in grid
                  if stored_parameters(n, stack.d_out, stack.d_in, r, k, kind) < budget]
    print(f"Sweeping {len(affordable)} settings on {module} ({n} adapters, {stack.d_out} x {stack.d_in})")
    if len(affordable) < len(grid):
        print(f"({len(grid) - len(affordable)} more would store as many parameters as the LoRAs: skipped)")
    points = []
    for kind, r, k in tqdm(affordable, desc="Settings", unit="setting"):
        points.append(evaluate_setting(stack, lora_ranks, settings.replace(rank=r, clusters=k, sigma_kind=kind))[0])
    meeting = [p for p in points if p.quantile_error <= args.target_error]
    best = min(meeting, key=lambda p: p.cost()) if meeting else None
    print(_sweep_table(points, best, args.target_error))
    which = "worst adapter" if args.error_quantile >= 1 else f"{args.error_quantile:.0%}-quantile adapter"
    if best:
        print(f"\nCheapest setting whose {which} error is <= {args.target_error}: {best.label()} "
              f"({best.quantile_error:.3f}; {best.saved_ratio:.1%} saved).\n"
              f"  jdlora compress ... --rank {best.rank} --clusters {best.clusters} --sigma {best.sigma_kind}")
    elif points:
        low = min(points, key=lambda p: p.quantile_error)
        print(f"\nNo setting here keeps the {which} error <= {args.target_error} (lowest: {low.quantile_error:.3f}, "
              f"{low.label()}): try more clusters or higher ranks, or keep these adapters uncompressed.")
    path = plot_sweep(points, args.plot, title=f"{module} ({n} adapters)", target=args.target_error, chosen=best)
    print(f"Plot saved to {path}")
    return 0


def cmd_demo(args) -> int:
    from .pipeline import compress
    from .synthetic import llama_modules, synthetic_adapters

    modules = llama_modules(args.layers, args.hidden, args.hidden // 4)
    print(f"Generating {args.adapters} synthetic rank-16 LoRA adapters on q/k/v of a {args.layers}-layer model "
          f"(hidden {args.hidden}), in 4 families that share most of their directions, as trained LoRAs do.")
    adapters = synthetic_adapters(args.adapters, modules, sharing=0.97, noise=0.01, seed=args.seed)
    start = time.perf_counter()
    collection = compress(adapters, seed=args.seed)
    _print_collection(collection, time.perf_counter() - start)
    if args.plot and collection.sweep:
        from .plots import plot_sweep

        chosen = _chosen_point(collection)
        print(f"Plot saved to {plot_sweep(collection.sweep, args.plot, target=collection.settings.target_error, chosen=chosen)}")
    return 0


def _chosen_point(collection):
    s = collection.settings
    return next((p for p in collection.sweep if (p.rank, p.clusters, p.sigma_kind) == (s.rank, s.clusters, s.sigma_kind)),
                None)


def _sweep_table(points, chosen, target: float) -> str:
    return _table(
        ["sigma", "rank", "clusters", "adapter error", "mean/adapter", "pooled", "saved", "work/token", ""],
        [[p.sigma_kind, p.rank, p.clusters, f"{p.quantile_error:.4f}", f"{p.mean_adapter_error:.4f}",
          f"{p.error:.4f}", f"{p.saved_ratio:.1%}", f"{p.token_work:,}",
          "<- chosen" if p is chosen else ("meets target" if p.quantile_error <= target else "")] for p in points])


def _print_collection(collection, seconds: float) -> None:
    print(f"\nCompressed in {seconds:.1f} s\n")
    if collection.sweep:
        judged = collection.choice.modules
        print(f"Settings tried on {len(judged)} module{'s' if len(judged) > 1 else ''} ({', '.join(judged)}; "
              f"adapter error: the {_which(collection.settings)} adapter's relative error, norm-weighted over them):")
        print(_sweep_table(collection.sweep, _chosen_point(collection), collection.settings.target_error))
        print()
    print(collection.summary())
    errors = collection.adapter_errors()
    rows = [[name, f"{err:.4f}"] for name, err in list(errors.items())[:20]]
    print()
    print(_table(["adapter", "error"], rows))
    if len(errors) > 20:
        print(f"... and {len(errors) - 20} more")


def _which(settings) -> str:
    return "worst" if settings.error_quantile >= 1 else f"{settings.error_quantile:.0%}-quantile"


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
