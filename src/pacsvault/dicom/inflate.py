"""Moved to ``pacsvault.dicomfile.inflate`` (issue 15: lower layers use it and must not import
``dicom``). The old name stays for its importers: it *is* the same module object, so
module state and private names behave exactly as before."""

import sys

from pacsvault.dicomfile import inflate as _moved
from pacsvault.dicomfile.inflate import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _moved
