"""Which of OHIF's modes a practice is offered.

OHIF 3.12's prebuilt distribution registers seven modes; a practice reads images in the
basic viewer ("Basic Viewer", ``@ohif/mode-longitudinal``), whose layout menu has MPR for
CT and MR volumes. The specialist modes are hidden unless the practice names them in
``[web] viewer_modes``: a doctor should not wonder what "Total Metabolic Tumor Volume" or
"Preclinical 4D" would do to a knee CT. Microscopy is never offered: the installer trims
the microscopy viewer it needs (``dist.TRIM_DIRS``). OHIF's own non-longitudinal basic
mode is hidden by OHIF itself.

Hidden means absent from the study list's mode buttons (OHIF's ``hide``); the viewer's
script wraps each hidden mode (``viewer_assets/app-config.js``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# Setting name -> OHIF's mode id.
OPTIONAL: Final[dict[str, str]] = {
    "segmentation": "@ohif/mode-segmentation",
    "tmtv": "@ohif/mode-tmtv",
    "preclinical-4d": "@ohif/mode-preclinical-4d",
    "us-pleura": "@ohif/mode-ultrasound-pleura-bline",
}
ALWAYS_HIDDEN: Final[tuple[str, ...]] = ("@ohif/mode-microscopy",)
# The basic viewer: its button comes first in a study's row, before pacsvault's study
# actions (OHIF lists config.modes before its own, so it is wrapped there too).
BASIC: Final[str] = "@ohif/mode-longitudinal"


def hidden(enabled: Iterable[str]) -> list[str]:
    """OHIF mode ids to hide, given the optional modes the practice enabled."""
    wanted = set(enabled)
    return [mode for name, mode in OPTIONAL.items() if name not in wanted] + list(
        ALWAYS_HIDDEN)
