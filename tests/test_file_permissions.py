"""Issue 11, defect 10: what pacsvault writes outside the vault is readable by its owner only.

``export`` writes decrypted DICOM, ``node cert --out`` a device's private key: with the usual
umask 022 they came out 0644 in 0755 folders, readable by every local account. Both run
here as a user would (the real CLI, umask 022): files 0600, folders made by pacsvault 0700.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from pacsvault.vault import create
from tests.helpers import VaultDir


@pytest.fixture(scope="module")
def vault(tmp_path_factory: pytest.TempPathFactory) -> VaultDir:
    root = tmp_path_factory.mktemp("perms")
    key = root / "keys" / "master.key"
    vault = VaultDir(root, key, create(root / "data", key_file=key))
    v = vault.open()
    try:
        for name in ("CT_small.dcm", "MR_small.dcm"):
            raw = Path(get_testdata_file(name)).read_bytes()  # type: ignore[arg-type]
            v.archive.store(raw, source_ae="TEST")
        v.archive.settle()
    finally:
        v.close()
    return vault


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _tree(root: Path) -> tuple[list[Path], list[Path]]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    folders = sorted(p for p in root.rglob("*") if p.is_dir())
    return files, folders


@pytest.mark.usefixtures("umask_022")
def test_export_files_are_0600_in_0700_folders(vault: VaultDir, tmp_path: Path) -> None:
    out = tmp_path / "new" / "export"  # missing parents are ours too
    vault.cli("export", "--all", "--out", out)
    files, folders = _tree(out)
    assert len(files) == 2 and all(f.suffix == ".dcm" for f in files)
    assert {str(dcmread(f).Modality) for f in files} == {"CT", "MR"}
    for f in files:
        assert _mode(f) == 0o600, (f, oct(_mode(f)))
    for folder in [out, out.parent, *folders]:
        assert _mode(folder) == 0o700, (folder, oct(_mode(folder)))
    assert not list(out.rglob("*.part"))

    # again into the same folder (files replaced), and into a folder the user made: that
    # one keeps its mode, everything pacsvault writes inside is still private
    vault.cli("export", "--all", "--out", out)
    assert all(_mode(f) == 0o600 for f in _tree(out)[0])
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o755)
    os.chmod(mine, 0o755)  # noqa: S103 (a folder the user made, on purpose)
    vault.cli("export", "--all", "--out", mine)
    files, folders = _tree(mine)
    assert _mode(mine) == 0o755 and len(files) == 2
    assert all(_mode(f) == 0o600 for f in files)
    assert all(_mode(d) == 0o700 for d in folders)


@pytest.mark.usefixtures("umask_022")
def test_node_certificate_files_are_0600_in_a_0700_folder(vault: VaultDir,
                                                          tmp_path: Path) -> None:
    vault.cli("node", "add", "PERMNODE", "--host", "127.0.0.1", "--client-cert")
    out = tmp_path / "certs"
    vault.cli("node", "cert", "PERMNODE", "--out", out)
    files, _ = _tree(out)
    assert any(f.suffix == ".key" for f in files) and any(f.name == "ca.crt" for f in files)
    for f in files:
        assert _mode(f) == 0o600, (f, oct(_mode(f)))
    assert _mode(out) == 0o700


@pytest.mark.usefixtures("umask_022")
def test_node_certificate_files_left_by_an_older_version_become_0600(
        vault: VaultDir, tmp_path: Path) -> None:
    vault.cli("node", "add", "OLDNODE", "--host", "127.0.0.1", "--client-cert")
    out = tmp_path / "old-certs"
    out.mkdir()
    for name in ("OLDNODE.key", "OLDNODE.crt", "ca.crt"):  # as an older pacsvault left them
        (out / name).write_text("old\n")
        os.chmod(out / name, 0o644)  # the defect being reproduced
    vault.cli("node", "cert", "OLDNODE", "--out", out)
    files, _ = _tree(out)
    assert {f.name for f in files} >= {"OLDNODE.key", "OLDNODE.crt", "ca.crt"}
    for f in files:
        assert f.read_text() != "old\n", f
        assert _mode(f) == 0o600, (f, oct(_mode(f)))
