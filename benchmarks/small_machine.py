"""Wall time of `jdlora demo` and of every example on a small machine that is busy with other work.

    python -m benchmarks.small_machine [--burners 2] [--repeats 1] [--out benchmarks/small_machine.json]

Starts ``--burners`` CPU-burning processes (a pure-Python loop each, as other jobs on a shared machine
would be), then runs each command with the library's default settings (torch's default threads: no
pinning, the library chooses), and prints the table for benchmarks/RESULTS.md. Examples that publish to
the Hub run against the local Hub-protocol server of the tests (tests/hub_server.py).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _burn() -> None:
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def _commands(tmp: Path, hub_url: str) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "jdlora demo": [py, "-m", "jdlora.cli", "demo", "--plot", str(tmp / "demo.png")],
        "examples/publish_and_load.py": [py, str(ROOT / "examples/publish_and_load.py"), "jdlora-test/bench",
                                         "--workdir", str(tmp / "publish")],
        "examples/mixed_batch_generate.py": [py, str(ROOT / "examples/mixed_batch_generate.py")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burners", type=int, default=2, help="CPU-burning background processes (default 2)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None, help="also write the numbers as JSON here")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from hub_server import HubServer  # the tests' local Hub-protocol server

    burners = [mp.Process(target=_burn, daemon=True) for _ in range(args.burners)]
    for b in burners:
        b.start()
    results = {}
    try:
        hub = HubServer(token="hf_bench", username="jdlora-test").start()
        with tempfile.TemporaryDirectory() as tmp:
            env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN="hf_bench", HF_HOME=str(Path(tmp) / "hf"),
                       HF_HUB_DISABLE_XET="1", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
            for name, cmd in _commands(Path(tmp), hub.url).items():
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
                    times.append(time.perf_counter() - start)
                    if proc.returncode:
                        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                        raise SystemExit(f"{name} failed ({proc.returncode})")
                results[name] = times
                print(f"{name}: " + ", ".join(f"{t:.1f} s" for t in times), flush=True)
        hub.stop()
    finally:
        for b in burners:
            b.terminate()
    print(f"\n{os.cpu_count()} CPUs, {args.burners} CPU-burning processes in the background, "
          f"{platform.python_implementation()} {platform.python_version()}\n")
    print("| command | wall time (s) |\n|---|---:|")
    for name, times in results.items():
        print(f"| `{name}` | {' / '.join(f'{t:.1f}' for t in times)} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"burners": args.burners, "cpus": os.cpu_count(), "seconds": results},
                                             indent=1))


if __name__ == "__main__":
    main()
