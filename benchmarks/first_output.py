"""How long a command takes to say something: the first line of output, and the whole command.

    python benchmarks/first_output.py                       # this checkout
    python benchmarks/first_output.py --checkout /tmp/old   # another checkout (same .venv)
    python benchmarks/first_output.py --full                # also the default run to its end

Each command runs from a fresh temporary folder (its run directories land there), three times by
default; the table gives the median seconds to the first byte on stdout or stderr and to exit.
The default run is stopped after its first line unless --full is given.
"""
from __future__ import annotations

import argparse
import os
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "refused key (trainer.max_stpes=3)": ["trainer.max_stpes=3"],
    "refused value (optim.lr=-1)": ["optim.lr=-1"],
    "dry run deepseek_67b, 16 x 8": ["+recipe=deepseek_67b", "dry_run=true", "trainer.num_nodes=16",
                                     "trainer.devices=8"],
    "default run (first line only)": [],
}


def timed(argv: list[str], cwd: str, stop_after_first: bool) -> tuple[float, float, int]:
    """(seconds to the first output byte, seconds to exit, exit code)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    selector.register(proc.stderr, selectors.EVENT_READ)
    first = None
    open_streams = 2
    while open_streams:
        for key, _ in selector.select():
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                selector.unregister(key.fileobj)
                open_streams -= 1
                continue
            if first is None:
                first = time.perf_counter() - start
                if stop_after_first:
                    proc.kill()
    code = proc.wait()
    return first if first is not None else float("nan"), time.perf_counter() - start, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=ROOT, help="the checkout whose train.py runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full", action="store_true", help="also time the default run to its end (minutes)")
    args = parser.parse_args()
    commands = dict(COMMANDS)
    if args.full:
        commands["default run (to the end)"] = ["logger=none"]
    print(f"checkout {args.checkout}, {os.cpu_count()} CPU(s), load {os.getloadavg()[0]:.1f}")
    print(f"| command | first output (s) | exit (s) | exit code |\n|---|---:|---:|---:|")
    for name, overrides in commands.items():
        runs = []
        stop = name.endswith("(first line only)")
        for _ in range(1 if name.endswith("(to the end)") else args.repeats):
            with tempfile.TemporaryDirectory() as cwd:
                runs.append(timed([sys.executable, str(args.checkout / "train.py"), *overrides], cwd, stop))
        first = statistics.median(r[0] for r in runs)
        total = "-" if stop else f"{statistics.median(r[1] for r in runs):.1f}"
        print(f"| {name} | {first:.1f} | {total} | {runs[0][2] if not stop else '-'} |", flush=True)


if __name__ == "__main__":
    main()
