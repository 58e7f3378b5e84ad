"""jdlora.tuner.siblings: q, k, v (and gate, up) of a tiny random Llama share one shrink, Sigma and expand launch.

Fused runs must give the bits of unfused runs (each layer its own three launches), and the outputs of each
row's adapter run alone; whatever a model does between siblings (another input, an input changed in place,
a disabled sibling, float64), the result stays right. The Triton kernels run through Triton's interpreter on
CPU (TRITON_INTERPRET=1, set by conftest.py), the torch reference on the same path otherwise.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping

import pytest
import torch

import jdlora
from jdlora.synthetic import llama_modules, synthetic_adapters
from jdlora.tuner import load_collection, siblings
from jdlora.tuner.mixed import MixedBatch
from tiny_models import tiny_llama

MLP = {f"model.layers.{i}.mlp.{t}": (96, 64) for i in range(2) for t in ("gate_proj", "up_proj")}
ATTN = "base_model.model.model.layers.{}.self_attn.{}"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def collection():
    modules = llama_modules(2, 64, 32, ("q_proj", "k_proj", "v_proj", "o_proj")) | MLP
    del modules["model.layers.1.self_attn.v_proj"]  # layer 1: q and k only (a pair)
    return jdlora.compress(synthetic_adapters(5, modules, rank=4, groups=2, seed=3), rank=6, clusters=2,
                           progress=False)


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    if request.param == "triton":
        pytest.importorskip("triton")
        if os.environ.get("TRITON_INTERPRET") != "1":  # tests/test_kernels.py runs the sibling kernels on CUDA
            pytest.skip("the tiny model runs on CPU: Triton needs TRITON_INTERPRET=1 (conftest.py sets it without CUDA)")
    monkeypatch.setattr(jdlora.kernels, "_ENV_BACKEND", request.param)
    return request.param


@pytest.fixture
def launches():
    """Counts the Triton launches by kind, named by their launch function, since the fixture was made or last
    cleared: every launch of a kernel, made through its launch function or replayed from a recording."""
    from jdlora.kernels.fast_launch import LAUNCHERS

    return _LaunchCounts(LAUNCHERS)


class _LaunchCounts(Mapping):
    _NAMES = {"jd_shrink_kernel": "launch_shrink", "jd_sigma_kernel": "launch_sigma", "jd_expand_kernel": "launch_expand",
              "jd_shrink_siblings_kernel": "launch_shrink_siblings", "jd_sigma_siblings_kernel": "launch_sigma_siblings",
              "jd_expand_siblings_kernel": "launch_expand_siblings"}

    def __init__(self, launchers):
        self._launchers = launchers
        self.clear()

    def _totals(self) -> Counter:
        return Counter({self._NAMES[l.name]: l.hits + l.misses for l in self._launchers if l.name in self._NAMES})

    def clear(self) -> None:
        self._start = self._totals()

    def _counts(self) -> dict:
        now = self._totals()
        return {name: now[name] - self._start[name] for name in now if now[name] != self._start[name]}

    def __getitem__(self, name: str) -> int:
        return self._counts().get(name, 0)  # like a Counter

    def __iter__(self):
        return iter(self._counts())

    def __len__(self) -> int:
        return len(self._counts())

    def __repr__(self) -> str:
        return repr(self._counts())


@pytest.fixture
def fusion(monkeypatch):
    def set_to(on: bool):
        monkeypatch.setattr(siblings, "ENABLED", on)

    return set_to


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def test_siblings_are_linked_by_parent_and_name(base, collection):
    model = load_collection(copy.deepcopy(base), collection)
    layers = dict(model.named_modules())
    qkv = [layers[ATTN.format(0, n)] for n in ("q_proj", "k_proj", "v_proj")]
    assert all(m._jd_siblings is qkv[0]._jd_siblings for m in qkv) and qkv[0]._jd_siblings.layers == qkv
    assert len(layers[ATTN.format(1, "q_proj")]._jd_siblings.layers) == 2  # q and k
    assert layers[ATTN.format(0, "o_proj")]._jd_siblings is None
    gate = layers["base_model.model.model.layers.0.mlp.gate_proj"]
    assert [m is gate._jd_siblings.layers[i] for i, m in enumerate(
        (gate, layers["base_model.model.model.layers.0.mlp.up_proj"]))] == [True, True]


def test_a_fused_mixed_batch_equals_the_unfused_one_and_each_row_alone(base, collection, backend, fusion, launches):
    model = load_collection(copy.deepcopy(base), collection)
    ids = torch.randint(1, 96, (3, 5), generator=torch.Generator().manual_seed(1))
    names = [collection.adapter_names[3], "__base__", collection.adapter_names[1]]
    fusion(False)
    unfused = _logits(model, ids, adapter_names=names)
    off = Counter(launches)
    launches.clear()
    fusion(True)
    fused = _logits(model, ids, adapter_names=names)
    assert torch.equal(fused, unfused)
    if backend == "triton":
        # 11 adapted layers; q, k, v 9 -> 3 launches (layer 1: q, k 6 -> 3), gate, up 6 -> 3, o 3 either way
        assert off == {"launch_shrink": 11, "launch_sigma": 11, "launch_expand": 11}
        assert launches == {"launch_shrink_siblings": 4, "launch_sigma_siblings": 4, "launch_expand_siblings": 4,
                            "launch_shrink": 2, "launch_sigma": 2, "launch_expand": 2}
    assert all(m._jd_siblings.on for m in model.modules() if getattr(m, "_jd_siblings", None) is not None)
    for i, name in enumerate(names):
        if name == "__base__":
            alone = _logits(base, ids[i : i + 1])
        else:
            model.set_adapter(name)
            alone = _logits(model, ids[i : i + 1])
        torch.testing.assert_close(fused[i : i + 1], alone, rtol=0, atol=1e-5)


def _replayed(model) -> int:
    """Calls replayed from launch recordings (jdlora.kernels.replay) in the model: fused siblings and single layers."""
    from jdlora.tuner.layer import JDLoraLayer

    layers = [m for m in model.modules() if isinstance(m, JDLoraLayer)]
    plans = {id(m._jd_siblings): m._jd_siblings._plan for m in layers if m._jd_siblings is not None}
    steps = [step for plan in plans.values() if plan is not None for step in plan[2] if step.replays is not None]
    return sum(s.replays.replayed for s in steps) + sum(r.replayed for m in layers for r in m._jd_replays.values())


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "alone"])
def test_repeated_forwards_replay_their_launches_and_see_what_changed_in_between(base, collection, backend, fusion,
                                                                                 fused, monkeypatch):
    """A forward of one token per row after the first of its batch size replays the launches it recorded
    (jdlora.kernels.replay; the model keeps that batch across mixes); new mixes, new inputs, Sigmas changed in
    place and prefills in between all show in its outputs, which equal those of launches made anew."""
    from jdlora.kernels import replay

    fusion(fused)
    model = load_collection(copy.deepcopy(base), collection)
    names = collection.adapter_names
    gen = torch.Generator().manual_seed(3)
    mixes = [[names[0], names[2], "__base__"], [names[4], names[4], names[1]], ["__base__", names[3], names[0]]]
    for step, mix in enumerate(mixes * 3):
        if step == 4:
            with torch.no_grad():
                for layer in model.modules():
                    if names[4] in getattr(layer, "jd_sigma", {}):
                        layer.jd_sigma[names[4]].mul_(3)  # in place, as an optimizer step: the banks' rows change
        ids = torch.randint(1, 96, (3, 1 if step % 4 else 5), generator=gen)  # decode-like, and prefills
        got = _logits(model, ids, adapter_names=mix)
        monkeypatch.setattr(replay, "ENABLED", False)
        assert torch.equal(got, _logits(model, ids, adapter_names=mix)), step  # launches made anew
        monkeypatch.setattr(replay, "ENABLED", True)
    if backend == "triton":
        assert _replayed(model) == 5 * (6 if fused else 11)  # each fused set or layer of 5 decode-like forwards
    else:
        assert _replayed(model) == 0  # the torch reference launches nothing
    clone = copy.deepcopy(model)  # without the recordings (compiled kernels, launchers): it records its own
    assert _replayed(clone) == 0
    ids = torch.randint(1, 96, (3, 1), generator=gen)
    assert torch.equal(_logits(clone, ids, adapter_names=mixes[0]), _logits(model, ids, adapter_names=mixes[0]))


def _qkv(base, collection):
    model = load_collection(copy.deepcopy(base), collection)
    layers = dict(model.named_modules())
    return model, [layers[ATTN.format(0, n)] for n in ("q_proj", "k_proj", "v_proj")]


def _run(layers, inputs, batch):
    with torch.no_grad():
        return [m(x, adapter_names=batch) for m, x in zip(layers, inputs)]


def _unfused_and_fused(layers, inputs, batch, fusion, launches=None):
    """The layers' outputs with fusion off, then on (``launches`` then counts the fused run alone)."""
    fusion(False)
    unfused = _run(layers, inputs, batch)
    if launches is not None:
        launches.clear()
    fusion(True)
    return unfused, _run(layers, inputs, batch)


def test_one_qkv_forward_takes_three_launches_instead_of_nine(base, collection, backend, fusion, launches):
    _, qkv = _qkv(base, collection)
    x = torch.randn(4, 1, 64)
    batch = MixedBatch([collection.adapter_names[0], "__base__", collection.adapter_names[2], collection.adapter_names[4]])
    fusion(False)
    unfused = _run(qkv, [x] * 3, batch)
    if backend == "triton":
        assert sum(launches.values()) == 9
    launches.clear()
    fusion(True)
    fused = _run(qkv, [x] * 3, batch)
    assert all(torch.equal(a, b) for a, b in zip(fused, unfused))
    if backend == "triton":
        assert launches == {"launch_shrink_siblings": 1, "launch_sigma_siblings": 1, "launch_expand_siblings": 1}
    assert qkv[0]._jd_siblings._kept is None  # every sibling took its output: nothing kept past the forward


def test_a_sibling_given_another_input_runs_alone_and_fusion_stops(base, collection, backend, fusion, launches):
    _, qkv = _qkv(base, collection)
    x, other = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    batch = MixedBatch([collection.adapter_names[1], collection.adapter_names[2]])
    expected, got = _unfused_and_fused(qkv, [x, other, x], batch, fusion)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not qkv[0]._jd_siblings.on  # k did not take the output computed from q's input
    launches.clear()
    assert all(torch.equal(a, b) for a, b in zip(_run(qkv, [x] * 3, batch), _run(qkv, [x] * 3, batch)))
    assert launches["launch_shrink_siblings"] == 0


def test_an_input_changed_in_place_between_siblings_is_not_served_a_stale_output(base, collection, backend, fusion):
    _, qkv = _qkv(base, collection)
    batch = MixedBatch([collection.adapter_names[0], collection.adapter_names[3]])
    x = torch.randn(2, 3, 64)
    fusion(True)
    with torch.no_grad():
        q = qkv[0](x, adapter_names=batch)
        x.mul_(2)
        k, v = qkv[1](x, adapter_names=batch), qkv[2](x, adapter_names=batch)
    fusion(False)
    expected = _run(qkv, [x / 2, x, x], batch)
    assert torch.equal(q, expected[0]) and torch.equal(k, expected[1]) and torch.equal(v, expected[2])


def test_a_kept_output_is_not_served_after_a_new_mix_or_new_banks(base, collection, backend, fusion, launches):
    """What changes between q's call (which computed k's and v's outputs) and k's is seen: a new mix of adapters in
    the same MixedBatch, or k's banks replaced; k and v then run alone on what they have now, and the next forward
    is fused again."""
    _, qkv = _qkv(base, collection)
    names = collection.adapter_names
    x = torch.randn(2, 3, 64)
    batch = MixedBatch([names[0], names[3]])
    fusion(True)
    with torch.no_grad():
        qkv[0](x, adapter_names=batch)
        batch.update([names[2], "__base__"])
        k, v = qkv[1](x, adapter_names=batch), qkv[2](x, adapter_names=batch)
    fusion(False)
    assert torch.equal(k, _run(qkv[1:2], [x], batch)[0]) and torch.equal(v, _run(qkv[2:], [x], batch)[0])
    fusion(True)
    launches.clear()
    again = _run(qkv, [x + 1] * 3, batch)
    assert qkv[0]._jd_siblings.on and qkv[0]._jd_siblings._kept is None
    if backend == "triton":
        assert launches["launch_shrink_siblings"] == 1
    fusion(False)
    assert all(torch.equal(a, b) for a, b in zip(again, _run(qkv, [x + 1] * 3, batch)))
    _, qkv = _qkv(base, collection)
    fusion(True)
    with torch.no_grad():
        qkv[0](x, adapter_names=batch)
        qkv[1].jd_cast(torch.float16)
        k = qkv[1](x, adapter_names=batch)
    fusion(False)
    assert torch.equal(k, _run(qkv[1:2], [x], batch)[0])


def test_any_sibling_may_run_first(base, collection, backend, fusion, launches):
    _, qkv = _qkv(base, collection)
    x = torch.randn(3, 2, 64)
    batch = MixedBatch([collection.adapter_names[1], "__base__", collection.adapter_names[4]])
    fusion(False)
    expected = _run(qkv, [x] * 3, batch)
    launches.clear()
    fusion(True)
    got = _run(qkv[::-1], [x] * 3, batch)[::-1]  # v, then k, then q
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert qkv[0]._jd_siblings.on and qkv[0]._jd_siblings._kept is None
    if backend == "triton":
        assert sum(launches.values()) == 3


def test_a_disabled_sibling_is_left_out_of_the_fused_launch(base, collection, backend, fusion, launches):
    _, qkv = _qkv(base, collection)
    qkv[1].enable_adapters(False)
    x = torch.randn(3, 2, 64)
    batch = MixedBatch([collection.adapter_names[2], "__base__", collection.adapter_names[0]])
    expected, got = _unfused_and_fused(qkv, [x] * 3, batch, fusion, launches)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(got[1], qkv[1].base_layer(x))
    assert qkv[0]._jd_siblings.on
    if backend == "triton":  # q and v fused: 3 launches, instead of 6
        assert sum(launches.values()) == 3


def test_float64_layers_run_unfused_with_the_same_numbers(base, collection, fusion):
    model, qkv = _qkv(base, collection)
    model.double()
    x = torch.randn(2, 3, 64, dtype=torch.float64)
    batch = MixedBatch([collection.adapter_names[0], collection.adapter_names[1]])
    expected, got = _unfused_and_fused(qkv, [x] * 3, batch, fusion)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert qkv[0]._jd_siblings._kept is None


def test_the_environment_switch_turns_fusion_off():
    code = "import jdlora.tuner.siblings as s; print(s.ENABLED)"
    env = {**os.environ, "JDLORA_FUSE_SIBLINGS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_inference_mode_tensors_are_fused_too(base, collection, backend, fusion, launches):
    """Tensors made under torch.inference_mode keep no version counter: siblings match them by identity."""
    _, qkv = _qkv(base, collection)
    batch = MixedBatch([collection.adapter_names[4], "__base__"])
    with torch.inference_mode():
        x = torch.randn(2, 3, 64)
        expected, got = _unfused_and_fused(qkv, [x] * 3, batch, fusion, launches)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    if backend == "triton":
        assert sum(launches.values()) == 3


def _triple(groups_per_layer, d=32):
    """q, k, v tuner layers under one parent; ``groups_per_layer[i]``: (rank, adapter names) groups of layer i."""
    from torch import nn

    from jdlora.tuner.layer import AdapterGroup, JDLoraLayer, Linear

    groups, parent = {}, nn.Module()
    for name, layer_groups, d_out in zip(("q_proj", "k_proj", "v_proj"), groups_per_layer, (d, d // 2, d // 2)):
        layer = Linear(nn.Linear(d, d_out, bias=False))
        for r, names in layer_groups:
            group = groups.setdefault(r, AdapterGroup(r, "full"))
            layer.add_bases(f"r{r}", torch.randn(d_out, r) / r**0.5, torch.randn(d, r) / d**0.5)
            layer.add_sigmas(group, names, group.add(names), torch.randn(len(names), r, r), f"r{r}")
        setattr(parent, name, layer)
    siblings.link_siblings(parent, JDLoraLayer)
    return parent.q_proj, parent.k_proj, parent.v_proj


def test_groups_only_some_siblings_have_and_other_ranks_run_alone(backend, fusion, launches):
    """k alone has rank-8 adapters ("b"), v has no rank-4 ones: the rank-16 adapters of all three are fused, q and
    k's rank-4 ones too (a pair), k's rank-8 ones run alone."""
    qkv = _triple([[(16, ["a0", "a1"]), (4, ["c"])], [(16, ["a0", "a1"]), (8, ["b"]), (4, ["c"])],
                   [(16, ["a0", "a1"])]])
    x = torch.randn(5, 1, 32)
    batch = MixedBatch(["a0", "b", "__base__", "c", "a1"])
    expected, got = _unfused_and_fused(qkv, [x] * 3, batch, fusion, launches)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    if backend == "triton":  # rank 16: 3 launches for q, k, v; rank 4: 3 for q and k; k's rank 8: its own 3
        assert launches == {"launch_shrink_siblings": 2, "launch_sigma_siblings": 2, "launch_expand_siblings": 2,
                            "launch_shrink": 1, "launch_sigma": 1, "launch_expand": 1}


def test_banks_replaced_between_forwards_are_fused_with_their_new_values(backend, fusion, launches):
    qkv = _triple([[(16, ["a0", "a1"])]] * 3)
    x = torch.randn(3, 2, 32)
    batch = MixedBatch(["a1", "__base__", "a0"])
    fusion(True)
    _run(qkv, [x] * 3, batch)
    for layer in qkv:  # new bank tensors (as .to() and load_state_dict(assign=True) give)
        layer.jd_cast(torch.float16)
    launches.clear()
    got = _run(qkv, [x] * 3, batch)
    if backend == "triton":
        assert launches["launch_shrink_siblings"] == 1
    fusion(False)
    expected = _run(qkv, [x] * 3, batch)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert qkv[0]._jd_siblings.on


def test_banks_grown_or_reloaded_after_a_fused_forward_are_used_by_the_next(backend, fusion):
    """The siblings' plan is kept between forwards; an adapter added through one sibling (the others' Sigma banks
    grow to the group) or a load that replaces the tensors (assign=True) must reach the next fused forward."""
    qkv = _triple([[(16, ["a0", "a1"])]] * 3)
    x = torch.randn(3, 2, 32)
    fusion(True)
    _run(qkv, [x] * 3, MixedBatch(["a1", "__base__", "a0"]))
    q = qkv[0]
    group = q._jd_banks["r16-full"].group
    q.add_sigmas(group, ["a2"], group.add(["a2"]), torch.randn(1, 16, 16), "r16")  # q only: k's and v's banks lag
    batch = MixedBatch(["a2", "a0", "a1"])
    got = _run(qkv, [x] * 3, batch)
    fusion(False)
    expected = _run(qkv, [x] * 3, batch)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    before = got[1]
    state = {k: v * 2 if "jd_sigma" in k else v for k, v in qkv[1].state_dict().items()}
    qkv[1].load_state_dict(state, assign=True)  # new tensors: k's banks are rebuilt before they are next used
    fusion(True)
    got = _run(qkv, [x] * 3, batch)
    fusion(False)
    expected = _run(qkv, [x] * 3, batch)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(got[1], before)  # k's doubled Sigmas are used


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "alone"])
def test_on_cuda_replayed_launches_give_the_outputs_of_launches_made_anew(base, collection, fusion, fused, monkeypatch):
    """The replays of jdlora.kernels.replay go straight to the compiled kernels on a GPU (the CPU tests replay through
    the interpreter): decode-like forwards with new mixes and inputs equal those made with replays off."""
    from jdlora.kernels import replay

    fusion(fused)
    model = load_collection(copy.deepcopy(base), collection).to("cuda", dtype=torch.bfloat16)
    names = collection.adapter_names
    gen = torch.Generator().manual_seed(4)
    for step in range(6):
        mix = [names[(step + i) % 5] if i != 1 else "__base__" for i in range(4)]
        ids = torch.randint(1, 96, (4, 1 if step % 3 else 6), generator=gen).cuda()
        got = _logits(model, ids, adapter_names=mix).float()
        monkeypatch.setattr(replay, "ENABLED", False)
        anew = _logits(model, ids, adapter_names=mix).float()
        monkeypatch.setattr(replay, "ENABLED", True)
        torch.testing.assert_close(got, anew, rtol=0, atol=5e-2)  # split-K sums meet by atomic adds in any order
    assert _replayed(model) == 3 * (6 if fused else 11)  # decode-like steps 2, 4, 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_on_cuda_the_fused_kernels_give_the_unfused_outputs(base, collection, fusion, launches, dtype):
    model = load_collection(copy.deepcopy(base), collection).to("cuda", dtype=dtype)
    ids = torch.randint(1, 96, (4, 7), generator=torch.Generator().manual_seed(2)).cuda()
    names = [collection.adapter_names[0], collection.adapter_names[4], "__base__", collection.adapter_names[2]]
    fusion(False)
    unfused = _logits(model, ids, adapter_names=names).float()
    launches.clear()
    fusion(True)
    for _ in range(2):  # the second forward launches directly (jdlora.kernels.fast_launch)
        fused = _logits(model, ids, adapter_names=names).float()
        # split-K sums meet by atomic adds in any order: equal up to rounding
        torch.testing.assert_close(fused, unfused, rtol=0, atol=1e-4 if dtype == torch.float32 else 5e-2)
    assert launches["launch_shrink_siblings"] == launches["launch_expand_siblings"] == 2 * 4
    assert launches["launch_expand"] == 2 * 2  # o_proj of each layer, two forwards
