"""Reading Part 10 streams with a bound on what a deflated dataset may inflate to.

pydicom inflates a Deflated Explicit VR Little Endian dataset with one unbounded
``zlib.decompress`` of the whole rest of the stream: a 408 KB object took the server to
1.1 GB at reception, and again on every rendered/frames read (issue 11, defect 5). Every
place that parses a received or stored object goes through ``read`` instead:

- the inflated size is first *counted* (``zlib.decompressobj`` with ``max_length``, output
  dropped chunk by chunk), so a bomb costs CPU up to the limit but only one chunk of
  memory, and is refused with ``InflateLimitExceeded``;
- only a stream within the limit is inflated, in one buffer of the size just counted,
  which is parsed and released: the dataset keeps no reference to it.

The limit is ``[storage] max_inflated_mb`` (``set_limit`` at vault opening). There is
deliberately no compression-ratio rule: binary segmentations and mostly black images
deflate by hundreds legitimately, and the absolute limit is what bounds memory.
Streams in any other transfer syntax go to ``dcmread`` unchanged.
"""

from __future__ import annotations

import io
import zlib
from typing import Any, BinaryIO, cast

from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from pacsvault.dicomfile import filemeta

MIB = 1024 * 1024
DEFAULT_LIMIT = 512 * MIB
_IN_CHUNK = 64 * 1024
_OUT_CHUNK = 4 * MIB
_PIXEL_DATA = 0x7FE00010

_limit = DEFAULT_LIMIT


class InflateLimitExceeded(Exception):
    """A deflated dataset expands beyond the configured limit (never parsed)."""


class TruncatedDeflate(Exception):
    """The deflated stream ends before its last block."""


def set_limit(max_bytes: int) -> None:
    """The process-wide limit (one vault per server process); tests may pass their own."""
    global _limit
    _limit = max(1, int(max_bytes))


def limit() -> int:
    return _limit


def describe_limit(max_bytes: int) -> str:
    return f"{max_bytes / MIB:g} MiB (max_inflated_mb)"


def inflated_size(data: bytes | memoryview, max_bytes: int) -> int:
    """The size ``data`` (raw deflate) inflates to, counted without keeping the output;
    raises ``InflateLimitExceeded`` as soon as it passes ``max_bytes``."""
    view = memoryview(data)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    for start in range(0, len(view), _IN_CHUNK):
        pending: bytes | memoryview = view[start:start + _IN_CHUNK]
        while pending:
            total += len(inflater.decompress(pending, _OUT_CHUNK))
            if total > max_bytes:
                raise InflateLimitExceeded(
                    f"deflated dataset expands beyond {describe_limit(max_bytes)}")
            pending = inflater.unconsumed_tail
        if inflater.eof:
            break
    total += len(inflater.flush())
    if total > max_bytes:
        raise InflateLimitExceeded(f"deflated dataset expands beyond {describe_limit(max_bytes)}")
    if not inflater.eof:
        raise TruncatedDeflate("deflated dataset is truncated")
    return total


def inflate(data: bytes | memoryview, max_bytes: int) -> bytes:
    """Raw deflate data inflated, refused beyond ``max_bytes`` before any big allocation."""
    size = inflated_size(data, max_bytes)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = inflater.decompress(data, max(size, 1))  # the size is known: bounded exactly
    return out


def _meta_syntax(raw: bytes) -> str | None:
    """The file meta's Transfer Syntax UID when it is plainly explicit VR little endian
    (``filemeta.walk``), else None: then ``read`` reads the file meta with pydicom as
    before. Why: the transfer syntax decides whether the stream is inflated here; reading
    the whole file meta with pydicom just for it, then again in ``dcmread``, was ~10% of a
    small image's parse (issue 17)."""
    found = filemeta.walk(raw)
    return None if found is None else found[0]


def read(
    raw: bytes, *, limit: int | None = None, stop_before_pixels: bool = False,
    specific_tags: list[Any] | None = None,
) -> Dataset:
    """``dcmread(BytesIO(raw))`` for a Part 10 stream, with deflated datasets inflated
    within ``limit`` bytes (default: the configured one)."""
    max_bytes = _limit if limit is None else limit
    syntax = _meta_syntax(raw)
    if syntax is not None and syntax != DeflatedExplicitVRLittleEndian:
        # not deflated: straight to pydicom (the file meta is read once, not twice)
        return dcmread(io.BytesIO(raw), stop_before_pixels=stop_before_pixels,
                       specific_tags=specific_tags)
    fp = io.BytesIO(raw)
    preamble = read_preamble(fp, False)
    file_meta = _read_file_meta_info(fp)
    if file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return dcmread(io.BytesIO(raw), stop_before_pixels=stop_before_pixels,
                       specific_tags=specific_tags)
    offset = fp.tell()
    del fp
    buffer = DicomBytesIO(inflate(memoryview(raw)[offset:], max_bytes))

    def at_pixels(tag: BaseTag, _vr: str | None, _length: int) -> bool:
        return bool(tag == _PIXEL_DATA)

    dataset = read_dataset(
        cast(BinaryIO, buffer), False, True, stop_when=at_pixels if stop_before_pixels else None,
        specific_tags=[Tag(t) for t in specific_tags] if specific_tags else None,
    )
    del buffer  # values are copies: the inflated stream is not kept
    # An empty buffer as the "file": FileDataset would otherwise hold the inflated bytes.
    ds = FileDataset(io.BytesIO(), dataset, preamble, file_meta, False, True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds
