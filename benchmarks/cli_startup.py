"""Start-up time of the ``quanta`` command: ``quanta --help`` must not import torch (target < 0.3 s).

Run by hand: ``python benchmarks/cli_startup.py [--repeat 15]``. Runs each command as a fresh
process (the installed ``quanta`` entry point, beside the interpreter) and prints the median and
best wall time, plus a bare ``python -c pass`` as the floor and ``import torch`` for scale; writes
the same text to ``benchmarks/results/cli_startup.txt``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def _time(cmd: list[str], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="runs per command (default 15)")
    args = parser.parse_args()
    quanta = str(Path(sys.executable).with_name("quanta"))
    cases = {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "quanta --help": [quanta, "--help"],
        "quanta plan --help": [quanta, "plan", "--help"],
        "python -c 'import torch' (for scale)": [sys.executable, "-c", "import torch"],
    }
    torch_free = subprocess.run([sys.executable, "-c", "import sys\nfrom quanta._cli import main\ntry:\n main(['--help'])\n"
                                 "except SystemExit:\n pass\nprint('torch' in sys.modules)"],
                                capture_output=True, text=True).stdout.strip().splitlines()[-1]
    lines = [f"# quanta CLI start-up, {time.strftime('%Y-%m-%d')}, {platform.platform()}, "
             f"Python {platform.python_version()}, {os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f})",
             f"# {args.repeat} interleaved runs each, wall time of a fresh process; `quanta --help` imports torch: {torch_free}"]
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(args.repeat):  # interleaved, so load changes hit every command alike
        for name, cmd in cases.items():
            if "torch" in name and round_ >= max(3, args.repeat // 5):
                continue
            times[name] += _time(cmd, 1)
    for name, t in times.items():
        lines.append(f"{name:<40} median {statistics.median(t):.3f} s  best {min(t):.3f} s")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    out = HERE / "results" / "cli_startup.txt"
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
