"""A cheaper eager launch for our three Triton kernels: reuse the compiled kernel, skip Triton's binding.

Why: an eager decode step launches 3 kernels per adapted layer (288 for Mistral-7B's q, k, v, o), each
costing about 50 us of host time in all, more than the kernels take on the GPU. Part of it is Triton's
``JITFunction.run`` (binding the arguments to the signature, the specialization key and its string, the
cache lookup, the launch metadata). Measured on the H200 with Triton 3.6 (``benchmarks/RESULTS.md``,
"Eager launches"): skipping it saves about 4 us per launch (Triton 3.6 already specializes in C++); the
rest is our launch functions and Triton's own Python launcher, which this module still calls.

How: :class:`FastLauncher` wraps one ``@triton.jit`` kernel. The first call for a specialization goes
through Triton's normal launch, which compiles (or finds) the kernel and returns its
``CompiledKernel``; we keep it under a key we compute cheaply. Later calls with the same key call the
compiled kernel's low-level launcher directly, exactly as ``JITFunction.run`` does::

    kernel.run(grid0, grid1, grid2, stream, kernel.function, kernel.packed_metadata,
               launch_metadata, launch_enter_hook, launch_exit_hook, *all_arguments)

Our key is never coarser than Triton's specialization (Triton 3.x): per tensor its dtype and whether
its address is 16-byte aligned; per int whether it is 1, divisible by 16 and fits in int32; floats
and bools by type; every constexpr and launch option (``num_warps``, ``num_stages``) by value; the
current device. So a hit always reuses the kernel Triton itself would have picked.

The normal launch runs instead whenever: an argument is of another kind (the key would not be safe),
Triton's interpreter runs (``TRITON_INTERPRET=1``: the kernel is not a ``JITFunction``), dynamo traces
the call (``torch.compile`` sees Triton's own launch, which it knows how to capture), Triton has
launch hooks set (profilers need the launch metadata we skip) or pre-run hooks, or
``JDLORA_FAST_LAUNCH=0`` (read at import). Under CUDA graph capture the direct launch is recorded like
the normal one (same launcher, same current stream). Triton knobs that enter its key without being
arguments (``TRITON_DEBUG``, instrumentation) are taken as they were at the first launch.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
from triton.runtime.jit import JITFunction

ENABLED = os.environ.get("JDLORA_FAST_LAUNCH", "1") != "0"
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


def _arg_key(a):
    """What Triton specializes an argument on (or finer); None: not a kind we key safely."""
    t = type(a)
    if t is int:
        return a == 1, a % 16 == 0, _I32_MIN <= a <= _I32_MAX
    if t is float or t is bool:
        return t
    if isinstance(a, torch.Tensor):  # nn.Parameter too
        return a.dtype, a.data_ptr() % 16 == 0
    return None


def _hook_set(hook) -> bool:
    # Triton <= 3.6: None or a callable; later: a HookChain, set when it has calls.
    return hook is not None and bool(getattr(hook, "calls", True))


class FastLauncher:
    """``launcher(grid, *args, **constexprs_and_options)`` launches ``kernel`` like ``kernel[grid](...)``.

    ``args``: the kernel's non-constexpr parameters, in order; the constexprs and ``num_warps`` /
    ``num_stages`` by keyword. ``hits`` and ``misses`` count direct and normal launches.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.hits = 0
        self.misses = 0
        self._cache: dict = {}
        self._proven = False  # a direct launch has gone through once
        self._fast = ENABLED and isinstance(kernel, JITFunction)
        if self._fast:
            self._constexprs = tuple(p.name for p in kernel.params if p.is_constexpr)
            self._n_args = len(kernel.params) - len(self._constexprs)
            # Every constexpr after every plain parameter: positional args + constexprs in order = the signature.
            self._fast = all(p.is_constexpr for p in kernel.params[self._n_args:])
            try:
                from triton import knobs  # Triton >= 3.4
            except ImportError:
                self._fast = False
            else:
                self._knobs = knobs.runtime
        self._device = self._stream = None  # Triton's own getters, taken at the first launch (no CUDA init at import)

    def __call__(self, grid, *args, **kwargs):
        if not self._fast or len(args) != self._n_args or torch.compiler.is_compiling():
            return self._normal(grid, args, kwargs, None)
        enter, exit_ = self._knobs.launch_enter_hook, self._knobs.launch_exit_hook
        if _hook_set(enter) or _hook_set(exit_) or getattr(self.kernel, "pre_run_hooks", None):
            return self._normal(grid, args, kwargs, None)
        arg_keys = tuple(map(_arg_key, args))
        if None in arg_keys:
            return self._normal(grid, args, kwargs, None)
        if self._device is None:
            driver = triton.runtime.driver.active
            self._device, self._stream = driver.get_current_device, driver.get_current_stream
        device = self._device()
        key = (device, arg_keys, tuple(kwargs.items()))
        entry = self._cache.get(key)
        if entry is None:
            return self._normal(grid, args, kwargs, key)
        compiled, tail = entry
        stream = self._stream(device)
        launch = (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, stream,
                  compiled.function, compiled.packed_metadata, None, enter, exit_, *args, *[kwargs[n] for n in tail])
        if self._proven:
            compiled.run(*launch)
        else:  # a Triton whose launcher takes other arguments fails here, before launching: stay on the normal path
            try:
                compiled.run(*launch)
            except (TypeError, AttributeError) as e:
                self._fast = False
                warnings.warn(f"jdlora: direct launch of {self.kernel} failed ({e}); using Triton's normal launch",
                              stacklevel=2)
                return self._normal(grid, args, kwargs, None)
            self._proven = True
        self.hits += 1

    def _normal(self, grid, args, kwargs, key):
        self.misses += 1
        compiled = self.kernel[grid](*args, **kwargs)
        if key is not None and compiled is not None and set(self._constexprs) <= kwargs.keys():
            self._cache[key] = (compiled, self._constexprs)
        return compiled
