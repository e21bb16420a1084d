"""Moved to ``pacsvault.dicomfile.render`` (issue 15: ``dicom.transcode`` decodes with it
and must not import ``web``). The old name stays for its importers: it *is* the same module
object, so module state and private names behave exactly as before."""

import sys

from pacsvault.dicomfile import render as _moved
from pacsvault.dicomfile.render import *  # noqa: F403  (the names, for type checkers)

sys.modules[__name__] = _moved
