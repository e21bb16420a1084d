"""Encrypted backups with restic: point-in-time snapshots of a live vault, a separate
keystore snapshot so crypto-shredding reaches every backup, and restore onto a new
machine with only the repository location, its credentials and the recovery code."""
