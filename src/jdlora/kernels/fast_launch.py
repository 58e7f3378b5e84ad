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
its address is 16-byte aligned; ints, floats and bools by value (Triton keys ints on whether they are 1,
divisible by 16 and fit in int32, floats and bools by type: a value is finer); every constexpr and launch
option (``num_warps``, ``num_stages``) by value; the current device. So a hit always reuses the kernel
Triton itself would have picked. Computing it is a few C-level passes over the arguments: the kernels take
their tensors first (parameters named ``*_ptr``) and their scalars after, so the key is the tensors' dtypes,
one alignment flag for all of them (the OR of their addresses; one flag per tensor only when some are not
aligned), and the tuple of scalars as given. Exact scalar values make a new prefill length one normal launch
before its direct ones; the cache is emptied when it passes :data:`MAX_ENTRIES`.

The normal launch runs instead whenever: an argument is of another kind (the key would not be safe),
Triton's interpreter runs (``TRITON_INTERPRET=1``: the kernel is not a ``JITFunction``), dynamo traces
the call (``torch.compile`` sees Triton's own launch, which it knows how to capture), Triton has
launch hooks set (profilers need the launch metadata we skip) or pre-run hooks, or
``JDLORA_FAST_LAUNCH=0`` (read at import). Under CUDA graph capture the direct launch is recorded like
the normal one (same launcher, same current stream). Triton knobs that enter its key without being
arguments (``TRITON_DEBUG``, instrumentation) are taken as they were at the first launch.

A call's direct launches can be recorded and made again for other inputs of the same layout, without our launch
functions' Python: :mod:`~jdlora.kernels.replay`.
"""

from __future__ import annotations

import functools
import operator
import os
import warnings

import torch
import triton
from triton.runtime.jit import JITFunction

from .replay import note_launch

ENABLED = os.environ.get("JDLORA_FAST_LAUNCH", "1") != "0"
LAUNCHERS: list[FastLauncher] = []  # every launcher made, one per kernel (their counters, for benchmarks)
MAX_ENTRIES = 1024  # keys kept per kernel (decode: one per batch size; prefill: one per token count)
_SCALARS = (int, float, bool)
_dtype = operator.attrgetter("dtype")
_data_ptr = torch.Tensor.data_ptr


def _three_dims(grid: tuple) -> tuple:
    """``grid`` as a direct launch takes it: three dimensions, the missing ones 1 (``kernel[grid]`` pads them)."""
    return grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1


def _hook_set(hook) -> bool:
    # Triton <= 3.6: None or a callable; later: a HookChain, set when it has calls.
    return hook is not None and bool(getattr(hook, "calls", True))


def launch_key(device: int, tensors: tuple, scalars: tuple, constexprs: dict):
    """What a launch is specialized on, never coarser than Triton's key (see the module docstring); None when
    a tensor argument is not a tensor. Scalars are keyed by value and type (``1``, ``1.0`` and ``True`` are equal
    as values); :func:`keyable` says whether they are all of a kind a key may hold."""
    try:
        dtypes = tuple(map(_dtype, tensors))
        addresses = functools.reduce(operator.or_, map(_data_ptr, tensors), 0)
    except (AttributeError, TypeError):
        return None
    aligned = True if addresses % 16 == 0 else tuple(_data_ptr(t) % 16 == 0 for t in tensors)
    return device, dtypes, aligned, scalars, tuple(map(type, scalars)), tuple(constexprs.items())


def keyable(key) -> bool:
    """Whether the scalars of a :func:`launch_key` are all ints, floats or bools (checked once, when a key is
    stored: a key with anything else is never stored, so a lookup with it always misses)."""
    return key is not None and all(t in _SCALARS for t in key[4])


class FastLauncher:
    """``launcher(grid, *args, **constexprs_and_options)`` launches ``kernel`` like ``kernel[grid](...)``.

    ``args``: the kernel's non-constexpr parameters, in order; the constexprs and ``num_warps`` /
    ``num_stages`` by keyword. ``hits`` and ``misses`` count direct and normal launches; ``name`` is the kernel's.
    Every launcher is listed in :data:`LAUNCHERS`.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.name = getattr(kernel, "__name__", repr(kernel))
        LAUNCHERS.append(self)
        self.hits = 0
        self.misses = 0
        self._cache: dict = {}  # launch_key -> the CompiledKernel
        self._proven = False  # a direct launch has gone through once
        self._fast = ENABLED and isinstance(kernel, JITFunction)
        if self._fast:
            params = kernel.params
            self._constexprs = tuple(p.name for p in params if p.is_constexpr)
            self._n_args = len(params) - len(self._constexprs)
            self._n_tensors = next((i for i, p in enumerate(params) if not p.name.endswith("_ptr")), len(params))
            names = self._constexprs  # their values in signature order, from the keywords
            self._tail = operator.itemgetter(*names) if len(names) > 1 else (lambda kw: tuple(kw[n] for n in names))
            # Every constexpr after every plain parameter, and every pointer before the scalars: the layout
            # the key relies on (our kernels' signatures).
            self._fast = (all(p.is_constexpr for p in params[self._n_args:])
                          and not any(p.name.endswith("_ptr") for p in params[self._n_tensors:]))
            try:
                from triton import knobs  # Triton >= 3.4
            except ImportError:
                self._fast = False
            else:
                self._knobs = knobs.runtime
        self._device = self._stream = None  # Triton's own getters, taken at the first launch (no CUDA init at import)

    def __call__(self, grid, *args, **kwargs):
        if not self._fast or len(args) != self._n_args or torch.compiler.is_compiling():
            return self._normal(grid, args, kwargs)
        hooks = self._hooks()
        if hooks is None:
            return self._normal(grid, args, kwargs)
        enter, exit_ = hooks
        if self._device is None:
            driver = triton.runtime.driver.active
            self._device, self._stream = driver.get_current_device, driver.get_current_stream
        device = self._device()
        n = self._n_tensors
        key = launch_key(device, args[:n], args[n:], kwargs)
        if key is None:
            return self._normal(grid, args, kwargs)
        compiled = self._cache.get(key)
        if compiled is None:
            return self._normal(grid, args, kwargs, key, device)
        tail = self._tail(kwargs)
        grid = _three_dims(grid)
        launch = (*grid, self._stream(device), compiled.function, compiled.packed_metadata, None, enter, exit_, *args,
                  *tail)
        if self._proven:
            compiled.run(*launch)
        else:  # a Triton whose launcher takes other arguments fails here, before launching: stay on the normal path
            try:
                compiled.run(*launch)
            except (TypeError, AttributeError) as e:
                self._fast = False
                warnings.warn(f"jdlora: direct launch of {self.kernel} failed ({e}); using Triton's normal launch",
                              stacklevel=2)
                return self._normal(grid, args, kwargs)
            self._proven = True
        self.hits += 1
        note_launch(self, grid, args, kwargs, compiled, device, tail)

    def _normal(self, grid, args, kwargs, key=None, device=None):
        """Triton's own launch; keeps the compiled kernel under ``key`` (when given and safe to keep)."""
        self.misses += 1
        compiled = self.kernel[grid](*args, **kwargs)
        if keyable(key) and compiled is not None and set(self._constexprs) <= kwargs.keys():
            if len(self._cache) >= MAX_ENTRIES:
                self._cache.clear()
            self._cache[key] = compiled
            # a direct launch (a replay) takes all three grid dimensions, as Triton's launcher does
            note_launch(self, _three_dims(grid), args, kwargs, compiled, device, self._tail(kwargs))
        else:
            note_launch(self, grid, args, kwargs, None, None, None)
        return compiled

    def _hooks(self) -> tuple | None:
        """``(launch_enter_hook, launch_exit_hook)`` to pass to a direct launch; None when hooks that it would skip
        are set (any launch hook: profilers read the launch metadata we do not build; the kernel's pre-run hooks)."""
        enter, exit_ = self._knobs.launch_enter_hook, self._knobs.launch_exit_hook
        if _hook_set(enter) or _hook_set(exit_) or getattr(self.kernel, "pre_run_hooks", None):
            return None
        return enter, exit_

    def direct_hooks(self) -> tuple | None:
        """:meth:`_hooks` when a direct launch of an already compiled kernel may go ahead now (one went through
        before); None when it may not."""
        return self._hooks() if self._fast and self._proven else None

    def current_device(self) -> int:
        return self._device()

    def current_stream(self, device: int):
        return self._stream(device)
