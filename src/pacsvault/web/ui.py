"""The former home of the sign-in, account and user-administration pages (issue 15 split it).

Where things are now:

* ``kit``: the page toolkit every page module imports (``PageRole``, ``page``,
  ``redirect``, ``safe_next``, the app's shared objects);
* ``signin``: ``/login`` and its steps, ``/logout``, the language switch, static files;
* ``account``: ``/account`` and its forms;
* ``admin_users``: ``/admin/users`` and its forms;
* ``admin_api``: ``/health`` and ``/admin/openapi.json``;
* ``audit.tail``: the trail-tail reader (``tail_records``).

Only ``safe_next`` is still importable from here, for code written against the old name.
"""

from __future__ import annotations

from pacsvault.web.kit import safe_next

__all__ = ["safe_next"]
