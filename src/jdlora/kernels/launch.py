"""Launchers of the Triton kernels (placeholder: runs the torch reference until the kernels land)."""

from __future__ import annotations

from .reference import jd_lora_forward_reference


def jd_lora_forward_triton(y, x, U, V, sigma, cluster_of, batch, *, scale=1.0):
    return jd_lora_forward_reference(y, x, U, V, sigma, cluster_of, batch.token_adapter, scale=scale)
