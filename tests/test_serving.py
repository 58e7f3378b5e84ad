"""benchmarks/serving: scheduler, LRU slots, request accounting and each adapter path against a dense reference.

A tiny random Mistral on the CPU (hidden 64, 2 layers; q 64 x 64, k and v 32 x 64): the kernels run
their torch reference, the serving loop is the one the H200 study runs.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # benchmarks/ is not an installed package

from jdlora.kernels import prepare_batch  # noqa: E402

from benchmarks.serving.engine import BasePath, Server  # noqa: E402
from benchmarks.serving.jd import JDPath, adapter_name, synthetic_collection  # noqa: E402
from benchmarks.serving.model import adapted_modules, build_model  # noqa: E402
from benchmarks.serving.multilora import LoraStore, MultiLoraLinear, MultiLoraPath, SlotCache  # noqa: E402
from benchmarks.serving.scheduler import FifoScheduler  # noqa: E402
from benchmarks.serving.settings import PAPER_SETTINGS, JDSetting, matched_slots, memory_ratio  # noqa: E402
from benchmarks.serving.workload import Request, make_requests  # noqa: E402

NEW_TOKENS = 10
SHORT = (12, 3, 6, 18)  # prompt lengths for the tests: mean, std, min, max
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: one thread is fastest


@pytest.fixture(scope="module")
def config():
    from transformers import MistralConfig

    return MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, sliding_window=None, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def model(config):
    return build_model(config, "cpu", torch.float32, seed=0)


@pytest.fixture(scope="module")
def modules(config):
    return adapted_modules(config)


def server_for(model, max_batch=4, **kwargs):
    return Server.for_model(model, max_batch=max_batch, new_tokens=NEW_TOKENS, **kwargs)


def greedy(model, prompt):
    """The model's own ``generate``: greedy, exactly NEW_TOKENS tokens, one unpadded prompt."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


def with_updates(model, updates):
    """A copy of the model with dense updates ``{module name: dW}`` added to its weights."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for name, delta in updates.items():
            merged.get_submodule(name).weight += delta
    return merged


# ----- the paper's memory matching (Appendix E) ---------------------------------------------------


def test_matched_slots_reproduce_the_paper_table_up_to_its_rounding_at_256_512_1024():
    # The formula agrees with the paper's K where ceil(ratio) is the paper's number...
    for n in (4, 8, 16, 32, 64, 128):
        setting, paper_k = PAPER_SETTINGS[n]
        assert matched_slots(n, setting) == paper_k, n
    # ...and at 256, 512, 1024 the ratio is just above an integer that the paper lists instead.
    exact = {256: Fraction(4096 * 2 * 16 * 10 + 256 * 257, 4096 * 32),
             512: Fraction(4096 * 2 * 16 * 25 + 512 * 257, 4096 * 32),
             1024: Fraction(4096 * 2 * 64 * 7 + 1024 * 4097, 4096 * 32)}
    for n, ratio in exact.items():
        setting, paper_k = PAPER_SETTINGS[n]
        assert memory_ratio(n, setting) == pytest.approx(float(ratio), rel=1e-12)
        assert paper_k == math.floor(ratio) and matched_slots(n, setting) == paper_k + 1
    # Appendix E.2 by hand: 32 adapters, rank 64 JD-Full = D*2*64 + 32*64^2 = exactly 5 LoRAs
    assert memory_ratio(32, JDSetting(64)) == 5.0 and matched_slots(32, JDSetting(64)) == 5


# ----- scheduler ----------------------------------------------------------------------------------


def requests_for(adapters):
    return [Request(i, a, [5], 0.0) for i, a in enumerate(adapters)]


def test_scheduler_keeps_at_most_k_adapters_per_batch_and_fifo_order_otherwise():
    rng = random.Random(0)
    queue = requests_for([rng.randrange(10) for _ in range(200)])
    scheduler = FifoScheduler(max_batch=6, max_adapters=3)
    scheduler.add(queue)
    served = []
    while len(scheduler):
        oldest = scheduler.waiting[0]
        waiting_before = list(scheduler.waiting)
        batch = scheduler.next_batch()
        adapters = {r.adapter for r in batch}
        assert batch[0] is oldest  # the oldest request never waits behind younger ones
        assert len(batch) <= 6 and len(adapters) <= 3
        assert [r.id for r in batch] == sorted(r.id for r in batch)
        # a request older than the batch's youngest was left out only because its adapter did not fit
        youngest = batch[-1].id
        for r in waiting_before:
            if r.id < youngest and r not in batch:
                assert r.adapter not in adapters and len(adapters) == 3
        # if the batch is not full, nothing waiting could have joined it
        if len(batch) < 6:
            assert all(r.adapter not in adapters for r in scheduler.waiting) and len(adapters) == 3
        assert [r.id for r in scheduler.waiting] == sorted(r.id for r in scheduler.waiting)
        served += batch
    assert sorted(r.id for r in served) == list(range(200))


def test_scheduler_without_adapter_limit_takes_the_oldest_requests():
    scheduler = FifoScheduler(max_batch=4)
    scheduler.add(requests_for([0, 1, 2, 3, 4, 5]))
    assert [r.id for r in scheduler.next_batch()] == [0, 1, 2, 3]
    assert [r.id for r in scheduler.next_batch()] == [4, 5]


# ----- LRU slots ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(modules):
    return LoraStore(modules, 8, dtype=torch.float32, b_std=0.5, seed=1)


def resident_factors_match(cache, store):
    for adapter, slot in cache.slot_of.items():
        for k in range(len(store.slices)):
            U, V = store.factors(adapter, k)
            if not (torch.equal(cache.U[k][slot], U) and torch.equal(cache.V[k][slot], V)):
                return False
    return True


def test_slots_evict_the_least_recently_used_adapter_that_the_batch_does_not_need(store):
    cache = SlotCache(store, slots=3, device="cpu", staging=2)
    cache.ensure([0, 1, 2])
    assert (cache.loads, cache.evictions) == (3, 0)
    cache.ensure([0])  # recency, least first: 1, 2, 0
    slot_of_1 = cache.slot_of[1]
    cache.ensure([3])  # evicts 1
    assert set(cache.slot_of) == {0, 2, 3} and cache.slot_of[3] == slot_of_1
    assert (cache.loads, cache.evictions) == (4, 1)
    # recency now 2, 0, 3: 2 is the least recently used, but this batch needs it, so 0 goes
    cache.ensure([2, 4])
    assert set(cache.slot_of) == {2, 3, 4}
    assert (cache.loads, cache.evictions) == (5, 2)
    cache.ensure([4, 3, 2])  # all resident: no copy
    assert (cache.loads, cache.evictions) == (5, 2)
    cache.ensure([5, 6, 7])  # more than the staging buffer holds at once
    assert set(cache.slot_of) == {5, 6, 7} and (cache.loads, cache.evictions) == (8, 5)
    assert resident_factors_match(cache, store)
    with pytest.raises(ValueError, match="4 distinct adapters"):
        cache.ensure([0, 1, 2, 3])


def test_multilora_layer_adds_each_rows_own_scaled_lora(model, store):
    torch.manual_seed(0)
    path = MultiLoraPath(model, store, slots=3, device="cpu")
    try:
        path.begin_batch([4, 1, 4, 6])
        layer = model.get_submodule(store.slices[1].name)  # k_proj: 32 outputs
        assert isinstance(layer, MultiLoraLinear)
        x = torch.randn(4, 5, 64)
        path.batch = None
        base = layer(x)
        path.batch = prepare_batch(path.row_slots.repeat_interleave(5))
        got = layer(x)
        path.batch = None
        for row, adapter in enumerate([4, 1, 4, 6]):
            U, V = store.factors(adapter, 1)
            expected = base[row] + store.scaling * (x[row] @ V) @ U.T
            torch.testing.assert_close(got[row], expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, base, atol=1e-3)
    finally:
        path.close()
    assert type(model.get_submodule(store.slices[1].name)) is torch.nn.Linear


# ----- serving: accounting and outputs against dense references -----------------------------------


def test_every_request_is_served_once_after_its_arrival_with_all_its_tokens(model, store, config):
    requests = make_requests(24, 6, rate=300.0, vocab_size=config.vocab_size, lengths=SHORT, seed=3)
    assert requests[-1].arrival > 0.02  # arrivals are spread out, so the loop has to wait for some
    path = MultiLoraPath(model, store, slots=2, device="cpu")
    try:
        stats = server_for(model, max_batch=4, max_wait=0.01).serve(path, requests)
    finally:
        path.close()
    assert all(r.start is not None and r.start >= r.arrival and r.finish > r.start for r in requests)
    assert all(len(r.tokens) == NEW_TOKENS for r in requests)
    assert round(stats["mean_batch"] * stats["batches"]) == len(requests) == stats["requests"]
    assert stats["tokens"] == NEW_TOKENS * len(requests)
    assert stats["max_distinct_adapters"] <= 2
    assert stats["loads"] >= len({r.adapter for r in requests}) and stats["evictions"] == stats["loads"] - 2
    assert stats["wall_s"] == pytest.approx(max(r.finish for r in requests))
    assert stats["requests_per_s"] == pytest.approx(len(requests) / stats["wall_s"])


def test_time_limit_stops_starting_batches(model, config):
    requests = make_requests(12, 1, rate=float("inf"), vocab_size=config.vocab_size, lengths=SHORT, seed=4)
    stats = server_for(model, max_batch=4).serve(BasePath(model), requests, time_limit=0.0)
    assert stats["truncated"] and stats["batches"] == 1 and stats["requests"] == 4
    assert sum(r.finish is not None for r in requests) == 4


def test_base_path_generates_what_model_generate_does(model, config):
    requests = make_requests(5, 1, rate=float("inf"), vocab_size=config.vocab_size, lengths=SHORT, seed=5)
    assert len({len(r.prompt) for r in requests}) > 1  # left padding is exercised
    server_for(model, max_batch=5).serve(BasePath(model), requests)
    for r in requests:
        assert r.tokens == greedy(model, r.prompt)


def test_multilora_path_generates_what_each_merged_adapter_does(model, store, config):
    requests = make_requests(8, 5, rate=float("inf"), vocab_size=config.vocab_size, lengths=SHORT, seed=6)
    path = MultiLoraPath(model, store, slots=2, device="cpu")
    try:
        server_for(model, max_batch=4).serve(path, requests)
    finally:
        path.close()
    differs = 0
    for r in requests:
        updates = {}
        for k, s in enumerate(store.slices):
            U, V = store.factors(r.adapter, k)
            updates[s.name] = store.scaling * U @ V.T  # scaling * B A
        assert r.tokens == greedy(with_updates(model, updates), r.prompt)
        differs += r.tokens != greedy(model, r.prompt)
    assert differs >= len(requests) // 2  # the adapters change the outputs: the comparison means something


def test_synthetic_collection_has_the_shapes_compression_produces(modules):
    collection = synthetic_collection(modules, 7, JDSetting(8, 3), seed=2)
    assert collection.adapter_names == [adapter_name(i) for i in range(7)]
    for name, (d_out, d_in) in modules.items():
        c = collection.modules[name].compression
        assert c.U.shape == (3, d_out, 8) and c.V.shape == (3, d_in, 8) and c.sigma.shape == (7, 8, 8)
        eye = torch.eye(8).expand(3, 8, 8)
        torch.testing.assert_close(c.U.transpose(1, 2) @ c.U, eye, atol=1e-5, rtol=0)
        torch.testing.assert_close(c.V.transpose(1, 2) @ c.V, eye, atol=1e-5, rtol=0)
        assert sorted(torch.bincount(c.cluster, minlength=3).tolist()) == [2, 2, 3]  # balanced
    assert collection.error == 0.0


def test_jd_path_generates_what_dense_u_sigma_vt_does(model, modules, config):
    collection = synthetic_collection(modules, 6, JDSetting(8, 2), seed=3)
    requests = make_requests(8, 6, rate=float("inf"), vocab_size=config.vocab_size, lengths=SHORT, seed=7)
    path = JDPath(model, collection)
    try:
        server_for(model, max_batch=4).serve(path, requests)
    finally:
        restored = path.close()
    assert restored is model and type(model.get_submodule(next(iter(modules)))) is torch.nn.Linear
    differs = 0
    for r in requests:
        name = adapter_name(r.adapter)
        updates = {m: collection.delta_weight(name, m) for m in modules}  # U_c Sigma_a V_c^T
        assert r.tokens == greedy(with_updates(model, updates), r.prompt)
        differs += r.tokens != greedy(model, r.prompt)
    assert differs >= len(requests) // 2


# ----- graph decode: static cache, the step the H200 captures in CUDA graphs ---------------------------


def test_graph_decode_generates_what_the_eager_loop_does_on_every_path(model, modules, store, config):
    """Same requests, same tokens: eager loop vs static cache + the capturable step (run eagerly on the CPU),
    batches padded to a decode size (max_batch 20: sizes 16 and 20), with adapters swapped in place."""
    requests = make_requests(12, 6, rate=float("inf"), vocab_size=config.vocab_size, lengths=SHORT, seed=8)
    collection = synthetic_collection(modules, 6, JDSetting(8, 2), seed=4)
    paths = {"base": lambda: BasePath(model), "multi-lora": lambda: MultiLoraPath(model, store, slots=2, device="cpu"),
             "jd": lambda: JDPath(model, collection)}
    for kind, make in paths.items():
        tokens = {}
        for decode in ("eager", "graph"):
            served = copy.deepcopy(requests)
            path = make()
            try:
                server = server_for(model, max_batch=20, decode=decode, max_len=SHORT[3] + NEW_TOKENS)
                stats = server.serve(path, served)
                if decode == "graph":  # what the warm-up captures on CUDA: every size with a max_batch batch begun
                    path.begin_batch([i % 2 for i in range(20)])
                    server.decoder.capture(path)
            finally:
                path.close()
            tokens[decode] = [r.tokens for r in served]
            if decode == "graph":
                assert server.decoder.sizes == (16, 20) and stats["mean_decode_rows"] in (16, 20)
                assert stats["decode"] == "graph" and stats["batches"] >= (3 if kind == "multi-lora" else 1)
        assert tokens["graph"] == tokens["eager"], kind
        assert all(len(t) == NEW_TOKENS for t in tokens["graph"])


# ----- the whole study, tiny ----------------------------------------------------------------------


def test_the_study_runs_end_to_end_on_the_cpu(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.serving.run", "--out", str(tmp_path), "--device", "cpu", "--tiny",
           "--sizes", "4,128", "--grid-sizes", "16", "--requests", "6", "--max-batch", "3,2", "--threads", "1",
           "--eager-sizes", "4"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, capture_output=True)
    results = json.loads((tmp_path / "results.json").read_text())
    done = {(r["path"], r["adapters"], r["setting"]) for r in results["runs"] if "stats" in r}
    assert ("base", 0, None) in done and ("jd", 128, "7c r16") in done and ("multi-lora", 4, "r16") in done
    assert ("multi-lora-all", 128, None) in done and ("jd", 16, "7c r64") in done
    assert all(r["stats"]["requests"] == 6 for r in results["runs"] if "stats" in r)
    checks = [r["graph_agreement"] for r in results["runs"] if r.get("graph_agreement") is not None]
    assert len(checks) >= 5 and all(a == 1.0 for a in checks)  # float32 on the CPU: graph decode = eager loop
    k = {r["adapters"]: r["slots"] for r in results["runs"] if r["path"] == "multi-lora" and r["adapters"] != 16}
    assert k[4] == 2 and k[128] == 8
    table = (tmp_path / "results.md").read_text()
    assert "| 3 | graph | uncapped | 128 | JD-LoRA | 7c r16 | (8) |" in table
    assert "| 3 | eager | uncapped | 4 | JD-LoRA | r16 | (2) |" in table
    assert "| eager | uncapped | 128 |" not in table  # eager only at --eager-sizes
    assert "| 2 | graph | uncapped | 128 | JD-LoRA | 7c r16 | (8) |" in table  # each group at each --max-batch
    assert (tmp_path / "figure1.png").stat().st_size > 10_000 and (tmp_path / "figure4.png").stat().st_size > 10_000


def test_merge_fills_skipped_runs_and_compares_each_run_with_its_own_calls_base():
    from benchmarks.serving.report import base_throughput, markdown, merge

    def run(path, adapters, setting, rps=None, memory="capped"):
        r = {"memory": memory, "path": path, "adapters": adapters, "setting": setting}
        if rps is None:
            return {**r, "skipped": "time budget"}
        stats = dict(requests_per_s=rps, tokens_per_s=10 * rps, batches=1, mean_batch=1.0, mean_distinct_adapters=1.0,
                     loads=0, evictions=0, swap_s=0.0, prefill_s=0.0, decode_s=0.0, schedule_s=0.0, wall_s=1.0)
        return {**r, "stats": stats}

    setup = {"memories": ["capped"], "command": "a"}
    first = {"setup": setup, "runs": [run("base", 0, None, 100.0), run("jd", 1024, "7c r64")]}
    second = {"setup": {**setup, "command": "b"}, "runs": [run("base", 0, None, 120.0), run("jd", 1024, "7c r64", 90.0)]}
    merged = merge([first, second])
    assert len(merged["runs"]) == 2
    assert base_throughput(merged["runs"], "capped") == 100.0  # the first part's base is kept
    jd = next(r for r in merged["runs"] if r["path"] == "jd")
    assert jd["stats"]["requests_per_s"] == 90.0  # the skipped run was filled
    assert jd["base_requests_per_s"] == 120.0  # ... and is compared with the base model of its own call
    assert "| 0.75 |" in markdown(merged) and "| 0.90 |" not in markdown(merged)


def test_report_sets_the_base_decode_step_against_its_weight_read_floor_and_splits_step_kernels():
    from benchmarks.serving.report import markdown

    stats = dict(requests_per_s=100.0, tokens_per_s=1000.0, batches=2, mean_batch=200.0, mean_distinct_adapters=1.0,
                 loads=0, evictions=0, swap_s=0.0, prefill_s=1.0, decode_s=0.1, schedule_s=0.0, wall_s=2.0,
                 decode="graph", mean_decode_rows=256.0, decode_step_ms=6.0, prefill_device_s=1.5, decode_device_s=0.2)
    kernels = {"gemm": 4.0, "lora": 0.0, "attention": 0.5, "other": 0.5, "total": 5.0, "kernels": 400, "rows": 256}
    setup = {"memories": ["uncapped"], "decode": ["graph"], "max_batch": [256], "weight_bytes_per_step": 14_000_000_000,
             "kv_bytes_per_row_step": 20_000_000, "static_cache_len": 176,
             "device_measured": {"copy_gb_per_s": 4000.0, "copy_note": "copy", "matmul_tflop_per_s": 700.0,
                                 "matmul_note": "mm"}}
    runs = [{"max_batch": 256, "memory": "uncapped", "decode": "graph", "path": "base", "adapters": 0, "setting": None, "stats": stats,
             "step_kernels_ms": kernels},
            {"max_batch": 256, "memory": "uncapped", "decode": "graph", "path": "jd", "adapters": 1024, "setting": "7c r64",
             "matched_slots": 61, "stats": {**stats, "requests_per_s": 90.0, "decode_step_ms": 7.5}}]
    table = markdown({"setup": setup, "runs": runs})
    # 14 GB at 4,000 GB/s: 3.50 ms; the base's 6.00 ms step is 1.71x that; compute floor 14e9/2 x 2 x 256 / 700e12
    assert "| 256 | uncapped | graph | 256 | 6.00 | 3.50 | 1.71 | 5.12 | 1.28 |" in table  # KV: 256 x 20 MB / 4 TB/s
    assert "| 256 | graph | uncapped | 1024 | JD-LoRA | 7c r64 | (61) | 90.0 | 1000 | 0.90 | - | 256.0 | 7.50 | 0.80 |" in table
    assert "| 256 | uncapped | - | base model | 256 | 4.00 | 0.00 | 0.50 | 0.50 | 5.00 | 400 | 6.00 |" in table


def test_generate_benchmark_times_base_and_jd_side_by_side_in_abba_rounds():
    from benchmarks.serving.compiled import timed_calls

    order = []
    calls = {"base": lambda: order.append("base"), "jd": lambda: order.append("jd")}
    counter = {"base": 0, "jd": 0}

    def counts(label):
        counter[label] += 1  # one more "launch" each time a subject's counters are read
        return {"direct": counter[label]}

    out = timed_calls(calls, torch.device("cpu"), warmup=1, reps=4, counts=counts)
    assert order == ["base", "jd"] + ["base", "jd", "jd", "base", "base", "jd", "jd", "base"]
    assert [len(out[k]["walls_s"]) for k in calls] == [4, 4]
    assert out["base"]["launches"] == {"direct": 4}  # the counters' increase over the timed calls alone


def test_prefill_tool_times_each_path_on_the_studys_model(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.serving.prefill", "--out", str(tmp_path), "--device", "cpu", "--tiny",
           "--shapes", "3x10", "--reps", "1"]
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, check=True, env=env, capture_output=True)
    results = json.loads((tmp_path / "prefill.json").read_text())
    assert [(r["path"], r["tokens"]) for r in results["runs"]] == [("base", 30), ("jd", 30), ("multi-lora", 30)]
    assert results["setting"] == "7c r64" and results["slots"] == 61
    assert all(r["median_s"] > 0 for r in results["runs"])
    assert 1 <= results["runs"][2]["distinct"] <= 3


def test_device_idle_time_splits_into_gaps_the_host_was_late_for_and_the_rest():
    """:func:`idle_summary` on a hand-made timeline (ns): two streams overlapping, a gap the host caused (the next
    kernel launched after the device went idle) and one it did not (launched early, queued behind a wait)."""
    from benchmarks.serving.graph import idle_summary

    us = 1000
    activities = [
        (10 * us, 20 * us, "gemm", 1 * us),
        (15 * us, 30 * us, "side", 2 * us),  # another stream: busy until 30
        (40 * us, 50 * us, "jd_shrink", 35 * us),  # 10 us idle; launched at 35 > 30: the host was late
        (52 * us, 60 * us, "tiny", 41 * us),  # 2 us: under min_gap_us
        (80 * us, 90 * us, "jd_shrink", 45 * us),  # 20 us idle, launched long before: not the host
        (95 * us, 99 * us, "copy", None),  # no launch found: not counted as host-bound
    ]
    idle = idle_summary(activities, host_start=0, min_gap_us=5)
    assert idle["before_first_us"] == 10 and idle["busy_span_us"] == 89
    assert idle["idle_us"] == 35 and idle["host_bound_us"] == 10
    assert idle["by_next"][0] == {"name": "jd_shrink", "us": 30, "gaps": 2, "host_bound_us": 10}
    assert idle["by_next"][1] == {"name": "copy", "us": 5, "gaps": 1, "host_bound_us": 0}
