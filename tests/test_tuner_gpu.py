"""On CUDA, the PEFT layers' mixed-batch path runs the Triton kernels and matches the CPU (torch) path."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import jdlora
from jdlora.synthetic import llama_modules, synthetic_adapters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def _llama_and_adapters(targets=QKVO):
    """A random 2-layer Llama (CPU, seed 0) and 12 synthetic rank-8 adapters on ``targets`` of both layers."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=0)
    base = LlamaForCausalLM(config).eval()
    adapters = synthetic_adapters(12, llama_modules(2, 256, 128, targets), rank=8)
    return base, adapters


@pytest.mark.parametrize("sigma", ["full", "diag"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)], ids=["fp32", "bf16"])
def test_mixed_batch_on_cuda_matches_the_cpu_path(sigma, dtype, tol, monkeypatch):
    from jdlora.tuner import load_collection
    import jdlora.kernels.launch as launch

    calls = {"triton": 0}
    real = launch.jd_lora_forward_triton

    def counted(*args, **kwargs):
        calls["triton"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "jd_lora_forward_triton", counted)
    base, adapters = _llama_and_adapters()
    collection = jdlora.compress(adapters, rank=16, clusters=3, sigma=sigma, progress=False)
    ids = torch.randint(1, 512, (6, 20), generator=torch.Generator().manual_seed(2))
    names = [collection.adapter_names[i] for i in (0, 5, 11, 5)] + ["__base__", collection.adapter_names[7]]
    cpu = load_collection(copy.deepcopy(base), collection)
    with torch.no_grad():
        expected = cpu(input_ids=ids, adapter_names=names).logits
    gpu = load_collection(copy.deepcopy(base), collection).to("cuda", dtype=dtype)
    with torch.no_grad():
        got = gpu(input_ids=ids.cuda(), adapter_names=names).logits.float().cpu()
    assert calls["triton"] > 0, "the CUDA path must run the Triton kernels"
    err = ((got - expected).norm() / expected.norm()).item()
    assert err < tol, f"relative error {err:.2e}"


def _qkv_llama_on_cuda():
    """A random 2-layer Llama on CUDA with a collection of 12 adapters (rank 16, 3 clusters) on q, k, v."""
    from jdlora.tuner import load_collection

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=0)
    adapters = synthetic_adapters(12, llama_modules(2, 256, 128, QKVO[:3]), rank=8)
    collection = jdlora.compress(adapters, rank=16, clusters=3, progress=False)
    return load_collection(LlamaForCausalLM(config).eval(), collection).to("cuda"), collection


def test_compiled_generate_with_a_static_cache_matches_eager_for_every_mix():
    """On CUDA transformers compiles the decode step when the cache is static (inductor, CUDA graphs):
    mixed adapters go through it, a new mix runs the same graph, and the result is the eager one."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, collection = _qkv_llama_on_cuda()
    ids = torch.randint(1, 512, (4, 12), generator=torch.Generator().manual_seed(2)).cuda()
    names = collection.adapter_names
    kwargs = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
    graphs = []
    for mix in ([names[0], names[5], "__base__", names[11]], [names[3], names[3], names[7], "__base__"],
                ["__base__", names[1], names[9], names[2]]):
        with torch.no_grad():
            got = model.generate(input_ids=ids, adapter_names=mix, cache_implementation="static", **kwargs)
            ref = model.generate(input_ids=ids, adapter_names=mix, disable_compile=True, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        assert torch.equal(got.sequences, ref.sequences), mix
        for a, b in zip(got.logits, ref.logits):
            assert ((a - b).norm() / b.norm()).item() < 1e-3
    assert graphs[0] >= 1 and graphs[1] == graphs[0] == graphs[2], f"compiled graphs after each call: {graphs}"
    torch._dynamo.reset()


def test_a_decode_step_captured_in_a_cuda_graph_replays_every_new_mix():
    """A server captures the eager decode step once per batch size and replays it: the mix is set outside
    the graph (the tuner's adapter_names hooks, as forward and generate set it) and lands in the tensors the
    graph reads, also after a call of another batch size (a prefill) in between."""
    model, collection = _qkv_llama_on_cuda()
    names = collection.adapter_names
    static_ids = torch.randint(1, 512, (4, 1), device="cuda")

    def step():
        return model.base_model.model(input_ids=static_ids, use_cache=False).logits

    mixes = [[names[0], names[5], "__base__", names[11]], [names[3], names[3], names[7], "__base__"],
             ["__base__"] * 4, [names[9], names[1], names[2], names[4]]]
    with torch.no_grad():
        with model.base_model._enable_peft_forward_hooks(adapter_names=mixes[0]):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up outside the capture: kernels compiled, scratch allocated
                step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = step()
        for i, mix in enumerate(mixes):
            if i == 2:  # a call of another batch size between replays
                model(input_ids=torch.randint(1, 512, (3, 7), device="cuda"), adapter_names=names[:3])
            static_ids.copy_(torch.randint(1, 512, (4, 1), device="cuda"))
            with model.base_model._enable_peft_forward_hooks(adapter_names=mix):
                graph.replay()
            expected = model(input_ids=static_ids, adapter_names=mix).logits
            assert ((out - expected).norm() / expected.norm()).item() < 1e-5, mix


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_model_split_across_two_gpus_gives_what_it_gives_on_one():
    """``device_map``-style placement (accelerate's hooks move the activations): each layer's kernels must run on
    its own GPU, on that GPU's stream, also when their launches are replayed (eager generate's decode steps), while
    the other GPU is the current one."""
    from accelerate import dispatch_model

    from jdlora.tuner import load_collection

    base, adapters = _llama_and_adapters()
    collection = jdlora.compress(adapters, rank=16, clusters=3, progress=False)
    one = load_collection(copy.deepcopy(base), collection).to("cuda:0")
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": 1, "model.norm": 1,
                  "model.rotary_emb": 1, "lm_head": 1}
    two = load_collection(dispatch_model(copy.deepcopy(base), device_map=device_map), collection)
    layer = two.base_model.model.model.layers[1].self_attn.q_proj
    assert next(iter(layer._jd_banks.values())).sigma.device == torch.device("cuda:1")
    names = collection.adapter_names
    mix = [names[0], names[5], "__base__", names[11]]
    ids = torch.randint(1, 512, (4, 9), generator=torch.Generator().manual_seed(3)).cuda(0)
    kwargs = dict(adapter_names=mix, max_new_tokens=6, min_new_tokens=6, do_sample=False, disable_compile=True,
                  return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        expected = one(input_ids=ids, adapter_names=mix).logits
        got = two(input_ids=ids, adapter_names=mix).logits.to(expected.device)
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        a, b = one.generate(input_ids=ids, **kwargs), two.generate(input_ids=ids, **kwargs)
    assert torch.equal(a.sequences, b.sequences.to(a.sequences.device))
    for x, y in zip(a.logits, b.logits):
        torch.testing.assert_close(y.to(x.device), x, rtol=1e-4, atol=1e-4)
