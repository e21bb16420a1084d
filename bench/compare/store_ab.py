"""Issue 17, C-STORE receive path: server CPU per image and MB/s, A/B alternated.

Why: on a loaded 2-core machine wall-clock figures move with the neighbours; the server
process's own CPU time per image (``/proc`` utime + stime of the ``serve`` process, read
before and after a one-association ``storescu`` push) is what a receive-path change
moves. Each variant is a source tree (``--tree NAME=DIR``, ``DIR/src`` put first on
``PYTHONPATH``; ``cur`` = this checkout), started fresh for each round, rounds alternated.
``--ceilings`` adds the bare pynetdicom / dcmtk ceilings of ``ceilings.py`` for the same
files, ``--profile`` a py-spy record of the last round of each variant.

    python -m bench.compare.store_ab --out /tmp/ab --slices 100 --rounds 3 \
        --tree base=/tmp/base --ceilings
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from bench.compare import dataset
from bench.compare import profile as spy
from bench.compare.pacsvault_server import PacsvaultTarget
from bench.ingest import push

MB = 1e6


def cpu_seconds(pid: int) -> float:
    """User + system CPU of the server process and its children so far."""
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


@contextlib.contextmanager
def record(pid: int, out: Path | None) -> Iterator[None]:
    """py-spy, samples taken only while a thread holds the GIL (Python CPU, not waits)."""
    if out is None:
        yield
        return
    exe = spy.exe()
    assert exe
    proc = subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--rate", "1000", "--format", "raw", "--gil",
         "--threads", "--nonblocking", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        if out.exists():
            out.with_suffix(".top.txt").write_text(spy.summary(out))


def files_for(root: Path, slices: int, tls: bool) -> list[Path]:
    size = dataset.Size("ab17", 1, slices, 0, 0, 1, 0)
    corpus = dataset.generate(root / "data", size)
    return [corpus.root / i.path for i in corpus.main if i.kind == "CT"]


def one_round(name: str, tree: Path | None, files: list[Path], work: Path, tls: bool,
              template: Path | None, prof: Path | None) -> dict[str, float]:
    root = work / f"{name}-vault"
    shutil.rmtree(root, ignore_errors=True)
    env_path = os.environ.get("PYTHONPATH", "")
    if tree is not None:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(tree / "src"), str(Path.cwd()), env_path) if p)
    try:
        if template is not None and not (template / "token").exists():
            # in a child with this tree first on the path: making the bench user opens
            # the vault in-process, which would otherwise migrate it with this checkout
            subprocess.run([sys.executable, "-c",
                            "import sys; from pathlib import Path; "
                            "from bench.compare.pacsvault_server import PacsvaultTarget; "
                            "PacsvaultTarget(Path(sys.argv[1]), sys.argv[2] == '1')",
                            str(template), "1" if tls else "0"], check=True)
        target = PacsvaultTarget(root, tls, template)
        target.start()
    finally:
        os.environ["PYTHONPATH"] = env_path
    logs = work / f"{name}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    service = target.service
    assert service is not None
    try:
        # untimed warm-up: the first association pays the server's lazy imports
        push(target.dicom_port, target.called_ae, files[:1], 1, target.scu_tls, logs)
        pid = service.pid
        c0 = cpu_seconds(pid)
        with record(pid, prof):
            t0 = time.perf_counter()
            push(target.dicom_port, target.called_ae, files[1:], 1, target.scu_tls, logs)
            wall = time.perf_counter() - t0
        cpu = cpu_seconds(pid) - c0
    finally:
        service.stop()
    n = len(files) - 1
    size = sum(f.stat().st_size for f in files[1:])
    return {"cpu_ms_per_image": cpu / n * 1000, "mb_s": size / wall / MB,
            "cpu_mb_s": size / cpu / MB}


def inproc(out: Path, files: list[Path], rounds: int, pdu: str | None) -> None:
    """One vault served in this process, the direct C-STORE path switched on and off for
    alternate rounds (``reactor.FAST_STORE``, read per association): the same code
    otherwise. Process CPU (the server's threads only: storescu is another process)."""
    import tempfile

    from bench.compare.procs import DCMTK_ENV, dcmtk
    from pacsvault.dicom import reactor
    from pacsvault.dicom.server import DicomService
    from pacsvault.vault import Vault, create

    results: dict[str, list[float]] = {"direct": [], "pynetdicom": []}
    size = sum(f.stat().st_size for f in files)
    for r in range(rounds):
        for fast in ((True, False) if r % 2 == 0 else (False, True)):
            root = Path(tempfile.mkdtemp(dir=out))
            create(root / "data", key_file=root / "key")
            vault = Vault.open(root / "data", root / "key")
            vault.nodes.add("BENCHSCU", "127.0.0.1")
            service = DicomService(vault)
            if pdu:  # the largest PDU we accept: what storescu sends in
                service.ae.maximum_pdu_size = int(pdu)
            port = service.start("127.0.0.1", 0, None)["dicom_port"]
            reactor.FAST_STORE = fast
            cmd = [dcmtk("storescu"), "-aet", "BENCHSCU", "-aec", vault.settings.server.ae_title,
                   "127.0.0.1", str(port)]
            try:
                subprocess.run([*cmd, str(files[0])], env=DCMTK_ENV, check=True,
                               capture_output=True)  # warm-up
                c0, t0 = time.process_time(), time.perf_counter()
                subprocess.run(cmd + [str(f) for f in files[1:]], env=DCMTK_ENV, check=True,
                               capture_output=True)
                cpu, wall = time.process_time() - c0, time.perf_counter() - t0
            finally:
                service.stop()
                vault.close()
                shutil.rmtree(root, ignore_errors=True)
            key = "direct" if fast else "pynetdicom"
            results[key].append(cpu / (len(files) - 1) * 1000)
            print(key, r, f"cpu_ms_per_image={results[key][-1]:.2f}",
                  f"mb_s={(size - files[0].stat().st_size) / wall / MB:.1f}", flush=True)
    (out / f"inproc-{pdu or 'default'}.json").write_text(json.dumps(results, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", action="append", default=[], help="NAME=DIR (DIR/src first)")
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--ceilings", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--no-cur", action="store_true", help="only the --tree variants")
    ap.add_argument("--inproc", action="store_true",
                    help="direct path on/off in one in-process server (see inproc)")
    ap.add_argument("--pdu", help="with --inproc: the server's maximum PDU size (default 0)")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    files = files_for(out, args.slices + 1, args.tls)
    if args.inproc:
        inproc(out, files, args.rounds, args.pdu)
        return
    trees: list[tuple[str, Path | None]] = [] if args.no_cur else [("cur", None)]
    for spec in args.tree:
        name, _, path = spec.partition("=")
        trees.append((name, Path(path)))
    results: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        order = trees if r % 2 == 0 else list(reversed(trees))
        for name, tree in order:
            prof = out / f"{name}.prof.txt" if args.profile and r == args.rounds - 1 else None
            # one vault per variant, made once by it, copied for each of its rounds
            # (``init`` costs more than a round)
            row = one_round(name, tree, files, out / "work", args.tls,
                            out / f"template-{name}", prof)
            results[name].append(row)
            print(name, r, json.dumps(row), flush=True)
    if args.ceilings:
        from bench.compare.ceilings import _store_once

        for key in ("store_pyn_16k", "store_pyn_unlimited", "store_dcmtk"):
            got = [_store_once(key, files[1:], out / "ceil") for _ in range(args.rounds)]
            results[key] = [{"mb_s": g} for g in got]
            print(key, json.dumps(got), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
