"""Setting values in the commented settings file, keeping everything else as written.

``init`` writes ``pacsvault.toml`` once, every setting present and explained by comments:
the file is how the practice's IT provider reads what the server does. When a command
then sets a few values (``init --alert-email``, ``alerts`` set-up, ``init --storage-url``),
re-serialising the parsed TOML would lose those comments. So the lines are edited in place:
only the named settings' lines in one section change, their value replaced and an inline
comment kept; comment lines, other sections, blank lines and order are untouched.

The settings file is ours (rendered by ``config.render``): one ``name = value`` per line
for the values set here. A multi-line value (an array spread over lines) is not edited
here: its first line would be replaced and the rest left dangling, so such settings are
set by other means.
"""

from __future__ import annotations

from collections.abc import Mapping

TomlValue = str | int | float | bool | list[str]


def toml_value(value: TomlValue) -> str:
    """``value`` as a TOML literal (a basic string escaped, a list of strings inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment_start(line: str) -> int:
    """Where a line's ``#`` comment starts, outside strings (-1: none). Basic strings
    know backslash escapes; literal ('...') strings do not."""
    quote = ""
    escaped = False
    for i, ch in enumerate(line):
        if quote == '"':
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quote = ""
        elif quote == "'":
            if ch == "'":
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            return i
    return -1


def set_in_section(text: str, section: str, values: Mapping[str, TomlValue]) -> str:
    """The settings file ``text`` with ``values`` set in its ``[section]`` (each setting's
    existing line rewritten: indentation and inline comment kept). Every name must have a
    line there (a commented-out ``# name = ...`` does not count): a ``ValueError`` naming
    the missing ones otherwise, and nothing is half-written (a new string is returned)."""
    pending = {name: toml_value(v) for name, v in values.items()}
    out: list[str] = []
    current = ""
    for line in text.splitlines():
        cut = _comment_start(line)
        code = (line if cut < 0 else line[:cut]).strip()
        if code.startswith("[") and code.endswith("]"):
            current = code[1:-1].strip()  # "[[backup.targets]]" -> "[backup.targets]": no match
        name, equals, _ = code.partition("=")
        name = name.strip()
        if current == section and equals and name in pending:
            indent = line[:len(line) - len(line.lstrip())]
            comment = line[cut:] if cut >= 0 else ""
            line = f"{indent}{name} = {pending.pop(name)}" + (f"  {comment}" if comment
                                                               else "")
        out.append(line)
    if pending:
        raise ValueError(f"the settings file lacks [{section}] " + ", ".join(sorted(pending)))
    return "\n".join(out) + "\n"
