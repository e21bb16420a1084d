"""One status report for ``pacsvault status`` and the Health page (``/admin/health``).

``report`` gathers it from an open vault into a typed ``StatusReport`` (listeners, nodes,
counts, storage, certificates, key protection, backups and drills, TLS downgrades, audit
chain and the latest security events); ``text`` renders it for the terminal and
``--json``; the page renders the same structure with its template. A workflow over a
whole vault (it reads the index, the backup state, the key file and ``serve.json``), so
both the CLI and the web layer can use it.
"""

from pacsvault.status.report import (
    EXPIRY_WARNING_DAYS,
    Certificate,
    Configured,
    Counts,
    KeySummary,
    Listener,
    SecurityEvent,
    StatusReport,
    Storage,
    gather,
    read_server_state,
    running_state,
)

__all__ = ["EXPIRY_WARNING_DAYS", "Certificate", "Configured", "Counts", "KeySummary",
           "Listener", "SecurityEvent", "StatusReport", "Storage", "gather",
           "read_server_state", "running_state"]
