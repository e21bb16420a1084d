"""Detection of suspicious activity on the event path, and alerts by e-mail and webhook.

Why here: the sanctioned practices learnt of their exposure from the regulator, years late.
Every event already flows through the ``Recorder``, so one more sink can watch that stream
and tell the practice the same day, without any producer knowing about alerts.

Three parts, separated so each can be tested alone (``config/alerts.py``, ``rules.py`` with
the ``findings.py`` it produces, ``delivery.py``; this package re-exports their names):

* ``AlertSettings``: the ``[alerts]`` section of the toml. Addresses and thresholds live
  there; secrets never do (the SMTP password and webhook token are read from 0600 files).
* ``Detector``: pure logic. It consumes ``AuditEvent``s, applies the rules below with
  sliding windows on the events' own times, and returns ``Alert``s. The clock (used only to
  close grouping windows) is injectable, so tests replay a whole day in milliseconds.
* ``AlertSink``: a ``Sink`` for the ``Recorder``. ``write`` only enqueues, and only the
  events some rule watches (``dispatch.py``: each rule declares its actions and codes; a
  stored image's event, watched by none, costs no hand-off). The DICOM thread must never
  wait on a mail server; one background thread runs the detector, sends mail
  over SMTP with STARTTLS and POSTs JSON to the optional webhook, then records each alert as
  an ``alert.sent`` / ``alert.failed`` Security Alert event through the same recorder.

Rules (ids are what ``disabled_rules`` takes):

``failed-logins``  ``auth.login.failed``: N failures within 10 minutes from one address (a
                   guessing run), or for one user from several addresses (distributed).
``account-locked`` ``auth.account.locked``: every lock.
``exposure``       ``exposure``: a connection from outside the trusted networks (port
                   forward / DMZ on the internet box). Critical, grouped for all addresses,
                   since an exposed server is scanned from many of them.
``unknown-node``   ``dicom.association.rejected`` (unregistered AE, wrong host, TLS or
                   certificate requirement not met) and ``dicom.move.unknown_destination``
                   (a node asked to send images somewhere unregistered).
``bulk-access``    one user or node reading more than N distinct studies (or patients, when
                   known) within one hour. Reads are retrievals, exports and image views,
                   never incoming stores; queries are not counted (viewers refresh study
                   lists all day, which is not a copy of the images).
``unusual-hours``  a read or a sign-in outside business hours (local time, days).
``audit-broken``   ``audit.verify`` that did not succeed, or ``audit.tamper`` (the running
                   server's watcher): the trail was edited or damaged.
``audit-unwritable`` ``audit.unavailable``: a record could not be written (disk full, I/O
                   error), so accesses are being refused; sent without touching the disk.
``disk-full``      ``dicom.store.failed`` with status A700 (images are being refused), and
                   the sink's periodic free-space check falling below ``disk_warn_free_mb``.
``connection-abuse`` a ``*.connection.refused`` summary (audit/refusals.py): one source
                   refused again and again by the DICOM/HTTPS connection budget.
``backup-failed``  ``backup.run``/``backup.verify``/``backup.prune``/``backup.drill`` that did
                   not succeed (per target and action): a copy is missing or would not
                   restore.
``backup-stale``   ``backup.stale`` (backup/schedule.py): the last good backup of a target
                   is older than ``[backup] max_age_hours``.
``archive-sealed`` ``application.start`` with ``sealed`` (the master key was unavailable:
                   receiving goes on, nothing can be read until someone unlocks it),
                   ``sealed.snapshot`` (the node snapshot does not verify: every device is
                   refused) and ``sealed.journal.damaged`` (sealed/).
``object-storage`` ``storage.scrub`` that did not succeed (an indexed object is missing or
                   does not authenticate: storage/scrub.py), ``storage.orphans`` that
                   refused to delete (far more unindexed objects than a crash leaves: a
                   restored older index on the same bucket?), and ``dicom.store.failed``
                   with A700 because the S3 endpoint cannot be reached (instead of
                   ``disk-full``: there is no disk to free).
``breach-clock``   ``breach.clock`` (breach/clock.py): a breach record reached 48 h or 66 h
                   after awareness with no decision on notifying the authority (art. 33).
``security-check`` ``check.run`` (check/record.py) naming a critical finding the previous
                   complete run did not have (check_rule.py).
``forwarding``     ``forward.failing`` (dicom/forward.py): a forwarding rule's images keep
                   failing to reach their node, once per episode.

Grouping: the first occurrence of a rule for one subject (a node, a user, an address, or
the whole server) is sent at once, because the practice must know within a minute. Further
occurrences within the group window are only counted; when the window ends, one follow-up
says how many more there were, between which times and from how many sources. If the
activity went on, the next window is twice as long (15 min, 30 min, 1 h ... capped at 6 h),
so a scan lasting a day yields about ten messages, not hundreds. A window that ends with no
repeat closes the group; the next occurrence is news again. ``close`` sends the pending
follow-ups so no count is lost at shutdown.

No patient data ever leaves in an alert: the text is built only from counts, AE titles,
user names, addresses and times. Event ``message`` texts are not copied, except the fixed
reasons of association refusals and the record numbers of a failed chain verification.
Study UIDs and patient IDs are kept in memory only to count distinct ones.
"""

from pacsvault.audit.alerts.delivery import AlertSink, DeliveryError
from pacsvault.audit.alerts.findings import Alert, Finding, Severity
from pacsvault.audit.alerts.rules import Detector, PatientResolver
from pacsvault.config.alerts import RULES, AlertConfigError, AlertSettings, render_section

__all__ = [
    "RULES", "Alert", "AlertConfigError", "AlertSettings", "AlertSink", "DeliveryError",
    "Detector", "Finding", "PatientResolver", "Severity", "render_section",
]
