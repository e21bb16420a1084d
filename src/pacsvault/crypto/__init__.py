"""Key hierarchy, authenticated object format and TLS material.

Everything secret at rest goes through this package, so that the rest of the code never
handles a raw key or chooses an algorithm.
"""
