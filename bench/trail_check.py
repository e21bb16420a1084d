"""Cost of the running trail tamper check (``audit/watch.py``) on a large trail.

    python -m bench.trail_check [--records N] [--checks K]

Creates a throw-away vault, writes N records to its trail (batches of 1000, one fsync
each), then times: the start-up baseline (``check(None, tail=1000)``), the watcher's
periodic check after one appended record (what runs every ``[audit] check_seconds``),
and a full check (re-hash of the verified prefix). A measurement to read, not a timed test.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import tempfile
import time
from pathlib import Path

from pacsvault import vault as vaultmod
from pacsvault.audit import AuditEvent, EventCode, Outcome


def _event(n: int) -> AuditEvent:
    return AuditEvent(action="bench.event", outcome=Outcome.SUCCESS,
                      code=EventCode.APPLICATION_ACTIVITY, message=f"event {n}",
                      actor_ae="MODALITY", detail={"n": n, "count": 3})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--checks", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        vaultmod.create(root / "data", key_file=root / "master.key")
        vault = vaultmod.Vault.open(root / "data", root / "master.key")
        try:
            trail = vault.audit
            started = time.perf_counter()
            for start in range(0, args.records, 1000):
                with trail.batch() as writer, vault.engine.begin() as conn:
                    writer.write(conn, [_event(n) for n in range(start, start + 1000)])
            size = trail.path.stat().st_size
            print(f"trail: {args.records} records, {size / 1e6:.1f} MB "
                  f"(written in {time.perf_counter() - started:.1f} s)")
            started = time.perf_counter()
            point, problem = trail.check(None, tail=1000)
            print(f"start-up baseline check: {time.perf_counter() - started:.3f} s")
            assert not problem, problem
            full = "full" in inspect.signature(trail.check).parameters
            periodic: list[float] = []
            fulls: list[float] = []
            for n in range(args.checks):
                trail.append(_event(args.records + n))
                started = time.perf_counter()
                point, problem = trail.check(point)
                periodic.append(time.perf_counter() - started)
                assert not problem, problem
                if full:
                    started = time.perf_counter()
                    point, problem = trail.check(point, full=True)
                    fulls.append(time.perf_counter() - started)
                    assert not problem, problem
            print(f"periodic check after one append: median "
                  f"{statistics.median(periodic) * 1000:.1f} ms "
                  f"(min {min(periodic) * 1000:.1f}, max {max(periodic) * 1000:.1f})")
            if fulls:
                print(f"full check (every few periods): median "
                      f"{statistics.median(fulls) * 1000:.1f} ms")
        finally:
            vault.close()


if __name__ == "__main__":
    main()
