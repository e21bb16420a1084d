"""Names of the security events the Health page lists (issue 20, item 7).

The audit page's table (``web/audit_names``) names the actions a DPO filters on; the
Health page's "latest security events" are mostly others (a refused form, an unknown
C-MOVE destination, a refused exposure switch...). This table adds those, in the same
way (``N_``, the catalogs in ``web/locale``), and falls back to ``audit_names`` (its
names, then its families, then the code): a raw code is the last resort, and the page
keeps it as the cell's tooltip; an action nobody named yet reads "Security event (code)".
"""

from __future__ import annotations

from pacsvault.web.audit_names import ACTIONS, SECURITY_ACTIONS, action_name
from pacsvault.web.i18n import N_, Gettext

FAMILIES: dict[str, str] = {
    "web.": N_("Web pages"),
    "forward.": N_("Automatic forwarding"),
    "alerts.": N_("Alerts"),
    "check.": N_("Security check"),
    "accounts.": N_("User accounts"),
}


def event_name(action: str, _: Gettext) -> str:
    """The reader's name of a security event's ``action``."""
    if action in ACTIONS:
        return action_name(action, _)
    if action in SECURITY_ACTIONS:
        return _(SECURITY_ACTIONS[action])
    named = action_name(action, _)
    if named != action:
        return named
    for prefix, name in FAMILIES.items():
        if action.startswith(prefix):
            return f"{_(name)} ({action})"
    return f"{_('Security event')} ({action})" if action else action
