"""Sealed mode: keep receiving images while the master key is unavailable.

A power cut at 7 am must not stop the X-ray unit at 8, before anyone has typed the
passphrase or put the key medium back. What ``serve`` needs then is made at every normal
open (``material``): an X25519 key pair for HPKE (the private half wrapped by the master
key), a signed snapshot of the node registry, and a copy of the listener TLS keys under a
boot secret kept beside the key file. While sealed (``runtime``), each received object is
encrypted under a new data key sealed to the public key and its index rows wait in an
HPKE-encrypted journal (``journal``); reads and queries are refused. ``pacsvault unseal``
or the ``/unseal`` page brings the master key; ``merge`` commits the journals through the
archive's normal path and the listeners switch to normal service without a restart.
"""
