"""CLI start-up cost: import time and wall time of everyday commands (issue 12, defect 7).

    python -m bench.cli_startup [--runs N]

Creates a throw-away vault in a temporary directory, then runs ``--version``, ``status``,
``node list`` and ``audit verify`` with ``python -X importtime`` and prints, per command,
the total import time (sum of the top-level imports' cumulative times), the wall time, the
CPU time (user + system: steadier than wall time on a loaded machine), and which heavy
packages were imported (none should be: they belong to ``serve``). A benchmark
to read, not a timed test: ``tests/test_cli_imports.py`` asserts which modules load.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = ("fastapi", "starlette", "uvicorn", "numpy", "pydicom", "pynetdicom", "PIL",
         "argon2", "jinja2")
COMMANDS = (["--version"], ["status"], ["node", "list"], ["audit", "verify"])
_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)$")


def imports(stderr: str) -> tuple[float, list[str]]:
    """Total import time in seconds (top-level modules) and every module imported."""
    total, names = 0, []
    for line in stderr.splitlines():
        found = _LINE.match(line)
        if not found:
            continue
        names.append(found.group(4))
        if len(found.group(3)) == 1:  # a top-level import of this run
            total += int(found.group(2))
    return total / 1e6, names


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(args: list[str], data: Path, key: Path) -> tuple[float, float, float, list[str]]:
    """(import seconds, wall seconds, CPU seconds, modules) of one CLI run."""
    extra = [] if args == ["--version"] else ["--data", str(data), "--key-file", str(key)]
    cpu = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pacsvault", *args,
                           *extra], capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    seconds, names = imports(proc.stderr)
    return seconds, wall, _children_cpu() - cpu, names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        data, key = Path(tmp) / "data", Path(tmp) / "master.key"
        subprocess.run([sys.executable, "-m", "pacsvault", "init", "--data", str(data),
                        "--key-file", str(key), "--admin", "admin"], check=True,
                       capture_output=True, timeout=300)
        print(f"{'command':<14} {'imports (s)':>11} {'wall (s)':>9} {'CPU (s)':>8}  "
              "heavy packages imported (best of each column)")
        for args in COMMANDS:
            results = [run(args, data, key) for _ in range(runs)]
            best = [min(r[i] for r in results) for i in range(3)]
            heavy = sorted({n.split(".")[0] for n in results[0][3]} & set(HEAVY))
            print(f"{' '.join(args):<14} {best[0]:>11.3f} {best[1]:>9.3f} {best[2]:>8.3f}  "
                  f"{', '.join(heavy) or '-'}")


if __name__ == "__main__":
    main()
