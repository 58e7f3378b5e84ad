"""The Hub code runs on both supported huggingface_hub lines: 1.31+ (e.g. the GPU machine's 1.33) and 2.x.

The suite runs on the installed (2.x) client; this test re-runs the Hub tests in a virtual environment that
shares every other installed package but pins huggingface_hub 1.33.0 (installed from PyPI).
"""

import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest

OLD_LINE = "1.33.0"
HUB_TESTS = ["tests/test_hub_server.py", "tests/test_hub_format.py"]


@pytest.mark.skipif(huggingface_hub.__version__.startswith("1."), reason="already running on huggingface_hub 1.x")
@pytest.mark.skipif(os.environ.get("JDLORA_HUB_COMPAT_RUN") == "1", reason="inside the compatibility run")
def test_hub_tests_pass_on_huggingface_hub_1x(tmp_path):
    venv = tmp_path / "hub1x"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", f"huggingface_hub=={OLD_LINE}"],
                             capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(f"cannot install huggingface_hub {OLD_LINE} (no package index?): {install.stderr[-300:]}")
    version = subprocess.run([str(python), "-c", "import huggingface_hub; print(huggingface_hub.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == OLD_LINE
    root = Path(__file__).parents[1]
    run = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *HUB_TESTS],
        cwd=root, capture_output=True, text=True, env={**os.environ, "JDLORA_HUB_COMPAT_RUN": "1"},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]
