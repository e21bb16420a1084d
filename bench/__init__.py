"""pacsvault benchmarks: ``python -m bench compare`` (side by side with Orthanc), plus the
older single-peer scripts ``bench/ingest.py`` and ``bench/query.py``."""

import os as _os

# Benchmarks start throw-away servers on loopback; run as root (as on the CI machine)
# they need the development escape hatch that `serve` otherwise refuses.
_os.environ.setdefault("PACSVAULT_ALLOW_ROOT", "1")
