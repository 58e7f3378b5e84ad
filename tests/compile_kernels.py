"""Compiles every configuration of jdlora's Triton kernels that the GPU path launches, for a real GPU, without one.

Triton's own compiler and ptxas (shipped in the ``triton`` wheel) take each kernel through MLIR, PTX and a cubin for
the target, so a kernel that only the interpreter can run (``TRITON_INTERPRET=1``, what the CPU tests use) fails here.
The configurations come from :mod:`jdlora.kernels.launch` (the GPU block sizes) and the launch functions' own option
helpers; integer arguments without divisibility hints (the generic specialization).

Run without ``TRITON_INTERPRET`` (the interpreter replaces the kernels at import)::

    python tests/compile_kernels.py 90        # compute capability 9.0 (H100/H200)

Prints one line per kernel (``ok ...`` or ``FAILED ...: the error``) and exits with status 1 if any failed.
"""

from __future__ import annotations

import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from jdlora.kernels import expand, launch, shrink, sigma

INT_POINTERS = ("cluster_of", "order", "sorted_adapter")
FLOAT32_POINTERS = ("h_ptr", "g_ptr")
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def signature(kernel, dtype: torch.dtype, constexprs: dict) -> dict:
    """Triton's type string per argument: the model's dtype for x, bases, y and Sigma, float32 scratch, int32
    indices and sizes, a float32 ``scale``."""
    out = {}
    for name in kernel.arg_names:
        if name in constexprs:
            out[name] = "constexpr"
        elif name.endswith("_ptr"):
            out[name] = ("*i32" if name.startswith(INT_POINTERS) else "*fp32" if name in FLOAT32_POINTERS
                         else f"*{TYPES[dtype]}")
        else:
            out[name] = "fp32" if name == "scale" else "i32"
    return out


def compile_one(kernel, dtype, options: dict, target: GPUTarget, label: str) -> None:
    launch_options = {k: options.pop(k) for k in ("num_warps", "num_stages") if k in options}
    source = ASTSource(fn=kernel, signature=signature(kernel, dtype, options), constexprs=options)
    compiled = triton.compile(source, target=target, options=launch_options)
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{label}: no cubin")


def configurations():
    """``(kernel, dtype, constexprs and launch options, label)`` for every kernel, regime, dtype and flag."""
    x = {dtype: torch.empty(0, dtype=dtype) for dtype in TYPES}
    regimes = {"decode": (launch.SHRINK_DECODE, launch.SIGMA_DECODE, launch.EXPAND_DECODE),
               "prefill": (launch.SHRINK_PREFILL, launch.SIGMA_PREFILL, launch.EXPAND_PREFILL)}
    for regime, (shrink_cfg, sigma_cfg, expand_cfg) in regimes.items():
        for dtype in (torch.bfloat16, torch.float32):
            for one in (True, False):
                for split in (2, 1):  # a decode batch splits d_in; a long one does not
                    opts = shrink._shrink_options(x[dtype], 64, split, shrink_cfg)
                    yield shrink.jd_shrink_kernel, dtype, {**opts, "ONE_CLUSTER": one}, \
                        f"shrink {regime} {TYPES[dtype]} one_cluster={one} split={split > 1}"
                    yield shrink.jd_shrink_siblings_kernel, dtype, {**opts, "ONE_CLUSTER0": one, "ONE_CLUSTER1": not one,
                                                                    "ONE_CLUSTER2": False}, \
                        f"shrink siblings {regime} {TYPES[dtype]} one_cluster={one} split={split > 1}"
                expand_opts = expand._expand_options(x[dtype], 64, expand_cfg)
                yield expand.jd_expand_kernel, dtype, {**expand_opts, "ONE_CLUSTER": one}, \
                    f"expand {regime} {TYPES[dtype]} one_cluster={one}"
                yield expand.jd_expand_siblings_kernel, dtype, {**expand_opts, "ONE_CLUSTER0": one,
                                                                "ONE_CLUSTER1": not one, "ONE_CLUSTER2": False}, \
                    f"expand siblings {regime} {TYPES[dtype]} one_cluster={one}"
        # the rank changes Sigma's tiling (SIGMA_ROWS); the diagonal and exact variants once, at rank 64
        for r, diag, exact in ((16, False, False), (64, False, False), (128, False, False), (64, True, False),
                               (64, False, True)):
            opts = sigma._sigma_options(r, diag, exact, sigma_cfg)
            label = f"{regime} r{r} {'diag' if diag else 'full'} {'ieee' if exact else 'tf32'}"
            yield sigma.jd_sigma_kernel, torch.bfloat16, dict(opts), f"sigma {label}"
            yield sigma.jd_sigma_siblings_kernel, torch.bfloat16, dict(opts), f"sigma siblings {label}"


def _compile(index: int, capability: int) -> str:
    kernel, dtype, options, label = list(configurations())[index]
    label = f"sm_{capability} {label}"
    try:
        compile_one(kernel, dtype, dict(options), GPUTarget("cuda", capability, 32), label)
    except Exception as error:
        return f"FAILED {label}: {type(error).__name__}: {error}"
    return f"ok {label}"


def main(capability: int) -> int:
    """Compiles every configuration on two processes (LLVM and ptxas are CPU work); 1 if any failed."""
    from concurrent.futures import ProcessPoolExecutor

    count = sum(1 for _ in configurations())
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_compile, range(count), [capability] * count))
    for line in results:
        print(line, flush=True)
    return 0 if all(line.startswith("ok ") for line in results) else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 90))
