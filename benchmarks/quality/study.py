"""The task-quality study (issue 7; the paper's Table 4, Figures 3 and 5, Appendix G.9) on the zoo.

For collections of the first n adapters of the zoo (each containing the smaller ones), every method
turns the adapters into per-adapter updates that a :class:`~.bank.LoraBank` serves in mixed batches,
and each adapter is scored on its own task's test set:

- ``JD-Full`` / ``JD-Diag`` at ranks 16, 32, 64 (``jdlora.compress``, one cluster), ``JD-Full`` rank 16
  with clusters, the automatic settings (``jdlora.compress`` defaults: the cheapest setting whose worst
  adapter's error, norm-weighted over 4 sampled modules, is at most 0.05; ``auto full+diag`` also
  searches JD-Diag);
- per-adapter SVD at ranks 1, 2, 4, and JD-Full rank 16 with as many clusters as store the same
  parameters as each of them (``JD-Full r16 c<k> =SVD r<s>``: ``k = n s / 16``), the comparison at equal
  stored parameters;
- TIES merging of all adapters into one update.

Also: the adapters' similarity before compression, the reconstruction error of trained adapters
against random ones of the same shapes (G.9), the error/size sweep on a middle module (Figure 5),
and adapters added to a compressed collection by projection (``jdlora.add_adapters``) without
recompression.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

import jdlora
from jdlora.compress import CompressionSettings, LoraStack, compress_module
from jdlora.compress.auto import sweep
from jdlora.compress.baselines import svd_per_adapter, ties_merge
from jdlora import pipeline
from jdlora.pipeline import middle_module, natural_key
from jdlora.sources import open_adapters

from .bank import LoraBank, merged
from .evaluate import score


@dataclass(frozen=True)
class Method:
    """One compression setting of the study: ``kind`` in jd | svd | ties, with its parameters."""

    name: str
    kind: str
    rank: int | str | None = None
    clusters: int | str = 1
    sigma: str = "full"  # the Sigma kind (the key "sigma" of the study's JSON)


# Per-adapter SVD ranks compared with JD at equal stored parameters.
SVD_RANKS = (1, 2, 4)


def methods_for(n: int) -> list[Method]:
    """The settings compared for a collection of n adapters (the paper's Table 4 rows, at our scale)."""
    out = [Method(f"JD-Full r{r}", "jd", r) for r in (16, 32, 64)]
    out += [Method(f"JD-Diag r{r}", "jd", r, sigma="diag") for r in (16, 32, 64)]
    clusters = max(2, n // 10)
    out.append(Method(f"JD-Full r16 c{clusters}", "jd", 16, clusters))
    out.append(Method("auto", "jd", "auto", "auto"))
    out.append(Method("auto full+diag", "jd", "auto", "auto", sigma="auto"))
    paired = set()
    for s in SVD_RANKS:
        out.append(Method(f"SVD r{s}", "svd", s))
        # Rank-16 bases per cluster store 16 (d_in + d_out) each, SVD s (d_in + d_out) per adapter.
        k = max(1, round(n * s / 16))
        if k not in paired:  # small n: two SVD ranks can round to the same cluster count
            paired.add(k)
            out.append(Method(f"JD-Full r16 c{k} =SVD r{s}", "jd", 16, k))
    out.append(Method("TIES", "ties"))
    return out


def read_stack(adapters, module: str, device) -> LoraStack:
    """One module of every adapter (the zoo's adapters all have every module), scaling folded into B."""
    return pipeline.read_stack(adapters, module, device=device)[0]


def jd_factors(collection: jdlora.JDLoraCollection) -> dict[str, tuple[Tensor, Tensor]]:
    """Per-adapter factors ``A_i = V_c^T``, ``B_i = U_c Sigma_i`` of a compressed collection (all adapters, all modules)."""
    out = {}
    for module, entry in collection.modules.items():
        c = entry.compression
        if len(entry.adapter_ids) != len(collection):
            raise ValueError(f"Module {module}: not every adapter has it; the zoo's adapters all do.")
        order = torch.argsort(entry.adapter_ids)
        sigma = c.sigma[order]
        sigma = sigma if sigma.dim() == 3 else torch.diag_embed(sigma)
        cluster = c.cluster[order].long()
        out[module] = (c.V[cluster].transpose(1, 2).contiguous(), c.U[cluster] @ sigma)
    return out


def lora_factors(adapters) -> dict[str, tuple[Tensor, Tensor]]:
    """The uncompressed LoRAs as bank factors (scaling folded into B)."""
    modules = sorted(adapters[0].modules, key=natural_key)
    out = {}
    for m in modules:
        stack = read_stack(adapters, m, "cpu")
        out[m] = (stack.A, stack.B)
    return out


def compress_method(method: Method, folders: Sequence[str], device) -> dict:
    """Runs one method on ``folders``; returns ``{"factors" or "deltas", "error", "saved_ratio", "seconds", ...}``."""
    start = time.perf_counter()
    if method.kind == "jd":
        collection = jdlora.compress(list(folders), rank=method.rank, clusters=method.clusters,
                                     sigma_kind=method.sigma, device=device, progress=False)
        counts = collection.parameter_counts()
        return dict(factors=jd_factors(collection), error=collection.mean_adapter_error,
                    adapter_errors=list(collection.adapter_errors().values()), saved_ratio=counts["saved_ratio"],
                    rank=collection.settings.rank, clusters=collection.settings.clusters,
                    sigma=collection.settings.sigma_kind, parameters=counts["compressed"],
                    choice=collection.choice.to_dict() if collection.choice else None,
                    seconds=time.perf_counter() - start, collection=collection)
    adapters = open_adapters(list(folders))
    modules = sorted(adapters[0].modules, key=natural_key)
    res = torch.zeros(len(adapters), dtype=torch.float64)
    norms = torch.zeros(len(adapters), dtype=torch.float64)
    factors, deltas, original, kept = {}, {}, 0, 0
    for m in modules:
        stack = read_stack(adapters, m, device)
        sq = stack.sq_norms()
        norms += sq.double().cpu()
        original += sum(a.modules[m][0] for a in adapters) * (stack.d_in + stack.d_out)
        if method.kind == "svd":
            svd = svd_per_adapter(stack, method.rank)
            factors[m] = (svd.V.transpose(1, 2).cpu(), (svd.U * svd.S[:, None, :]).cpu())
            res += svd.residuals.double().cpu()
            kept += svd.num_parameters()
        elif method.kind == "ties":
            ties = ties_merge(stack)
            deltas[m] = ties.delta.cpu()
            res += ties.residuals.double().cpu()
            kept += ties.delta.numel()
        else:
            raise ValueError(f"Unknown method kind {method.kind!r}.")
    errors = (res / norms.clamp_min(1e-30)).tolist()
    out = dict(error=sum(errors) / len(errors), adapter_errors=errors, saved_ratio=1 - kept / original,
               rank=method.rank, clusters=None, sigma=None, parameters=kept, choice=None,
               seconds=time.perf_counter() - start)
    out["factors" if method.kind == "svd" else "deltas"] = factors or deltas
    return out


def evaluate_method(model, tokenizer, result: dict, tests, **kw) -> list[dict]:
    """Scores of each task (``tests[k]`` through adapter k) with a method's factors or merged deltas."""
    if "deltas" in result:
        with merged(model, result["deltas"]):
            return score(model, tokenizer, tests, None, **kw)
    param = next(model.parameters())  # the factors in the model's dtype (bf16 on a GPU)
    factors = {m: (a.to(param.device, param.dtype), b.to(param.device, param.dtype))
               for m, (a, b) in result["factors"].items()}
    bank = LoraBank(factors)
    with bank.attached(model):
        return score(model, tokenizer, tests, bank, **kw)


def similarity(adapters, modules: Sequence[str]) -> dict:
    """How alike the adapters are before compression: cosine similarity across adapters, per module.

    ``A``: of the flattened A matrices (independent initializations give ~0: LoRA's A moves little
    from its initialization, so a high value means a shared initialization). ``delta``: of the updates
    ``B_i A_i``, through the factors (``<B_i A_i, B_j A_j> = sum((B_i^T B_j) * (A_i A_j^T))``).
    Returns the mean and max of |cos| over pairs i != j, averaged over ``modules``.
    """
    stats = {"A_mean": [], "A_max": [], "delta_mean": [], "delta_max": []}
    for m in modules:
        stack = read_stack(adapters, m, "cpu")
        n = stack.n
        off = ~torch.eye(n, dtype=torch.bool)
        a = torch.nn.functional.normalize(stack.A.reshape(n, -1), dim=1)
        cos_a = (a @ a.T).abs()[off]
        BtB = torch.einsum("idr,jds->ijrs", stack.B, stack.B)
        AAt = torch.einsum("ird,jsd->ijrs", stack.A, stack.A)
        gram = (BtB * AAt).sum((2, 3))
        d = gram.diagonal().clamp_min(1e-30).sqrt()
        cos_d = (gram / d[:, None] / d[None, :]).abs()[off]
        for key, v in (("A", cos_a), ("delta", cos_d)):
            stats[f"{key}_mean"].append(v.mean().item())
            stats[f"{key}_max"].append(v.max().item())
    return {k: sum(v) / len(v) for k, v in stats.items()}


def random_like(stack: LoraStack, generator: torch.Generator) -> LoraStack:
    """Random LoRAs of the same shapes and per-adapter norms: A Kaiming-uniform like PEFT's init, B Gaussian."""
    A = (torch.rand(stack.A.shape, generator=generator) * 2 - 1) / math.sqrt(stack.d_in)
    B = torch.randn(stack.B.shape, generator=generator)
    rand = LoraStack(A.to(stack.A), B.to(stack.A))
    return rand.scaled((stack.sq_norms() / rand.sq_norms()).sqrt())


def trained_vs_random(adapters, modules: Sequence[str], sizes: Sequence[int], ranks: Sequence[int], device,
                      seed: int = 0) -> list[dict]:
    """Mean per-adapter relative error of JD-Full, trained adapters against random ones (Appendix G.9)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in sizes:
        errs = {r: {"trained": [], "random": []} for r in ranks}
        for m in modules:  # one read and one random draw per module, compressed at every rank
            stack = read_stack(adapters[:n], m, device)
            rand = random_like(stack, g)
            for r in ranks:
                settings = CompressionSettings(rank=r, clusters=1)
                errs[r]["trained"].append(compress_module(stack, settings).mean_adapter_error)
                errs[r]["random"].append(compress_module(rand, settings).mean_adapter_error)
        rows += [dict(n=n, rank=r, trained=sum(e["trained"]) / len(modules), random=sum(e["random"]) / len(modules))
                 for r, e in errs.items()]
    return rows


def figure5_sweep(adapters, device, ranks=(8, 16, 32, 64), clusters=(1, 2, 4, 8)) -> dict:
    """Error against parameters saved on the middle module, for a grid of (rank, clusters), full and diagonal."""
    modules = sorted(adapters[0].modules, key=natural_key)
    module = middle_module(modules, adapters)
    stack = read_stack(adapters, module, device)
    lora_ranks = [a.modules[module][0] for a in adapters]
    grid = [(r, c) for r in ranks for c in clusters if c <= stack.n]
    points = []
    for kind in ("full", "diag"):
        points += [p.to_dict() for p in sweep(stack, lora_ranks, grid, CompressionSettings(sigma_kind=kind))]
    return {"module": module, "n": stack.n, "points": points}


def sample_modules(modules: Sequence[str], every: int) -> list[str]:
    """Every ``every``-th layer's modules (cheaper statistics over a spread of depths)."""
    layers = sorted({m.split(".layers.")[1].split(".")[0] for m in modules}, key=int)
    keep = set(layers[::every])
    return [m for m in modules if m.split(".layers.")[1].split(".")[0] in keep]


def run_study(model, tokenizer, folders: Sequence[str], tests, *, sizes: Sequence[int], device,
              methods: Callable[[int], list[Method]] = methods_for, added: int = 10, stats_every: int = 5,
              log: Callable[[str], None] = print, **score_kw) -> dict:
    """The whole study; ``tests[k]``: test examples of the task of ``folders[k]``. Returns JSON-able results."""
    out: dict = {"sizes": list(sizes), "runs": [], "added": None}
    t0 = time.perf_counter()
    adapters = open_adapters(list(folders))
    modules = sorted(adapters[0].modules, key=natural_key)
    n_max = max(sizes)

    out["base"] = score(model, tokenizer, tests[:n_max], None, **score_kw)
    log(f"base model scored ({time.perf_counter() - t0:.0f} s)")
    lora = {"factors": lora_factors(adapters[:n_max])}
    out["lora"] = evaluate_method(model, tokenizer, lora, tests[:n_max], **score_kw)
    log(f"LoRAs scored ({time.perf_counter() - t0:.0f} s)")

    auto_settings = {}
    for n in sizes:
        for method in methods(n):
            result = compress_method(method, folders[:n], device)
            scores = evaluate_method(model, tokenizer, result, tests[:n], **score_kw)
            out["runs"].append(dict(n=n, method=method.name, kind=method.kind, sigma=result.get("sigma", method.sigma),
                                    rank=result["rank"], clusters=result["clusters"], error=result["error"],
                                    adapter_errors=result["adapter_errors"], saved_ratio=result["saved_ratio"],
                                    parameters=result.get("parameters"), choice=result.get("choice"),
                                    compress_seconds=result["seconds"], scores=scores))
            if method.name == "auto":
                auto_settings[n] = (result["rank"], result["clusters"])
            log(f"n={n} {method.name}: error {result['error']:.3f}, saved {result['saved_ratio']:.3f}, "
                f"compress {result['seconds']:.1f} s ({time.perf_counter() - t0:.0f} s)")
            if result.get("choice"):  # the library's own automatic choice, as users get it
                log(f"  chose {result['choice']['reason']}")

    if added and n_max > added and n_max in auto_settings:
        rank, clusters = auto_settings[n_max]
        collection = jdlora.compress(list(folders[: n_max - added]), rank=rank, clusters=clusters, device=device,
                                     progress=False)
        collection.add_adapters(list(folders[n_max - added: n_max]))
        factors = jd_factors(collection)
        scores = evaluate_method(model, tokenizer, {"factors": factors}, tests[:n_max], **score_kw)
        out["added"] = dict(n=n_max, added=added, rank=rank, clusters=clusters, scores=scores,
                            adapter_errors=list(collection.adapter_errors().values()))
        log(f"compress {n_max - added} + add {added}: done ({time.perf_counter() - t0:.0f} s)")

    stat_modules = sample_modules(modules, stats_every)
    out["similarity"] = similarity(adapters[:n_max], stat_modules)
    out["similarity_modules"] = len(stat_modules)
    out["trained_vs_random"] = trained_vs_random(adapters, stat_modules, sizes, (16, 32, 64), device)
    out["figure5"] = figure5_sweep(adapters[:n_max], device)
    out["seconds"] = time.perf_counter() - t0
    log(f"study done in {out['seconds']:.0f} s")
    return out
