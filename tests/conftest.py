# ======================================================================================================
# Fake Hugging Face Hub fixtures (tests/hub_server.py). Keep this block self-contained.
#
# huggingface_hub reads HF_ENDPOINT / HF_HOME / HF_HUB_CACHE / HF_HUB_DISABLE_XET when it is imported,
# so they are set here, at conftest import time, before any test module imports it. The server itself
# only starts when a test requests `hub_server` or `hub`.
#   hub_server (session): the running HubServer (url, token, username, requests, ...).
#   hub        (function): same server, reset to no repos / empty logs, and a fresh per-test download
#                          cache (constants.HF_HUB_CACHE -> tmp_path/"hf_cache", also `hub.cache_dir`).
# ======================================================================================================
import atexit
import os
import shutil
import socket
import sys
import tempfile

import pytest

HUB_TOKEN = "hf_jdlora_fake_token"
HUB_USER = "jdlora-test"


def _reserve_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HUB_PORT = _reserve_port()
_HF_HOME = tempfile.mkdtemp(prefix="jdlora-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ.update(
    HF_ENDPOINT=f"http://127.0.0.1:{_HUB_PORT}",
    HF_TOKEN=HUB_TOKEN,
    HF_HOME=_HF_HOME,
    HF_HUB_CACHE=os.path.join(_HF_HOME, "hub"),
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_XET="1",  # no Xet/LFS offline: the fake Hub makes every file a regular inline upload
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    HF_HUB_DISABLE_IMPLICIT_TOKEN="0",
)
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER"):
    os.environ.pop(_var, None)
if "huggingface_hub" in sys.modules:  # imported too early (plugin?): its constants would point elsewhere
    import huggingface_hub.constants as _hfc

    if _hfc.ENDPOINT != os.environ["HF_ENDPOINT"]:
        raise RuntimeError("huggingface_hub was imported before tests/conftest.py could set HF_ENDPOINT")


@pytest.fixture(scope="session")
def hub_server():
    import huggingface_hub.constants as hfc
    from hub_server import HubServer  # tests/ is on sys.path (rootdir conftest, no __init__.py)

    assert hfc.ENDPOINT == f"http://127.0.0.1:{_HUB_PORT}", "huggingface_hub imported before conftest set env"
    server = HubServer(port=_HUB_PORT, token=HUB_TOKEN, username=HUB_USER).start()
    yield server
    server.stop()


@pytest.fixture
def hub(hub_server, tmp_path, monkeypatch):
    import huggingface_hub.constants as hfc

    hub_server.reset()
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # for subprocesses (CLI tests)
    hub_server.cache_dir = str(cache)
    _redirect_hardcoded_hub_urls(monkeypatch, hub_server.url)
    yield hub_server
    hub_server.reset()


def _redirect_hardcoded_hub_urls(monkeypatch, url):
    """huggingface_hub 1.x's ModelCard.validate() posts to a hard-coded https://huggingface.co URL."""
    import huggingface_hub.repocard as repocard

    real_get_session = repocard.get_session

    class _Session:
        def __getattr__(self, name):
            return getattr(real_get_session(), name)

        def post(self, target, *args, **kwargs):
            return real_get_session().post(str(target).replace("https://huggingface.co", url, 1), *args, **kwargs)

    monkeypatch.setattr(repocard, "get_session", _Session)


# ====================================================================================== end of hub block


# ======================================================================================================
# Real third-party LoRA adapters (../shared/data beside the repository; see its README).
# ======================================================================================================
from pathlib import Path  # noqa: E402

REAL_ADAPTERS = (Path(__file__).parents[1] / ".." / "shared" / "data").resolve() / "gemma3-270m-it-adapters"


@pytest.fixture(scope="session")
def real_adapters() -> list[Path]:
    """The five gemma-3-270m-it LoRA folders (mixed ranks 4/8, targets q,k,v,o or q,v)."""
    if not REAL_ADAPTERS.is_dir():
        pytest.skip(f"real adapters not found at {REAL_ADAPTERS} (the shared/ test data sits beside the repo)")
    return sorted(p for p in REAL_ADAPTERS.iterdir() if p.is_dir())


# ======================================================================================================
# Kernels (tests/test_kernels.py). Keep this block self-contained.
#
# Triton reads TRITON_INTERPRET when it is imported, so it is set here, before any test imports it:
# without CUDA, the Triton kernels run on CPU tensors through Triton's interpreter.
# ======================================================================================================
import torch as _torch_for_kernels  # noqa: E402

if not _torch_for_kernels.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# ===================================================================================== end of kernels block


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest, and several spin for seconds on a busy machine.

    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
