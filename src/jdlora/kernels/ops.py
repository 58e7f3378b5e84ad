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

The siblings' halves are two more ops: ``torch.ops.jdlora.jd_lora_shrink_siblings`` returns a fresh ``g`` (a graph
value, so no state outlives the graph) and ``torch.ops.jdlora.jd_lora_expand_siblings_`` mutates the list of
outputs (:func:`jdlora.kernels.jd_lora_shrink_siblings`, :func:`jdlora.kernels.jd_lora_expand_siblings`).

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
from .reference import _accumulation, jd_lora_expand_reference, jd_lora_forward_reference, jd_lora_shrink_reference
from .sizes import block_rank

__all__ = ["jd_lora_forward_op", "jd_lora_shrink_siblings_op", "jd_lora_expand_siblings_op"]

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


@torch.library.custom_op("jdlora::jd_lora_shrink_siblings", mutates_args=())
def jd_lora_shrink_siblings_op(
    x: Tensor,
    Vs: list[Tensor],
    sigmas: list[Tensor],
    cluster_ofs: list[Tensor],
    row_adapter: Tensor,
    order: Tensor,
    sorted_adapter: Tensor,
    tokens_per_row: int,
    backend: str,
) -> Tensor:
    """``g_s = Sigma_s[a] V_s[c_s]^T x`` of up to three siblings (:func:`jdlora.kernels.jd_lora_shrink_siblings`), as a
    new tensor: Triton ``[S, T, w]`` float32 in the batch's adapter order, torch ``[S, T, r]`` in token order."""
    batch = JDBatch(row_adapter, order, sorted_adapter, tokens_per_row)  # its scratch: allocated per call
    if backend == "torch":
        ta = batch.token_adapter
        return torch.stack([jd_lora_shrink_reference(x, V, s, c, ta, V.dtype) for V, s, c in zip(Vs, sigmas, cluster_ofs)])
    from .launch import jd_lora_shrink_siblings_triton  # imports triton

    return jd_lora_shrink_siblings_triton(x, Vs, sigmas, cluster_ofs, batch)


@jd_lora_shrink_siblings_op.register_fake
def _(x, Vs, sigmas, cluster_ofs, row_adapter, order, sorted_adapter, tokens_per_row, backend) -> Tensor:
    T, r = x.shape[0], Vs[0].shape[2]
    if backend == "torch":
        return x.new_empty((len(Vs), T, r), dtype=_accumulation(x, Vs[0].dtype, Vs[0], sigmas[0]))
    return x.new_empty((len(Vs), torch.sym_max(T, 1), block_rank(r)), dtype=torch.float32)


@torch.library.custom_op("jdlora::jd_lora_expand_siblings_", mutates_args=("ys",))
def jd_lora_expand_siblings_op(
    ys: list[Tensor],
    Us: list[Tensor],
    g: Tensor,
    cluster_ofs: list[Tensor],
    row_adapter: Tensor,
    order: Tensor,
    sorted_adapter: Tensor,
    tokens_per_row: int,
    scale: float,
    d_in: int,
    backend: str,
) -> None:
    """``ys[s] += scale * U_s[c_s] g[s]`` for each sibling s, with ``g`` from :func:`jd_lora_shrink_siblings_op`
    (:func:`jdlora.kernels.jd_lora_expand_siblings`; one sibling: :func:`jdlora.kernels.jd_lora_expand`), in one
    launch: the siblings must fit it (:func:`jdlora.kernels.expand_siblings_fusable`, checked by the caller)."""
    batch = JDBatch(row_adapter, order, sorted_adapter, tokens_per_row)
    if backend == "torch":
        for y, U, g_s, cluster_of in zip(ys, Us, g, cluster_ofs):
            jd_lora_expand_reference(y, U, g_s, cluster_of, batch.token_adapter, scale=scale)
        return
    from .launch import jd_lora_expand_siblings_triton  # imports triton

    jd_lora_expand_siblings_triton(ys, Us, g, cluster_ofs, batch, scale=scale, d_in=d_in)


@jd_lora_expand_siblings_op.register_fake
def _(ys, Us, g, cluster_ofs, row_adapter, order, sorted_adapter, tokens_per_row, scale, d_in, backend) -> None:
    return None
