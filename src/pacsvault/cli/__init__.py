"""The ``pacsvault`` command line: one sub-module per command group."""
