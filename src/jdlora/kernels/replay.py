"""Record the launches of one eager call and make them again for new inputs, without rebuilding their arguments.

Why: a layer's JD-LoRA is the same three launches on every call of a decode step but for its input and output
tensors, and building each launch's arguments (shapes, strides, options, the key of
:class:`~jdlora.kernels.fast_launch.FastLauncher`) was most of our own host time per layer: about 20 of
25-30 us on a small CPU (``benchmarks/host.py``; ``benchmarks/RESULTS.md``).

How: inside ``with LaunchRecording(x, y):`` every launch of a :class:`FastLauncher` is kept: the grid, every
argument, the compiled kernel (when the launcher keeps one), with the positions where the *slots* (``x``, ``y``:
the tensors that change from call to call) went, found by identity. :meth:`LaunchRecording.replay` makes the same
launches with new slot tensors in those positions: directly through the compiled kernel's launcher, as the
direct launch does, or through the launcher where that may not go ahead now (launch hooks set, another current
device, the interpreter: so the CPU tests run every replay). Every other argument is replayed as
recorded, so the caller keys its recordings on everything they were built from: :class:`Replays` keys them on a
context object (the kernel batch: its row tensors and scratch) and the slots' :func:`layout` (dtype, shape,
strides, 16-byte alignment, device: all the arguments derived from the slots), and its owner drops them when
the fixed tensors (the banks) change.

``JDLORA_REPLAY_LAUNCHES=0`` (read at import; or :data:`ENABLED` set to False) turns replays off.

A recording is kept only if the call launched something (the torch reference does not) and passed every slot as
it was, not a copy of it; never under ``torch.compile``. Under CUDA graph capture a replay is recorded like the
direct launch (same launcher, current stream).

This module imports no Triton (the tuner imports it; Triton is optional): it sees launchers through
``direct_hooks``, ``current_device``, ``current_stream``, ``hits`` and calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import os

import torch

__all__ = ["ENABLED", "LaunchRecording", "Replays", "layout", "note_launch"]

ENABLED = os.environ.get("JDLORA_REPLAY_LAUNCHES", "1") != "0"  # read at import; Replays neither replay nor record

_recording: contextvars.ContextVar[LaunchRecording | None] = contextvars.ContextVar("jdlora_recording", default=None)


def note_launch(launcher, grid: tuple, args: tuple, kwargs: dict, compiled, device, tail) -> None:
    """Called by a :class:`~jdlora.kernels.fast_launch.FastLauncher` after each launch: ``args`` its
    non-constexpr arguments, ``kwargs`` the constexprs and options; ``compiled`` the compiled kernel it keeps for
    direct launches on ``device`` (None: it keeps none, the launch is replayed through Triton's normal one),
    ``tail`` the constexprs' values in signature order."""
    recording = _recording.get()
    if recording is not None:
        recording._add(launcher, grid, args, kwargs, compiled, device, tail)


def layout(t: torch.Tensor) -> tuple:
    """What a recording with ``t`` in a slot is valid for: ``t``'s dtype, shape, strides, device and whether its
    address is 16-byte aligned (the key of Triton's specialization)."""
    return t.dtype, t.shape, t.stride(), t.device, t.data_ptr() % 16 == 0


class LaunchRecording:
    """The launches of one call, to make again for other ``slots`` of the same :func:`layout`.

    Usage::

        with LaunchRecording(x, y) as recording:  # a real call: its launches run as usual
            jd_lora_forward(y, x, U, V, sigma, cluster_of, batch)
        ...
        if recording.complete:
            recording.replay(x2, y2)  # what jd_lora_forward(y2, x2, U, V, sigma, cluster_of, batch) launches

    ``complete``: whether it can be replayed (see the module docstring).
    """

    def __init__(self, *slots: torch.Tensor):
        self._slots = slots
        self._launches: list[tuple] = []  # (launcher, grid, args with None at slots, [(position, slot)], kwargs,
        #                                   compiled, device, tail)
        self._token = None
        self.complete = not torch.compiler.is_compiling()  # a graph's launches are not ours to record

    def __enter__(self) -> LaunchRecording:
        self._token = _recording.set(self)
        return self

    def __exit__(self, *exc) -> None:
        _recording.reset(self._token)
        used = {j for _, _, _, positions, *_ in self._launches for _, j in positions}
        if exc[0] is not None or not self._launches or len(used) < len(self._slots):
            self.complete = False  # no launch (the torch reference), or a slot never went to one as it was (a copy did)
        self._slots = ()  # no reference to this call's tensors

    def _add(self, launcher, grid: tuple, args: tuple, kwargs: dict, compiled, device, tail) -> None:
        positions = tuple((i, j) for i, a in enumerate(args) for j, t in enumerate(self._slots) if a is t)
        at_slot = {i for i, _ in positions}
        fixed = tuple(None if i in at_slot else a for i, a in enumerate(args))
        self._launches.append((launcher, grid, fixed, positions, kwargs, compiled, device, tail))

    def replay(self, *slots: torch.Tensor) -> None:
        """The recorded launches with ``slots`` in place of the recorded call's (same order, same layouts): each
        directly through its compiled kernel when a direct launch may go ahead now, else through its launcher as
        the call would (the first direct launch, launch hooks set since, another current device, the
        interpreter). The GPU of the first slot is made current for them, as the call does
        (:mod:`~jdlora.kernels.launch`: a model split across GPUs)."""
        stream = now = None
        if slots and slots[0].is_cuda:
            now = slots[0].device.index
            if now != torch.cuda.current_device():
                with torch.cuda.device(now):
                    return self.replay(*slots)
        for launcher, grid, fixed, positions, kwargs, compiled, device, tail in self._launches:
            args = list(fixed)
            for i, j in positions:
                args[i] = slots[j]
            hooks = None if compiled is None else launcher.direct_hooks()
            if hooks is not None:
                if now is None:
                    now = launcher.current_device()
                if stream is None:
                    stream = launcher.current_stream(now)
                if now == device:
                    compiled.run(*grid, stream, compiled.function, compiled.packed_metadata, None, *hooks, *args, *tail)
                    launcher.hits += 1
                    continue
            launcher(grid, *args, **kwargs)  # its own launch: direct once proven, else Triton's


class Replays:
    """The :class:`LaunchRecording` s of one piece of work on fixed tensors (a layer's banks), one per ``context``
    object (a kernel batch) and :func:`layout` of the slots; at most ``max_recordings`` (then it starts over).

    Usage::

        if not replays.replay(batch, x, y):
            with replays.record(batch, x, y):
                jd_lora_forward(y, x, U, V, sigma, cluster_of, batch)

    The owner drops it when the fixed tensors change. Once a call could not be recorded (the torch reference
    launches nothing) it stops trying (``on``).
    """

    def __init__(self, max_recordings: int = 32):  # a server's decode batch sizes
        self.max_recordings = max_recordings
        self.on = True
        self.replayed = 0  # calls replayed (for tests and benchmarks)
        self._recordings: dict[tuple, tuple[object, LaunchRecording]] = {}

    def __getstate__(self) -> dict:
        # A copy or pickle of a model starts without recordings: they hold compiled kernels, launchers, this
        # process's tensors.
        return {"max_recordings": self.max_recordings}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_recordings"])

    def replay(self, context, *slots: torch.Tensor) -> bool:
        """Makes the launches of an earlier call with ``context`` and slots of these layouts again, for these
        ``slots``; False when there was none (then make the call, under :meth:`record`)."""
        if not (self.on and ENABLED):
            return False
        kept = self._recordings.get((id(context), *map(layout, slots)))
        if kept is None or kept[0] is not context:
            return False
        kept[1].replay(*slots)
        self.replayed += 1
        return True

    @contextlib.contextmanager
    def record(self, context, *slots: torch.Tensor):
        """Records the launches made inside; keeps the recording for :meth:`replay` if it can be replayed."""
        if not (self.on and ENABLED):
            yield
            return
        with LaunchRecording(*slots) as recording:
            yield
        if not recording.complete:
            self.on = False
            return
        if len(self._recordings) >= self.max_recordings:
            self._recordings.clear()
        self._recordings[(id(context), *map(layout, slots))] = (context, recording)
