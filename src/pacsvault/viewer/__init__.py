"""The OHIF web viewer: fetching its pinned prebuilt distribution and describing it.

OHIF is not committed to the repository: the install step downloads one pinned release from
the npm registry, checks it against the integrity hash recorded here, trims what a practice
does not need, and caches it. The web application then serves it same-origin behind the
session (``pacsvault.web.viewer``).
"""

from pacsvault.viewer.dist import PINNED, ViewerDist, ViewerError, default_dir, install, load

__all__ = ["PINNED", "ViewerDist", "ViewerError", "default_dir", "install", "load"]
