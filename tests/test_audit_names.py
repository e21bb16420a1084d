"""Every action this wave added reads as a name on the audit and Health pages, in French
too (a DPO filtering the trail must not meet ``dicom.send.begin``)."""

from __future__ import annotations

import pytest

from pacsvault.web.audit_names import action_name
from pacsvault.web.health_names import event_name
from pacsvault.web.i18n import gettext_for

ACTIONS = (
    "dicom.send", "dicom.send.begin", "dicom.send.refused", "forward.failing", "dicom.echo",
    "exposure.switch", "exposure.refused", "exposure.pending", "alerts.choice",
    "alerts.test", "check.run", "share.created", "share.opened", "share.revoked",
    "breach.opened", "breach.exported", "breach.patients.export", "gdpr.record.export",
    "export.media", "export.deidentified", "token.new-address",
)


@pytest.mark.parametrize("language", ["en", "fr"])
def test_new_actions_have_names(language: str) -> None:
    _ = gettext_for(language)
    for action in ACTIONS:
        for name in (action_name(action, _), event_name(action, _)):
            assert action not in name, (language, action, name)  # a name, not the code
    if language == "fr":
        assert action_name("dicom.send", _) == "Images envoyées (envoi)"
