"""The import contract (issue 15): dependencies only point down, and no module import circle.

Why a test: an upward import is cheap to add and expensive to take out later (the scale-out
work splits processes along these layers). The graph is read by ``grimp`` from the source,
lazy imports inside functions included; only ``if TYPE_CHECKING:`` imports are left out
(they never run). Check by hand: ``.venv/bin/python -m pytest -q tests/test_import_layers.py``.

Layers, top to bottom. A module belongs to the layer of its longest matching prefix; a
module may import its own layer or any layer below, never one above.
"""

from __future__ import annotations

import grimp
import pytest

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # the entry points; sealed.serve is the sealed branch of the `serve` command
    ("cli", ("pacsvault.cli", "pacsvault.__main__", "pacsvault.sealed.serve")),
    # HTTPS; sealed.web is the /unseal page, built on the web toolkit
    ("web", ("pacsvault.web", "pacsvault.sealed.web")),
    # the DICOM network side (listeners, policy, Q/R, answers)
    ("dicom", ("pacsvault.dicom",)),
    # workflows over a whole vault: sealed mode, backups, the status report (shared by
    # `pacsvault status` and the Health page), a patient's erasure (keys, rows and files
    # destroyed, then the running server and every backup told)
    # check: the security self-check; breach: the breach register and its documents;
    # gdpr: the record of processing; deidentify: PS3.15 de-identified exports
    # media: patient CD/USB (DICOMDIR file-set) and its streamed ZIP (issue 20)
    ("workflows", ("pacsvault.sealed", "pacsvault.backup", "pacsvault.status",
                   "pacsvault.storage.erasure", "pacsvault.migrate", "pacsvault.check",
                   "pacsvault.breach", "pacsvault.gdpr", "pacsvault.deidentify",
                   "pacsvault.media")),
    # the vault's layout, create/open: composes everything below
    # sealed.material: what a start without the master key needs, refreshed at every open
    # vaultfile: vault.json itself, written by the workflows without importing the Vault
    # crypto.rotation: master key rotation, which Vault.open completes when one was
    # interrupted (handed the Vault class; it tells the backups nothing, they find the new
    # recovery password in vault.json at their next run)
    ("vault", ("pacsvault.vault", "pacsvault.vaultfile", "pacsvault.vaultindex",
               "pacsvault.vaultsecrets", "pacsvault.sealed.material",
               "pacsvault.crypto.rotation")),
    # sharing: share links for an outside colleague (issue 19)
    ("domain", ("pacsvault.storage", "pacsvault.accounts", "pacsvault.viewer",
                "pacsvault.sharing")),
    ("audit", ("pacsvault.audit",)),
    ("index", ("pacsvault.index",)),
    ("crypto", ("pacsvault.crypto",)),
    ("config", ("pacsvault.config",)),
    # helpers with no pacsvault dependency of their own
    ("base", ("pacsvault.dicomfile", "pacsvault.service", "pacsvault.logsafe",
              "pacsvault.fsutil", "pacsvault.documents", "pacsvault")),
)

# Known arrows against the contract, each with why it is still there. Remove an entry when
# its import goes (a stale entry fails the test, so the list only shrinks).
# (Empty: the last one, vault -> crypto.rotation, went when rotation stopped calling the
# backups and moved down to the vault layer.)
EXCEPTIONS: dict[tuple[str, str], str] = {}

# Arrows another change removes; allowed while present, not reported as stale when gone.
# (Empty: config/ imports no audit delivery code since the settings moved there.)
PENDING: dict[tuple[str, str], str] = {}


def _layer(module: str) -> tuple[int, str]:
    best: tuple[int, str] | None = None
    for index, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if ((module == prefix or module.startswith(prefix + "."))
                    and (best is None or len(prefix) > len(best[1]))):
                best = (index, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best[0], LAYERS[best[0]][0]


def _lines(graph: grimp.ImportGraph, importer: str, imported: str) -> str:
    details = graph.get_import_details(importer=importer, imported=imported)
    return ",".join(str(d["line_number"]) for d in details)


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("pacsvault", exclude_type_checking_imports=True)


def _edges(graph: grimp.ImportGraph) -> list[tuple[str, str]]:
    return [(importer, imported) for importer in sorted(graph.modules)
            for imported in sorted(graph.find_modules_directly_imported_by(importer))]


def test_no_upward_import(graph: grimp.ImportGraph) -> None:
    upward = []
    for importer, imported in _edges(graph):
        (low, low_name), (high, high_name) = _layer(importer), _layer(imported)
        if high < low and (importer, imported) not in EXCEPTIONS | PENDING:
            upward.append(f"  {importer} (layer {low_name}) imports {imported} "
                          f"(layer {high_name}), line {_lines(graph, importer, imported)}")
    assert not upward, ("upward imports (a lower layer must not import a higher one; "
                        "move the shared piece down or pass it in):\n" + "\n".join(upward))


def test_no_import_circle() -> None:
    graph = grimp.build_graph("pacsvault", exclude_type_checking_imports=True)  # edited below
    for importer, imported in EXCEPTIONS | PENDING:
        if graph.direct_import_exists(importer=importer, imported=imported):
            graph.remove_import(importer=importer, imported=imported)
    circles = []
    for importer, imported in _edges(graph):
        back = graph.find_shortest_chain(importer=imported, imported=importer)
        if back:
            circles.append(f"  {importer} -> " + " -> ".join(back))
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_exceptions_are_current(graph: grimp.ImportGraph) -> None:
    stale = [f"  {a} -> {b}" for a, b in EXCEPTIONS
             if not graph.direct_import_exists(importer=a, imported=b)]
    assert not stale, "remove these EXCEPTIONS entries, the import is gone:\n" + "\n".join(stale)


def test_contract_catches_an_upward_import() -> None:
    """The contract itself works: a made-up index → web import is reported by name."""
    probe = grimp.build_graph("pacsvault", exclude_type_checking_imports=True)
    probe.add_import(importer="pacsvault.index.models", imported="pacsvault.web.app",
                     line_number=1, line_contents="import pacsvault.web.app")
    with pytest.raises(AssertionError, match=r"pacsvault\.index\.models \(layer index\) "
                                             r"imports pacsvault\.web\.app \(layer web\)"):
        test_no_upward_import(probe)
