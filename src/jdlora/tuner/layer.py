"""The JD-LoRA layer: ``y = W0 x + U_c Sigma_a V_c^T x`` with shared bases and per-adapter Sigma.

Storage. Each adapter owns one Sigma per module, an ``nn.Parameter`` in ``jd_sigma[adapter]`` (so
PEFT's per-adapter machinery, trainability, saving and deleting work as for LoRA). The bases are
buffers in ``jd_U`` / ``jd_V``, keyed by basis (one per cluster of a collection, or per random
seed and rank), never per adapter: ``jd_basis[adapter]`` names the basis an adapter uses.

Banks. Mixed-adapter batches gather Sigma by index, so the same numbers also live stacked: per rank
a bases bank (``U [C, d_out, r]``, ``V [C, d_in, r]``) and per adapter group (same rank and Sigma
kind, rows shared by every layer, see :class:`AdapterGroup`) a Sigma bank (``[n, r, r]`` or
``[n, r]``) with the cluster of each row. Every ``jd_sigma`` / ``jd_U`` / ``jd_V`` entry is a *view*
of its bank row, so in-place updates (optimizer steps, ``load_state_dict``) show in the banks at no
cost. Operations that replace tensors (``.to()``, ``assign=True`` loads) break the views; they mark
the layer and the banks are rebuilt from the dicts (the source of truth) before they are next used.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils.other import transpose
from torch import Tensor, nn

from ..kernels import KERNEL_DTYPES
from ..kernels.replay import Replays
from . import banks
from . import siblings as _siblings
from .banks import AdapterGroup, BasesBank, SigmaBank, grown, mark_changed
from .mixed import MixedBatch, jd_lora_forward, mark_static, worth_recording


def _same(a: Tensor, b: Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.device == b.device and a.shape == b.shape


def _insert_parameters(params: nn.ParameterDict, new: dict[str, nn.Parameter]) -> None:
    """``params.update(new)``, fast: thousands of adapters per layer make ``__setitem__``'s checks
    (an attribute lookup that fails, per name) the bulk load's main cost. Falls back to it when
    ParameterDict's internals are not the expected ones or registration hooks are installed."""
    from torch.nn.modules import module as torch_module

    keys = getattr(params, "_keys", None)
    if not isinstance(keys, dict) or getattr(torch_module, "_global_parameter_registration_hooks", None):
        for name, param in new.items():
            params[name] = param
        return
    taken = params.__dict__.keys() | params._buffers.keys() | params._modules.keys()
    for name in new:
        if name in taken or hasattr(type(params), name):
            params[name] = new[name]  # let PyTorch raise its own error
    params._parameters.update(new)
    keys.update(dict.fromkeys(new))


class JDLoraLayer(BaseTunerLayer):
    """JD-LoRA on one layer; see the module docstring for how the weights are stored."""

    adapter_layer_names = ("jd_sigma",)
    # The model's MixedBatch (JDLoraModel sets it once and activates it per call): a layer reads the
    # batch from here rather than from a per-call forward hook, so compiled graphs see one object.
    _jd_mixed: Optional[MixedBatch] = None
    # Layers of the same parent that read the same input (q, k, v), set by siblings.link_siblings: in mixed-batch
    # forwards the first one called runs them all, three launches in all.
    _jd_siblings: Optional[_siblings.Siblings] = None
    _jd_sibling_index: int = 0  # its place among its siblings (set with _jd_siblings)
    other_param_names = ("jd_U", "jd_V", "jd_basis", "r", "jd_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs):
        self.base_layer = base_layer
        self.jd_sigma = nn.ParameterDict({})
        self.jd_U = BufferDict({}, persistent=True)
        self.jd_V = BufferDict({}, persistent=True)
        self.jd_basis: dict[str, str] = {}
        self.r: dict[str, int] = {}
        self.jd_dropout: dict[str, float] = {}
        self._jd_bases: dict[int, BasesBank] = {}
        self._jd_banks: dict[str, SigmaBank] = {}
        self._jd_untied = False
        self._jd_replays: dict[str, Replays] = {}  # group key -> recordings of this layer's launches
        self._jd_replays_epoch = -1
        self._jd_marked_epoch = -1  # banks.epoch() when _jd_mark_static last marked the banks
        self._disable_adapters = False
        self.merged_adapters = []
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if in_features is None or out_features is None:
            raise TypeError(f"JD-LoRA does not support layers of type {type(self.get_base_layer()).__name__}.")
        self.in_features, self.out_features = in_features, out_features
        self.kwargs = kwargs
        self.register_load_state_dict_post_hook(JDLoraLayer._jd_after_load)

    # ----- adding adapters ------------------------------------------------------------------------

    def _jd_dtype_device(self, dtype: Optional[torch.dtype]) -> tuple[torch.dtype, torch.device]:
        for d in (self.jd_U, self.jd_sigma):
            for t in d.values():
                return t.dtype, t.device  # one dtype and device per layer: its adapters share banks
        weight = self.get_base_weight()
        if dtype is None:
            dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
            if dtype in (torch.float16, torch.bfloat16):
                dtype = torch.float32  # like PEFT's autocast_adapter_dtype: adapter math in fp32
        return dtype, weight.device

    def add_bases(self, key: str, U: Tensor, V: Tensor, dtype: Optional[torch.dtype] = None) -> None:
        """Adds the basis ``key`` (``U [d_out, r]``, ``V [d_in, r]``) unless this layer has it already."""
        if key in self.jd_U:
            return
        if U.shape[0] != self.out_features or V.shape[0] != self.in_features or U.shape[1] != V.shape[1]:
            raise ValueError(
                f"Bases of shapes U {tuple(U.shape)} and V {tuple(V.shape)} do not fit a layer with "
                f"{self.in_features} inputs and {self.out_features} outputs (need U [d_out, r], V [d_in, r])."
            )
        self._jd_retie_if_needed()
        dtype, device = self._jd_dtype_device(dtype)
        r = U.shape[1]
        bank = self._jd_bases.get(r)
        if bank is None:
            bank = self._jd_bases[r] = BasesBank(torch.zeros(0, self.out_features, r, dtype=dtype, device=device),
                                                  torch.zeros(0, self.in_features, r, dtype=dtype, device=device))
        slot = bank.keys.index(None) if None in bank.keys else len(bank.keys)
        if slot >= bank.U.shape[0]:
            bank.U, bank.V = grown(bank.U, slot + 1), grown(bank.V, slot + 1)
            bank.keys += [None] * (bank.U.shape[0] - len(bank.keys))
            self._jd_view_bases(bank)
        bank.U[slot].copy_(U)
        bank.V[slot].copy_(V)
        bank.keys[slot] = key
        self.jd_U[key], self.jd_V[key] = bank.U[slot], bank.V[slot]

    def add_sigmas(self, group: AdapterGroup, names: list[str], rows: list[int], sigma: Tensor, basis: str,
                   *, trainable: bool = False, dropout: float = 0.0) -> None:
        """Adds adapters ``names`` (rows ``rows`` of ``group``), Sigmas ``sigma [k, r, r] | [k, r]``, on ``basis``."""
        self._jd_retie_if_needed()
        r = group.rank
        bases = self._jd_bases.get(r)
        if basis not in self.jd_U or bases is None or basis not in bases.keys:
            raise KeyError(f"Layer has no basis {basis!r} of rank {r}; add it with add_bases first.")
        expected = (r, r) if group.kind == "full" else (r,)
        if tuple(sigma.shape[1:]) != expected:
            raise ValueError(f"Sigma of shape {tuple(sigma.shape[1:])} does not fit rank {r} ({group.kind}).")
        bank = self._jd_banks.get(group.key)
        dtype, device = bases.U.dtype, bases.U.device
        if bank is None:
            bank = self._jd_banks[group.key] = SigmaBank(
                group, torch.zeros(0, *expected, dtype=dtype, device=device),
                torch.zeros(0, dtype=torch.long, device=device),
            )
        self._jd_grow(bank, max(rows) + 1)
        index = torch.tensor(rows, device=device)
        bank.sigma[index] = sigma.to(dtype=dtype, device=device)
        bank.cluster_of[index] = bases.keys.index(basis)
        for name in names:
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"Adapter name {name!r} cannot be a PyTorch/PEFT name (empty or containing '.').")
        views = bank.sigma.unbind(0)
        _insert_parameters(self.jd_sigma, {n: nn.Parameter(views[row], requires_grad=trainable)
                                           for n, row in zip(names, rows)})
        self.jd_basis.update(dict.fromkeys(names, basis))
        self.r.update(dict.fromkeys(names, r))
        if dropout:
            self.jd_dropout.update(dict.fromkeys(names, dropout))

    def _jd_grow(self, bank: SigmaBank, rows: int) -> None:
        if bank.sigma.shape[0] >= rows:
            return
        bank.sigma, bank.cluster_of = grown(bank.sigma, rows), grown(bank.cluster_of, rows, fill=-1)
        for name, param in self.jd_sigma.items():
            if name in bank.group.rows and self._jd_group_key(name) == bank.group.key:
                param.data = bank.sigma[bank.group.rows[name]]

    def _jd_view_bases(self, bank: BasesBank) -> None:
        for slot, key in enumerate(bank.keys):
            if key is not None:
                self.jd_U._buffers[key], self.jd_V._buffers[key] = bank.U[slot], bank.V[slot]

    def _jd_group_key(self, name: str) -> str:
        return f"r{self.r[name]}-{'full' if self.jd_sigma[name].dim() == 2 else 'diag'}"

    # ----- keeping banks and dicts tied -------------------------------------------------------------

    def _jd_retie_if_needed(self) -> None:
        if self._jd_untied:
            self._jd_retie()

    def _jd_retie(self) -> None:
        """Rebuilds every bank from the dicts (the truth) and makes the dict entries views again."""
        dtype = device = None
        for t in list(self.jd_sigma.values()) + list(self.jd_U.values()):
            dtype, device = t.dtype, t.device
            break
        if dtype is None:
            self._jd_bases.clear()
            self._jd_banks.clear()
            mark_changed()
            self._jd_untied = False
            return
        for bank in self._jd_bases.values():
            U = torch.zeros(bank.U.shape, dtype=dtype, device=device)
            V = torch.zeros(bank.V.shape, dtype=dtype, device=device)
            for slot, key in enumerate(bank.keys):
                if key is not None:
                    U[slot], V[slot] = self.jd_U[key], self.jd_V[key]
            bank.U, bank.V = U, V
            self._jd_view_bases(bank)
        for bank in self._jd_banks.values():
            sigma = torch.zeros(bank.sigma.shape, dtype=dtype, device=device)
            with torch.no_grad():
                for name, param in self.jd_sigma.items():
                    if self._jd_group_key(name) == bank.group.key:
                        row = bank.group.rows[name]
                        sigma[row] = param.detach().to(dtype=dtype, device=device)
                        param.data = sigma[row]
            bank.sigma, bank.cluster_of = sigma, bank.cluster_of.to(device)
        self._jd_untied = False

    def _jd_ties_hold(self) -> bool:
        """Whether every dict entry is still a view of its bank row (one pointer compare per entry)."""
        for bank in self._jd_bases.values():
            for slot, key in enumerate(bank.keys):
                if key is not None and not _same(self.jd_U[key], bank.U[slot]):
                    return False
        for name, param in self.jd_sigma.items():
            bank = self._jd_banks.get(self._jd_group_key(name))
            if bank is None or not _same(param, bank.sigma[bank.group.rows[name]]):
                return False
        return True

    def _jd_after_apply(self) -> None:
        if not self._jd_ties_hold():  # .to() & co. converted each dict entry on its own: rebuild the banks
            self._jd_retie()

    @staticmethod
    def _jd_after_load(module, incompatible_keys) -> None:
        if not module._jd_ties_hold():  # load_state_dict(assign=True) replaced tensors
            module._jd_untied = True
            mark_changed()  # the banks are rebuilt before their next use

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Moves this layer's JD-LoRA tensors to the base layer's device (all at once: they share banks)."""
        target = device if device is not None else self.get_base_weight().device
        tensors = list(self.jd_sigma.values()) + list(self.jd_U.values())
        if any(t.device != target for t in tensors):
            for d in (self.jd_sigma, self.jd_U, self.jd_V):
                d.to(target)
            self._jd_untied = True
            self._jd_retie()

    def jd_cast(self, dtype: torch.dtype) -> None:
        """Casts this layer's JD-LoRA tensors (every adapter and basis: they share banks) to ``dtype``."""
        if all(p.dtype == dtype for p in self.jd_sigma.values()) and all(b.dtype == dtype for b in self.jd_U.values()):
            return
        for d in (self.jd_sigma, self.jd_U, self.jd_V):
            d.to(dtype)
        self._jd_untied = True
        self._jd_retie()

    # ----- deleting -----------------------------------------------------------------------------

    def delete_adapter(self, adapter_name: str) -> None:
        """Removes the adapter's Sigma, and its basis once no adapter of this layer uses it."""
        if adapter_name in self.jd_sigma:
            self._jd_retie_if_needed()
            group_key = self._jd_group_key(adapter_name)
            bank = self._jd_banks[group_key]
            row = bank.group.rows[adapter_name]
            bank.sigma[row].zero_()
            bank.cluster_of[row] = -1
            del self.jd_sigma[adapter_name]
            basis = self.jd_basis.pop(adapter_name)
            r = self.r.pop(adapter_name)
            self.jd_dropout.pop(adapter_name, None)
            self._jd_drop_basis_if_unused(basis, r)
        super().delete_adapter(adapter_name)

    def _jd_drop_basis_if_unused(self, basis: str, r: int) -> None:
        if basis in self.jd_basis.values():
            return
        bases = self._jd_bases[r]
        slot = bases.keys.index(basis)
        bases.keys[slot] = None
        bases.U[slot].zero_()
        bases.V[slot].zero_()
        del self.jd_U[basis], self.jd_V[basis]

    def replace_bases(self, adapter_name: str, U: Tensor, V: Tensor, key: str) -> None:
        """Puts ``adapter_name`` on the basis ``key`` (``U``, ``V``; added unless the layer has it), e.g. when the
        bases saved with its weights are loaded; the basis it used before goes once no adapter uses it."""
        if adapter_name not in self.jd_sigma:
            raise KeyError(f"This layer has no adapter {adapter_name!r}.")
        r = self.r[adapter_name]
        if U.shape[1] != r or V.shape[1] != r:
            raise ValueError(
                f"Saved bases of rank {U.shape[1]} do not fit adapter {adapter_name!r} of rank {r} in this layer: the "
                "adapter_config.json does not match its weights."
            )
        old = self.jd_basis[adapter_name]
        if old == key:
            return
        self.add_bases(key, U, V)
        bank = self._jd_banks[self._jd_group_key(adapter_name)]
        bank.cluster_of[bank.group.rows[adapter_name]] = self._jd_bases[r].keys.index(key)
        self.jd_basis[adapter_name] = key
        self._jd_drop_basis_if_unused(old, r)

    def _all_available_adapter_names(self) -> list[str]:
        return sorted(self.jd_sigma.keys())

    # ----- math ---------------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The dense update ``U Sigma V^T`` of ``adapter``, laid out like the base weight.

        Zero when the adapter has no update in this layer (adapters of a collection need not adapt every
        module), so PEFT's ``convert_to_lora`` works on any adapter.
        """
        if adapter not in self.jd_sigma:
            return torch.zeros_like(self.get_base_weight())
        sigma = self.jd_sigma[adapter]
        basis = self.jd_basis[adapter]
        U, V = self.jd_U[basis], self.jd_V[basis]
        dtype = self.get_base_weight().dtype
        compute = torch.float32 if sigma.dtype in (torch.float16, torch.bfloat16) else sigma.dtype
        U, V, sigma = U.to(compute), V.to(compute), sigma.to(compute)
        middle = sigma if sigma.dim() == 2 else torch.diag(sigma)
        return transpose(U @ middle @ V.T, self.fan_in_fan_out).to(dtype)

    def _jd_delta(self, x: Tensor, adapter: str) -> Tensor:
        """``x V Sigma^T U^T`` for one adapter: three thin products, never the dense update."""
        sigma = self.jd_sigma[adapter]
        basis = self.jd_basis[adapter]
        U, V = self.jd_U[basis], self.jd_V[basis]
        x = self._cast_input_dtype(x, sigma.dtype)
        p = self.jd_dropout.get(adapter, 0.0)
        if p and self.training:
            x = F.dropout(x, p=p)
        h = x @ V
        h = h @ sigma.T if sigma.dim() == 2 else h * sigma
        return h @ U.T

    def _check_forward_args(self, x: Tensor, *args, **kwargs) -> None:
        adapter_names = kwargs.get("adapter_names")
        if adapter_names is None:
            return
        # x.shape[0], not len(x) (slower); a MixedBatch's len is a number it keeps, not its list of names
        if x.shape[0] != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _jd_mark_static(self) -> None:
        """Marks the banks as tensors at fixed addresses for ``torch.compile`` (as transformers marks its
        static cache): a graph reads them as inputs, and CUDA graphs would otherwise copy every input
        that is not a parameter or buffer into their own memory at each replay (all bases and Sigmas,
        per step). A bank that is replaced (grown, moved) is marked anew; graphs then record again. Nothing to do
        while the bank :func:`~jdlora.tuner.banks.epoch` stays the same (every replaced or untied bank changes it)."""
        if self._jd_marked_epoch == banks.epoch():
            return
        self._jd_retie_if_needed()
        tensors = [t for b in self._jd_bases.values() for t in (b.U, b.V)]
        tensors += [t for b in self._jd_banks.values() for t in (b.sigma, b.cluster_of)]
        for t in tensors:
            mark_static(t)
        self._jd_marked_epoch = banks.epoch()

    def _mixed_batch_forward(self, x: Tensor, *args: Any, adapter_names, **kwargs: Any) -> Tensor:
        """Each row of the batch with its own adapter: one gathered JD product per adapter group.

        No loop over adapters: per group (rank and Sigma kind; usually one), the rows' adapters are
        turned into Sigma-bank rows once per forward (:class:`MixedBatch`) and the kernel applies
        ``U_c Sigma_a V_c^T`` to every token. Sibling layers that read the same ``x`` (q, k, v) run as one: the
        first called computes every sibling's output, three launches for all (one shrink-and-Sigma node and one
        expand node under ``torch.compile``; :mod:`~jdlora.tuner.siblings`), and the others return theirs.
        """
        batch = adapter_names if isinstance(adapter_names, MixedBatch) else MixedBatch(adapter_names)
        siblings = self._jd_siblings if _siblings.ENABLED else None
        if siblings is not None and not args and not kwargs:
            if torch.compiler.is_compiling():
                result = siblings.traced(self, x, batch)
            else:
                result = siblings.forward(self, x, batch) if siblings.on else None
            if result is not None:
                return result
        result = self.base_layer(x, *args, **kwargs)
        if not self._jd_banks:
            return result
        if self._jd_untied:
            self._jd_retie()
        if not result.is_contiguous():
            result = result.contiguous()
        y2 = result.view(-1, result.shape[-1])
        x2 = x.reshape(-1, x.shape[-1])
        tokens_per_row = math.prod(x.shape[1:-1])  # [B, S, d]: S; [B, d]: 1 (static shapes: no recompile per mix)
        for bank in self._jd_banks.values():
            prepared = batch.prepared(bank.group, tokens_per_row, x.device)
            if prepared is not None:
                self._jd_group_forward(bank, y2, x2, prepared)
        return result

    def _jd_group_forward(self, bank: SigmaBank, y2: Tensor, x2: Tensor, prepared) -> None:
        """``y2 += U_c Sigma_a V_c^T x2`` in place for the rows of ``prepared`` (the kernel batch of ``bank``'s
        adapter group): this layer's own three launches."""
        group = bank.group
        if bank.sigma.shape[0] < group.size:  # _jd_grow's own test, first: no call per layer on the hot path
            self._jd_grow(bank, group.size)
        bases = self._jd_bases[group.rank]
        U, V, sigma, cluster_of = bases.U, bases.V, bank.sigma, bank.cluster_of
        y = y2
        if U.dtype not in KERNEL_DTYPES or y2.dtype not in KERNEL_DTYPES:  # e.g. float64: kernels in fp32
            U, V, sigma = U.float(), V.float(), sigma.float()
            y = torch.zeros(y2.shape, dtype=torch.float32, device=y2.device)
        xin = x2 if x2.dtype == U.dtype else x2.to(U.dtype)
        # no autocast guard needed: the kernels and the torch reference fix their own precision.
        # No per-call checks: the banks are this layer's own (shapes fixed when adapters are added),
        # x fits them (the base layer would have refused it), the batch is the model's.
        # Replays (kernels.replay) where worth_recording says; none for banks converted for this call or in a graph.
        if y is not y2 or not worth_recording(prepared) or torch.compiler.is_compiling():
            jd_lora_forward(y, xin, U, V, sigma, cluster_of, prepared, check=False)
            if y is not y2:
                y2 += y.to(y2.dtype)
            return
        replays = self._jd_replays_of(bank)
        if not replays.replay(prepared, xin, y):
            with replays.record(prepared, xin, y):
                jd_lora_forward(y, xin, U, V, sigma, cluster_of, prepared, check=False)

    def _jd_replays_of(self, bank: SigmaBank) -> Replays:
        """The recordings of this layer's launches for ``bank``'s group (:class:`~jdlora.kernels.replay.Replays`),
        all dropped when any bank changes (:func:`~jdlora.tuner.banks.epoch`): they replay the banks' tensors."""
        if self._jd_replays_epoch != banks.epoch():
            self._jd_replays, self._jd_replays_epoch = {}, banks.epoch()
        replays = self._jd_replays.get(bank.group.key)
        if replays is None:
            replays = self._jd_replays[bank.group.key] = Replays()
        return replays


class Linear(nn.Module, JDLoraLayer):
    """JD-LoRA around an ``nn.Linear`` (or transformers' ``Conv1D`` with ``fan_in_fan_out``)."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False, is_target_conv_1d_layer: bool = False,
                 **kwargs) -> None:
        super().__init__()
        JDLoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = fan_in_fan_out
        self.is_target_conv_1d_layer = is_target_conv_1d_layer

    def _apply(self, fn, *args, **kwargs):
        # here, not on JDLoraLayer: nn.Module comes first in this class's MRO
        out = super()._apply(fn, *args, **kwargs)
        self._jd_after_apply()
        return out

    def __setstate__(self, state):
        super().__setstate__(state)
        # an unpickled layer: bank epochs are counted per process, so the ones it kept mean nothing here
        self._jd_marked_epoch = self._jd_replays_epoch = -1

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Adds ``U Sigma V^T`` of the active (or given) adapters to the base weight."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.jd_sigma:
                continue
            weight = self.get_base_weight()
            if safe_merge:
                weight = weight.clone() + self.get_delta_weight(adapter)
                if not torch.isfinite(weight).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                self.set_base_weight(weight)
            else:
                weight += self.get_delta_weight(adapter)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtracts every merged adapter's update again."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.jd_sigma:
                self.get_base_weight().sub_(self.get_delta_weight(adapter))

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            mixed = self._jd_mixed  # the model's batch for this call (JDLoraModel._enable_peft_forward_hooks)
            if mixed is not None and mixed.active:
                adapter_names = mixed
        if adapter_names is not None:
            self._check_forward_args(x, adapter_names=adapter_names)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter in self.jd_sigma:
                result = result + self._jd_delta(x, adapter).to(result.dtype)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return True

    def __repr__(self) -> str:
        return "jdlora." + super().__repr__()
