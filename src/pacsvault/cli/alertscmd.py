"""``pacsvault alerts test``, and the alert channel ``init`` asks for (issue 19).

Why a test is recorded: the exposure guard (``cli/exposure.py``) lets a switch open the
archive only when a person would be told, i.e. when a channel *as configured now* has
delivered a test. ``alerts test`` sends one, records the channels that took it
(``config.exposure.record_test``, a 0600 file in the data directory) and the attempt in the
trail (``alerts.test``). ``init`` writes the chosen channel into ``[alerts]`` and sends the
first test; choosing none is recorded too (``alerts.choice``), and stays a finding of the
security check (``check/alerting.py``) until a channel is set up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pacsvault.audit import AuditEvent, EventCode, Outcome, Recorder
from pacsvault.audit.events import SECURITY_CONFIGURATION
from pacsvault.cli.common import CommandError, add_data_args, data_dir, open_vault, say
from pacsvault.config import CONFIG_NAME
from pacsvault.config.exposure import channels, record_test, webhook_loopback_http, with_alerts

if TYPE_CHECKING:
    from pacsvault.config.alerts import AlertSettings


def register(sub: Any) -> None:
    p = sub.add_parser("alerts", help="the alert channels (e-mail, webhook)")
    asub = p.add_subparsers(dest="alerts_command", required=True, metavar="ACTION")
    t = asub.add_parser("test", help="send a test alert now and record which channels "
                        "delivered it (needed before opening the archive to the internet)")
    add_data_args(t)
    t.set_defaults(func=cmd_test)


def add_init_args(p: argparse.ArgumentParser) -> None:
    """The alert channel chosen at ``init`` (also asked at a terminal)."""
    p.add_argument("--alert-email", metavar="ADDRESS", action="append", default=[],
                   help="e-mail address for security alerts (repeatable); needs --smtp-host")
    p.add_argument("--smtp-host", metavar="HOST[:PORT]", default="",
                   help="the mail server alerts go through (default port 587, STARTTLS)")
    p.add_argument("--smtp-security", choices=("starttls", "tls", "none"), default=None,
                   help="'none' only for a relay on this machine")
    p.add_argument("--smtp-username", default="")
    p.add_argument("--smtp-password-file", metavar="FILE", type=Path,
                   help="0600 file holding the SMTP password")
    p.add_argument("--alert-webhook", metavar="URL", default="",
                   help="https:// URL receiving alerts as JSON")
    p.add_argument("--webhook-token-file", metavar="FILE", type=Path,
                   help="0600 file holding the webhook's bearer token")
    p.add_argument("--no-alerts", action="store_true",
                   help="no alert channel (recorded; a standing finding of the security check)")


def chosen_values(args: argparse.Namespace, ask: bool) -> dict[str, str | int | bool | list[str]]:
    """The ``[alerts]`` values ``init`` writes (empty: none chosen)."""
    emails: list[str] = list(getattr(args, "alert_email", None) or [])
    smtp_host: str = getattr(args, "smtp_host", "") or ""
    webhook: str = getattr(args, "alert_webhook", "") or ""
    if getattr(args, "no_alerts", False):
        if emails or webhook:
            raise CommandError("--no-alerts goes without --alert-email/--alert-webhook")
        return {}
    if not (emails or webhook) and ask and sys.stdin.isatty() and sys.stdout.isatty():
        say("Security alerts (an exposure, a break-in attempt, a failed backup) must reach "
            "a person. Leave empty to decide later (it stays a finding of 'pacsvault check').")
        typed = input("E-mail address for alerts: ").strip()
        if typed:
            emails = [typed]
            smtp_host = input("Mail server (host[:port], STARTTLS): ").strip()
        else:
            webhook = input("Or a webhook URL (https://...): ").strip()
    values: dict[str, str | int | bool | list[str]] = {}
    if emails:
        if not smtp_host:
            raise CommandError("--alert-email needs --smtp-host (the mail server)")
        host, _, port = smtp_host.rpartition(":") if smtp_host.count(":") == 1 \
            else (smtp_host, "", "")
        values.update(smtp_host=host or smtp_host, mail_to=emails)
        if port:
            if not port.isdigit():
                raise CommandError(f"--smtp-host {smtp_host}: the port is not a number")
            values["smtp_port"] = int(port)
        security = getattr(args, "smtp_security", None)
        if security:
            values["smtp_security"] = security
        if getattr(args, "smtp_username", ""):
            values["smtp_username"] = args.smtp_username
        if getattr(args, "smtp_password_file", None):
            values["smtp_password_file"] = str(Path(args.smtp_password_file).resolve())
    if webhook:
        values["webhook_url"] = webhook
        if webhook_loopback_http(webhook):
            values["webhook_allow_http_loopback"] = True
        if getattr(args, "webhook_token_file", None):
            values["webhook_token_file"] = str(Path(args.webhook_token_file).resolve())
    return values


def forward_args(args: argparse.Namespace, ask: bool) -> list[str]:
    """The same choice as ``init`` flags (``service install`` runs ``init`` as the service
    user): asked here at a terminal, checked, then passed on."""
    values = chosen_values(args, ask)
    if not values:
        return ["--no-alerts"]
    out: list[str] = []
    mail_to = values.get("mail_to")
    for address in mail_to if isinstance(mail_to, list) else []:
        out += ["--alert-email", address]
    if "smtp_host" in values:
        port = values.get("smtp_port")
        out += ["--smtp-host", f"{values['smtp_host']}:{port}" if port
                else str(values["smtp_host"])]
    for key, flag in (("smtp_security", "--smtp-security"),
                      ("smtp_username", "--smtp-username"),
                      ("smtp_password_file", "--smtp-password-file"),
                      ("webhook_url", "--alert-webhook"),
                      ("webhook_token_file", "--webhook-token-file")):
        if key in values:
            out += [flag, str(values[key])]
    return out


def write_choice(root: Path, values: dict[str, str | int | bool | list[str]]) -> None:
    """The chosen channel into the new vault's settings file (checked by loading it)."""
    from pacsvault.config import ConfigError, load

    path = root / CONFIG_NAME
    before = path.read_text("utf-8")
    path.write_text(with_alerts(before, values), "utf-8")
    try:
        load(root)
    except ConfigError as exc:
        path.write_text(before, "utf-8")
        raise CommandError(f"the alert settings are not usable: {exc}") from None


def send_test(root: Path, alerts: AlertSettings, recorder: Recorder,
              by: str) -> tuple[list[str], list[str]]:
    """Send a test on every configured channel now: (channels that delivered it, errors).
    The delivery (``alert.*``) and the test (``alerts.test``) are recorded; a success is
    remembered for the exposure guard."""
    from pacsvault.audit.alerts import AlertConfigError, AlertSink

    wanted = channels(alerts)
    if not wanted:
        recorder.emit(_event("alerts.test", Outcome.MINOR_FAILURE, by,
                             channels="none", delivered=""))
        return [], ["no alert channel is configured: set mail_to and smtp_host, or "
                    f"webhook_url, in the [alerts] section of {CONFIG_NAME}"]
    seen: list[AuditEvent] = []

    class _Capture:
        def write(self, event: AuditEvent) -> None:
            seen.append(event)

    capture = Recorder([_Capture()])
    try:
        sink = AlertSink(alerts, capture, start=False, retry_delays=())
        sink.send_test()
    except AlertConfigError as exc:
        recorder.emit(_event("alerts.test", Outcome.SERIOUS_FAILURE, by,
                             channels=",".join(wanted), delivered=""))
        return [], [str(exc)]
    result = seen[-1] if seen else None
    delivered = [c for c in wanted if result is not None and result.detail.get(c) == "sent"]
    errors = []
    if result is None or result.action != "alert.sent" or len(delivered) < len(wanted):
        errors.append(result.message if result is not None else "no result")
    now = dt.datetime.now(dt.UTC)
    if delivered:
        record_test(root, alerts, delivered, now)
    recorder.emit(_event("alerts.test", Outcome.SUCCESS if delivered and not errors
                         else Outcome.MINOR_FAILURE if delivered else Outcome.SERIOUS_FAILURE,
                         by, channels=",".join(wanted), delivered=",".join(delivered)))
    return delivered, errors


def choice_event(values: dict[str, Any], delivered: list[str], by: str) -> AuditEvent:
    """``alerts.choice``: what ``init`` was told (none is a decision on record too)."""
    chosen = [c for c, key in (("mail", "mail_to"), ("webhook", "webhook_url")) if key in values]
    # A decision, recorded as made (init says what "none" means; the check keeps saying it)
    return _event("alerts.choice", Outcome.SUCCESS, by,
                  channels=",".join(chosen) or "none", tested=",".join(delivered))


def _event(action: str, outcome: Outcome, by: str, **detail: str) -> AuditEvent:
    return AuditEvent(action=action, outcome=outcome, code=EventCode.SECURITY_ALERT,
                      actor_user=by, detail={"type_code": SECURITY_CONFIGURATION, **detail})


def cmd_test(args: argparse.Namespace) -> int:
    root = data_dir(args)
    vault = open_vault(args)
    try:
        import getpass

        delivered, errors = send_test(root, vault.settings.alerts, vault.recorder,
                                      f"cli:{getpass.getuser()}")
    finally:
        vault.close()
    for channel in delivered:
        print(f"test alert delivered by {channel}: recorded")
    for error in errors:
        say(f"pacsvault: {error}")
    if not delivered:
        raise CommandError("no alert channel delivered the test; nothing was recorded as "
                           "tested")
    return 0 if not errors else 1
