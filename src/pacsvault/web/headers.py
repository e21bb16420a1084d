"""HTTP header values: quoted-string aware splitting, ``type; name=value`` parameters, and
the one parser of q-value lists (``Accept`` for DICOMweb in ``multipart``,
``Accept-Language`` for the pages in ``i18n``).

Lenient on purpose: a malformed item or parameter is skipped or read as "not acceptable"
(q=0), never an error, since a browser's header must not break a page.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def split_unquoted(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes (quoted-pairs honoured)."""
    out: list[str] = []
    buf: list[str] = []
    quoted = escaped = False
    for ch in text:
        if escaped:
            buf.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            buf.append(ch)
            escaped = True
        elif ch == '"':
            buf.append(ch)
            quoted = not quoted
        elif ch == sep and not quoted:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf))
    return out


def unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    return value


def parse_media_type(value: str) -> tuple[str, dict[str, str]]:
    """``'multipart/related; type="application/dicom"'`` -> (type, {param: value}).

    The first item is lower-cased, so are parameter names; values are unquoted as given.
    """
    pieces = split_unquoted(value, ";")
    mime = pieces[0].strip().lower()
    params: dict[str, str] = {}
    for piece in pieces[1:]:
        name, sep, raw = piece.partition("=")
        if sep:
            params[name.strip().lower()] = unquote(raw)
    return mime, params


def quality(text: str) -> float:
    """A q-value: a number clamped to [0, 1]; anything else is 0 (not acceptable)."""
    try:
        return max(0.0, min(1.0, float(text)))
    except ValueError:
        return 0.0


@dataclass(frozen=True)
class Weighted:
    """One item of a q-value list: its value (lower-cased), other parameters, its q."""

    value: str
    params: dict[str, str] = field(default_factory=dict)
    q: float = 1.0


def weighted(header: str, limit: int | None = None) -> list[Weighted]:
    """The items of a q-value list header, best first: q descending, the header's order
    breaking ties; empty items and q=0 (refused) are left out. Only the first ``limit``
    items are read when a limit is given (a header is the client's, its length too)."""
    items = split_unquoted(header, ",")
    if limit is not None:
        items = items[:limit]
    ranked: list[tuple[float, int, Weighted]] = []
    for position, item in enumerate(items):
        if not item.strip():
            continue
        value, params = parse_media_type(item)
        q = quality(params.pop("q")) if "q" in params else 1.0
        if q <= 0:
            continue
        ranked.append((-q, position, Weighted(value, params, q)))
    return [w for _, _, w in sorted(ranked, key=lambda t: (t[0], t[1]))]
