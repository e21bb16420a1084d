"""Export of audit events to an ATNA collector: syslog (RFC 5424) over TLS (RFC 5425).

IHE ATNA's Record Audit Event [ITI-20] carries each DICOM audit message (``atna``) as the
MSG of one RFC 5424 syslog record, over TLS with RFC 5425 octet-counting framing
(``LEN SP SYSLOG-MSG``). The record's header follows ITI-20: facility 10
(security/authorization), severity 5 (notice) for a success and 4 (warning) otherwise,
APP-NAME ``pacsvault``, MSGID ``IHE+RFC-3881``, no structured data, and MSG = UTF-8 BOM +
the XML (RFC 5424's MSG-UTF8 form: the BOM tells the collector the bytes are UTF-8).

Why a disk queue. A collector is a separate machine that goes down, reboots or is
unreachable for days; audit events must not be lost meanwhile, and the archive must never
wait for it (a modality's C-STORE cannot stall because the audit server is rebooting).
So ``SyslogSink.write`` only appends the framed record to ``DATA/audit/syslog-queue/``
and returns; a background thread delivers the queue in order.

Queue format. One file per record, named by a 20-digit zero-padded sequence number
(``00001730000000000001.msg``), so lexical order is delivery order. The number is
``max(last + 1, now in microseconds)``: strictly increasing, and still increasing across
restarts (an old file replayed later cannot take a current number). The last number lives
in ``queue.lock``, which also serialises writers across processes (server and CLI share
the queue). Each file is a ``pacsvault-obj/1`` object (``crypto.objects``: AES-256-GCM,
per-file salt) under a key derived for this purpose, with ``pacsvault-syslog-queue/<seq>``
as associated data: the records hold patient IDs and study UIDs, so they are never on disk
in clear, and a file renamed to another place in the queue fails authentication instead
of being delivered out of order. Files are written to a temporary name, fsynced, linked
into place and the directory fsynced, so a crash leaves either no record or a whole one.

Delivery guarantee: at least once, in order. Syslog has no application-level
acknowledgement (RELP would; ATNA does not use it), so "delivered" is the strongest thing a
sender can know: every byte of the batch was *acknowledged by the collector's TCP stack*
on a connection that was still established (Linux: ``SIOCOUTQ`` reaches 0 and
``TCP_INFO`` still shows ESTABLISHED/CLOSE_WAIT). Only then are the batch's files deleted.
A failure anywhere before that keeps the files; after reconnecting the batch is sent again
from its first record, so the collector may see the start of a batch twice
(``5 6 | 5 6 7``), but never a gap, and records first arrive in queue order. Before each
batch the connection is probed for an orderly close by the collector (a syslog receiver
never sends data), so records are not written into a connection the collector has
already dropped. The residual loss window
is a collector that crashes after its TCP stack acknowledged a record but before it stored
it, which no syslog sender can close.

One sender per queue: the thread takes ``sender.lock`` (``flock``) first, so when
``pacsvault serve`` and a CLI command share a vault, only one delivers; the other only
enqueues.

Size: a record is at most ``max_message_size`` octets (RFC 5425 receivers must take
8192); an event naming more objects than fit (an export of the whole archive) becomes
several complete AuditMessages, each naming a share of the objects ("part i of n").

Bounded: ``queue_limit`` records at most (the disk also holds the images). Beyond it new
records are not queued and an error is logged; when there is room again, a Security Alert
saying how many events were not exported is queued first, so the collector sees the gap.
The signed audit trail still holds every event.
"""

from pacsvault.audit.syslog.queue import QUEUE_DIR_NAME, SyslogQueue
from pacsvault.audit.syslog.sender import (
    APP_NAME,
    BOM,
    FACILITY_SECURITY,
    MSGID,
    DeliveryError,
    SyslogSink,
    format_record,
    frame,
)

# The settings live in config/syslog.py (read at every start without this sender); the
# names stay importable from here.
from pacsvault.config.syslog import DEFAULT_PORT, TOML_SECTION, SyslogConfigError, SyslogSettings

__all__ = [
    "APP_NAME", "BOM", "DEFAULT_PORT", "FACILITY_SECURITY", "MSGID", "QUEUE_DIR_NAME",
    "TOML_SECTION", "DeliveryError", "SyslogConfigError", "SyslogQueue", "SyslogSettings",
    "SyslogSink", "format_record", "frame",
]
