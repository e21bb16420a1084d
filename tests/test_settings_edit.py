"""Setting a few values in the commented settings file (``config.tomledit.set_in_section``):
``init --alert-email/--alert-webhook`` (``[alerts]``) and ``init --storage-url``
(``[storage]``) go through the one helper, and the file keeps every comment, blank line and
other section as written, only the named lines changing."""

from __future__ import annotations

import tomllib

import pytest

from pacsvault.config import ConfigError, Settings, StorageSettings, render, with_storage
from pacsvault.config.exposure import with_alerts
from pacsvault.config.tomledit import set_in_section


def _comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("#") or not line]


def _changed(before: str, after: str) -> list[tuple[str, str]]:
    old, new = before.splitlines(), after.splitlines()
    assert len(old) == len(new)
    return [(a, b) for a, b in zip(old, new, strict=True) if a != b]


def test_storage_in_the_full_settings_file_keeps_every_comment() -> None:
    before = render("PACSVAULT", None)
    storage = StorageSettings(url="s3://bucket-a/pacs", endpoint="https://s3.example.net",
                              region="eu-west-3", credentials_file="/etc/pv/s3 \"key\"",
                              ca_file="", path_style=True)
    after = with_storage(before, storage)
    assert _comments(after) == _comments(before)
    changed = _changed(before, after)
    assert [b for _a, b in changed] == [
        'url = "s3://bucket-a/pacs"', 'endpoint = "https://s3.example.net"',
        'region = "eu-west-3"', 'credentials_file = "/etc/pv/s3 \\"key\\""',
        "path_style = true"]  # ca_file = "" as it was
    loaded = Settings.model_validate(tomllib.loads(after)).storage
    assert (loaded.url, loaded.credentials_file, loaded.path_style) == (
        storage.url, storage.credentials_file, True)


def test_alerts_in_the_full_settings_file_keep_every_comment() -> None:
    before = render("PACSVAULT", None)
    after = with_alerts(before, {"smtp_host": "mail.example.org", "smtp_port": 465,
                                 "mail_to": ["dr@example.org", "dpo@example.org"]})
    assert _comments(after) == _comments(before)
    changed = dict(_changed(before, after))
    assert len(changed) == 3
    [mail_to] = [b for b in changed.values() if b.startswith("mail_to")]
    # the inline comment stays (the example of the setting)
    assert mail_to.startswith('mail_to = ["dr@example.org", "dpo@example.org"]  # e.g.')
    alerts = tomllib.loads(after)["alerts"]
    assert alerts["smtp_port"] == 465 and alerts["mail_to"] == ["dr@example.org",
                                                                "dpo@example.org"]


def test_the_helper_edits_only_real_setting_lines_of_its_section() -> None:
    text = (
        "# header comment\n"
        "[storage]  # the objects\n"
        "# url = \"s3://commented/out\"\n"
        "  url = \"\"   # empty: local files\n"
        "note = \"a # in a string\"  # and a comment\n"
        "\n"
        "[[backup.targets]]\n"
        "url = \"untouched\"\n"
        "[other]\n"
        "url = \"untouched too\"\n"
    )
    after = set_in_section(text, "storage", {"url": "s3://b/p", "note": "x#y"})
    assert after.splitlines() == [
        "# header comment",
        "[storage]  # the objects",
        "# url = \"s3://commented/out\"",
        "  url = \"s3://b/p\"  # empty: local files",
        "note = \"x#y\"  # and a comment",
        "",
        "[[backup.targets]]",
        "url = \"untouched\"",
        "[other]",
        "url = \"untouched too\"",
    ]
    assert tomllib.loads(after)["storage"] == {"url": "s3://b/p", "note": "x#y"}
    # a setting only commented out, or in another section, is missing: nothing written
    with pytest.raises(ValueError, match=r"lacks \[other\] endpoint, region"):
        set_in_section(text, "other", {"region": "x", "endpoint": "y", "url": "z"})
    with pytest.raises(ConfigError, match=r"lacks \[storage\]"):
        with_storage("[storage]\nurl = \"\"\n", StorageSettings(url="s3://bucket-a/p"))
