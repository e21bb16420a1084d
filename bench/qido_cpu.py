"""Where one QIDO-RS request's server CPU goes, phase by phase (issue 17).

Why: ``bench.latency`` counts the serving process's CPU in 10 ms kernel ticks, and
cProfile inflates the many small calls of pydicom, SQLAlchemy and Starlette several times.
Here the vault's real HTTPS service (``WebService`` with ``create_app``, TLS as ``serve``
sets it up) runs in this process, a client in another process sends the requests
(keep-alive, bearer token), and ``time.thread_time`` is read around the phases the QIDO
handler is made of: ``qido.parse`` (event loop), ``_search_recorded`` in the worker thread
and inside it ``qido.search`` (the engine: SQL, stored headers, answers) and
``Recorder.emit`` (the durable record), ``json_answer`` (the body), and the bearer token's
check (``deps._from_token``, its own worker-thread hop). "rest" is the process's CPU less
those: TLS, HTTP parsing, middlewares, routing, the thread hops.

Usage: ``python -m bench.qido_cpu --root ROOT [--n 200] [--query 'StudyDate=A-B']``, or
``--ab OLD_SRC [--new NEW_SRC] [--rounds 4]`` (children alternated, medians of rounds), or
``--ab OLD_SRC --pair`` (both services at once, one request to each in turn: process CPU
per request and latency p50/p95 of each, the same load on both).
ROOT: a ``bench.latency`` vault copy (``ROOT/data``, ``ROOT/keys/master.key``,
``ROOT/token``); it is written to (audit records).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

PHASES = ("process", "auth", "parse", "search_recorded", "search", "emit", "json_answer",
          "rest")

_CLIENT = """
import sys, httpx
url, ca, token, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
with httpx.Client(verify=ca, trust_env=False, timeout=60, headers={
        "Authorization": "Bearer " + token, "Accept": "application/dicom+json"}) as c:
    for _ in range(n):
        r = c.get(url)
        assert r.status_code == 200, r.status_code
        sys.stdout.write("go\\n" if _ == 0 else "")
        sys.stdout.flush()
        if _ == 0:
            sys.stdin.readline()
"""


def _instrument(spent: dict[str, list[float]]) -> None:
    from pacsvault.audit.events import Recorder
    from pacsvault.web import deps, dicomweb, dicomweb_common, qido

    lock = threading.Lock()

    def timed(fn: Callable[..., Any], key: str) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    spent[key].append(time.thread_time() - start)
        return wrapper

    deps._from_token = timed(deps._from_token, "auth")
    if hasattr(deps, "quick_principal"):  # the check's common case, on the event loop
        deps.quick_principal = timed(deps.quick_principal, "auth")
    qido.parse = timed(qido.parse, "parse")
    qido.search = timed(qido.search, "search")
    dicomweb._search_recorded = timed(dicomweb._search_recorded, "search_recorded")
    dicomweb_common.json_answer = timed(dicomweb_common.json_answer, "json_answer")
    Recorder.emit = timed(Recorder.emit, "emit")  # type: ignore[method-assign]


def measure(root: Path, n: int, query: str) -> dict[str, float]:
    """ms per request for each phase (``rest``: the process less the phases)."""
    from pacsvault.cli.serving import web_tls
    from pacsvault.vault import Vault
    from pacsvault.web.app import create_app
    from pacsvault.web.limits import WebLimits
    from pacsvault.web.server import WebService

    spent: dict[str, list[float]] = defaultdict(list)
    _instrument(spent)
    vault = Vault.open(root / "data", root / "keys" / "master.key")
    settings = vault.settings.web
    web = WebService(create_app(vault, vault.accounts),
                     web_tls(vault.layout.tls, vault.tls_password(), settings),
                     WebLimits.from_settings(settings))
    port = web.start("127.0.0.1", 0)
    url = f"https://127.0.0.1:{port}/dicom-web/studies?{query}"
    token = (root / "token").read_text().strip()
    try:
        client = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, url, str(root / "data" / "tls" / "ca.crt"),
             token, str(n + 20)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert client.stdin is not None and client.stdout is not None
        client.stdout.readline()  # one request answered: imports, TLS session, caches
        time.sleep(0.3)
        spent.clear()
        cpu = time.process_time()
        client.stdin.write("\n")
        client.stdin.flush()
        if client.wait(600) != 0:
            raise RuntimeError("the QIDO client failed")
        cpu = time.process_time() - cpu
    finally:
        web.stop()
        vault.close()
    count = n + 19
    result = {"process": cpu * 1000 / count}
    for name, values in spent.items():
        result[name] = sum(values) * 1000 / count
    inner = result.get("search", 0.0) + result.get("emit", 0.0)
    result["rest"] = (result["process"] - result.get("parse", 0.0) - result.get("auth", 0.0)
                      - max(result.get("search_recorded", 0.0), inner)
                      - result.get("json_answer", 0.0))
    return result


_SERVE = """
import sys
from pathlib import Path
from bench.qido_cpu import serve_only
serve_only(Path(sys.argv[1]))
"""


def serve_only(root: Path) -> None:
    """``--pair``'s child: the HTTPS service of ROOT; prints its port, then its process CPU
    (seconds) at each line read from stdin, until stdin closes."""
    from pacsvault.cli.serving import web_tls
    from pacsvault.vault import Vault
    from pacsvault.web.app import create_app
    from pacsvault.web.limits import WebLimits
    from pacsvault.web.server import WebService

    vault = Vault.open(root / "data", root / "keys" / "master.key")
    settings = vault.settings.web
    web = WebService(create_app(vault, vault.accounts),
                     web_tls(vault.layout.tls, vault.tls_password(), settings),
                     WebLimits.from_settings(settings))
    print(web.start("127.0.0.1", 0), flush=True)
    try:
        for _ in sys.stdin:
            print(time.process_time(), flush=True)
    finally:
        web.stop()
        vault.close()


def pair(root: Path, trees: dict[str, Path], n: int, query: str) -> None:
    """Both trees' services at once, one request to each in turn (order alternated), so a
    load that comes and goes on a shared machine weighs on both alike: each one's process
    CPU per request (the kernel's ticks, over all requests) and its latency p50/p95."""
    import httpx

    here = str(Path(__file__).resolve().parent.parent)
    procs: dict[str, subprocess.Popen[str]] = {}
    ports: dict[str, int] = {}
    for label, src in trees.items():
        env = dict(os.environ, PYTHONPATH=f"{src.resolve()}{os.pathsep}{here}")
        proc = subprocess.Popen([sys.executable, "-c", _SERVE, str(root)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        procs[label], ports[label] = proc, int(proc.stdout.readline())

    def cpu(label: str) -> float:
        proc = procs[label]
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("\n")
        proc.stdin.flush()
        return float(proc.stdout.readline())

    token = (root / "token").read_text().strip()
    walls: dict[str, list[float]] = {label: [] for label in trees}
    spent: dict[str, float] = {}
    try:
        with httpx.Client(verify=str(root / "data" / "tls" / "ca.crt"), trust_env=False,
                          timeout=60, headers={"Authorization": "Bearer " + token,
                                               "Accept": "application/dicom+json"}) as c:
            def one(label: str) -> float:
                start = time.perf_counter()
                r = c.get(f"https://127.0.0.1:{ports[label]}/dicom-web/studies?{query}")
                assert r.status_code == 200, r.status_code
                return time.perf_counter() - start

            for _ in range(20):
                for label in trees:
                    one(label)
            time.sleep(0.3)
            before = {label: cpu(label) for label in trees}
            labels = list(trees)
            for i in range(n):
                for label in labels if i % 2 == 0 else labels[::-1]:
                    walls[label].append(one(label))
            spent = {label: cpu(label) - before[label] for label in trees}
    finally:
        for proc in procs.values():
            assert proc.stdin is not None
            proc.stdin.close()
            proc.wait(60)
    print(f"{'tree':6s} {'CPU ms/request':>15s} {'p50 ms':>8s} {'p95 ms':>8s}")
    for label in trees:
        ordered = sorted(walls[label])
        print(f"{label:6s} {spent[label] * 1000 / n:15.3f} {ordered[len(ordered) // 2] * 1000:8.2f}"
              f" {ordered[int(len(ordered) * 0.95)] * 1000:8.2f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--query", default="StudyDate=20230306-20230312")
    ap.add_argument("--ab", type=Path, default=None, help="the old tree's src directory")
    ap.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent / "src")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--pair", action="store_true",
                    help="with --ab: both services at once, requests alternated")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.pair and args.ab is not None:
        pair(args.root, {"old": args.ab, "new": args.new}, args.n, args.query)
        return 0
    if args.ab is None:
        result = measure(args.root, args.n, args.query)
        if args.child:
            print(json.dumps(result))
        else:
            for name in PHASES:
                print(f"{name:18s} {result.get(name, 0.0):7.3f} ms/request")
        return 0
    runs: dict[str, list[dict[str, float]]] = {"old": [], "new": []}
    here = str(Path(__file__).resolve().parent.parent)
    for rnd in range(args.rounds):
        order = (("old", args.ab), ("new", args.new))
        for label, src in order if rnd % 2 == 0 else order[::-1]:
            env = dict(os.environ, PYTHONPATH=f"{src.resolve()}{os.pathsep}{here}")
            proc = subprocess.run(
                [sys.executable, "-m", "bench.qido_cpu", "--child", "--root", str(args.root),
                 "--n", str(args.n), "--query", args.query],
                env=env, capture_output=True, text=True, check=True, timeout=900)
            runs[label].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'phase (ms/request, median)':28s} {'old':>7s} {'new':>7s}")
    for name in PHASES:
        old = statistics.median(r.get(name, 0.0) for r in runs["old"])
        new = statistics.median(r.get(name, 0.0) for r in runs["new"])
        print(f"{name:28s} {old:7.3f} {new:7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
