"""The DICOMDIR of a media export, written by pydicom's ``FileSet`` from headers only.

The headers are the index's stored ones (``media.export``): the DICOMDIR is known before
any object is decrypted.

Why a subclass: ``FileSet.add`` saves a copy of every instance into a temporary folder
(its staging area) and ``FileSet.write`` then re-encodes the instances into the target.
Neither is acceptable here: no plaintext patient file may appear outside the destination
the user chose (the server writes none at all), and the files on the media must be the
stored bytes unchanged. So the record tree is built the way ``FileSet.add`` builds it
(``_recordify``: pydicom's own PS3.3 Annex F record definitions and file-ID scheme), without
staging, and the DICOMDIR is encoded by ``FileSet``'s own writer into memory. These are
private pydicom methods: pyproject pins pydicom to 3.0.x, and tests/test_media_export.py
reads every DICOMDIR back with the public ``FileSet`` API and checks it with dcmtk.

Type 1 record attributes a modality left empty (Study ID, Study Date, Series Number,
Instance Number...) are filled in the *record only* with placeholder values, as dcmtk's
``dcmmkdir --invent`` does: the instance files stay untouched.
"""

from __future__ import annotations

import copy
import io
import os
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomFileLike
from pydicom.fileset import FileInstance, FileSet, RecordNode
from pydicom.uid import UID

MAX_COMPONENTS = 8  # PS3.10 8.2: at most eight levels of file-ID components

# Placeholders for empty Type 1 record attributes (PS3.3 F.5), record only.
_INVENTED: dict[str, str] = {
    "StudyDate": "19000101", "StudyTime": "000000", "StudyID": "1",
    "Modality": "OT", "SeriesNumber": "1",
    "ContentDate": "19000101", "ContentTime": "000000",
    "CompletionFlag": "PARTIAL", "VerificationFlag": "UNVERIFIED",
}


class MediaError(Exception):
    """An instance that cannot be listed in a DICOMDIR (message without patient data)."""


@dataclass(frozen=True)
class Entry:
    """One instance on the media: its file ID (``/``-separated) and its header (for the
    listing: patient, study, modality)."""

    file_id: str
    header: Dataset


class MediaFileSet(FileSet):
    """A ``FileSet`` whose instances are known by their headers only (see module doc)."""

    def __init__(self, file_set_id: str = "PACSVAULT") -> None:
        super().__init__()
        # FileSet makes an (empty) staging folder; nothing is ever staged here: remove it.
        self._stage["t"].cleanup()
        self.ID = file_set_id
        self._numbers: dict[str, int] = {}
        self._nodes: dict[tuple[str, ...], RecordNode] = {}
        self._seen: set[str] = set()

    def add_header(self, header: Dataset, transfer_syntax: str = "") -> Entry:
        """List the instance whose header (without pixels) is ``header``; returns its file
        ID. Instances are appended, so an earlier file ID never changes (checked again in
        ``encode``)."""
        if not getattr(header, "file_meta", None):
            header.file_meta = FileMetaDataset()
        if "TransferSyntaxUID" not in header.file_meta:
            header.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        sop = str(header.get("SOPInstanceUID", ""))
        if not sop or sop in self._seen:
            raise MediaError("an instance without a SOP Instance UID, or twice the same one")
        self._seen.add(sop)
        source = self._with_invented(header)
        try:
            records = list(self._recordify(source))
        except (ValueError, NotImplementedError, KeyError) as exc:
            sop_class = str(header.get("SOPClassUID", "?"))
            raise MediaError(f"an instance of SOP class {sop_class} cannot be listed in a "
                             f"DICOMDIR ({type(exc).__name__})") from None
        # Where ``RootNode.add`` would merge the branch (compare each record's key with
        # every sibling's: quadratic, 11 s of CPU for a 2,000-slice series), a dict of the
        # nodes by their key path finds the same place in constant time.
        parent: RecordNode = self._tree
        path: tuple[str, ...] = ()
        for record in records:
            node = RecordNode(record)
            path = (*path, str(node.key))
            found = self._nodes.get(path)
            if found is None:
                node.parent = parent  # appended to the parent's children
                self._nodes[path] = found = node
            parent = found
        instance = FileInstance(parent)
        parent.instance = instance
        self._instances.append(instance)
        file_id = "/".join(instance.FileID.split(os.path.sep))
        if file_id.count("/") >= MAX_COMPONENTS:
            raise MediaError("a file ID deeper than eight levels")
        return Entry(file_id, header)

    def _with_invented(self, header: Dataset) -> Dataset:
        """A copy of ``header`` (a header without pixels: small) whose empty Type 1
        record attributes hold placeholders (``InstanceNumber``: the rank in its series)."""
        source = copy.deepcopy(header)
        for keyword, value in _INVENTED.items():
            if keyword not in source or source[keyword].VM == 0:
                setattr(source, keyword, value)
        series = str(source.get("SeriesInstanceUID", ""))
        self._numbers[series] = self._numbers.get(series, 0) + 1
        if "InstanceNumber" not in source or source["InstanceNumber"].VM == 0:
            source.InstanceNumber = self._numbers[series]
        return source

    def encode(self, file_ids: list[str]) -> bytes:
        """The DICOMDIR file (PS3.10 Part 10, Explicit VR Little Endian), in memory.
        ``file_ids`` are the IDs ``add_header`` gave, in order: they must not have moved."""
        current = ["/".join(i.FileID.split(os.path.sep)) for i in self._instances]
        if current != file_ids:
            raise MediaError("file IDs moved while the file-set was built")
        for instance in self._instances:
            instance.node._record.ReferencedFileID = instance.FileID.split(os.path.sep)
        out = io.BytesIO()
        self._write_dicomdir(DicomFileLike(out))
        return out.getvalue()
