"""``bench compare``'s wire ceilings by ingest shape, without a server (issue 17).

Each ingest row is read against ceilings measured the way that row is fed (associations,
TLS, files), never against another shape's: a 4-association row against the one-association
ceilings would say "118 % of the wire" when the wire of its own shape allows more. These
check the bookkeeping only (which ceilings a row gets, the unit conversion of an images/s
row, the tables' labels); no figure is asserted.
"""

from __future__ import annotations

from bench.compare import ceilings
from bench.compare.report import Row, markdown

# one value per ceiling key (MB/s), distinct so a wrong pick shows
VALUES = {k: 10.0 * (i + 1) for i, k in enumerate(
    (*ceilings.STORE, *ceilings.SHAPED, *ceilings.GET, *ceilings.MOVE, *ceilings.WEB))}


def test_every_ingest_shape_has_its_three_receivers_and_the_old_keys_stay() -> None:
    assert ceilings.KINDS["store"] == ("store_dcmtk", "store_pyn_16k", "store_pyn_unlimited")
    shapes = {"store_plain4", "store_tls1", "store_tls4", "store_fill4"}
    assert shapes <= set(ceilings.KINDS)
    assert {k for s in shapes for k in ceilings.KINDS[s]} == set(ceilings.SHAPED)
    assert len(ceilings.SHAPED) == 12
    assert {ceilings.kind(tls, n) for tls in (False, True) for n in (1, 4)} == {
        "store", "store_plain4", "store_tls1", "store_tls4"}
    for k in ceilings.SHAPED:  # every key labelled: receiver, shape, short name with its tag
        assert ceilings.LABELS[k] and ceilings.SHAPES[ceilings.SHAPE_OF[k]].label
        assert ceilings.SHORT[k] != ceilings.SHORT[k.split("_", 2)[0] + "_" + k.split("_", 2)[2]]


def test_a_row_is_read_against_its_own_shape_only() -> None:
    row = Row("ingest TLS, 4 assoc.", "MB/s", True, ceiling="store_tls4")
    row.samples["pacsvault"] = [50.0]
    row.samples["orthanc"] = [100.0]
    shares = row.ceiling_shares("pacsvault", VALUES)
    assert set(shares) == set(ceilings.KINDS["store_tls4"])
    for k, v in shares.items():
        assert v == 50.0 / VALUES[k]
    plain = Row("ingest plain, 1 assoc.", "MB/s", True, ceiling="store")
    plain.samples["pacsvault"] = [50.0]
    assert set(plain.ceiling_shares("pacsvault", VALUES)) == set(ceilings.STORE)


def test_an_images_per_s_row_reads_mb_per_s_ceilings_in_its_unit() -> None:
    """The filler row is images/s: a ceiling of 2 MB/s over files of 10 images per MB is
    20 images/s."""
    row = Row("ingest index filler (64x64 MR), 4 assoc.", "images/s", True,
              ceiling="store_fill4", per_mb=10.0)
    row.samples["pacsvault"] = [10.0]
    row.samples["orthanc"] = [30.0]
    fills = dict.fromkeys(ceilings.KINDS["store_fill4"], 2.0)
    assert row.ceiling_shares("pacsvault", fills) == dict.fromkeys(fills, 0.5)
    assert row.to_json({}, fills)["orthanc"]["fraction_of_ceilings"] == dict.fromkeys(fills, 1.5)
    table = markdown([row], {}, fills)
    assert "50 % dcmtk filler ×4" in table and "150 % pyn 16K filler ×4" in table


def test_the_ceiling_table_names_each_shape_and_gives_images_per_s() -> None:
    images = ceilings.images_per_s(VALUES, {"main": (100, 50_000_000), "filler": (10, 1_000_000)})
    assert set(images) == {*ceilings.STORE, *ceilings.SHAPED}  # not the C-GET / web ones
    assert images["store_dcmtk"] == VALUES["store_dcmtk"] * 2
    assert images["store_fill4_dcmtk"] == VALUES["store_fill4_dcmtk"] * 10
    table = ceilings.markdown(VALUES, images).splitlines()
    assert len(table) == 2 + len(VALUES)
    tls4 = [ln for ln in table if "mutual TLS, 4 assoc." in ln]
    assert len(tls4) == 3 and any("--fork" in ln for ln in tls4)
    assert sum("index filler" in ln for ln in table) == 3
    assert any(ln.startswith("| dcmtk storescp --ignore (discards) | plain, 1 assoc.")
               for ln in table)
