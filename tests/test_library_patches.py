"""pacsvault's pynetdicom/pydicom patches against the library versions they were written for.

Why: the patches (``pacsvault/dicom/patches.py``) copy or lean on library internals. A
dependency upgrade that changes one of them must stop the build here, naming the upstream
function to re-read, instead of failing later as a subtle protocol bug.
"""

from __future__ import annotations

from typing import cast

import pydicom
import pynetdicom
import pytest
from pynetdicom import AE, _config

from pacsvault.dicom import patches


def test_pinned_versions() -> None:
    patches.check_versions()  # raises on any other version
    assert pynetdicom.__version__.startswith(patches.WRITTEN_FOR["pynetdicom"])
    assert pydicom.__version__.startswith(patches.WRITTEN_FOR["pydicom"])


def test_other_version_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    with pytest.raises(patches.UnsupportedLibraryVersion, match=r"pynetdicom 3\.1\.0"):
        patches.check_versions()


def test_patched_upstream_code_unchanged() -> None:
    changed = [f"  {name}: recorded {expected[:12]}..., installed {got[:12]}..."
               for name, expected in sorted(patches.UPSTREAM.items())
               if (got := patches.source_hash(name)) != expected]
    assert not changed, (
        "upstream code the patches copy or rely on has changed (a dependency upgrade?): "
        "read each change, port it to the pacsvault code named next to it in "
        "pacsvault/dicom/patches.py, then record the new hash:\n" + "\n".join(changed))


def test_hash_catches_a_change() -> None:
    """The check itself works: another function's source does not match a recorded hash."""
    name = "pynetdicom.dsutils.encode"
    assert patches.source_hash(name) == patches.UPSTREAM[name]
    assert patches.source_hash("pynetdicom.dsutils.decode") != patches.UPSTREAM[name]


def test_patches_applied_as_the_server_needs() -> None:
    import pacsvault.dicom.server  # noqa: F401 - applies the configuration at import

    for name, value in patches.PYNETDICOM_CONFIG.items():
        assert getattr(_config, name) == value, name
    assert patches.pydicom_settings_applied()  # by dicomfile/parse, imported by the server


def test_wrappers_are_idempotent() -> None:
    from pynetdicom import service_class

    from pacsvault.dicom.answers import install

    install()
    first = service_class.encode  # type: ignore[attr-defined]
    install()
    assert service_class.encode is first  # type: ignore[attr-defined]

    ae = AE()
    calls: list[str] = []

    def around(original: object, addr: str, port: int, **_kwargs: object) -> str:
        calls.append(addr)
        return "assoc"

    patches.wrap_associate(ae, around)
    wrapped = ae.associate
    patches.wrap_associate(ae, around)
    assert ae.associate is wrapped
    assert cast(object, ae.associate("127.0.0.1", 1)) == "assoc" and calls == ["127.0.0.1"]
