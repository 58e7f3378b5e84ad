"""Tensor-parallel sharding of JD-LoRA bases, matching TGI's own LoRA sharding.

TGI (``adapters/lora.py``: ``prepare_weights``, ``shard_lora_weights``, ``get_start_stop_idxs_for_rank``)
splits a dimension of size ``d`` over ``world_size`` ranks in equal blocks of ``d // world_size``, and treats
``o_proj``, ``down_proj`` and ``lm_head`` as row-parallel (their input is sharded, their output is reduced by
an all-reduce) and every other adapted projection as column-parallel (input replicated, output sharded).

JD-LoRA's update ``U_c Sigma_a V_c^T x`` is sharded accordingly:

- **column-parallel** (q/k/v, gate/up): ``U`` is sharded on ``d_out`` like LoRA B; ``V`` and Sigma are
  replicated. Each rank computes its own slice of the output with no collective (TGI's LoRA shards A on the
  rank dimension and all-gathers ``x A``; with shared bases a replicated V costs ``d_in x r`` per cluster and
  saves that collective).
- **row-parallel** (o, down): ``V`` is sharded on ``d_in`` like LoRA A; each rank computes ``V_c^T x`` on its
  slice of the input, the partial products are summed by an all-reduce (float32, ``[T, r]``), then Sigma
  (replicated) and ``U`` (replicated) are applied after the collective, adding the full update to the
  already-reduced output of the base layer on every rank.

Fused ``qkv_proj`` (phi3: TGI's ``load_qkv``) is not sharded: TGI gives each rank its block of q, its block
of k and its block of v, side by side, while the bases' ``d_out`` holds q, k, v whole; the split needs head
counts the adapter API does not pass. Serving it on more than one rank is refused
(:class:`UnsupportedShardingError`); one rank is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from jdlora.errors import JDLoraError

__all__ = ["FUSED_LAYERS", "ROW_PARALLEL_LAYERS", "ShardSpec", "UnsupportedShardingError", "shard_bounds"]

ROW_PARALLEL_LAYERS = frozenset({"o_proj", "down_proj", "lm_head"})  # TGI's split_dim=0 set
FUSED_LAYERS = frozenset({"qkv_proj"})  # q, k and v in one weight, sharded per projection by TGI (load_qkv)


class UnsupportedShardingError(JDLoraError, ValueError):
    """A layer type whose tensor-parallel sharding in TGI the backend does not reproduce."""

    def __init__(self, adapter: str, module: str, world_size: int):
        super().__init__(
            f"JD-LoRA adapter {adapter!r} adapts the fused projection {module!r}, which TGI shards per q, k and "
            f"v block over {world_size} ranks; jdlora_tgi serves fused qkv_proj on one rank only. Serve it "
            f"with --num-shard 1, or compress the collection from adapters of the separate q_proj, k_proj "
            f"and v_proj modules.")


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[start, stop)`` of ``rank``'s block of a dimension of ``size`` (TGI's ``get_start_stop_idxs_for_rank``)."""
    block = size // world_size
    return rank * block, (rank + 1) * block


@dataclass(frozen=True)
class ShardSpec:
    """How one layer type is sharded on this rank."""

    rank: int = 0
    world_size: int = 1
    row_parallel: bool = False
    fused: bool = False

    @classmethod
    def for_layer(cls, layer_type: str, rank: int = 0, world_size: int = 1) -> "ShardSpec":
        return cls(rank, world_size, layer_type in ROW_PARALLEL_LAYERS, layer_type in FUSED_LAYERS)

    def check(self, adapter: str, module: str) -> None:
        """Refuses what :meth:`shard` would get wrong (fused layers on more than one rank)."""
        if self.fused and self.world_size > 1:
            raise UnsupportedShardingError(adapter, module, self.world_size)

    @property
    def needs_collective(self) -> bool:
        """Row-parallel layers on more than one rank all-reduce ``V^T x`` before Sigma."""
        return self.row_parallel and self.world_size > 1

    def shard(self, U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
        """This rank's ``(U [C, d_out_local, r], V [C, d_in_local, r])`` from the full bases."""
        if self.world_size == 1:
            return U, V
        if self.row_parallel:
            start, stop = shard_bounds(V.shape[1], self.rank, self.world_size)
            return U, V[:, start:stop]
        start, stop = shard_bounds(U.shape[1], self.rank, self.world_size)
        return U[:, start:stop], V
