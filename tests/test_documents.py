"""The shared document model: values stay values in Markdown and HTML; the PDF holds the text."""

from __future__ import annotations

import io

import pypdf

from pacsvault.documents import Document, Fields, Heading, Paragraph, Table


def _doc() -> Document:
    return Document(
        title="Notification draft", lang="fr", subtitle="brouillon",
        blocks=(Heading("Nature"), Paragraph("Confidentialité # *pas* <b>html</b>"),
                Fields((("Heure", "2026-12-05 10:00"), ("Mesures", "a\nb"))),
                Table(("Catégorie", "Nombre"), (("patients", "3"), ("pipe | here", "1")))))


def test_markdown_escapes_values() -> None:
    text = _doc().to_markdown()
    assert text.startswith("# Notification draft\n")
    assert "\\# \\*pas\\* \\<b\\>html\\</b\\>" in text
    assert "| pipe \\| here | 1 |" in text
    assert "- **Heure**: 2026\\-12\\-05 10:00" in text


def test_html_escapes_values() -> None:
    page = _doc().to_html()
    assert "<b>html</b>" not in page and "&lt;b&gt;html&lt;/b&gt;" in page
    assert '<html lang="fr">' in page


def test_pdf_contains_the_text() -> None:
    pdf = _doc().to_pdf()
    assert pdf.startswith(b"%PDF-")
    text = "".join(page.extract_text() for page in pypdf.PdfReader(io.BytesIO(pdf)).pages)
    assert "Notification draft" in text and "Confidentialité" in text and "patients" in text
