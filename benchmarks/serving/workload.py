"""The requests: Poisson arrivals, random adapters, prompts of sonnet-like lengths (section 6.3).

The paper sent Shakespeare sonnets as prompts. No dataset is available here, so prompts are random
token ids whose lengths follow a sonnet-like distribution: a sonnet is 14 lines of about 9 to 11
tokens, so lengths are drawn from a normal distribution around 130 tokens, clipped to 100-160.
Throughput depends on the lengths, not on which tokens they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SONNET_LENGTH = (130.0, 12.0, 100, 160)  # mean, std, min, max tokens


@dataclass
class Request:
    """One request: a prompt for one adapter, arriving at ``arrival`` seconds after the start.

    The serving loop fills ``start`` (its batch began), ``finish`` (its last token is known) and
    ``tokens`` (the generated ids).
    """

    id: int
    adapter: int
    prompt: list[int]
    arrival: float
    start: float | None = None
    finish: float | None = None
    tokens: list[int] = field(default_factory=list)


def make_requests(
    num_requests: int,
    num_adapters: int,
    *,
    rate: float,
    vocab_size: int,
    lengths: tuple[float, float, int, int] = SONNET_LENGTH,
    seed: int = 0,
) -> list[Request]:
    """Requests sorted by arrival: exponential gaps of mean ``1 / rate`` (Poisson), uniform adapters.

    Args:
        num_requests: how many requests.
        num_adapters: adapters are drawn uniformly from ``0 .. num_adapters - 1``.
        rate: mean arrivals per second; ``inf`` makes every request arrive at time 0.
        vocab_size: prompt token ids are drawn from ``3 .. vocab_size - 1`` (0-2: pad/bos/eos).
        lengths: ``(mean, std, min, max)`` of the prompt lengths.
        seed: seed of every draw.
    """
    gen = torch.Generator().manual_seed(seed)
    if rate == float("inf"):
        arrivals = torch.zeros(num_requests, dtype=torch.float64)
    else:
        gaps = torch.empty(num_requests, dtype=torch.float64).exponential_(rate, generator=gen)
        arrivals = gaps.cumsum(0) - gaps[0]  # the first request arrives at time 0
    adapters = torch.randint(0, num_adapters, (num_requests,), generator=gen)
    mean, std, low, high = lengths
    sizes = (torch.randn(num_requests, generator=gen, dtype=torch.float64) * std + mean).round()
    sizes = sizes.clamp(low, high).long()
    return [
        Request(i, int(adapters[i]), torch.randint(3, vocab_size, (int(sizes[i]),), generator=gen).tolist(),
                float(arrivals[i]))
        for i in range(num_requests)
    ]
