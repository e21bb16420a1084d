"""User accounts for remote access: passwords, second factor, throttling, API tokens.

``models`` (tables in the index database), ``passwords`` (CNIL 2022 acceptance, Argon2id),
``totp`` (RFC 6238 with replay refusal, recovery codes), ``throttle`` (delays and locks per
account and per address, with their events), ``tokens`` (``pv_<id>_<secret>`` bearer
tokens) and ``service.Accounts``, which ties them together for the CLI and the web layer:
it is assembled from ``users`` (administration), ``signin`` (the sign-in state machine) and
``token_service`` (API tokens) over ``core`` (what they share).
"""
