"""Alert delivery: ``AlertSink`` runs the ``Detector`` off the caller's thread and sends
each alert by e-mail (SMTP with STARTTLS or TLS) and to the optional webhook (JSON POST),
then records it as an ``alert.*`` Security Alert event through the same recorder.

Why apart from the rules: this is the only alert code that touches the network, threads
and secret files; the rules stay pure and testable without any of it.
"""

from __future__ import annotations

import datetime as dt
import email.policy
import email.utils
import json
import logging
import queue
import shutil
import smtplib
import socket
import ssl
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from pacsvault.audit.alerts.findings import Alert, Severity
from pacsvault.audit.alerts.findings import clean_text as _clean
from pacsvault.audit.alerts.findings import utc_now as _utc_now
from pacsvault.audit.alerts.findings import utc_text as _utc_text
from pacsvault.audit.alerts.rules import Detector, PatientResolver
from pacsvault.audit.events import AuditEvent, EventCode, Outcome, Recorder
from pacsvault.config.alerts import RULES, AlertConfigError, AlertSettings
from pacsvault.config.alerts import is_loopback_host as _is_loopback_host
from pacsvault.fsutil import PrivateFileError, read_private_text

log = logging.getLogger("pacsvault.alerts")

# --- delivery ----------------------------------------------------------------------------


def _read_secret(path_text: str, what: str) -> str:
    """Read a secret file, refusing one that others can read (it would leak the secret)."""
    path = Path(path_text).expanduser()
    try:
        return read_private_text(path)
    except PrivateFileError as exc:
        raise AlertConfigError(exc.explain(what)) from None


def _wrap(text: str) -> str:
    """Mail-friendly lines; indented lines (commands) are kept whole so they can be copied."""
    lines: list[str] = []
    for line in text.splitlines():
        if line.startswith(" ") or len(line) <= 76:
            lines.append(line)
        else:
            lines.extend(textwrap.wrap(line, 76, break_long_words=False,
                                       break_on_hyphens=False))
    return "\n".join(lines)


def _tls_context(ca_file: str) -> ssl.SSLContext:
    """Verified TLS 1.2+: system CAs, or only the given CA when one is configured."""
    ctx = ssl.create_default_context(cafile=str(Path(ca_file).expanduser()) if ca_file
                                     else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect could downgrade the webhook to http or send it elsewhere: refuse it."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        return None


class DeliveryError(Exception):
    """A channel refused the alert (message names the cause, never the alert's content)."""


_STOP = object()


class AlertSink:
    """Recorder sink: detection and delivery off the caller's thread.

    ``write`` never blocks (a bounded queue; on overflow the event is dropped for detection
    only, it is still in the trail through the other sinks). One worker thread runs the
    ``Detector``, checks the disk every ``disk_check_seconds`` when ``disk_path`` is given,
    delivers each alert to every configured channel (with ``retry_delays`` between
    attempts), and records it through ``recorder`` as ``alert.sent`` (at least one channel
    took it), ``alert.failed`` (none did) or ``alert.recorded`` (no channel is configured:
    the trail is its only destination, which is not a failure). Its own ``alert.*`` events
    are ignored.

    ``claim`` (several instances sharing one index, issue 16): asked before a first notice
    is sent; False means another instance sent that rule's notice for that subject within
    the grouping window, so this one stays silent (its repeats still make follow-ups).
    """

    nonblocking = True  # ``write`` only queues (``Recorder.try_emit``)

    def __init__(
        self,
        settings: AlertSettings,
        recorder: Recorder,
        *,
        disk_path: Path | None = None,
        patients_of: PatientResolver | None = None,
        clock: Callable[[], dt.datetime] = _utc_now,
        retry_delays: Sequence[float] = (5.0, 30.0),
        tick_seconds: float = 5.0,
        disk_check_seconds: float = 300.0,
        queue_size: int = 10_000,
        start: bool = True,
        claim: Callable[[Alert], bool] | None = None,
    ) -> None:
        """``start=False`` builds and checks the sink without a worker (settings checks,
        ``send_test``, tests); such a sink ignores ``write``."""
        self.settings = settings
        self.detector = Detector(settings, clock=clock, patients_of=patients_of)
        self._recorder = recorder
        self._claim = claim
        self._disk_path = disk_path
        self._retry_delays = tuple(retry_delays)
        self._tick_seconds = tick_seconds
        self._disk_check_seconds = disk_check_seconds
        self._server = _clean(settings.server_name or socket.gethostname() or "pacsvault")
        self._queue: queue.Queue[object] = queue.Queue(maxsize=queue_size)
        self._closing = False
        self._dropped = 0
        # Fail at start, not at the first alert: a wrong path or mode is a setup mistake.
        if settings.smtp_password_file:
            _read_secret(settings.smtp_password_file, "SMTP password file")
        if settings.webhook_token_file:
            _read_secret(settings.webhook_token_file, "webhook token file")
        for ca in (settings.smtp_ca_file, settings.webhook_ca_file):
            if ca and not Path(ca).expanduser().is_file():
                raise AlertConfigError(f"CA file {ca} not found")
        self._thread = threading.Thread(target=self._run, name="pacsvault-alerts",
                                        daemon=True)
        if start and settings.enabled:
            self._thread.start()

    # --- Sink -------------------------------------------------------------------------

    def write(self, event: AuditEvent) -> None:
        # Only what some rule watches goes to the worker (``Detector.watches``): a stored
        # image's event, which none does, cost a queue hand-off and a thread wake-up each
        # (issue 17). Grouping windows still close on the worker's own tick.
        if (not self.settings.enabled or self._closing or not self._thread.is_alive()
                or not self.detector.watches(event)):
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.error("alert queue full: %d event(s) not checked by the alert rules",
                          self._dropped)

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event written so far is checked and its alerts delivered."""
        if not self._thread.is_alive():
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Send pending follow-ups, record them, stop the worker.

        Call before the trail is closed, so the last ``alert.*`` events can be recorded.
        Retries are skipped from here on: shutdown must not hang on a dead mail server.
        """
        if not self._thread.is_alive():
            return
        self._closing = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            log.error("alert worker did not drain its queue; pending alerts are lost")
            return
        self._thread.join(timeout)

    def send_test(self) -> Alert:
        """Deliver a harmless test alert now (for a ``pacsvault alert test`` command)."""
        now = _utc_now()
        alert = Alert(
            rule="test", severity=Severity.WARNING, title="Test alert",
            text=("This is a test of the alerts of the pacsvault archive. Nothing happened. "
                  "If you can read this, alerts reach you.\n\nWhere to look:\n    "
                  "pacsvault audit show --action alert"),
            subject="", first_seen=now, last_seen=now, count=1, summary=False,
            look="pacsvault audit show --action alert",
        )
        self._deliver(alert)
        return alert

    # --- worker -----------------------------------------------------------------------

    def _run(self) -> None:
        next_disk = time.monotonic()
        while True:
            try:
                item = self._queue.get(timeout=self._tick_seconds)
            except queue.Empty:
                item = None
            alerts: list[Alert] = []
            try:
                if isinstance(item, AuditEvent):
                    alerts += self.detector.observe(item)
                alerts += self.detector.tick()
                if self._disk_path is not None and time.monotonic() >= next_disk:
                    next_disk = time.monotonic() + self._disk_check_seconds
                    usage = shutil.disk_usage(self._disk_path)
                    alerts += self.detector.observe_disk(usage.free, usage.total)
                if item is _STOP:
                    alerts += self.detector.flush()
            except Exception as exc:  # a rule bug must not stop detection for good
                log.error("alert detection failed: %s", type(exc).__name__)
            for alert in alerts:
                try:
                    if (not alert.summary and self._claim is not None
                            and not self._claim(alert)):
                        continue  # another instance sent this notice
                    self._deliver(alert)
                except Exception as exc:
                    log.error("alert delivery failed: %s", type(exc).__name__)
            if isinstance(item, threading.Event):
                item.set()
            if item is _STOP:
                return

    def _deliver(self, alert: Alert) -> None:
        results: dict[str, str] = {}
        errors: list[str] = []
        channels: list[tuple[str, Callable[[Alert], None]]] = []
        if self.settings.mail_enabled:
            channels.append(("mail", self._send_mail))
        if self.settings.webhook_url:
            channels.append(("webhook", self._post_webhook))
        for name, send in channels:
            error = self._attempt(send, alert)
            results[name] = "failed" if error else "sent"
            if error:
                errors.append(f"{name}: {error}")
                log.error("alert %s could not be sent by %s: %s", alert.rule, name, error)
        delivered = any(v == "sent" for v in results.values())
        detail: dict[str, str | int | bool] = {
            "rule": alert.rule, "severity": alert.severity.value, "count": alert.count,
            "follow_up": alert.summary, "mail": results.get("mail", "off"),
            "webhook": results.get("webhook", "off"),
        }
        if not channels:
            # Nothing to fail: the trail (and the Health page) is the only destination the
            # administrator chose. Not a failure at every alert (issue 12, defect 8).
            action, outcome = "alert.recorded", Outcome.SUCCESS
            detail["delivered"] = "trail"
            errors.append("recorded in the audit trail only: no e-mail or webhook is "
                          "configured")
        elif delivered:
            action = "alert.sent"
            outcome = Outcome.MINOR_FAILURE if errors else Outcome.SUCCESS
        else:
            action, outcome = "alert.failed", Outcome.SERIOUS_FAILURE
        message = alert.title + (f" -- {'; '.join(errors)}" if errors else "")
        self._recorder.emit(AuditEvent(
            action=action, outcome=outcome,
            code=EventCode.SECURITY_ALERT, message=message, actor_ae=alert.ae,
            actor_address=alert.address, actor_user=alert.user, detail=detail,
        ))

    def _attempt(self, send: Callable[[Alert], None], alert: Alert) -> str:
        """Try, then retry after each delay; returns the last error ('' when sent)."""
        error = ""
        for delay in (0.0, *self._retry_delays):
            if delay:
                if self._closing:
                    break
                time.sleep(delay)
            try:
                send(alert)
                return ""
            except (OSError, smtplib.SMTPException, DeliveryError, AlertConfigError,
                    ValueError) as exc:
                error = _clean(f"{type(exc).__name__}: {exc}", 200)
        return error

    # --- channels ---------------------------------------------------------------------

    def build_message(self, alert: Alert) -> EmailMessage:
        """The e-mail: plain text, no attachment, nothing but the alert's own text."""
        s = self.settings
        # Long enough that the subject is never folded (some clients show a fold badly).
        msg = EmailMessage(policy=email.policy.default.clone(max_line_length=200))
        tag = f" (+{alert.count} repeats, grouped)" if alert.summary else ""
        msg["Subject"] = (f"[pacsvault {self._server}] {alert.severity.value.upper()}: "
                          f"{alert.title}{tag}")
        msg["From"] = s.mail_from or f"pacsvault@{_clean(socket.gethostname(), 200)}"
        msg["To"] = ", ".join(s.mail_to)
        msg["Date"] = email.utils.formatdate(localtime=True)
        msg["Message-ID"] = email.utils.make_msgid(domain="pacsvault.invalid")
        msg["Auto-Submitted"] = "auto-generated"
        msg["X-Pacsvault-Rule"] = alert.rule
        body = (
            f"pacsvault alert from the archive server '{self._server}'\n"
            f"Severity: {alert.severity.value}\n\n"
            f"{alert.title}\n{'=' * len(alert.title)}\n\n"
            f"{_wrap(alert.text)}\n\n"
            f"First seen: {_utc_text(alert.first_seen)}\n"
            f"Last seen:  {_utc_text(alert.last_seen)}\n"
            f"Rule: {alert.rule} ({RULES.get(alert.rule, 'test')})\n\n"
            "-- \nThis message never contains patient data. The details are in the "
            "server's audit trail.\n"
        )
        ascii_only = body.isascii()
        msg.set_content(body, cte="7bit" if ascii_only else "quoted-printable")
        return msg

    def _send_mail(self, alert: Alert) -> None:
        s = self.settings
        msg = self.build_message(alert)
        ctx = _tls_context(s.smtp_ca_file)
        smtp: smtplib.SMTP
        if s.smtp_security == "tls":
            smtp = smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout,
                                    context=ctx)
        else:
            smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout)
        with smtp:
            smtp.ehlo()
            if s.smtp_security == "starttls":
                if not smtp.has_extn("starttls"):
                    raise DeliveryError("the mail server does not offer STARTTLS")
                smtp.starttls(context=ctx)
                smtp.ehlo()
            if s.smtp_username:
                smtp.login(s.smtp_username,
                           _read_secret(s.smtp_password_file, "SMTP password file"))
            smtp.send_message(msg)

    def webhook_payload(self, alert: Alert) -> dict[str, Any]:
        """The JSON body: the same facts as the mail, no patient data."""
        return {
            "source": "pacsvault", "server": self._server, "rule": alert.rule,
            "severity": alert.severity.value, "title": alert.title, "text": alert.text,
            "count": alert.count, "follow_up": alert.summary,
            "first_seen": alert.first_seen.astimezone(dt.UTC).isoformat(),
            "last_seen": alert.last_seen.astimezone(dt.UTC).isoformat(),
            "where_to_look": alert.look, "node": alert.ae, "address": alert.address,
            "user": alert.user, "facts": dict(alert.facts),
        }

    def _post_webhook(self, alert: Alert) -> None:
        s = self.settings
        parts = urllib.parse.urlsplit(s.webhook_url)
        loopback = _is_loopback_host(parts.hostname or "")
        if parts.scheme != "https" and not (
            parts.scheme == "http" and s.webhook_allow_http_loopback and loopback
        ):
            raise DeliveryError("webhook_url must be https")
        headers = {"Content-Type": "application/json", "User-Agent": "pacsvault-alerts"}
        if s.webhook_token_file:
            headers["Authorization"] = (
                "Bearer " + _read_secret(s.webhook_token_file, "webhook token file"))
        request = urllib.request.Request(  # noqa: S310 (scheme checked above)
            s.webhook_url, data=json.dumps(self.webhook_payload(alert)).encode(),
            headers=headers, method="POST",
        )
        handlers: list[urllib.request.BaseHandler] = [
            _NoRedirect(), urllib.request.HTTPSHandler(context=_tls_context(s.webhook_ca_file)),
        ]
        if loopback:  # never hand a loopback URL to an environment proxy
            handlers.append(urllib.request.ProxyHandler({}))
        opener = urllib.request.build_opener(*handlers)
        try:
            with opener.open(request, timeout=s.webhook_timeout) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            raise DeliveryError(f"the webhook answered HTTP {exc.code}") from None
        if not 200 <= status < 300:
            raise DeliveryError(f"the webhook answered HTTP {status}")


__all__ = ["AlertSink", "DeliveryError"]
