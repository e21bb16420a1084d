"""The breach register (issue 18, parts 2-5): records with every item of GDPR art. 33(3)
and 33(5) and of the regulator's notification form (``model``), kept encrypted and
versioned (``store``), their scope counted from the audit trail (``scope``), the 72-hour
clock's alerts (``clock``, a job of ``serve``), and the documents made from them
(``documents``, ``labels``; the list of patients to inform only encrypted: ``patients``).
"""

from __future__ import annotations

from pacsvault.breach.model import Breach, BreachError, Clock, Notification, Scope, Step

__all__ = ["Breach", "BreachError", "Clock", "Notification", "Scope", "Step"]
