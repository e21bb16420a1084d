"""Modules a serving process is made to import but never uses, loaded on first use only.

Why (issue 17, peak memory of the serving processes during ingest): every ``serve``
process (each worker of ``serve --workers N``) imports pydicom, and pydicom 3 imports, at
its own start, its test-data downloader (``pydicom.data.download``), which imports
``requests`` (with urllib3, charset_normalizer, idna, http.cookiejar) and ``tqdm``: ~15 MB
of resident memory per process, for files the server never downloads. The downloader only
asks whether they import (``try: import requests``), so each is given a placeholder in
``sys.modules`` instead: the ``import`` succeeds, and the first attribute read loads the
real module (then every later read is the real module's), so a caller that does use them
works as before. Installed by ``cli/main`` before the ``serve`` command is imported, never
when a module is already imported (then it is the real one, and stays so).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

# Imported by pydicom at start, used by no serving code path (tests/test_deferred.py
# checks a started server has not loaded them).
SERVER_UNUSED = ("requests", "tqdm")

_LOCK = threading.RLock()


class _Placeholder(types.ModuleType):
    """Stands for a module not loaded yet; ``__getattr__`` (for names its own dict lacks:
    everything but the import system's ``__spec__``/``__name__``) loads it."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_load(self), name)


def _load(placeholder: _Placeholder) -> types.ModuleType:
    name = placeholder.__name__
    with _LOCK:
        if sys.modules.get(name) is placeholder:
            del sys.modules[name]
        real = importlib.import_module(name)
        # later reads find the real module's names in the placeholder's own dict
        placeholder.__dict__.update(real.__dict__)
    return real


def install(names: tuple[str, ...] = SERVER_UNUSED) -> list[str]:
    """Put a placeholder in ``sys.modules`` for each module of ``names`` not imported yet
    and installed (a missing module stays missing: ``import`` still raises). Returns the
    names given a placeholder."""
    done: list[str] = []
    with _LOCK:
        for name in names:
            if name in sys.modules:
                continue
            spec = importlib.util.find_spec(name)
            if spec is None:
                continue
            placeholder = _Placeholder(name)
            placeholder.__spec__ = spec
            placeholder.__loader__ = spec.loader
            sys.modules[name] = placeholder
            done.append(name)
    return done


def loaded(name: str) -> bool:
    """Whether ``name`` is imported for real (not a placeholder still)."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, _Placeholder)
