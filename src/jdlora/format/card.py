"""The collection's model card (README.md), from the template in ``hub_cards/``."""

from __future__ import annotations

import importlib.resources
from collections import Counter

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = "hub_cards/collection.md"
MAX_TABLE_ROWS = 100
TAGS = ["jdlora", "lora", "peft", "compress-then-serve", "multi-lora"]


def card_data(manifest: dict) -> ModelCardData:
    """The card's YAML header: library_name peft, base model, adapter relation, tags."""
    data = ModelCardData(library_name="peft", tags=list(TAGS))
    if manifest.get("base_model"):
        data.base_model = manifest["base_model"]
        data.base_model_relation = "adapter"
    return data


def render_card(manifest: dict, repo_id: str | None = None) -> str:
    """Renders the README of a collection from its manifest (and the repo id it is published under)."""
    template = importlib.resources.files("jdlora").joinpath(TEMPLATE).read_text()
    modules = manifest["modules"]
    adapters = manifest["adapters"]
    counts = manifest.get("parameter_counts", {})
    mid = len(modules) // 2
    rows = [
        {"name": a["name"], "source": _source(a.get("origin", {})),
         "cluster": "-" if a["clusters"][mid] is None else a["clusters"][mid], "error": f"{a['error']:.4f}"}
        for a in adapters[:MAX_TABLE_ROWS]
    ]
    ranks = sorted({m["rank"] for m in modules})
    clusters = sorted({m["clusters"] for m in modules})
    errors = [a["error"] for a in adapters]
    example = adapters[0] if adapters else {"name": "ADAPTER", "subfolder": "adapters/ADAPTER"}
    card = ModelCard.from_template(
        card_data(manifest),
        template_str=template,
        title=f"JD-LoRA collection of {len(adapters)} adapters" + (f" for {manifest['base_model']}"
                                                                   if manifest.get("base_model") else ""),
        num_adapters=len(adapters),
        base_model=manifest.get("base_model"),
        sigma=manifest["sigma"],
        sigma_label="Full" if manifest["sigma"] == "full" else "Diag",
        normalize=manifest.get("settings", {}).get("normalize", True),
        ranks=_span(ranks),
        clusters=_span(clusters),
        num_modules=len(modules),
        target_modules=", ".join(sorted(Counter(m["name"].rsplit(".", 1)[-1] for m in modules))),
        params_before=f"{counts.get('original', 0):,}",
        params_after=f"{counts.get('compressed', 0):,}",
        saved=f"{counts.get('saved_ratio', 0.0):.1%}",
        error=f"{manifest.get('error', 0.0):.4f}",
        mean_error=f"{manifest.get('mean_adapter_error', 0.0):.4f}",
        worst_error=f"{max(errors):.4f}" if errors else "-",
        choice=manifest.get("choice"),
        cluster_module=modules[mid]["name"] if modules else "-",
        adapters=rows,
        more_adapters=max(0, len(adapters) - MAX_TABLE_ROWS),
        repo_id=repo_id or "path/to/collection",
        example_adapter=example["name"],
        example_subfolder=example["subfolder"],
    )
    return str(card)


def _source(origin: dict) -> str:
    if "repo_id" in origin:
        rev = origin.get("revision")
        sub = f"/{origin['subfolder']}" if origin.get("subfolder") else ""
        return f"[{origin['repo_id']}](https://huggingface.co/{origin['repo_id']}){sub}" + (f" @ `{rev[:7]}`" if rev else "")
    if "folder" in origin:
        return f"local `{origin['folder']}`"
    if "synthetic" in origin:
        return "synthetic"
    return "-"


def _span(values: list[int]) -> str:
    return "-" if not values else str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
