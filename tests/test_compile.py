"""JD-LoRA under torch.compile: the kernels as one custom-op node, and ``generate`` with a static cache
compiled once for every mix of adapters (the mix is tensor data). CPU: the torch reference (and the
Triton kernels through the interpreter) behind the op, dynamo's ``aot_eager`` backend."""

from __future__ import annotations

import copy
import os
import random

import pytest
import torch
from transformers import CompileConfig

import jdlora
from jdlora.kernels import jd_lora_forward, jd_lora_forward_reference, prepare_batch
from jdlora.synthetic import llama_modules, synthetic_adapters
from jdlora.tuner import load_collection
from tiny_models import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
OP = "jdlora.jd_lora_forward_"


class Graphs:
    """A dynamo backend that keeps every graph it is given (one per compilation) and runs it with aot_eager.

    A plain function, not an object: transformers deep-copies its compile config (and an object backend with it).
    """

    def __init__(self):
        self.graphs = []

        def backend(gm, example_inputs):
            from torch._dynamo.backends.debugging import aot_eager

            self.graphs.append(gm)
            return aot_eager(gm, example_inputs)

        self.backend = backend

    def op_calls(self, op: str = OP) -> int:
        return sum(1 for gm in self.graphs for node in gm.graph.nodes if op == str(node.target).removesuffix(".default"))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_kernels_trace_as_one_graph_node_and_match_eager(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set by conftest.py)")
    rows, S, n, d_in, d_out, r = 4, 3, 5, 48, 40, 16
    x = torch.randn(rows * S, d_in)
    U, V = torch.randn(2, d_out, r) / r**0.5, torch.randn(2, d_in, r) / d_in**0.5
    sigma, cluster_of = torch.randn(n, r, r) / r**0.5, torch.tensor([0, 1, -1, 1, 0])
    y0 = torch.randn(rows * S, d_out)

    def step(x, row_adapter):
        batch = prepare_batch(row_adapter, tokens_per_row=S)
        y = y0 + 0  # the op mutates its output: give it a fresh tensor
        return jd_lora_forward(y, x, U, V, sigma, cluster_of, batch, scale=0.5, backend=backend)

    graphs = Graphs()
    compiled = torch.compile(step, fullgraph=True, backend=graphs.backend)
    for _ in range(3):  # a new mix each call: the same graph
        row_adapter = torch.randint(-1, n, (rows,))
        expected = jd_lora_forward_reference(y0.clone(), x, U, V, sigma, cluster_of,
                                             row_adapter.repeat_interleave(S), scale=0.5)
        torch.testing.assert_close(compiled(x, row_adapter), expected, rtol=2e-5, atol=2e-5)
    assert len(graphs.graphs) == 1 and graphs.op_calls() == 1


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("expands", ["each", "together"])
def test_the_siblings_shrink_and_expands_trace_as_graph_nodes_and_match_each_forward(backend, expands):
    """Under torch.compile, q, k and v's shared shrink is one node returning a fresh g, and their expands one node
    mutating every output (or one node each): the same numbers as each module's own forward."""
    from jdlora.kernels import jd_lora_expand, jd_lora_expand_siblings, jd_lora_shrink_siblings

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 (set by conftest.py)")
    rows, S, n, d_in, r = 3, 4, 5, 48, 16
    d_outs, clusters = (40, 24, 24), (2, 1, 3)
    x = torch.randn(rows * S, d_in)
    Us = [torch.randn(c, d, r) / r**0.5 for c, d in zip(clusters, d_outs)]
    Vs = [torch.randn(c, d_in, r) / d_in**0.5 for c in clusters]
    sigmas = [torch.randn(n, r, r) / r**0.5 for _ in clusters]
    cluster_ofs = [torch.randint(-1, c, (n,)) for c in clusters]
    y0s = [torch.randn(rows * S, d) for d in d_outs]

    def step(x, row_adapter):
        batch = prepare_batch(row_adapter, tokens_per_row=S)
        shrunk = jd_lora_shrink_siblings(x, Vs, sigmas, cluster_ofs, batch, backend=backend)
        if expands == "each":
            return [jd_lora_expand(y0 + 0, U, c, shrunk, s, scale=0.5)
                    for s, (y0, U, c) in enumerate(zip(y0s, Us, cluster_ofs))]
        ys = [y0 + 0 for y0 in y0s]
        jd_lora_expand_siblings(ys, Us, cluster_ofs, shrunk, scale=0.5)
        return ys

    graphs = Graphs()
    compiled = torch.compile(step, fullgraph=True, backend=graphs.backend)
    for _ in range(2):  # a new mix: the same graph
        row_adapter = torch.randint(-1, n, (rows,))
        for y, y0, U, V, sigma, c in zip(compiled(x, row_adapter), y0s, Us, Vs, sigmas, cluster_ofs):
            expected = jd_lora_forward_reference(y0.clone(), x, U, V, sigma, c, row_adapter.repeat_interleave(S), scale=0.5)
            torch.testing.assert_close(y, expected, rtol=2e-5, atol=2e-5)
    assert len(graphs.graphs) == 1
    assert graphs.op_calls("jdlora.jd_lora_shrink_siblings") == 1
    assert graphs.op_calls("jdlora.jd_lora_expand_siblings_") == (3 if expands == "each" else 1)


@pytest.fixture(scope="module")
def peft_model():
    base = tiny_llama()
    modules = llama_modules(2, 64, 32, ("q_proj", "k_proj", "v_proj", "o_proj"))
    collection = jdlora.compress(synthetic_adapters(6, modules, rank=4, groups=2, seed=3), rank=6, clusters=2,
                                 progress=False)
    return load_collection(copy.deepcopy(base), collection), collection.adapter_names


def generate(model, ids, names, **kwargs):
    with torch.no_grad():
        # min_new_tokens: no early stop at EOS (a row alone would end shorter than its padded batch row)
        return model.generate(input_ids=ids, adapter_names=names, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                              **kwargs)


def test_generate_with_a_static_cache_compiles_once_for_every_mix_of_adapters(peft_model):
    """transformers compiles the decode step when the cache is static (on CPU when asked to); the
    mixed-adapter batch is data the graph reads, so a new mix runs the same graph, no graph break, and
    each row equals that row generated alone with its adapter, eagerly. q, k and v share their shrink."""
    model, names = peft_model
    graphs = Graphs()
    config = CompileConfig(backend=graphs.backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # transformers' switch for compiling on CPU
    ids = torch.randint(1, 96, (3, 6))
    for _ in range(3):
        mix = random.sample(names, 2) + ["__base__"]
        random.shuffle(mix)
        out = generate(model, ids, mix, cache_implementation="static", compile_config=config)
        for i, name in enumerate(mix):
            assert torch.equal(out[i], generate(model, ids[i:i + 1], [name])[0]), (mix, i)
    assert len(graphs.graphs) == 1, "a new mix of adapters recompiled the decode step"
    # q, k and v of each layer: one shrink-and-Sigma node and one expand node for the three (the siblings, traced);
    # o_proj: its own forward node
    assert graphs.op_calls("jdlora.jd_lora_shrink_siblings") == 2
    assert graphs.op_calls("jdlora.jd_lora_expand_siblings_") == 2
    assert graphs.op_calls() == 2
    # without adapter_names the compiled step is the base model's (another graph, no JD op)
    base_out = generate(model, ids, None, cache_implementation="static", compile_config=config)
    with model.disable_adapter():
        assert torch.equal(base_out, generate(model, ids, None))


def test_a_new_mix_of_the_same_size_rewrites_the_tensors_a_captured_decode_step_reads(peft_model):
    """A CUDA graph captured over a decode step keeps reading the batch's row tensors and scratch: a new mix
    of the same batch size must land in those tensors, and no mix in between (base-only, another size) may
    free them."""
    from jdlora.tuner.mixed import MixedBatch

    model, names = peft_model
    group = next(iter(model.base_model.jd_groups.values()))
    batch = MixedBatch()
    batch.update(names[:3], [group], ["cpu"])
    decode = batch.prepared(group, 1, torch.device("cpu"))
    h, g = decode.scratch(16, torch.device("cpu"))
    tensors = [t.data_ptr() for t in (decode.row_adapter, decode.order, decode.sorted_adapter, h, g)]
    batch.update(["__base__"] * 3)
    assert batch.prepared(group, 1, torch.device("cpu")) is None  # eager: nothing to launch
    mix = [names[4], "__base__", names[1]]
    batch.update(mix)
    again = batch.prepared(group, 1, torch.device("cpu"))
    assert again is decode
    h2, g2 = again.scratch(16, torch.device("cpu"))
    assert [t.data_ptr() for t in (again.row_adapter, again.order, again.sorted_adapter, h2, g2)] == tensors
    assert again.row_adapter.tolist() == [group.rows[names[4]], -1, group.rows[names[1]]]
    batch.update(names[:2])  # another batch size (a prefill, say): its own tensors ...
    assert batch.prepared(group, 1, torch.device("cpu")).row_adapter.shape == (2,)
    batch.update(mix[::-1])  # ... and the 3-row decode batch is still the one captured
    assert batch.prepared(group, 1, torch.device("cpu")) is decode
    assert decode.row_adapter.tolist() == [group.rows[names[1]], -1, group.rows[names[4]]]


def test_adapter_weights_changed_in_place_reach_the_mixed_batch(peft_model):
    """The PEFT parameters are views of the Sigma banks the mixed batch reads (an optimizer step or a
    load_state_dict writes through), so a Sigma scaled in place changes the mixed-batch output."""
    model, names = peft_model
    ids = torch.randint(1, 96, (2, 5))
    with torch.no_grad():
        before = model(input_ids=ids, adapter_names=[names[0], names[1]]).logits
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        old = layer.jd_sigma[names[0]].detach().clone()
        layer.jd_sigma[names[0]].mul_(3.0)
        after = model(input_ids=ids, adapter_names=[names[0], names[1]]).logits
        layer.jd_sigma[names[0]].copy_(old)
        restored = model(input_ids=ids, adapter_names=[names[0], names[1]]).logits
    assert not torch.allclose(before[0], after[0])
    torch.testing.assert_close(before[1], after[1])  # the other adapter's row is untouched
    torch.testing.assert_close(before, restored)
