"""The Hub code runs on both supported huggingface_hub lines: 1.31+ (e.g. the GPU machine's 1.33) and 2.x.

The suite runs on the installed (2.x) client; this test re-runs the Hub tests in a virtual environment that
shares every other package of the running interpreter (its venv, not the system's) but pins huggingface_hub
1.33.0 (installed from PyPI).
"""

import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import huggingface_hub
import pytest

OLD_LINE = "1.33.0"
HUB_TESTS = ["tests/test_hub_server.py", "tests/test_hub_format.py"]


@pytest.mark.skipif(huggingface_hub.__version__.startswith("1."), reason="already running on huggingface_hub 1.x")
@pytest.mark.skipif(os.environ.get("JDLORA_HUB_COMPAT_RUN") == "1", reason="inside the compatibility run")
def test_hub_tests_pass_on_huggingface_hub_1x(tmp_path):
    venv = tmp_path / "hub1x"
    python = make_venv_on_top_of_this_one(venv)
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", f"huggingface_hub=={OLD_LINE}"],
                             capture_output=True, text=True)
    if install.returncode != 0:
        pytest.skip(f"cannot install huggingface_hub {OLD_LINE} (no package index?): {install.stderr[-300:]}")
    version = subprocess.run([str(python), "-c", "import huggingface_hub; print(huggingface_hub.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == OLD_LINE
    root = Path(__file__).parents[1]
    run = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *HUB_TESTS],
        cwd=root, capture_output=True, text=True, env={**os.environ, "JDLORA_HUB_COMPAT_RUN": "1"},
    )
    print(run.stdout[-1500:])  # the inner run's summary, with the reason of any skip (-rs)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]


def make_venv_on_top_of_this_one(venv: Path) -> Path:
    """A venv whose own site-packages come first, then the running interpreter's (whatever venv it runs in).

    ``python -m venv --system-site-packages`` would expose the packages of the *base* interpreter, which inside
    a venv is the system's, not the venv's (no torch there). A ``.pth`` line that calls ``site.addsitedir`` on
    each of our site folders appends them, ``.pth`` files (editable installs) included, after the new venv's.
    Installing into the new venv never touches ours: pip leaves packages outside its environment alone.
    """
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    ours = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    new_site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in dict.fromkeys(ours) if os.path.isdir(p))
    Path(new_site, "zz_running_interpreter.pth").write_text(lines)
    return python
