"""``pacsvault storage scrub`` on the default local object files (issue 16, part 2): every
indexed object read back and authenticated; a deleted and a damaged file are named by
their random object ids, exit status 1, ``storage.scrub`` recorded as a failure."""

from __future__ import annotations

from pathlib import Path

from tests import corpus
from tests.helpers import new_vault


def test_scrub_of_local_objects(tmp_path: Path) -> None:
    vault = new_vault(tmp_path)
    files = corpus.synthetic_ct_series(tmp_path / "ct", 3, size=16)
    v = vault.open()
    try:
        for f in files:
            v.archive.store(f.read_bytes())
        v.archive.settle()
        items = sorted(v.archive.locate(), key=lambda i: i.object_id)
        paths = [v.objects.path(i.object_id) for i in items]
    finally:
        v.close()
    ok = vault.cli("storage", "scrub")
    assert "checked: 3 " in ok.stdout and "orphans" not in ok.stdout
    paths[0].unlink()
    blob = bytearray(paths[1].read_bytes())
    blob[100] ^= 0x40
    paths[1].write_bytes(bytes(blob))
    res = vault.cli("storage", "scrub", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"missing: {items[0].object_id}" in res.stdout
    assert f"corrupt: {items[1].object_id}" in res.stdout
    assert res.stderr.strip().splitlines()[-1].startswith("1 missing and 1 corrupt")
    v = vault.open()
    try:
        outcomes = [r.outcome for r in v.audit.records() if r.action == "storage.scrub"]
    finally:
        v.close()
    assert len(outcomes) == 2 and outcomes[0] != outcomes[1]
