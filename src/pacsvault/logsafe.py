"""One log entry = one line, whatever a peer sends.

Why: AE titles, user names, URLs and decoder error messages come from the network, and
pynetdicom quotes some of them in its own lines. A CR/LF in a calling AE title used to start
a new log line with the attacker's text (a forged entry for whoever reads the journal), and
a malformed PDU dumped a multi-line traceback. This formatter is installed on the process's
one handler (``cli.common.setup_logging``), so it covers our loggers, pynetdicom's and
uvicorn's alike:

- control characters (C0, DEL, C1, Unicode line/paragraph separators) in the final message
  are escaped (``\\r``, ``\\n``, ``\\t``, ``\\xNN``, ``\\uNNNN``);
- an exception is condensed to ``[Type: message]`` on the same line (message escaped,
  truncated), never a traceback: the peer-caused ones are expected, ours have their frames
  in the code;
- pynetdicom's lines name the peer's address (taken from the association thread), so a
  condensed error still says where it came from.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}
EXCEPTION_TEXT_LIMIT = 200


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with every character that could break or forge a log line escaped."""
    return _UNSAFE.sub(_escape_one, text)


def _current_peer() -> str:
    """The remote address of the DICOM association this thread works for, if any."""
    thread = threading.current_thread()
    assoc: Any = getattr(thread, "assoc", None) or thread  # DUL thread, or the association
    try:
        remote = assoc.requestor if assoc.is_acceptor else assoc.acceptor
        return str(remote.address_info.address)
    except Exception:
        return ""


class OneLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = escape(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            detail = escape(str(exc))[:EXCEPTION_TEXT_LIMIT]
            message += f" [{type(exc).__name__}{': ' + detail if detail else ''}]"
        if record.name.startswith("pynetdicom"):
            peer = _current_peer()
            if peer:
                message += f" (peer {peer})"
        record.message = message
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        return self.formatMessage(record)
