"""The encrypted index: patients, studies, series, instances, nodes, data keys, events.

One SQLCipher database, encrypted as a whole, reached only through SQLAlchemy so a
PostgreSQL backend can replace it without rewriting queries.
"""
