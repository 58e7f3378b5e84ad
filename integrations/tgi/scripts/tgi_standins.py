"""Plain-torch stand-ins for the compiled kernel modules TGI 3.3.7 imports on CUDA (docs/tgi.md, "Running
TGI's own server offline"). TGI's Python code runs unchanged; only these binary modules are replaced:

- found through ``utils.kernels.load_kernel(module=..., repo_id=...)``, which imports a local module of that
  name before it looks for the locked Hub build: ``paged_attention`` (``reshape_and_cache``,
  ``paged_attention_v1/v2``), ``rotary`` (``apply_rotary``), ``punica_sgmv`` (its pure-Python helpers and
  no kernels, so TGI takes its per-adapter torch path for plain LoRA), ``quantization`` and ``moe``
  (imported at module level by TGI's layers; for an unquantized dense model only fp8's capability query runs,
  answered "not supported");
- imported directly: ``flash_attn_2_cuda`` (``varlen_fwd``, prefill attention) and ``dropout_layer_norm``
  (``dropout_add_ln_fwd``, TGI's fused residual + RMSNorm).

The paged-attention ops read and write TGI's paged KV layout (``KVCache``: key ``[blocks, kv_heads,
head_size // x, BLOCK_SIZE, x]``, value ``[blocks, kv_heads, head_size, BLOCK_SIZE]``) with static shapes
and no host synchronisation, so TGI can capture them in CUDA graphs. Used by
``graph_warmup_check.py`` and by ``tests/test_tgi_server.py`` (``PunicaHelpers``).
"""

from __future__ import annotations

import importlib.util
import math
import sys
import types

import torch

__all__ = ["PunicaHelpers", "install", "pretend_cuda_system"]


class PunicaHelpers(types.ModuleType):
    """punica-sgmv's pure-Python helpers as TGI uses them (TGI 2.4 ``utils/sgmv.py``), as a module. With
    no kernels ``MAX_RANK_CUSTOM = -1``, so ``can_vectorize`` is False and TGI's per-adapter torch path runs."""

    MIN_SGMV_RANK, SGMV_BLOCK_SIZE, BGMV_MAX_RANK, MAX_RANK_CUSTOM, MIN_RANK_CUSTOM = 8, 16, 64, -1, 16

    def __init__(self):
        super().__init__("punica_sgmv", self.__doc__)

    def pad_rank(self, t, dim, world_size):
        min_rank = self.MIN_SGMV_RANK * world_size
        current = t.size(dim)
        target = min_rank if current <= min_rank else (current + 15) // 16 * 16
        if current == target:
            return t
        pad = [0, 0] * t.dim()
        pad[(t.dim() - dim - 1) * 2 + 1] = target - current
        return torch.nn.functional.pad(t, tuple(pad))

    def use_cutlass_shrink(self, rank):
        return rank < self.MIN_RANK_CUSTOM

    def orient_for_rank(self, t, rank):
        return t.transpose(0, 1) if self.MIN_RANK_CUSTOM <= rank <= self.MAX_RANK_CUSTOM else t

    def get_tmp_tensors(self, *args):
        return None, None


class _NotProvided(types.ModuleType):
    """A kernel module TGI imports at module level but never calls for an unquantized dense model: every
    attribute is a function that raises, so an unexpected use fails loudly (except the capability queries
    TGI makes at import, answered "not supported")."""

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def not_provided(*args, **kwargs):
            raise NotImplementedError(f"{self.__name__}.{attr} has no plain-torch stand-in (tgi_standins.py)")

        return not_provided


# ----- paged_attention (kernels-community/paged-attention) ---------------------------------------------


def reshape_and_cache(key, value, key_cache, value_cache, slots, kv_cache_dtype="auto", k_scale=None, v_scale=None):
    """Writes token t's key/value ``[T, kv_heads, head_size]`` at slot ``slots[t]`` of the paged caches."""
    _auto_only(kv_cache_dtype)
    block_size, x = key_cache.shape[3], key_cache.shape[4]
    block, offset = slots // block_size, slots % block_size
    T, H, D = key.shape
    key_cache[block, :, :, offset, :] = key.reshape(T, H, D // x, x).to(key_cache.dtype)
    value_cache[block, :, :, offset] = value.to(value_cache.dtype)


def paged_attention_v1(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens,
                       block_size, max_seq_len, alibi_slopes=None, kv_cache_dtype="auto", k_scale=None,
                       v_scale=None):
    """Decode attention of query ``[S, heads, head_size]`` over each sequence's first ``seq_lens[s]``
    cached tokens (blocks ``block_tables[s]``); writes ``out``. Reads ``ceil(max_seq_len / block_size)``
    blocks per sequence (a static shape for a given ``max_seq_len``), masking positions past ``seq_lens``."""
    _auto_only(kv_cache_dtype)
    if alibi_slopes is not None:
        raise NotImplementedError("ALiBi has no stand-in")
    S, H, D = query.shape
    n_blocks = min(math.ceil(max_seq_len / block_size), block_tables.shape[1])
    blocks = block_tables[:, :n_blocks].long().clamp(0, key_cache.shape[0] - 1)  # stale entries stay in range
    L = n_blocks * block_size
    k = key_cache[blocks].permute(0, 2, 1, 4, 3, 5).reshape(S, num_kv_heads, L, D)  # [S, kvH, L, D]
    v = value_cache[blocks].permute(0, 2, 1, 4, 3).reshape(S, num_kv_heads, L, D)
    q = query.float().reshape(S, num_kv_heads, H // num_kv_heads, D)
    scores = torch.einsum("skgd,skld->skgl", q, k.float()) * scale
    valid = torch.arange(L, device=query.device)[None, :] < seq_lens[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], -1e30)  # finite: padding rows (length 0) stay finite
    o = torch.einsum("skgl,skld->skgd", scores.softmax(-1), v.float())
    out.copy_(o.reshape(S, H, D).to(out.dtype))


def paged_attention_v2(out, exp_sums, max_logits, tmp_out, query, key_cache, value_cache, num_kv_heads, scale,
                       block_tables, seq_lens, block_size, max_seq_len, alibi_slopes=None, kv_cache_dtype="auto",
                       k_scale=None, v_scale=None):
    """Same result as :func:`paged_attention_v1` (v2 only partitions the work)."""
    paged_attention_v1(out, query, key_cache, value_cache, num_kv_heads, scale, block_tables, seq_lens, block_size,
                       max_seq_len, alibi_slopes, kv_cache_dtype, k_scale, v_scale)


def _auto_only(kv_cache_dtype):
    if kv_cache_dtype != "auto":
        raise NotImplementedError(f"KV cache dtype {kv_cache_dtype!r} has no stand-in")


# ----- flash_attn_2_cuda (flash-attn 2, prefill) -----------------------------------------------------------


def varlen_fwd(q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, leftpad_k, block_table, alibi_slopes,
               max_seqlen_q, max_seqlen_k, p_dropout, softmax_scale, zero_tensors, is_causal, window_size_left,
               window_size_right, softcap, return_softmax, gen):
    """Attention of packed sequences (``cu_seqlens``), causal with the queries at the end of each sequence,
    optional left window and softcap; GQA by repeating KV heads. Returns ``[out]``."""
    if block_table is not None or alibi_slopes is not None or p_dropout:
        raise NotImplementedError("paged KV, ALiBi or dropout in varlen_fwd has no stand-in")
    Tq, H = q.shape[:2]
    Tk, Hkv = k.shape[:2]

    def positions(cu, T):
        t = torch.arange(T, device=q.device)
        seq = torch.searchsorted(cu[1:].long(), t, right=True)
        return seq, t - cu.long()[seq]

    seq_q, pos_q = positions(cu_seqlens_q, Tq)
    seq_k, pos_k = positions(cu_seqlens_k, Tk)
    shift = (cu_seqlens_k.diff() - cu_seqlens_q.diff()).long()[seq_q]  # query i sits at key position i + shift
    allowed = seq_q[:, None] == seq_k[None, :]
    if is_causal:
        allowed &= pos_k[None, :] <= (pos_q + shift)[:, None]
    if window_size_left is not None and window_size_left >= 0:
        allowed &= pos_k[None, :] >= (pos_q + shift - window_size_left)[:, None]
    kk = k.float().repeat_interleave(H // Hkv, dim=1)
    vv = v.float().repeat_interleave(H // Hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), kk) * softmax_scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vv).to(q.dtype)
    if out is None:
        return [o]
    out.copy_(o)
    return [out]


# ----- rotary (kernels-community/rotary) ------------------------------------------------------------------


def apply_rotary(x1, x2, cos, sin, out1, out2, conj):
    """flash-attn's rotary: ``(out1, out2) = (x1 cos - x2 sin, x1 sin + x2 cos)`` (``sin`` negated if conj)."""
    a, b, c, s = x1.float(), x2.float(), cos.float(), sin.float()
    if conj:
        s = -s
    o1, o2 = a * c - b * s, a * s + b * c
    out1.copy_(o1.to(out1.dtype))
    out2.copy_(o2.to(out2.dtype))


# ----- dropout_layer_norm (flash-attn csrc/layer_norm) -----------------------------------------------------


def dropout_add_ln_fwd(x0, residual, gamma, beta, rowscale, colscale, x0_subset, z_subset, dropout_p, epsilon,
                       rowscale_const, z_numrows, gen, residual_in_fp32, is_rms_norm):
    """``x = x0 + residual``; returns ``[norm(x), x (None without residual), None, mean, rstd]`` (LayerNorm,
    or RMSNorm with ``is_rms_norm``). Dropout, row/column scales and subsets are not supported."""
    if dropout_p or any(t is not None for t in (rowscale, colscale, x0_subset, z_subset)):
        raise NotImplementedError("dropout / scales / subsets in dropout_add_ln_fwd have no stand-in")
    x = x0.float() if residual is None else x0.float() + residual.float()
    mean = None if is_rms_norm else x.mean(-1, keepdim=True)
    centred = x if is_rms_norm else x - mean
    rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + epsilon)
    z = centred * rstd * gamma.float()
    if beta is not None:
        z = z + beta.float()
    res = None
    if residual is not None:
        res = x if residual_in_fp32 else x.to(x0.dtype)
    return [z.to(x0.dtype), res, None, mean, rstd]


# ----- installing ----------------------------------------------------------------------------------------


def _module(name: str, **functions) -> types.ModuleType:
    m = types.ModuleType(name, f"tgi_standins: plain-torch stand-in for `{name}`")
    m.__dict__.update(functions)
    return m


def _not_provided(name: str, **answers) -> _NotProvided:
    m = _NotProvided(name, f"tgi_standins: `{name}` is imported but not provided (no kernels)")
    m.__dict__.update(answers)
    return m


def _standins() -> dict[str, types.ModuleType]:
    return {
        "paged_attention": _module("paged_attention", reshape_and_cache=reshape_and_cache,
                                   paged_attention_v1=paged_attention_v1, paged_attention_v2=paged_attention_v2),
        "flash_attn_2_cuda": _module("flash_attn_2_cuda", varlen_fwd=varlen_fwd),
        "rotary": _module("rotary", apply_rotary=apply_rotary),
        "dropout_layer_norm": _module("dropout_layer_norm", dropout_add_ln_fwd=dropout_add_ln_fwd),
        "punica_sgmv": PunicaHelpers(),
        "quantization": _not_provided("quantization", cutlass_scaled_mm_supports_fp8=lambda capability: False),
        "moe": _not_provided("moe"),
    }


def install() -> list[str]:
    """Registers a stand-in for each of the modules above that is not importable; returns their names
    (a real module, e.g. in TGI's image, is left in place)."""
    installed = []
    for name, module in _standins().items():
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            sys.modules[name] = module
            installed.append(name)
    return installed


def pretend_cuda_system() -> None:
    """CPU dry runs only: makes TGI take its CUDA code paths (``SYSTEM == "cuda"``, compute capability 9.0)
    so that the stand-ins run on CPU. TGI binds ``SYSTEM`` with ``from ... import SYSTEM`` and
    ``utils/__init__.py`` imports most of ``utils``, so ``utils/import_utils.py`` is loaded here on its own
    and patched before anything else of TGI's is imported. Its helpers stay the CPU ones (``synchronize``
    and ``empty_cache`` do nothing, ``get_free_memory`` reads host memory)."""
    name = "text_generation_server.utils.import_utils"
    if "text_generation_server.utils" in sys.modules:
        raise RuntimeError("pretend_cuda_system() must run before TGI's modules are imported")
    package = importlib.util.find_spec("text_generation_server")
    spec = importlib.util.spec_from_file_location(
        name, f"{package.submodule_search_locations[0]}/utils/import_utils.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    module.SYSTEM = "cuda"
    torch.cuda.get_device_capability = lambda device=None: (9, 0)
