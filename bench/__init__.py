"""pacsvault benchmarks: ``python -m bench compare`` (side by side with Orthanc), plus the
older single-peer scripts ``bench/ingest.py`` and ``bench/query.py``."""
