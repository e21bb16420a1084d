"""``pacsvault migrate``: move a vault between the embedded backends (SQLCipher index,
local object files) and the scale-out ones (PostgreSQL index, S3 bucket), either way.

A workflow over a whole vault (the import layer of ``backup`` and ``sealed``): ``run``
drives it (objects, index rows, verification, switch; docs/migration.md),
``objects`` copies the ciphertext as it is, ``rows`` the index through the column types,
``state`` keeps the progress for a resumed run, ``switch`` rewrites the settings file,
``targets`` reads the command line's target, ``progress`` draws the bars.
"""

from pacsvault.migrate.run import MigrationError, Options, Summary, migrate
from pacsvault.migrate.targets import Target, TargetError, choose

__all__ = ["MigrationError", "Options", "Summary", "Target", "TargetError", "choose",
           "migrate"]
