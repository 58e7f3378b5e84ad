"""Scoring adapters on their tasks' test sets: greedy generation in mixed batches, exact match and Rouge-L."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .bank import LoraBank
from .tasks import Example, exact_match, format_prompt, rouge_l


@torch.no_grad()
def generate(model, tokenizer, prompts: Sequence[str], rows: Sequence[int], bank: LoraBank | None = None, *,
             max_new_tokens: int = 24, batch_size: int = 512) -> list[str]:
    """Greedy completions of ``prompts``, row i through adapter ``rows[i]`` of ``bank`` (``-1`` or no bank: base).

    Prompts are batched by length (little padding), left-padded; a completion ends at EOS or at the
    first newline.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        enc = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        if bank is not None:
            bank.rows = torch.tensor([rows[i] for i in chunk], device=device)
        ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                             pad_token_id=eos)
        texts = tokenizer.batch_decode(ids[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        for i, text in zip(chunk, texts):
            out[i] = text.split("\n", 1)[0].strip()
    return out


def score(model, tokenizer, tests: Sequence[Sequence[Example]], bank: LoraBank | None = None, *,
          adapters: Sequence[int] | None = None, max_new_tokens: int = 24, batch_size: int = 512) -> list[dict]:
    """Exact match and Rouge-L of each task ``tests[k]`` through adapter ``adapters[k]`` (default k).

    Returns one ``{"exact_match", "rouge_l", "predictions"}`` per task (means over its test examples;
    the first few predictions kept for inspection).
    """
    adapters = list(range(len(tests))) if adapters is None else list(adapters)
    prompts, rows, refs, owner = [], [], [], []
    for k, examples in enumerate(tests):
        for e in examples:
            prompts.append(format_prompt(e))
            rows.append(adapters[k])
            refs.append(e.output)
            owner.append(k)
    preds = generate(model, tokenizer, prompts, rows, bank, max_new_tokens=max_new_tokens, batch_size=batch_size)
    results = [{"exact_match": 0.0, "rouge_l": 0.0, "count": 0, "predictions": []} for _ in tests]
    for k, pred, ref in zip(owner, preds, refs):
        r = results[k]
        r["exact_match"] += exact_match(pred, ref)
        r["rouge_l"] += rouge_l(pred, ref)
        r["count"] += 1
        if len(r["predictions"]) < 3:
            r["predictions"].append([pred, ref])
    for r in results:
        r["exact_match"] /= max(r["count"], 1)
        r["rouge_l"] /= max(r["count"], 1)
    return results


def max_answer_tokens(tokenizer, tests: Sequence[Sequence[Example]]) -> int:
    """Room for the longest reference answer, plus EOS and a little slack."""
    longest = max(len(tokenizer(e.output, add_special_tokens=False).input_ids) for ex in tests for e in ex)
    return longest + 3
