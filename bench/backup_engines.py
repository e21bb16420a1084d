"""restic vs borg on what a pacsvault backup really is (issue 14: choose by measurement).

    python bench/backup_engines.py [--mb 200] [--borg /path/to/borg] [--restic restic]

A vault's objects are ciphertext: random, incompressible, written once. This makes ~200 MB
of object-like random files (sizes 50 kB .. 4 MB, in ``ab/cd/<hex>.pvo`` directories),
then for each engine, in the same run and on the same disk:

1. ``init`` an encrypted repository (restic: AES-256 + Poly1305; borg: repokey-blake2);
2. a first backup;
3. a second backup after adding 10 % new files (deduplication: only the new data goes);
4. a restore of the latest snapshot into an empty directory (compared byte for byte);
5. a full check reading every pack (``restic check --read-data``,
   ``borg check --verify-data``).

Wall times, CPU times of the child, repository size. Passwords come through a file or an
environment variable of the child only (a benchmark; pacsvault itself never uses the
environment for them). Not run by pytest: a benchmark to read, one run on a loaded machine
says roughly, not precisely. Borg: Debian's ``borgbackup`` or ``pip install borgbackup``
into a throw-away venv (needs liblz4/libzstd/libxxhash/libacl headers to build).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import random
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

PASSWORD = "bench-only-password-not-a-secret"  # noqa: S105


@dataclass
class Step:
    engine: str
    step: str
    wall: float
    cpu: float


def make_objects(root: Path, total: int, rng: random.Random, prefix: str = "") -> int:
    """Random files like the object store's, ``total`` bytes in all; returns the count."""
    made, count = 0, 0
    while made < total:
        size = min(int(rng.lognormvariate(13.0, 1.0)) + 50_000, 4_000_000, total - made)
        name = prefix + rng.randbytes(16).hex()
        path = root / name[:2] / name[2:4] / f"{name}.pvo"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        made += size
        count += 1
    return count


def timed(engine: str, step: str, argv: list[str], env: dict[str, str],
          steps: list[Step], cwd: Path | None = None) -> None:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=3600, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} {step} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    steps.append(Step(engine, step, wall, cpu))
    print(f"  {engine:<7} {step:<26} {wall:7.1f} s wall  {cpu:7.1f} s cpu", flush=True)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(
        same_tree(a / d, b / d) for d in cmp.common_dirs)


def run_restic(binary: str, src: Path, work: Path, steps: list[Step]) -> int:
    repo, out = work / "restic-repo", work / "restic-restore"
    pw = work / "restic.pw"
    pw.write_text(PASSWORD)
    pw.chmod(0o600)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C",
           "RESTIC_PASSWORD_FILE": str(pw), "RESTIC_CACHE_DIR": str(work / "restic-cache")}
    base = [binary, "--repo", str(repo), "--quiet"]
    timed("restic", "init", [*base, "init"], env, steps)
    timed("restic", "backup 1 (200 MB)", [*base, "backup", "."], env, steps, cwd=src)
    size_first = du(repo)
    make_objects(src, int(du(src) * 0.10), random.Random(2), prefix="ff")
    timed("restic", "backup 2 (+10 %)", [*base, "backup", "."], env, steps, cwd=src)
    timed("restic", "restore latest", [*base, "restore", "latest", "--target", str(out)],
          env, steps)
    timed("restic", "check --read-data", [*base, "check", "--read-data"], env, steps)
    if not same_tree(src, out):
        raise SystemExit("restic: restored tree differs")
    print(f"  restic  repository {du(repo) / 1e6:.1f} MB (after first backup "
          f"{size_first / 1e6:.1f} MB)")
    return du(repo)


def run_borg(binary: str, src: Path, work: Path, steps: list[Step]) -> int:
    repo, out = work / "borg-repo", work / "borg-restore"
    out.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8",
           "BORG_PASSPHRASE": PASSWORD, "BORG_BASE_DIR": str(work / "borg-home"),
           "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
    timed("borg", "init", [binary, "init", "--encryption", "repokey-blake2", str(repo)],
          env, steps)
    # lz4 is borg's default; ciphertext does not compress, so "auto" would only cost
    # its probe: keep the default, as a practice would.
    timed("borg", "backup 1 (200 MB)", [binary, "create", f"{repo}::one", "."], env, steps,
          cwd=src)
    size_first = du(repo)
    make_objects(src, int(du(src) * 0.10), random.Random(2), prefix="ff")
    timed("borg", "backup 2 (+10 %)", [binary, "create", f"{repo}::two", "."], env, steps,
          cwd=src)
    timed("borg", "restore latest", [binary, "extract", f"{repo}::two"], env, steps, cwd=out)
    timed("borg", "check --verify-data", [binary, "check", "--verify-data", str(repo)], env,
          steps)
    if not same_tree(src, out):
        raise SystemExit("borg: restored tree differs")
    print(f"  borg    repository {du(repo) / 1e6:.1f} MB (after first backup "
          f"{size_first / 1e6:.1f} MB)")
    return du(repo)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--restic", default=shutil.which("restic") or "restic")
    parser.add_argument("--borg", default=shutil.which("borg") or "")
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    steps: list[Step] = []
    with tempfile.TemporaryDirectory(prefix="pv-bench-backup-", dir=args.dir) as tmp:
        work = Path(tmp)
        for engine in ("restic", "borg"):
            binary = args.restic if engine == "restic" else args.borg
            if not binary:
                print(f"  {engine}: not installed, skipped")
                continue
            version = subprocess.run([binary, "version" if engine == "restic" else
                                      "--version"], capture_output=True, text=True,
                                     check=False).stdout.strip()
            print(f"{engine}: {version}")
            src = work / f"{engine}-src"
            count = make_objects(src, args.mb * 1_000_000, random.Random(1))
            print(f"  {count} object-like files, {du(src) / 1e6:.1f} MB")
            (run_restic if engine == "restic" else run_borg)(binary, src, work, steps)
            shutil.rmtree(src)
    print("\n| step | " + " | ".join(sorted({s.engine for s in steps})) + " |")
    engines = sorted({s.engine for s in steps})
    print("|---|" + "---|" * len(engines))
    names = ["init", "backup 1", "backup 2", "restore", "check"]
    for name in names:
        cells = []
        for engine in engines:
            found = [s for s in steps if s.engine == engine and s.step.startswith(name)]
            cells.append(f"{found[0].wall:.1f} s ({found[0].cpu:.1f} s cpu)" if found else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
