"""End to end: TGI 3.3.7's own ``text-generation-server serve`` with JD-LoRA collections and a plain LoRA.

Skipped unless ``JDLORA_TGI_PYTHON`` is the Python of a TGI environment, e.g. the one built by
``integrations/tgi/scripts/build_tgi_cpu_env.sh`` (docs/tgi.md, "End-to-end test"). That environment runs
TGI's server on the CPU through TGI's Intel (IPEX) path: ``FlashCausalLM`` / ``FlashLlama``, TGI's IPEX
attention (``ATTENTION=flashdecoding-ipex``), paged KV cache, TGI's adapter loading with jdlora_tgi's hooks
(from the ``.pth`` the wheel installs; this checkout's sources come first on ``PYTHONPATH``).

The server gets two collections and a plain LoRA in ``LORA_ADAPTERS``; ``integrations/tgi/scripts/tgi_router.py``
makes the router's gRPC calls (ServiceDiscovery, Info, Warmup, Prefill, Decode with concatenation, FilterBatch)
for waves of greedy requests that join and leave a running batch. Every request is checked against float32
references (transformers' Llama with each adapter's update merged into the weights, computed here, outside
TGI): along the tokens the server generated, each of its tokens must be the reference's argmax (up to a
bfloat16 near-tie) and its logprob the reference's; exactly one reference (the requested adapter's, the base
model's for an unknown id) may fit.

TGI limit (not jdlora's): a batch mixing plain-LoRA requests with any other request crashes inside IPEX 2.8's
``sgmv_shrink_cpu`` ("double free or corruption"), with the JD backend off too; plain LoRA runs in its own
phase here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "integrations" / "tgi" / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
from tiny_llama import projection_modules, write_tiny_llama  # noqa: E402  (beside the TGI scripts)
TGI_PYTHON = os.environ.get("JDLORA_TGI_PYTHON")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not TGI_PYTHON or not (Path(TGI_PYTHON).parent / "text-generation-server").exists(),
    reason="set JDLORA_TGI_PYTHON to the python of a TGI 3.3.7 environment (integrations/tgi/scripts/"
           "build_tgi_cpu_env.sh) to run TGI's real server end to end",
)]

LLAMA = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 64, "vocab_size": 64, "max_position_embeddings": 256}
LOGIT_SCALE = 6.0  # lm_head gain: peaked distributions, so that bfloat16 rarely turns a greedy choice
MARGIN = 0.25  # a server token may trail the reference's argmax by this much (bfloat16 near-ties)
LOGPROB_TOL = 0.25  # |server logprob - reference logprob| (bfloat16 weights and activations)
START_TIMEOUT = 300  # seconds for the server to start (about 30 s here)


# ----- assets: a tiny flash llama, two collections, a plain LoRA ---------------------------------------


def llama_modules() -> dict[str, tuple[int, int]]:
    return projection_modules(LLAMA)


def write_base(root: Path) -> dict[str, torch.Tensor]:
    return write_tiny_llama(root, LLAMA, logit_scale=LOGIT_SCALE, transformers4_tokenizer=True)


def write_assets(root: Path) -> SimpleNamespace:
    """Collection ``a``: 4 JD-Full adapters of rank 8 in 2 clusters on every projection; collection ``b``:
    3 JD-Diag adapters of rank 4 on q/v/down of layer 1 only; ``plain``: a rank-8 LoRA on every projection.
    ``LORA_ADAPTERS`` also lists one adapter folder of ``a`` alone (``single``)."""
    import jdlora
    from jdlora.synthetic import save_adapters, synthetic_adapters

    base = write_base(root / "base")
    modules = llama_modules()
    some = {m: s for m, s in modules.items() if m.startswith("model.layers.1.") and m.split(".")[-1] in
            ("q_proj", "v_proj", "down_proj")}
    kw = {"base_model": str(root / "base")}
    a = jdlora.compress(synthetic_adapters(4, modules, rank=8, alpha=64, groups=2, seed=1, **kw), rank=8,
                        clusters=2, sigma="full", max_iter=20, max_rounds=3, progress=False)
    b = jdlora.compress(synthetic_adapters(3, some, rank=4, alpha=128, groups=1, seed=2, **kw), rank=4,
                        clusters=1, sigma="diag", max_iter=20, max_rounds=3, progress=False)
    a.save_pretrained(root / "coll_a", progress=False)
    b.save_pretrained(root / "coll_b", progress=False)
    (plain,) = save_adapters(synthetic_adapters(1, modules, rank=8, alpha=64, seed=3, **kw), root / "plain")
    return SimpleNamespace(root=root, base=base, a=a, b=b, plain=plain,
                           lora_adapters=f"a={root / 'coll_a'},b={root / 'coll_b'},plain={plain},"
                                         f"single={root / 'coll_a' / 'adapters' / 'synthetic-00003'}")


def variant_deltas(assets) -> dict[str, dict[str, torch.Tensor]]:
    """``{adapter id: {module: dense update}}`` from the saved files: the references' updates."""
    from safetensors.torch import load_file

    out = {"base": {}}
    for entry, coll in (("a", assets.a), ("b", assets.b)):
        for name in coll.adapter_names:
            deltas = {m: coll.delta_weight(name, m) for m in coll.modules}
            out[f"{entry}:{name}"] = {m: d.float() for m, d in deltas.items() if d is not None}
    config = json.loads((assets.plain / "adapter_config.json").read_text())
    tensors = load_file(assets.plain / "adapter_model.safetensors")
    scale = config["lora_alpha"] / config["r"]
    out["plain"] = {m: scale * tensors[f"{p}.lora_B.weight"] @ tensors[f"{p}.lora_A.weight"]
                    for m, p in ((m, f"base_model.model.{m}") for m in llama_modules())
                    if f"{p}.lora_A.weight" in tensors}
    return out


class References:
    """float32 transformers Llama per adapter id, the adapter's update merged into the base weights."""

    def __init__(self, assets):
        from transformers import LlamaConfig, LlamaForCausalLM

        self.models = {}
        config = LlamaConfig(**json.loads((assets.root / "base" / "config.json").read_text()))
        for variant, deltas in variant_deltas(assets).items():
            model = LlamaForCausalLM(config).float().eval()
            weights = {k: v.clone() for k, v in assets.base.items()}
            for module, delta in deltas.items():
                weights[f"{module}.weight"] += delta
            model.load_state_dict(weights, strict=True)
            self.models[variant] = model

        self._cache: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}

    @torch.no_grad()
    def precompute(self, sequences: list[list[int]]) -> None:
        """:meth:`log_probs` of every sequence for every variant, one right-padded batch per variant (causal
        attention: the padding after a sequence does not change its logits)."""
        longest = max(map(len, sequences))
        batch = torch.tensor([ids + [0] * (longest - len(ids)) for ids in sequences])
        for variant, model in self.models.items():
            lp = model(batch).logits.float().log_softmax(-1)
            for i, ids in enumerate(sequences):
                self._cache[variant, tuple(ids)] = lp[i, :len(ids)]

    @torch.no_grad()
    def log_probs(self, variant: str, ids: list[int]) -> torch.Tensor:
        """``[len(ids), vocab]`` log-softmax of the next-token logits after each prefix of ``ids``."""
        key = (variant, tuple(ids))
        if key not in self._cache:
            self._cache[key] = self.models[variant](torch.tensor([ids])).logits[0].float().log_softmax(-1)
        return self._cache[key]

    def errors(self, variant: str, result: dict) -> tuple[float, float]:
        """(largest amount by which a server token trails the reference's argmax, largest |logprob difference|,
        prompt logprobs included) of ``result`` (the server's prompt ids, tokens, logprobs) against ``variant``."""
        prompt, gen = result["prompt_ids"], result["ids"]
        lp = self.log_probs(variant, prompt + gen[:-1])
        steps = lp[len(prompt) - 1:]
        gap = max(float(steps[t].max() - steps[t, token]) for t, token in enumerate(gen))
        diffs = [abs(float(steps[t, token]) - x) for t, (token, x) in enumerate(zip(gen, result["logprobs"]))]
        diffs += [abs(float(lp[t, prompt[t + 1]]) - x)  # prompt logprobs; the first one is NaN
                  for t, x in enumerate(result.get("prompt_logprobs", [])[1:])]
        return gap, max(diffs)

    def fits(self, variant: str, result: dict) -> bool:
        return within_tolerance(self.errors(variant, result))


def within_tolerance(errors: tuple[float, float]) -> bool:
    gap, logprob = errors
    return gap <= MARGIN and logprob <= LOGPROB_TOL


# ----- the scenario: waves of requests joining and leaving running batches ----------------------------


def prompt(i: int, words: int) -> str:
    return " ".join(f"w{(7 * i + 3 * j) % (LLAMA['vocab_size'] - 3)}" for j in range(words))


def prompt_ids(i: int, words: int) -> list[int]:
    return [3 + (7 * i + 3 * j) % (LLAMA["vocab_size"] - 3) for j in range(words)]


# (request id, adapter id sent, expected reference, prompt words, max_new_tokens, prefill logprobs)
UNKNOWN = "a:no-such-adapter"
MIXED = [  # phase 1: base, both collections, an unknown id; three waves joining a running batch
    (0, [(1, "", "base", 5, 6, True), (2, "a:synthetic-00000", None, 4, 3, False),
         (3, "a:synthetic-00001", None, 6, 7, True), (4, "b:synthetic-00000", None, 3, 5, True),
         (5, UNKNOWN, "base", 5, 6, False), (6, "b:synthetic-00002", None, 4, 2, False)]),
    (2, [(7, "a:synthetic-00002", None, 5, 5, True), (8, "b:synthetic-00001", None, 4, 6, False),
         (9, "", "base", 3, 5, False), (10, "a:synthetic-00003", None, 6, 4, True)]),
    (4, [(11, "a:synthetic-00000", None, 5, 4, False), (12, "b:synthetic-00000", None, 5, 4, True),
         (13, "single", "a:synthetic-00003", 4, 4, False)]),  # one adapter folder of collection a, listed alone
]
PLAIN = [  # phase 2: plain LoRA alone (TGI + IPEX 2.8 crash on plain LoRA mixed with anything else)
    (0, [(21, "plain", None, 5, 5, True), (22, "plain", None, 3, 3, False)]),
    (2, [(23, "plain", None, 4, 4, True)]),
]
PHASES = [MIXED, PLAIN]
REQUESTS = [r for phase in PHASES for _, wave in phase for r in wave]
SENT = {rid: adapter for rid, adapter, *_ in REQUESTS}
WORDS = {rid: words for rid, _, _, words, *_ in REQUESTS}
MAX_NEW = {rid: max_new for rid, _, _, _, max_new, _ in REQUESTS}
EXPECTED = {rid: expected or adapter for rid, adapter, expected, *_ in REQUESTS}


def scenario(tokenizer: Path) -> dict:
    def req(rid, adapter, _, words, max_new, logprobs):
        return {"id": rid, "adapter_id": adapter, "inputs": prompt(rid, words), "max_new_tokens": max_new,
                "prefill_logprobs": logprobs}

    return {"tokenizer": str(tokenizer),
            "phases": [[{"at": at, "requests": [req(*r) for r in wave]} for at, wave in phase] for phase in PHASES]}


# ----- running TGI's server ----------------------------------------------------------------------------


def server_env(assets) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "PYTHON"))}
    env.update(ATTENTION="flashdecoding-ipex", PREFIX_CACHING="0", PREFILL_CHUNKING="0", REQUEST_LOGPROBS="1",
               LORA_ADAPTERS=assets.lora_adapters, HF_HUB_OFFLINE="1", HF_HOME=str(assets.root / "hf_home"),
               OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO / "integrations" / "tgi" / "src")]))
    return env


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("tgi_e2e")
    assets = write_assets(root)
    (root / "scenario.json").write_text(json.dumps(scenario(root / "base" / "tokenizer.json")))
    server_bin = Path(TGI_PYTHON).parent / "text-generation-server"
    uds, log_path = root / "sock", root / "server.log"
    env = server_env(assets)
    t0 = time.time()
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(server_bin), "serve", str(root / "base"), "--uds-path", str(uds)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        router = subprocess.run([TGI_PYTHON, str(SCRIPTS / "tgi_router.py"), "--uds-path", str(uds), "--scenario",
                                 str(root / "scenario.json"), "--out", str(root / "result.json"),
                                 "--timeout", str(START_TIMEOUT), "--server-pid", str(server.pid)],
                                env=env, capture_output=True, text=True, timeout=START_TIMEOUT + 120)
        alive = server.poll() is None
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    log_text = log_path.read_text(errors="replace")
    assert router.returncode == 0 and alive, (
        f"router stand-in failed (server {'alive' if alive else 'died'}):\n{router.stderr[-4000:]}\n"
        f"server log:\n{log_text[-4000:]}")
    result = json.loads((root / "result.json").read_text())
    print(f"\nTGI end to end: {time.time() - t0:.1f}s in all; {result['seconds']}")
    return SimpleNamespace(assets=assets, result=result, log=log_text, refs=References(assets))


# ----- tests -------------------------------------------------------------------------------------------


def test_tgi_serves_its_flash_llama_on_the_ipex_path_with_the_router_calls(served):
    info = served.result["info"]
    assert info["attention_impl"] == "flashdecoding-ipex" and info["device_type"] == "cpu"
    assert not info["support_chunking"]
    assert served.result["urls"] == [f"unix://{served.assets.root / 'sock'}-0"]
    assert {c["call"] for c in served.result["calls"]} == {"Prefill", "Decode", "FilterBatch"}


def test_every_request_fits_exactly_the_float32_reference_of_its_adapter(served):
    results, refs = served.result["results"], served.refs
    assert set(map(int, results)) == set(EXPECTED)
    refs.precompute([prompt_ids(int(rid), WORDS[int(rid)]) + r["ids"][:-1] for rid, r in results.items()])
    wrong, own, others = {}, [], []
    for rid, result in results.items():
        rid, expected = int(rid), EXPECTED[int(rid)]
        assert len(result["ids"]) == MAX_NEW[rid]
        if result["prompt_ids"] is not None:  # returned with prefill logprobs: the server's tokenization
            assert result["prompt_ids"] == prompt_ids(rid, WORDS[rid])
        result = {**result, "prompt_ids": prompt_ids(rid, WORDS[rid])}
        errors = {v: refs.errors(v, result) for v in refs.models}
        own.append(errors[expected])
        others += [max(gap / MARGIN, lp / LOGPROB_TOL) for v, (gap, lp) in errors.items() if v != expected]
        fits = {v for v, e in errors.items() if within_tolerance(e)}
        if fits != {expected}:
            wrong[rid] = (result["adapter_id"], sorted(fits), errors[expected])
    print(f"\n{len(results)} requests; against their own reference: largest argmax gap "
          f"{max(g for g, _ in own):.3f}, largest logprob difference {max(d for _, d in own):.3f}; the closest "
          f"other reference is {min(others):.1f} tolerances off")
    assert not wrong, wrong


def test_an_unknown_adapter_id_is_served_by_the_base_model(served):
    results = served.result["results"]
    (rid,) = [r for r, adapter in SENT.items() if adapter == UNKNOWN]
    result = {**results[str(rid)], "prompt_ids": prompt_ids(rid, WORDS[rid])}
    assert served.refs.fits("base", result)
    assert not any(served.refs.fits(v, result) for v in served.refs.models if v != "base")


def test_requests_join_and_leave_running_batches_that_mix_adapters(served):
    calls = served.result["calls"]
    concatenated = [c["batches"] for c in calls if c["call"] == "Decode" and len(c["batches"]) > 1]
    assert len(concatenated) >= 3  # two joins in the mixed phase, one in the plain phase
    assert sum(c["call"] == "FilterBatch" for c in calls) >= 4
    mixes = [{SENT[i].split(":")[0] if SENT[i] != UNKNOWN else UNKNOWN for b in c["batches"] for i in b}
             for c in calls if c["call"] == "Decode"]
    assert any({"", "a", "b", UNKNOWN} <= m for m in mixes)  # a step mixed base, both collections and the unknown id


def test_start_up_lines_of_jdlora_tgi_reach_tgis_log(served):
    log = served.log
    assert f"JD-LoRA collection a={served.assets.root / 'coll_a'}: 4 adapters, ids a:<adapter name>" in log
    assert f"JD-LoRA collection b={served.assets.root / 'coll_b'}: 3 adapters, ids b:<adapter name>" in log
    assert "JD-LoRA adapters on this rank: 8 adapters" in log
