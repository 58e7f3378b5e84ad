"""JD-LoRA forward for batches that mix adapters: Triton kernels on CUDA, a torch reference elsewhere.

The math (paper "Compress then Serve", arXiv 2407.00066, section 3 and Appendix A.3): a compressed
module keeps, per cluster c, shared bases ``U[c]`` (d_out x r) and ``V[c]`` (d_in x r), and per
adapter a a small ``Sigma[a]`` (r x r for JD-Full, r for JD-Diag); adapter a belongs to cluster
``cluster_of[a]``. For a batch where token t uses adapter ``a(t)``::

    y[t] += scale * U[c] @ Sigma[a] @ V[c].T @ x[t],    a = token_adapter[t], c = cluster_of[a]

and tokens with ``a < 0`` (no adapter) or ``c < 0`` (adapter a has no update in this module) are
left untouched.

API::

    batch = prepare_batch(token_adapter)           # once per forward; reused by every layer
    jd_lora_forward(y, x, U, V, sigma, cluster_of, batch, scale=1.0)   # in place, returns y
    y = jd_lora_linear(x, W, b, U, V, sigma, cluster_of, batch)     # base linear + JD in one call

    x [T, d_in], y [T, d_out]          any strides (rows of a flattened [B, S, d] tensor are fine)
    U [C, d_out, r], V [C, d_in, r]    x, U, V: one dtype among float16, bfloat16, float32
    sigma [n, r, r] (full) or [n, r] (diagonal); y and sigma: any of those dtypes
    cluster_of [n], token_adapter [T]  int32 or int64; -1 = none. Indices must be < n and < C
                                       (not checked: checking would synchronize with the host)

Sibling modules that read the same ``x`` (q, k and v of an attention block; gate and up) run their first
two launches together, then their expands, together when every output is at hand (3 launches for q, k, v
instead of 9) or each its own (5); the same bits as each module's own :func:`jd_lora_forward`::

    if siblings_fusable(Vs, sigmas, cluster_ofs):     # one rank, dtype and layout; 2-3 siblings
        shrunk = jd_lora_shrink_siblings(x, Vs, sigmas, cluster_ofs, batch)   # g_s = Sigma_s[a] V_s[c_s]^T x
        jd_lora_expand_siblings(ys, Us, cluster_ofs, shrunk, scale=scale)     # or, per sibling s:
        # jd_lora_expand(ys[s], Us[s], cluster_ofs[s], shrunk, s, scale=scale)

The PEFT tuner does this by itself (:mod:`jdlora.tuner.siblings`), and :func:`jd_lora_forward_siblings` for
the slices of one output (the serving engines' fused projections).

``batch`` may also be the raw ``token_adapter`` tensor (then :func:`prepare_batch` runs per call). A batch
of rows of S tokens each (a ``[B, S, d]`` input flattened) is ``prepare_batch(row_adapter)`` once and
``batch.with_tokens_per_row(S)`` per forward: one sort of the rows serves prefill and decode.

torch.compile: under ``torch.compile`` both functions put one custom-op node in the graph
(``torch.ops.jdlora.jd_lora_forward_``, :mod:`~jdlora.kernels.ops`, mutating ``y``), so dynamo never traces
into Triton's launcher; ``fullgraph=True`` works and CUDA graphs (``mode="reduce-overhead"``) replay the
kernels; the siblings' functions likewise (one shrink-and-Sigma node, one expand node). In eager mode they call
the launcher directly (no custom-op dispatch per call).
Numbers: float32 accumulation throughout; :mod:`jdlora.kernels.reference` defines them.

Dispatch: ``backend="auto"`` runs the Triton kernels on CUDA tensors and the torch reference
elsewhere; ``backend="triton"`` forces the kernels (on CPU tensors too, under
``TRITON_INTERPRET=1``, which is how CPU CI tests them), ``backend="torch"`` forces the reference;
the environment variable ``JDLORA_KERNELS=torch|triton`` (read when this module is imported) overrides ``"auto"``. Triton is imported
only when the Triton path runs, so ``import jdlora`` never imports it.

Kernels (Triton path), three launches per layer, no host synchronization, CUDA-graph capturable
(grids are sized by T and the shapes, programs with nothing to do exit early):

1. :mod:`~jdlora.kernels.shrink` -- ``h[t] = V[c]^T x[t]`` for blocks of tokens in adapter order,
   split over d_in when the batch is small (partial sums meet in a float32 scratch by atomic adds).
   Reads x once, each present cluster's V once per token block.
2. :mod:`~jdlora.kernels.sigma` -- ``g[t] = Sigma[a] h[t]``: one token per program in decode (its
   whole Sigma in one load), one dot per run of one adapter in prefill; re-zeroes the scratch, so
   every layer of the forward reuses it without a memset.
3. :mod:`~jdlora.kernels.expand` -- ``y[t] += scale * U[c] g[t]`` for tiles of d_out. Reads g and
   each present cluster's U tile once per token block, reads and writes y once.

Siblings (:func:`jd_lora_shrink_siblings`): ``jd_shrink_siblings_kernel`` and ``jd_sigma_siblings_kernel`` add a
sibling index to the grid of 1. and 2. (each program is the same program of one sibling s, with its own
``V_s``, ``Sigma_s``, ``cluster_of_s`` and rows of a ``[S, T, w]`` scratch), so each sibling gets the sums of
its own launches; ``jd_expand_siblings_kernel`` lays the siblings' column tiles of 3. along one grid axis (each
its own ``U``, output and width).

:mod:`~jdlora.kernels.launch` says why three launches and holds the block-size configurations.
Eager launches go through :mod:`~jdlora.kernels.fast_launch`: after the first launch of a specialization
it calls the compiled kernel's launcher directly, skipping Triton's per-call argument handling (most of
the host time of an eager layer); ``JDLORA_FAST_LAUNCH=0`` turns it off.
:func:`jd_lora_linear` runs the same three launches around the base layer's GEMM: shrink and Sigma
on a side stream beside the GEMM (they only read x), the expand into the GEMM's output after it.

Memory traffic that must happen (the bandwidth floor): x, y twice, the U and V of every cluster
present, and the Sigma of every adapter present. The kernels add only the float32 ``g`` (T x r)
and re-reads of bases by several token blocks (from L2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from .batch import JDBatch, prepare_batch
from .ops import jd_lora_expand_siblings_op, jd_lora_forward_op, jd_lora_shrink_siblings_op
from .reference import jd_lora_expand_reference, jd_lora_forward_reference, jd_lora_shrink_reference

__all__ = ["JDBatch", "prepare_batch", "jd_lora_forward", "jd_lora_linear", "jd_lora_forward_reference",
           "ShrunkSiblings", "siblings_fusable", "jd_lora_shrink_siblings", "jd_lora_expand", "jd_lora_expand_siblings",
           "jd_lora_forward_siblings", "expand_siblings_fusable", "MAX_SIBLINGS", "KERNEL_DTYPES"]

Backend = Literal["auto", "triton", "torch"]
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the Triton kernels take
_INTS = (torch.int32, torch.int64)
# Read once, at import: a lookup per call cost more host time than the rest of the dispatch.
_ENV_BACKEND = os.environ.get("JDLORA_KERNELS")
_launch_module = None


def _triton():
    """:mod:`~jdlora.kernels.launch`, imported on first use (it imports triton); a global after that, not an
    ``import`` statement per eager call."""
    global _launch_module
    if _launch_module is None:
        from . import launch

        _launch_module = launch
    return _launch_module


def jd_lora_forward(
    y: Tensor,
    x: Tensor,
    U: Tensor,
    V: Tensor,
    sigma: Tensor,
    cluster_of: Tensor,
    batch: JDBatch | Tensor,
    *,
    scale: float = 1.0,
    backend: Backend = "auto",
    check: bool = True,
) -> Tensor:
    """In place ``y[t] += scale * U[c] Sigma[a] V[c]^T x[t]`` for a batch mixing adapters.

    Args:
        y: ``[T, d_out]`` output, updated in place (only rows of tokens with an update).
        x: ``[T, d_in]`` input.
        U: ``[C, d_out, r]`` expand bases per cluster. V: ``[C, d_in, r]`` shrink bases.
        sigma: ``[n, r, r]`` (JD-Full) or ``[n, r]`` (JD-Diag), per adapter.
        cluster_of: ``[n]`` cluster of each adapter in this module (-1: no update here).
        batch: :func:`prepare_batch` of ``token_adapter [T]``, or that tensor itself.
        scale: multiplies the update.
        backend: ``"auto"`` (Triton on CUDA, torch elsewhere), ``"triton"`` or ``"torch"``.
        check: check shapes, dtypes and devices (a few microseconds of host time per call). A caller that
            built the tensors itself and checked them once (the PEFT tuner's layers) passes False.

    Returns:
        ``y``.

    Example::

        batch = prepare_batch(token_adapter)
        y = base_linear(x)
        jd_lora_forward(y, x, U, V, sigma, cluster_of, batch)
    """
    batch, backend = _prepare(y, x, U, V, sigma, cluster_of, batch, backend, check)
    if torch.compiler.is_compiling():  # one graph node (jdlora.kernels.ops), not a trace into Triton's launcher
        _op_forward(y, x, U, V, sigma, cluster_of, batch, scale, backend)
        return y
    if backend == "torch":
        return jd_lora_forward_reference(y, x, U, V, sigma, cluster_of, batch.token_adapter, scale=scale)
    return _triton().jd_lora_forward_triton(y, x, U, V, sigma, cluster_of, batch, scale=scale)


def jd_lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    U: Tensor,
    V: Tensor,
    sigma: Tensor,
    cluster_of: Tensor,
    batch: JDBatch | Tensor,
    *,
    scale: float = 1.0,
    backend: Backend = "auto",
    overlap: bool = True,
) -> Tensor:
    """``y = x W^T + b`` and, per token, ``+ scale * U[c] Sigma[a] V[c]^T x[t]``: an adapted linear.

    Same numbers as ``jd_lora_forward(F.linear(x, W, b), x, ...)``. On CUDA with ``overlap=True``
    the JD shrink and Sigma launches run on a side stream beside the base GEMM (both only read
    ``x``), and the expand adds into the GEMM's output afterwards, so the GEMM hides part of the
    adapter's latency; inside a captured CUDA graph the two branches stay parallel.

    Args:
        x: ``[T, d_in]``. weight: ``[d_out, d_in]`` (``nn.Linear.weight``), x's dtype. bias: ``[d_out]`` or None.
        U, V, sigma, cluster_of, batch, scale, backend: as in :func:`jd_lora_forward`.
        overlap: run shrink and Sigma beside the GEMM (CUDA only; otherwise one after the other).

    Returns:
        A new ``[T, d_out]`` tensor.
    """
    d_out = U.shape[1] if U.dim() == 3 else -1
    if weight.shape != (d_out, x.shape[-1]) or weight.dtype != x.dtype or weight.device != x.device:
        raise ValueError(f"jd_lora_linear: weight must be [d_out={d_out}, d_in={x.shape[-1]}] in {x.dtype} on "
                         f"{x.device} (U's d_out, x's d_in), got {tuple(weight.shape)} {weight.dtype} on {weight.device}")
    batch, backend = _prepare(None, x, U, V, sigma, cluster_of, batch, backend)
    if torch.compiler.is_compiling():  # the graph orders the GEMM and the op; no side stream here
        y = torch.nn.functional.linear(x, weight, bias)
        _op_forward(y, x, U, V, sigma, cluster_of, batch, scale, backend)
        return y
    if backend == "torch":
        y = torch.nn.functional.linear(x, weight, bias)
        return jd_lora_forward_reference(y, x, U, V, sigma, cluster_of, batch.token_adapter, scale=scale)
    return _triton().jd_lora_linear_triton(x, weight, bias, U, V, sigma, cluster_of, batch, scale=scale, overlap=overlap)


MAX_SIBLINGS = 3  # the fused kernels' sibling axis (q, k, v)


@dataclass(frozen=True)
class ShrunkSiblings:
    """``g_s = Sigma_s[a] V_s[c_s]^T x`` of sibling modules, from :func:`jd_lora_shrink_siblings`.

    ``g[s]`` is what sibling s's :func:`jd_lora_expand` reads (Triton: rows in the batch's adapter order,
    in the batch's sibling scratch; torch: rows in token order). Valid while :attr:`valid`: the next
    :func:`jd_lora_shrink_siblings` on the same batch overwrites the Triton path's scratch.
    """

    g: Tensor | tuple[Tensor, ...]  # Triton: [S, T, w] (one stacked scratch); torch: one [T, r] per sibling
    batch: JDBatch
    call: int  # TRACED: made under torch.compile (a graph value of its own, never overwritten)
    d_in: int
    backend: str

    @property
    def valid(self) -> bool:
        return self.call == TRACED or self.batch.sibling_calls == self.call


TRACED = -1


def siblings_fusable(Vs: Sequence[Tensor], sigmas: Sequence[Tensor], cluster_ofs: Sequence[Tensor]) -> bool:
    """Whether :func:`jd_lora_shrink_siblings` takes these banks: 1 to :data:`MAX_SIBLINGS` non-empty ones of one
    rank, dtype, Sigma kind and the same strides (contiguous banks of one rank always are), cluster_of of one
    dtype. Siblings that are not go through :func:`jd_lora_forward` each."""
    if not 0 < len(Vs) <= MAX_SIBLINGS or not len(Vs) == len(sigmas) == len(cluster_ofs):
        return False
    V0, s0, c0 = Vs[0], sigmas[0], cluster_ofs[0]
    for V, sigma, cluster_of in zip(Vs, sigmas, cluster_ofs):
        if (V.dim() != 3 or V.shape[0] == 0 or V.shape[1:] != V0.shape[1:] or V.stride() != V0.stride()
                or V.dtype != V0.dtype or sigma.dim() != s0.dim() or sigma.shape[1:] != s0.shape[1:]
                or sigma.stride()[1:] != s0.stride()[1:] or sigma.stride(0) != s0.stride(0)
                or sigma.dtype != s0.dtype or cluster_of.dtype != c0.dtype or cluster_of.shape[0] == 0):
            return False
    return True


def jd_lora_shrink_siblings(
    x: Tensor,
    Vs: Sequence[Tensor],
    sigmas: Sequence[Tensor],
    cluster_ofs: Sequence[Tensor],
    batch: JDBatch,
    *,
    backend: Backend = "auto",
) -> ShrunkSiblings:
    """The first half of :func:`jd_lora_forward` for up to three sibling modules that read the same ``x``
    (q, k and v; gate and up): ``g_s[t] = Sigma_s[a] V_s[c_s]^T x[t]``, two launches in all on the Triton path.

    Then :func:`jd_lora_expand` per sibling gives, bit for bit, what its own :func:`jd_lora_forward` gives.
    Each sibling has its own bases bank ``V_s [C_s, d_in, r]``, Sigma bank and ``cluster_of_s``; they share
    the rank, dtypes and strides (:func:`siblings_fusable`, not checked here: the caller checks once).

    Example::

        shrunk = jd_lora_shrink_siblings(x, (Vq, Vk, Vv), (Sq, Sk, Sv), (cq, ck, cv), batch)
        for s, (y, U, c) in enumerate(((yq, Uq, cq), (yk, Uk, ck), (yv, Uv, cv))):
            jd_lora_expand(y, U, c, shrunk, s)
    """
    backend = _resolve_backend(backend, x)
    if torch.compiler.is_compiling():  # one graph node returning a fresh g (no counter for dynamo to guard on)
        g = jd_lora_shrink_siblings_op(x, list(Vs), list(sigmas), list(cluster_ofs), batch.row_adapter, batch.order,
                                       batch.sorted_adapter, batch.tokens_per_row, backend)
        return ShrunkSiblings(g, batch, TRACED, x.shape[1], backend)
    batch.sibling_calls += 1
    if backend == "torch":
        ta = batch.token_adapter
        g = tuple(jd_lora_shrink_reference(x, V, s, c, ta, V.dtype) for V, s, c in zip(Vs, sigmas, cluster_ofs))
    else:
        g = _triton().jd_lora_shrink_siblings_triton(x, Vs, sigmas, cluster_ofs, batch)
    return ShrunkSiblings(g, batch, batch.sibling_calls, x.shape[1], backend)


def jd_lora_expand(y: Tensor, U: Tensor, cluster_of: Tensor, shrunk: ShrunkSiblings, sibling: int, *,
                   scale: float = 1.0) -> Tensor:
    """In place ``y[t] += scale * U[c] g[t]`` with sibling ``sibling``'s ``g`` of ``shrunk``
    (:func:`jd_lora_shrink_siblings`): the expand launch of :func:`jd_lora_forward`. Returns ``y``."""
    if torch.compiler.is_compiling():
        _op_expand([y], [U], shrunk.g[sibling:sibling + 1], [cluster_of], shrunk, scale)
        return y
    if not shrunk.valid:
        raise RuntimeError("jd_lora_expand: a later jd_lora_shrink_siblings on this batch overwrote this g")
    g = shrunk.g[sibling]
    if shrunk.backend == "torch":
        return jd_lora_expand_reference(y, U, g, cluster_of, shrunk.batch.token_adapter, scale=scale)
    return _triton().jd_lora_expand_triton(y, U, g, cluster_of, shrunk.batch, scale=scale, d_in=shrunk.d_in)


def expand_siblings_fusable(ys: Sequence[Tensor], Us: Sequence[Tensor]) -> bool:
    """Whether :func:`jd_lora_expand_siblings` takes these outputs and U banks in one launch: 2-D outputs of one
    row count and column stride, U banks of one rank, dtype and the same strides in their last two dims
    (contiguous outputs and banks of one rank always are). Else it runs one expand per sibling."""
    y0, U0 = ys[0], Us[0]
    return all(
        y.dim() == 2 and y.shape[0] == y0.shape[0] and y.stride(1) == y0.stride(1) and U.dim() == 3
        and U.shape[2] == U0.shape[2] and U.dtype == U0.dtype and U.stride()[1:] == U0.stride()[1:]
        for y, U in zip(ys, Us)
    )


def jd_lora_expand_siblings(ys: Sequence[Tensor], Us: Sequence[Tensor], cluster_ofs: Sequence[Tensor],
                            shrunk: ShrunkSiblings, *, scale: float = 1.0, check: bool = True) -> None:
    """:func:`jd_lora_expand` of every sibling of ``shrunk`` (``ys[s]``, ``Us[s]``, ``cluster_ofs[s]`` in
    :func:`jd_lora_shrink_siblings`'s order), in one launch on the Triton path when
    :func:`expand_siblings_fusable`; each ``ys[s]`` gets the bits of its own :func:`jd_lora_expand`.

    With it q, k and v take three launches in all (shrink, Sigma, expand), where their own
    :func:`jd_lora_forward` calls take nine. ``check=False`` skips checking the arguments and
    :func:`expand_siblings_fusable` (for a caller that checked them once: contiguous outputs of the rows of
    ``shrunk``, U banks of one rank, dtype and layout).

    Example::

        shrunk = jd_lora_shrink_siblings(x, (Vq, Vk, Vv), (Sq, Sk, Sv), (cq, ck, cv), batch)
        jd_lora_expand_siblings((yq, yk, yv), (Uq, Uk, Uv), (cq, ck, cv), shrunk)
    """
    if torch.compiler.is_compiling():  # one graph node mutating every y (one per y if they cannot share a launch)
        if check and not expand_siblings_fusable(ys, Us):
            for s, (y, U, cluster_of) in enumerate(zip(ys, Us, cluster_ofs)):
                jd_lora_expand(y, U, cluster_of, shrunk, s, scale=scale)
        else:
            _op_expand(list(ys), list(Us), shrunk.g, list(cluster_ofs), shrunk, scale)
        return
    if check:
        if not shrunk.valid:
            raise RuntimeError("jd_lora_expand_siblings: a later jd_lora_shrink_siblings on this batch overwrote this g")
        if len(ys) != len(shrunk.g) or len(Us) != len(ys) or len(cluster_ofs) != len(ys):
            raise ValueError(f"jd_lora_expand_siblings: {len(shrunk.g)} siblings were shrunk, got {len(ys)} outputs, "
                             f"{len(Us)} U banks and {len(cluster_ofs)} cluster_of")
    if shrunk.backend == "torch" or (check and not expand_siblings_fusable(ys, Us)):
        for s, (y, U, cluster_of) in enumerate(zip(ys, Us, cluster_ofs)):
            jd_lora_expand(y, U, cluster_of, shrunk, s, scale=scale)
        return
    _triton().jd_lora_expand_siblings_triton(ys, Us, shrunk.g, cluster_ofs, shrunk.batch, scale=scale,
                                             d_in=shrunk.d_in)


def jd_lora_forward_siblings(
    ys: Sequence[Tensor],
    x: Tensor,
    Us: Sequence[Tensor],
    Vs: Sequence[Tensor],
    sigmas: Sequence[Tensor],
    cluster_ofs: Sequence[Tensor],
    batch: JDBatch | Tensor,
    *,
    scale: float = 1.0,
    backend: Backend = "auto",
    check: bool = True,
) -> None:
    """:func:`jd_lora_forward` of sibling modules that read the same ``x``, each into its own ``ys[s]`` (e.g. the
    q, k and v slices of a fused projection's output): three launches for each set of up to :data:`MAX_SIBLINGS`
    siblings whose banks share rank, dtype and layout (:func:`jd_lora_shrink_siblings`,
    :func:`jd_lora_expand_siblings`), its own three for any other. Each ``ys[s]`` gets the numbers of its own
    :func:`jd_lora_forward`; the arguments are those of :func:`jd_lora_forward`, one per sibling, and ``check``
    checks each sibling's as it does."""
    batch, backend = _prepare(None, x, Us[0], Vs[0], sigmas[0], cluster_ofs[0], batch, backend, check=False)
    if check:
        for y, U, V, sigma, cluster_of in zip(ys, Us, Vs, sigmas, cluster_ofs):
            _check_inputs(y, x, U, V, sigma, cluster_of, batch, allow_float64=backend == "torch")
    sets: dict[tuple, list[int]] = {}  # siblings that may share launches: same shapes but d_out, dtypes, strides
    for s, (y, U, V, sigma, cluster_of) in enumerate(zip(ys, Us, Vs, sigmas, cluster_ofs)):
        key = (V.shape[1:], V.stride(), V.dtype, U.stride()[1:], sigma.shape[1:], sigma.stride(), sigma.dtype,
               cluster_of.dtype, y.stride(1))
        sets.setdefault(key, []).append(s)
    for members in sets.values():
        for i in range(0, len(members), MAX_SIBLINGS):
            part = members[i:i + MAX_SIBLINGS]
            ys_, Us_, Vs_, sigmas_, cs_ = ([seq[s] for s in part] for seq in (ys, Us, Vs, sigmas, cluster_ofs))
            if (len(part) > 1 and Vs_[0].dtype == x.dtype and siblings_fusable(Vs_, sigmas_, cs_)
                    and expand_siblings_fusable(ys_, Us_)):
                shrunk = jd_lora_shrink_siblings(x, Vs_, sigmas_, cs_, batch, backend=backend)
                jd_lora_expand_siblings(ys_, Us_, cs_, shrunk, scale=scale, check=False)
                continue
            for y, U, V, sigma, cluster_of in zip(ys_, Us_, Vs_, sigmas_, cs_):
                jd_lora_forward(y, x, U, V, sigma, cluster_of, batch, scale=scale, backend=backend, check=False)


def _op_expand(ys: list, Us: list, g: Tensor, cluster_ofs: list, shrunk: ShrunkSiblings, scale: float) -> None:
    b = shrunk.batch
    jd_lora_expand_siblings_op(ys, Us, g, cluster_ofs, b.row_adapter, b.order, b.sorted_adapter, b.tokens_per_row,
                               float(scale), shrunk.d_in, shrunk.backend)


def _op_forward(y, x, U, V, sigma, cluster_of, batch: JDBatch, scale: float, backend: str) -> None:
    jd_lora_forward_op(y, x, U, V, sigma, cluster_of, batch.row_adapter, batch.order, batch.sorted_adapter,
                       batch.tokens_per_row, float(scale), backend)


def _prepare(y, x, U, V, sigma, cluster_of, batch, backend: Backend, check: bool = True) -> tuple[JDBatch, str]:
    """The batch (prepared if given as ``token_adapter``) and the backend that runs, after checking the inputs."""
    if not isinstance(batch, JDBatch):
        batch = prepare_batch(batch)
    backend = _resolve_backend(backend, x)
    if check:
        _check_inputs(y, x, U, V, sigma, cluster_of, batch, allow_float64=backend == "torch")
    return batch, backend


def _resolve_backend(backend: Backend, x: Tensor) -> str:
    """``"triton"`` or ``"torch"``: ``"auto"`` is ``JDLORA_KERNELS`` if set, else Triton for CUDA tensors."""
    if backend == "auto":
        backend = _ENV_BACKEND or ("triton" if x.is_cuda else "torch")
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    return backend


def _check_inputs(y, x, U, V, sigma, cluster_of, batch: JDBatch, *, allow_float64: bool = False) -> None:
    """Shapes, dtypes and devices of :func:`jd_lora_forward`'s inputs (``y=None``: no output given)."""
    floats = KERNEL_DTYPES + ((torch.float64,) if allow_float64 else ())

    def fail(msg: str):
        raise ValueError(f"jd_lora_forward: {msg}")

    if x.dim() != 2 or (y is not None and y.dim() != 2):
        fail(f"x and y must be 2-D [T, d] (flatten leading dims first), got {tuple(x.shape)}"
             + (f" and {tuple(y.shape)}" if y is not None else ""))
    if U.dim() != 3 or V.dim() != 3:
        fail(f"U and V must be [C, d, r], got {tuple(U.shape)} and {tuple(V.shape)}")
    T, d_in = x.shape
    C, d_out, r = U.shape
    if y is not None and y.shape != (T, d_out):
        fail(f"y must be [T={T}, d_out={d_out}], got {tuple(y.shape)}")
    if V.shape != (C, d_in, r):
        fail(f"V must be [C={C}, d_in={d_in}, r={r}] to match x and U, got {tuple(V.shape)}")
    n = cluster_of.shape[0] if cluster_of.dim() == 1 else -1
    if cluster_of.dim() != 1 or cluster_of.dtype not in _INTS:
        fail(f"cluster_of must be a 1-D int32/int64 tensor [n], got {cluster_of.dtype} {tuple(cluster_of.shape)}")
    if sigma.shape not in ((n, r, r), (n, r)):
        fail(f"sigma must be [n={n}, r={r}, r] (full) or [n, r] (diagonal), got {tuple(sigma.shape)}")
    if batch.num_tokens != T:
        fail(f"the batch has {batch.num_tokens} tokens but x has {T} rows")
    names = "fp16/bf16/fp32" + ("/fp64 (fp64: torch backend only)" if allow_float64 else " (fp64: torch backend only)")
    if x.dtype not in floats or U.dtype != x.dtype or V.dtype != x.dtype:
        fail(f"x, U and V must share one dtype among {names}, got {x.dtype}, {U.dtype}, {V.dtype}")
    if (y is not None and y.dtype not in floats) or sigma.dtype not in floats:
        fail(f"y and sigma must be {names}, got {getattr(y, 'dtype', None)} and {sigma.dtype}")
    devices = {t.device for t in (y, x, U, V, sigma, cluster_of, batch.order) if t is not None}
    if len(devices) != 1:
        fail(f"all tensors must be on one device, got {sorted(map(str, devices))}")
