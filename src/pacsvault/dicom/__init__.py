"""The DICOM side: parsing received objects and the network listeners (pynetdicom)."""
