"""Issue 13, defect 3: which transfer syntax the archive accepts when a sender offers several
in one presentation context.

dcmtk ``dcmsend`` offers, for a compressed file, its own syntax plus the uncompressed ones in
one context, and converts to whatever the SCP accepts. The archive used to accept Implicit
VR Little Endian first (pydicom's list order): dcmsend then decompressed RLE, JPEG-LS and
JPEG lossless objects and turned Explicit VR into Implicit. Now the sender's compressed
syntax is kept, then Explicit, then Implicit, Big Endian only when nothing else is offered;
``[dicom] syntax_preference`` changes it for one calling AE title.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE as ClientAE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests import corpus
from tests.helpers import AE, Server, VaultDir, dcmtk, dcmtk_env, make_vault, start_server

SENDER = "DCMSEND"
PLAIN = "PYSCU"
IMPLICIT_NODE = "OLDCT"
# What dcmsend sends of the corpus. Not the Implicit VR file: with Explicit offered in the
# same context, Explicit is preferred (the order), and dcmsend converts it.
KEPT = {str(RLELossless), str(JPEGLSLossless), str(JPEGLosslessSV1),
        str(ExplicitVRLittleEndian)}


@dataclass
class Env:
    vault: VaultDir
    server: Server
    files: list[corpus.CorpusFile]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("negotiation")
    vault = make_vault(root / "vault")
    for ae in (SENDER, PLAIN, IMPLICIT_NODE):
        vault.add_node(ae, "--roles", "store")
    vault.set_toml("dicom", "syntax_preference", f'{{ {IMPLICIT_NODE} = "implicit" }}')
    files = [f for f in corpus.build(root / "corpus") if f.transfer_syntax in KEPT]
    assert {f.transfer_syntax for f in files} == KEPT
    server = start_server(vault)
    try:
        yield Env(vault, server, files)
    finally:
        server.stop()


def _elements(path: Path) -> dict[int, tuple[str, object]]:
    """Every element as (VR, value). dcmsend itself re-encodes what it reads (drops the
    trailing (FFFC,FFFC) padding, writes encapsulated Pixel Data as OB where the file said
    OW), so the file's own bytes cannot come back; what must is every value, and the
    compressed stream byte for byte (no decompression anywhere)."""
    ds = dcmread(path)
    out: dict[int, tuple[str, object]] = {}
    for elem in ds:
        if elem.tag == 0xFFFCFFFC:
            continue
        vr = "OB" if elem.tag == 0x7FE00010 and ds.file_meta.TransferSyntaxUID.is_compressed \
            else str(elem.VR)
        out[int(elem.tag)] = (vr, elem.value)
    return out


@pytest.mark.slow
def test_dcmsend_multi_syntax_offer_keeps_what_the_sender_has(env: Env, tmp_path: Path) -> None:
    proc = subprocess.run(
        [dcmtk("dcmsend"), "-aet", SENDER, "-aec", AE, "127.0.0.1", str(env.server.port),
         *(str(f.path) for f in env.files)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "export"
    env.vault.cli("export", "--all", "--out", out)
    exported = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
                for p in out.rglob("*") if p.is_file()}
    for f in env.files:
        got = exported[f.sop_uid]
        ts = str(dcmread(got, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        assert ts == f.transfer_syntax, f.path.name
        assert _elements(got) == _elements(f.path), f.path.name
        assert dcmread(got).PixelData == dcmread(f.path).PixelData, f.path.name


def _accepted(server: Server, calling: str, offered: Sequence[str]) -> str:
    ae = ClientAE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, offered)
    assoc = ae.associate("127.0.0.1", server.port, ae_title=AE)
    try:
        assert assoc.is_established
        (cx,) = assoc.accepted_contexts
        return str(cx.transfer_syntax[0])
    finally:
        assoc.release()


def test_explicit_preferred_over_implicit_and_big_endian(env: Env) -> None:
    offer = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian]
    assert _accepted(env.server, PLAIN, offer) == ExplicitVRLittleEndian
    assert _accepted(env.server, PLAIN, [ExplicitVRBigEndian, ImplicitVRLittleEndian]) == (
        ImplicitVRLittleEndian)


def test_big_endian_only_when_nothing_else_is_offered(env: Env) -> None:
    assert _accepted(env.server, PLAIN, [ExplicitVRBigEndian]) == ExplicitVRBigEndian


def test_compressed_as_offered_in_the_senders_order(env: Env) -> None:
    offer = [ImplicitVRLittleEndian, JPEGLSLossless, ExplicitVRLittleEndian, RLELossless]
    assert _accepted(env.server, PLAIN, offer) == JPEGLSLossless


def test_per_node_preference(env: Env) -> None:
    offer = [RLELossless, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assert _accepted(env.server, IMPLICIT_NODE, offer) == ImplicitVRLittleEndian
    assert _accepted(env.server, PLAIN, offer) == RLELossless


def test_nothing_supported_is_refused_cleanly(env: Env) -> None:
    """A context offering only syntaxes we do not know is rejected; the others still work."""
    ae = ClientAE(ae_title=PLAIN)
    ae.add_requested_context(CTImageStorage, ["1.2.3.4.5.6"])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", env.server.port, ae_title=AE)
    try:
        assert assoc.is_established
        assert [str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts] == [
            ExplicitVRLittleEndian]
        assert len(assoc.rejected_contexts) == 1
    finally:
        assoc.release()
