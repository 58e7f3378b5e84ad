"""Training the zoo: one LoRA per task, all tasks at once in one process (the paper's settings).

Every adapter is an independent LoRA (rank 16, alpha 32, on q/k/v, its own seed and initialization,
early stopping on its own validation loss), but they train side by side: each step takes
``batch_per_adapter`` examples of every still-training task, and a :class:`~.bank.LoraBank` routes each
row through its task's factors. The adapters share no parameter, Adam works entry-wise, and each
task's loss only reaches its own factors, so this is the same as training them one by one with the
same schedule, only ~100x fewer kernel launches.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .bank import LoraBank, peft_init
from .tasks import Example, format_prompt


def encode(tokenizer, examples: Sequence[Example]) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, answer ids + EOS)`` per example; prompt and answer tokenized apart, as in generation."""
    prompts = tokenizer([format_prompt(e) for e in examples], add_special_tokens=False).input_ids
    answers = tokenizer([e.output for e in examples], add_special_tokens=False).input_ids
    return [(p, a + [tokenizer.eos_token_id]) for p, a in zip(prompts, answers)]


def collate(pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 outside the answers)."""
    length = max(len(p) + len(a) for p, a in pairs)
    ids = torch.full((len(pairs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pairs), length), dtype=torch.long)
    labels = torch.full((len(pairs), length), -100, dtype=torch.long)
    for i, (p, a) in enumerate(pairs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        mask[i, : len(p) + len(a)] = 1
        labels[i, len(p): len(p) + len(a)] = torch.tensor(a)
    return ids.to(device), mask.to(device), labels.to(device)


def answer_losses(model, ids: Tensor, mask: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy of the answer tokens and their count, per row.

    Logits only at answer positions: the vocabulary is 49k wide, so full logits would dominate memory.
    """
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    rows, cols = (targets != -100).nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols]).float()
    loss = torch.nn.functional.cross_entropy(logits, targets[rows, cols], reduction="none")
    sums = torch.zeros(len(ids), device=ids.device).index_add_(0, rows, loss)
    counts = torch.zeros(len(ids), device=ids.device).index_add_(0, rows, torch.ones_like(loss))
    return sums, counts


@dataclass
class ZooTraining:
    """What :func:`train_zoo` returns.

    Attributes:
        factors: ``{module: (A [n, r, d_in], B [n, d_out, r])}`` of each adapter at its best validation loss
            (B without the scaling; the scaling is ``alpha / rank``).
        best_val: validation loss per adapter at its best step. base_val: the base model's, per task.
        best_step: the step of each adapter's best validation loss.
        history: ``[{"step", "epoch", "val": [n]}]``.
        seconds: training wall time.
    """

    factors: dict[str, tuple[Tensor, Tensor]]
    best_val: list[float]
    base_val: list[float]
    best_step: list[int]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def validation_losses(model, bank: LoraBank | None, val: list[list[tuple]], pad_id: int, *, rows_per_batch: int = 1024) -> list[float]:
    """Mean answer-token loss of each adapter on its own validation examples (``bank=None``: the base model)."""
    device = next(model.parameters()).device
    items = [(k, pair) for k, pairs in enumerate(val) for pair in pairs]
    items.sort(key=lambda kp: len(kp[1][0]) + len(kp[1][1]))
    sums = torch.zeros(len(val), device=device)
    counts = torch.zeros(len(val), device=device)
    for start in range(0, len(items), rows_per_batch):
        chunk = items[start: start + rows_per_batch]
        adapters = torch.tensor([k for k, _ in chunk], device=device)
        if bank is not None:
            bank.rows = adapters
        with _autocast(device):
            s, c = answer_losses(model, *collate([p for _, p in chunk], pad_id, device))
        sums.index_add_(0, adapters, s)
        counts.index_add_(0, adapters, c)
    return (sums / counts.clamp_min(1)).tolist()


def train_zoo(
    model,
    tokenizer,
    train: Sequence[Sequence[Example]],
    val: Sequence[Sequence[Example]],
    modules: dict[str, tuple[int, int]],
    *,
    seeds: Sequence[int],
    rank: int = 16,
    alpha: float = 32,
    lr: float = 1e-3,
    batch_per_adapter: int = 8,
    max_epochs: int = 8,
    evals_per_epoch: int = 2,
    patience: int = 2,
    warmup_steps: int = 10,
    log: Callable[[str], None] = print,
) -> ZooTraining:
    """Trains one LoRA per task (``train[k]``, ``val[k]``: task k's examples) with early stopping.

    An adapter stops training (leaves the batches) once its validation loss has not improved for
    ``patience`` evaluations; each keeps the factors of its best evaluation.
    """
    device = next(model.parameters()).device
    n = len(train)
    start = time.perf_counter()
    pad_id = tokenizer.pad_token_id
    train_pairs = [encode(tokenizer, ex) for ex in train]
    val_pairs = [encode(tokenizer, ex) for ex in val]
    bank = LoraBank(peft_init(n, modules, rank, alpha, list(seeds), device), scale=alpha / rank, trainable=True)
    optimizer = torch.optim.AdamW(bank.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps))

    steps_per_epoch = math.ceil(max(len(p) for p in train_pairs) / batch_per_adapter)
    eval_every = max(1, steps_per_epoch // evals_per_epoch)
    rngs = [random.Random(s) for s in seeds]
    orders = [[] for _ in range(n)]

    def next_examples(k: int) -> list[tuple]:
        picked = []
        while len(picked) < batch_per_adapter:
            if not orders[k]:
                orders[k] = list(range(len(train_pairs[k])))
                rngs[k].shuffle(orders[k])
            picked.append(train_pairs[k][orders[k].pop()])
        return picked

    base_val = validation_losses(model, None, val_pairs, pad_id)
    with bank.attached(model):
        best_val = [math.inf] * n
        best_step = [0] * n
        best = {name: (a.clone(), b.clone()) for name, (a, b) in bank.factors().items()}
        stale = [0] * n
        history = []
        step = 0
        while step < max_epochs * steps_per_epoch:
            active = [k for k in range(n) if stale[k] < patience]
            if not active:
                break
            batch = [(k, pair) for k in active for pair in next_examples(k)]
            bank.rows = torch.tensor([k for k, _ in batch], device=device)
            with _autocast(device):
                sums, counts = answer_losses(model, *collate([p for _, p in batch], pad_id, device))
            loss = (sums / counts.clamp_min(1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step % eval_every == 0 or step == max_epochs * steps_per_epoch:
                losses = validation_losses(model, bank, val_pairs, pad_id)
                history.append({"step": step, "epoch": step / steps_per_epoch, "train_loss": loss.item(), "val": losses})
                improved = [k for k in active if losses[k] < best_val[k]]
                for k in active:
                    stale[k] = 0 if k in improved else stale[k] + 1
                if improved:
                    idx = torch.tensor(improved, device=device)
                    for name, (a, b) in bank.factors().items():
                        best[name][0][idx] = a[idx]
                        best[name][1][idx] = b[idx]
                    for k in improved:
                        best_val[k], best_step[k] = losses[k], step
                log(f"step {step} (epoch {step / steps_per_epoch:.1f}): train loss {loss.item():.3f}, "
                    f"mean val loss {sum(losses) / n:.3f}, {len(improved)} improved, "
                    f"{sum(s < patience for s in stale)} still training, {time.perf_counter() - start:.0f} s")
    return ZooTraining(best, best_val, base_val, best_step, history, time.perf_counter() - start, step)

