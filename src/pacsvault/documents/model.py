"""A document as headings, paragraphs, field lists and tables; rendered three ways.

The model is deliberately poor (no inline markup): every value is escaped for the output
it goes to, so a study description or a user-typed circumstance can never inject Markdown
structure or HTML into a document that will be printed and sent.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

_CSS = """
@page { size: A4; margin: 18mm 16mm; @bottom-right { content: counter(page) " / " counter(pages);
        font-size: 8pt; color: #555; } }
body { font-family: "DejaVu Sans", sans-serif; font-size: 10pt; line-height: 1.35; color: #111; }
h1 { font-size: 16pt; margin: 0 0 6mm; } h2 { font-size: 12.5pt; margin: 6mm 0 2mm; }
h3 { font-size: 11pt; margin: 4mm 0 1.5mm; }
table { border-collapse: collapse; width: 100%; margin: 2mm 0 4mm; }
th, td { border: 0.4pt solid #999; padding: 1.2mm 1.8mm; text-align: left; vertical-align: top; }
th { background: #eee; } dl { margin: 0 0 3mm; } dt { font-weight: bold; margin-top: 1.5mm; }
dd { margin: 0 0 0 6mm; white-space: pre-wrap; } .subtitle { color: #444; margin-bottom: 5mm; }
"""


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2  # 1 is the title (Document.title); sections start at 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Fields:
    """Label / value pairs (a form's items, in the form's order)."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


Block = Heading | Paragraph | Fields | Table


def _md(text: str) -> str:
    """Escape Markdown's structural characters so a value stays a value."""
    out = []
    for ch in text:
        if ch in "\\`*_{}[]<>()#+-.!|":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


def _md_cell(text: str) -> str:
    return _md(text).replace("\n", " ")


@dataclass(frozen=True)
class Document:
    title: str
    lang: str = "en"
    subtitle: str = ""
    blocks: tuple[Block, ...] = field(default_factory=tuple)

    def to_markdown(self) -> str:
        lines = [f"# {_md(self.title)}", ""]
        if self.subtitle:
            lines += [f"*{_md(self.subtitle)}*", ""]
        for block in self.blocks:
            if isinstance(block, Heading):
                lines += [f"{'#' * max(2, min(block.level, 6))} {_md(block.text)}", ""]
            elif isinstance(block, Paragraph):
                lines += [_md(block.text), ""]
            elif isinstance(block, Fields):
                for label, value in block.items:
                    value_lines = (value or "—").splitlines() or ["—"]
                    lines.append(f"- **{_md(label)}**: {_md(value_lines[0])}")
                    lines += [f"  {_md(extra)}" for extra in value_lines[1:]]
                lines.append("")
            else:
                lines.append("| " + " | ".join(_md_cell(h) for h in block.header) + " |")
                lines.append("|" + "---|" * len(block.header))
                for row in block.rows:
                    lines.append("| " + " | ".join(_md_cell(c) for c in row) + " |")
                lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def to_html(self) -> str:
        esc = html.escape
        parts = [f'<!doctype html><html lang="{esc(self.lang)}"><head><meta charset="utf-8">',
                 f"<title>{esc(self.title)}</title><style>{_CSS}</style></head><body>",
                 f"<h1>{esc(self.title)}</h1>"]
        if self.subtitle:
            parts.append(f'<p class="subtitle">{esc(self.subtitle)}</p>')
        for block in self.blocks:
            if isinstance(block, Heading):
                level = max(2, min(block.level, 6))
                parts.append(f"<h{level}>{esc(block.text)}</h{level}>")
            elif isinstance(block, Paragraph):
                parts.append(f"<p>{esc(block.text)}</p>")
            elif isinstance(block, Fields):
                parts.append("<dl>" + "".join(
                    f"<dt>{esc(label)}</dt><dd>{esc(value or '—')}</dd>"
                    for label, value in block.items) + "</dl>")
            else:
                head = "".join(f"<th>{esc(h)}</th>" for h in block.header)
                body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>"
                               for row in block.rows)
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        parts.append("</body></html>")
        return "".join(parts)

    def to_pdf(self) -> bytes:
        """PDF bytes in memory (WeasyPrint; imported here: it is slow to import)."""
        import weasyprint

        pdf = weasyprint.HTML(string=self.to_html()).write_pdf()
        assert pdf is not None
        return bytes(pdf)
