"""De-identified exports (issue 19): PS3.15 Annex E with explicit options, consistent
pseudonyms per export project, refusal of burned-in text unless confirmed.

``options`` names the profiles, ``engine`` de-identifies one dataset in memory (deid
recipes in ``recipes/``, then a check walk), ``export`` runs a whole export into a sink.
"""
