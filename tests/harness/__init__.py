"""The harness shared by the tests and the benchmarks: real dcmtk peers, loopback ports,
a dcmtk ``storescp`` destination, a loopback webhook receiver.

One place so that a fix (a dcmtk binary shadowed by pynetdicom's script of the same name,
Nagle's algorithm in Debian's dcmtk, a readiness check that sends no packet) reaches every
caller. It imports nothing from pacsvault: the benchmarks import it (``bench/ingest.py``,
``bench/compare/procs.py``) as well as ``tests/helpers.py``.
"""
