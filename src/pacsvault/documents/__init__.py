"""Documents a DPO hands over: one small model rendered as Markdown, HTML and PDF.

Why one model: the breach notification draft, the letter to patients, the register export
(issue 18), the record of processing (issue 19) and the audit exports (issue 20) must read
the same in Markdown (kept, diffed, pasted into the regulator's form) and in PDF (printed,
signed, sent). Writing each twice would let them drift. PDF comes from HTML through
WeasyPrint (a well-kept library, no PDF written by hand); nothing here touches disk: the
caller decides where bytes go (and never writes patient lists in clear).
"""

from __future__ import annotations

from pacsvault.documents.model import Block, Document, Fields, Heading, Paragraph, Table

__all__ = ["Block", "Document", "Fields", "Heading", "Paragraph", "Table"]
