"""The JD-LoRA forward as a ``torch.library`` custom op, so that ``torch.compile`` traces it whole.

``torch.ops.jdlora.jd_lora_forward_`` mutates ``y`` in place (``y[t] += scale * U[c] Sigma[a] V[c]^T
x[t]``, :func:`jdlora.kernels.jd_lora_forward`), takes the batch as its three tensors plus
``tokens_per_row`` and has a fake implementation (it only mutates ``y``: nothing to infer), so dynamo
puts it in the graph as one node instead of tracing into Triton's launcher (a graph break) and
inductor calls it as an opaque kernel. Under ``mode="reduce-overhead"`` the captured CUDA graph
replays its three launches; the host code here runs only while the graph is recorded. This is the
pattern vLLM uses for its LoRA kernels (``direct_register_custom_op`` with ``mutates_args``).

:func:`jdlora.kernels.jd_lora_forward` routes through this op when it runs under ``torch.compile``
(``torch.compiler.is_compiling()``) and calls the launcher directly in eager mode (a custom op's
dispatch costs host time that eager callers would pay per layer).

Scratch: the kernels need a zeroed float32 ``[T, r]`` buffer. A batch built outside the op keeps one
for all layers (:class:`~jdlora.kernels.JDBatch`, kept zeroed by the kernels); here each call takes a
fresh one (one small memset per layer). Keeping one for the process would be cheaper, but inside
``torch.compile``'s CUDA graphs every allocation of the op comes from the graphs' memory pool, whose
state the graph trees reset between recordings: a buffer that outlives the call could be handed out
again while still in use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .batch import JDBatch
from .reference import jd_lora_forward_reference

__all__ = ["jd_lora_forward_op"]

@torch.library.custom_op("jdlora::jd_lora_forward_", mutates_args=("y",))
def jd_lora_forward_op(
    y: Tensor,
    x: Tensor,
    U: Tensor,
    V: Tensor,
    sigma: Tensor,
    cluster_of: Tensor,
    row_adapter: Tensor,
    order: Tensor,
    sorted_adapter: Tensor,
    tokens_per_row: int,
    scale: float,
    backend: str,
) -> None:
    """``y += scale * U[c] Sigma[a] V[c]^T x`` per token; ``backend`` is ``"triton"`` or ``"torch"`` (checked by the caller)."""
    batch = JDBatch(row_adapter, order, sorted_adapter, tokens_per_row)  # its scratch: allocated per call
    if backend == "torch":
        jd_lora_forward_reference(y, x, U, V, sigma, cluster_of, batch.token_adapter, scale=scale)
        return
    from .launch import jd_lora_forward_triton  # imports triton

    jd_lora_forward_triton(y, x, U, V, sigma, cluster_of, batch, scale=scale)


@jd_lora_forward_op.register_fake
def _(y, x, U, V, sigma, cluster_of, row_adapter, order, sorted_adapter, tokens_per_row, scale, backend) -> None:
    return None
