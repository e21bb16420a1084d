"""DICOM files and DICOM JSON without any network: Part 10 parsing and header JSON
(``parse``), bounded inflation of deflated datasets (``inflate``), VRs checked against the
data dictionary (``vr_check``), pixel decoding with permissive codecs and rendering
(``render``).

Why a package of its own: the archive (``storage``), the query engine (``index``), sealed
mode and the DICOM listeners all need these; they sit at the bottom of the import layers so
that none of those has to reach up into ``dicom`` (issue 15). It imports nothing of
pacsvault outside itself.
"""
