"""What pacsvault hands OHIF (issue 20, item 1), without a browser: the generated
``app-config.js`` script stays valid and safe with any practice name, carries the menu's
labels in the user's language, hides the modes a practice did not enable, and the French
overrides keep OHIF's placeholders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
from pydantic import ValidationError

from pacsvault.config import WebSettings
from pacsvault.viewer import ohif_modes, ohif_strings
from pacsvault.web.viewer import app_config, pacsvault_block

PLACEHOLDER = re.compile(r"\{\{\w+\}\}")


def _block(text: str) -> dict[str, object]:
    found = re.search(r"var pv = (\{.*?\});\n", text)
    assert found, "no pacsvault block in app-config.js"
    value: dict[str, object] = json.loads(found.group(1))
    return value


def test_practice_name_cannot_leave_the_script() -> None:
    hostile = "Cabinet </script><script>alert(1)</script> & \u2028 co"
    text = app_config("fr", pacsvault_block("fr", practice=hostile, csrf="tok", admin=True,
                                            modes=[]))
    assert "</script>" not in text and "\u2028" not in text
    block = _block(text)
    assert block["practice"] == hostile and block["csrf"] == "tok" and block["admin"] is True
    assert block["labels"] == {"menu": "Menu", "account": "Compte",
                               "admin": "Administration", "language": "Langue",
                               "signOut": "Déconnexion",
                               "media": "Télécharger / CD patient", "send": "Envoyer à…",
                               "share": "Partager…", "studies": "Actions sur les examens",
                               "studyActions": "Télécharger, envoyer, partager…"}
    if shutil.which("node"):
        path = shutil.which("node")
        assert path is not None
        checked = subprocess.run([path, "--check", "-"], input=text, text=True,
                                 capture_output=True, timeout=30)
        assert checked.returncode == 0, checked.stderr


def test_study_actions_post_the_study_never_put_it_in_a_url() -> None:
    """The study list's "Download, send, share…" mode and the viewer menu's entries post
    the study to pacsvault's pages (issue 20: no UID in a URL the server sees)."""
    text = app_config("en", pacsvault_block("en", practice="p", csrf="", admin=False,
                                            modes=[]))
    assert "id: 'pacsvault-study-actions'" in text
    assert "post('/account/studies', { study:" in text
    assert "post('/account/studies/open', { study: study, action: entry[0] })" in text
    assert "/account/media?" not in text and "/account/send?" not in text
    labels = _block(text)["labels"]
    assert isinstance(labels, dict) and labels["send"] == "Send to…"
    assert _block(text)["firstModes"] == [ohif_modes.BASIC]  # its button before ours


def test_modes_hidden_unless_enabled() -> None:
    assert set(ohif_modes.hidden([])) == {*ohif_modes.OPTIONAL.values(),
                                         "@ohif/mode-microscopy"}
    hidden = ohif_modes.hidden(["tmtv", "segmentation"])
    assert "@ohif/mode-tmtv" not in hidden and "@ohif/mode-segmentation" not in hidden
    assert "@ohif/mode-microscopy" in hidden  # its viewer is trimmed at install
    assert "@ohif/mode-longitudinal" not in hidden  # the basic viewer, with MPR
    text = app_config("en", pacsvault_block("en", practice="p", csrf="", admin=False,
                                            modes=["tmtv"]))
    assert "@ohif/mode-tmtv" not in _block(text)["hiddenModes"]  # type: ignore[operator]


def test_settings_accept_only_known_modes_and_a_name() -> None:
    assert WebSettings().practice_name == "pacsvault" and WebSettings().viewer_modes == []
    assert WebSettings(viewer_modes=["us-pleura"]).viewer_modes == ["us-pleura"]
    with pytest.raises(ValidationError):
        WebSettings(viewer_modes=["microscopy"])
    with pytest.raises(ValidationError):
        WebSettings(practice_name="")


def test_french_overrides_keep_placeholders_and_french_typography() -> None:
    french = ohif_strings.FRENCH
    assert french["StudyList"]["MRN"] == "IPP"
    assert french["Common"]["localDateFormat"] == "DD/MM/YYYY"
    assert french["Common"]["localTimeFormat"] == "HH:mm"
    for namespace in french.values():
        for key, text in namespace.items():
            assert PLACEHOLDER.findall(key) == PLACEHOLDER.findall(text) or \
                key == "Tracked series", (key, text)
            assert "'" not in text, text
