"""First-come-first-served batching with a limit on distinct adapters per batch (as vLLM's scheduler).

vLLM's multi-LoRA scheduler admits waiting requests in arrival order, but a request whose adapter
would make the batch hold more than ``max_loras`` distinct adapters is skipped and stays at its place
in the queue; later requests whose adapters are already in the batch may still join. The same
scheduler serves every configuration: the base model and JD-LoRA simply have no adapter limit.
"""

from __future__ import annotations

from collections.abc import Sequence

from .workload import Request


class FifoScheduler:
    """Waiting requests in arrival order; :meth:`next_batch` takes up to ``max_batch`` of them.

    Args:
        max_batch: most requests in one batch.
        max_adapters: most distinct adapters in one batch (None: no limit).
    """

    def __init__(self, max_batch: int, max_adapters: int | None = None):
        if max_batch < 1 or (max_adapters is not None and max_adapters < 1):
            raise ValueError(f"max_batch and max_adapters must be >= 1, got {max_batch} and {max_adapters}")
        self.max_batch = max_batch
        self.max_adapters = max_adapters
        self.waiting: list[Request] = []

    def __len__(self) -> int:
        return len(self.waiting)

    def add(self, requests: Sequence[Request]) -> None:
        """Queues requests (they must come in arrival order)."""
        self.waiting.extend(requests)

    def next_batch(self) -> list[Request]:
        """The oldest requests that fit: at most ``max_batch``, at most ``max_adapters`` distinct adapters.

        Skipped requests keep their order and go first next time.
        """
        batch: list[Request] = []
        adapters: set[int] = set()
        skipped: list[Request] = []
        for i, request in enumerate(self.waiting):
            if len(batch) == self.max_batch:
                skipped.extend(self.waiting[i:])
                break
            fits = (request.adapter in adapters or self.max_adapters is None
                    or len(adapters) < self.max_adapters)
            if fits:
                batch.append(request)
                adapters.add(request.adapter)
            else:
                skipped.append(request)
        self.waiting = skipped
        return batch
