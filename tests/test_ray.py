"""Distributed compression on a local Ray cluster (jdlora.distributed, docs/scale.md).

One local cluster (2 CPUs) serves the whole file; shapes are tiny so the file stays well under
three minutes on a busy 2-core machine. Skips with a message when Ray is not installed
(``pip install -e ".[ray]"``; the ``dev`` extra includes it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import jdlora
from jdlora.distributed import RayEngine
from jdlora.distributed.staging import MODULES_DIR, staging_root
from jdlora.errors import NonFiniteWeightsError, TargetExistsError
from jdlora.synthetic import save_adapters, synthetic_adapters

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install -e '.[ray]' to run the distributed tests")

pytestmark = pytest.mark.usefixtures("one_thread")

MODULES = {f"model.layers.{i}.self_attn.{p}": (24, 20) for i in range(3) for p in ("q_proj", "v_proj")}
_TENSORS = ("U", "V", "sigma", "cluster", "sq_norms", "residuals")


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster for the file; yields its address (for drivers in other processes)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Workers unpickle the wrapped adapters below by value: they need not import this test module.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


class Instrumented:
    """A synthetic adapter whose reads can be logged, slowed, or kill the worker process reading them."""

    def __init__(self, inner, *, log=None, delay=0.0, kill_module=None, kill_marker=None):
        self.inner = inner
        self.name, self.base_model, self.modules, self.origin = inner.name, inner.base_model, inner.modules, inner.origin
        self.rank, self.alpha, self.use_rslora = inner.rank, inner.alpha, inner.use_rslora
        self.log, self.delay, self.kill_module, self.kill_marker = log, delay, kill_module, kill_marker

    def scaling(self, module):
        return self.inner.scaling(module)

    def read_module(self, module, dtype=torch.float32):
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()} {module}\n")
        if module == self.kill_module:
            try:  # only the first time: the marker file exists afterwards
                os.close(os.open(self.kill_marker, os.O_CREAT | os.O_EXCL))
                os.kill(os.getpid(), signal.SIGKILL)
            except FileExistsError:
                pass
        time.sleep(self.delay)
        return self.inner.read_module(module, dtype)


def _assert_same(a, b, exact=True, history=True, **tol):
    assert list(a.modules) == list(b.modules)
    for module in a.modules:
        ca, cb = a.modules[module].compression, b.modules[module].compression
        assert torch.equal(a.modules[module].adapter_ids, b.modules[module].adapter_ids)
        for name in _TENSORS:
            if exact:
                assert torch.equal(getattr(ca, name), getattr(cb, name)), (module, name)
            else:
                torch.testing.assert_close(getattr(ca, name), getattr(cb, name), **tol, msg=f"{module} {name}")
        if exact and history:  # (the saved format does not keep the history)
            assert ca.history == cb.history, module


def test_import_jdlora_does_not_import_ray():
    code = "import sys, jdlora, jdlora.distributed; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ray_engine_equals_single_process(cluster):
    adapters = synthetic_adapters(24, MODULES, rank=4, seed=3)
    settings = dict(rank=6, clusters=2, progress=False)
    local = jdlora.compress(adapters, **settings)
    stats = []
    distributed = jdlora.compress(adapters, engine=RayEngine(on_module=stats.append), **settings)
    _assert_same(local, distributed, exact=False, rtol=1e-4, atol=1e-5)
    assert distributed.settings == local.settings
    assert distributed.adapter_names == local.adapter_names
    assert sorted(s["module"] for s in stats) == sorted(MODULES)
    assert all(s["shards"] == 1 and s["adapters"] == 24 and all(p > 0 for p in s["workers"].values()) for s in stats)


def test_module_sharded_across_workers_equals_unsharded_even_when_a_shard_dies(cluster, tmp_path):
    modules = {"model.layers.0.mlp.down_proj": (48, 40)}
    adapters = synthetic_adapters(40, modules, rank=4, seed=1)
    settings = dict(rank=6, clusters=3, dtype=torch.float64, progress=False)
    local = jdlora.compress(adapters, **settings)
    # The second shard's actor process dies reading its first adapter; Ray re-runs the module's coordinator.
    marker = tmp_path / "shard-killed-once"
    adapters[20] = Instrumented(adapters[20], kill_module=next(iter(modules)), kill_marker=str(marker))
    # 40 adapters x 4 x (48 + 40) float64 values = 112,640 bytes: two shards of at most 60,000.
    stats = []
    sharded = jdlora.compress(adapters, engine=RayEngine(worker_memory=60_000, on_module=stats.append), **settings)
    assert marker.exists()
    assert [s["shards"] for s in stats] == [2]
    assert len(stats[0]["workers"]) == 2  # two actor processes held the shards
    _assert_same(local, sharded, exact=False, rtol=1e-9, atol=1e-12)
    c = sharded.modules["model.layers.0.mlp.down_proj"].compression
    assert c.num_clusters == 3 and c.history == pytest.approx(local.modules[next(iter(modules))].compression.history)


def test_worker_killed_mid_module_is_retried_by_ray(cluster, tmp_path):
    base = synthetic_adapters(12, MODULES, rank=4, seed=5)
    victim = "model.layers.1.self_attn.q_proj"
    marker = tmp_path / "killed-once"
    adapters = [Instrumented(a, kill_module=victim, kill_marker=str(marker)) if i == 6 else a
                for i, a in enumerate(base)]
    settings = dict(rank=4, clusters=1, progress=False)
    result = jdlora.compress(adapters, engine=RayEngine(max_retries=2), **settings)
    assert marker.exists()  # a worker really died reading that module
    _assert_same(jdlora.compress(base, **settings), result, exact=False, rtol=1e-4, atol=1e-5)


_DRIVER = textwrap.dedent("""
    import sys, ray, torch, jdlora
    sys.path.insert(0, {tests!r})
    import test_ray
    ray.init(address={address!r}, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(test_ray)
    adapters = test_ray.resume_adapters({log!r})
    jdlora.compress(adapters, rank=4, clusters=2, progress=False,
                    engine=jdlora.distributed.RayEngine(out={out!r}, num_cpus=1))
""")


def resume_adapters(log):
    """The collection of the resume test: adapter 0 logs each module read and takes a second for it."""
    base = synthetic_adapters(8, MODULES, rank=4, seed=7)
    return [Instrumented(base[0], log=log, delay=1.0), *base[1:]]


def test_killed_driver_resumes_without_recomputing_finished_modules(cluster, tmp_path):
    out = tmp_path / "collection"
    staged = staging_root(out) / MODULES_DIR
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    script = _DRIVER.format(tests=str(Path(__file__).parent), address=cluster, log=str(first_log), out=str(out))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(jdlora.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    driver = subprocess.Popen([sys.executable, "-c", script], env=env)
    try:
        deadline = time.monotonic() + 120
        while len(list(staged.glob("*.safetensors"))) < 2:
            assert driver.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "no module finished in time"
            time.sleep(0.05)
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    finally:
        if driver.poll() is None:
            driver.kill()
    finished = {p.name: p.stat().st_mtime_ns for p in staged.glob("*.safetensors")}
    assert 2 <= len(finished) < len(MODULES), "the driver was not killed mid-run"
    assert not (out / "collection.json").exists()

    adapters = resume_adapters(str(second_log))
    stats = []
    resumed = jdlora.compress(adapters, rank=4, clusters=2, progress=False,
                              engine=RayEngine(out=str(out), on_module=stats.append))
    recomputed = {line.split()[1] for line in second_log.read_text().splitlines()}
    finished_modules = {name.removesuffix(".safetensors") for name in finished}
    assert not recomputed & finished_modules  # not one read of a finished module's factors
    assert sorted(s["module"] for s in stats) == sorted(set(MODULES) - finished_modules)
    assert not staging_root(out).exists()  # removed after the normal save
    uninterrupted = jdlora.compress(resume_adapters(None), rank=4, clusters=2, progress=False, engine="ray")
    _assert_same(uninterrupted, resumed)
    _assert_same(uninterrupted, jdlora.JDLoraCollection.from_pretrained(out), history=False)


def _poison(weights: Path, key: str) -> None:
    """Overwrites the first value of tensor ``key`` with NaN bytes, leaving the header valid."""
    raw = weights.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    start = 8 + header_len + json.loads(raw[8:8 + header_len])[key]["data_offsets"][0]
    weights.write_bytes(raw[:start] + b"\xff\xff\xff\xff" + raw[start + 4:])


def test_corrupt_adapter_among_1000_is_named_and_nothing_half_written_is_finished(cluster, tmp_path):
    modules = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.self_attn.v_proj": (8, 8)}
    paths = save_adapters(synthetic_adapters(1000, modules, rank=2, seed=2), tmp_path / "adapters")
    bad = paths[500]
    _poison(bad / "adapter_model.safetensors", "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight")
    out = tmp_path / "collection"
    with pytest.raises(NonFiniteWeightsError, match="synthetic-00500"):
        jdlora.compress(paths, rank=4, clusters=1, progress=False, engine=RayEngine(out=str(out)))
    staged = staging_root(out) / MODULES_DIR
    assert not (out / "collection.json").exists()
    assert not (staged / "model.layers.0.self_attn.v_proj.safetensors").exists()
    assert not [p for p in staged.iterdir() if p.name.startswith(".")]  # no temporary file left behind


@pytest.mark.filterwarnings("ignore:.*added adapter.*above the collection's target")  # rank 4 for 8 adapters
def test_cli_compress_and_add_on_ray(cluster, tmp_path):
    from jdlora.cli import main

    paths = save_adapters(synthetic_adapters(10, MODULES, rank=4, seed=4), tmp_path / "adapters")
    out = tmp_path / "collection"
    assert main(["compress", *map(str, paths[:8]), "--rank", "4", "--clusters", "1", "--out", str(out), "--ray"]) == 0
    collection = jdlora.JDLoraCollection.from_pretrained(out)
    assert len(collection) == 8 and not staging_root(out).exists()
    assert main(["add", str(out), *map(str, paths[8:]), "--ray"]) == 0
    added = jdlora.JDLoraCollection.from_pretrained(out)
    assert len(added) == 10
    collection.add_adapters([str(p) for p in paths[8:]])  # the same addition in this process
    _assert_same(collection, added, exact=False, rtol=1e-5, atol=1e-6)


def test_output_folder_holding_other_files_is_refused_before_any_work(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not a collection")
    with pytest.raises(TargetExistsError, match="notes.txt"):
        jdlora.compress(synthetic_adapters(3, MODULES, rank=2), rank=2, clusters=1, progress=False,
                        engine=RayEngine(out=str(out)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging area either
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
