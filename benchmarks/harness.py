"""What every benchmark script shares: the results-file header, fresh worker processes, medians.

Every figure is a ratio of tools measured in the same run (workers alternate tool by tool,
repetition by repetition), on a machine that may be shared: the header records the date, the
machine, the torch thread count and the load average before and after, so a reader can judge
the noise. Worker processes print one JSON line; ``first_s`` is the first call in that fresh
process (what a user's script pays), ``warm_s`` the median of the calls after it.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """One line: date, OS, Python, torch, CPUs and the 1-minute load average now."""
    import torch

    return (f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.platform()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
            f"load {os.getloadavg()[0]:.1f}")


def header(command: str, threads: int, note: str = "") -> list[str]:
    """The first lines of a results file."""
    lines = [f"# {command}", f"# {machine()}; torch threads {threads} per process"]
    if note:
        lines.append(f"# {note}")
    return lines


def footer() -> str:
    return f"# load average at the end: {os.getloadavg()[0]:.1f}"


_ROOT = Path(__file__).resolve().parent.parent
_PRIMED = []


def prime() -> None:
    """Compile quanta's modules to bytecode once, as an installed package has them: a machine
    with ``PYTHONDONTWRITEBYTECODE`` set would otherwise charge every fresh process's first call
    for compiling the modules it imports lazily."""
    if _PRIMED:
        return
    folders = [str(_ROOT / d) for d in ("core", "plugins", "registry", "lib", "compat", "examples") if (_ROOT / d).is_dir()]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *folders], check=False, capture_output=True,
                   env=_worker_env())
    _PRIMED.append(True)


def _worker_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONWARNINGS"] = "ignore"
    return env


def worker(script: str | Path, args: list[str], timeout: float = 1800) -> dict:
    """Run ``script --worker ...`` in a fresh Python process (bytecode cached, see :func:`prime`);
    its last stdout line is JSON."""
    prime()
    env = _worker_env()
    proc = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {script} {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_mib() -> float:
    """Resident memory of this process now (MiB)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB): ``VmHWM`` from ``/proc/self/status``.

    Not ``ru_maxrss``: a child started by fork + exec inherits its parent's peak there, so a worker
    spawned by a large parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # no /proc (macOS, where it is bytes)
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> None:
    """Start this process's peak resident memory again from the memory now (Linux >= 4.0:
    ``clear_refs`` 5), so a peak measured next is the call's, not an earlier spike's (imports,
    building the model). Elsewhere nothing."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def time_calls(fn, calls: int, setup=None) -> dict:
    """Time ``fn(setup())`` ``calls`` times in this process: the first call, the median of the rest,
    and the first call's peak resident memory above the memory before it (``setup`` runs untimed).
    Wall-clock seconds and this process's CPU seconds (user + system, page faults included): on a
    shared machine the CPU seconds are the steadier figure, since waiting for a core is not in them."""
    import gc

    gc.collect()
    reset_peak_rss()
    before = rss_mib()
    times, cpu, peak = [], [], None
    for _ in range(calls):
        arg = setup() if setup is not None else None
        t, c = time.perf_counter(), time.process_time()
        out = fn(arg)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        if peak is None:
            peak = peak_rss_mib() - before
        del out, arg
        gc.collect()
    warm, warm_cpu = times[1:] or times, cpu[1:] or cpu
    return {"first_s": times[0], "warm_s": statistics.median(warm), "first_cpu_s": cpu[0],
            "warm_cpu_s": statistics.median(warm_cpu), "peak_mib": peak, "load": os.getloadavg()[0]}


def median(xs) -> float:
    return statistics.median(xs)


def write(name: str, lines: list[str]) -> Path:
    """Write ``results/<name>`` and echo it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    print(text, end="")
    return path
