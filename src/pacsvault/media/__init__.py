"""Patient media (issue 20, part 4): a study or a patient as a standard DICOM file-set.

The layout is PS3.10/PS3.11's General Purpose profile (STD-GEN-CD, STD-GEN-USB): a
``DICOMDIR`` at the root, written by pydicom's ``FileSet`` (``media.fileset``), and the
instances under file IDs of at most eight upper-case characters per component
(``PT000000/ST000000/SE000000/IM000000``). The profile allows no readable folder names
inside the file-set, so ``INDEX.HTM`` and ``README.TXT`` at the root list the patient and
the studies for the person holding the CD (it is the patient's own copy: identified).

One workflow (``media.export``) feeds both outputs: ``pacsvault export --media DIR`` (a
folder, a USB key or a folder to burn) and the physician's ZIP download (``media.zipped``,
streamed: the server never writes a plaintext file). Both are recorded as a disclosure
before the first byte leaves.
"""
