"""``python -m bench compare [--small] [--out DIR]`` and the older ``ingest``/``query`` benches."""

from __future__ import annotations

import sys

USAGE = """usage: python -m bench {compare,ingest,query} [options]

  compare   pacsvault vs Orthanc, same machine, same run (see bench/README.md)
  ingest    C-STORE ingest, pacsvault vs dcmtk storescp (bench/ingest.py)
  query     C-FIND over a 10,000-study index (bench/query.py)
"""


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "compare":
        from bench.compare.run import main as compare_main

        return compare_main(rest)
    if cmd in ("ingest", "query"):
        if cmd == "ingest":
            from bench.ingest import main as ingest_main

            return ingest_main(rest)
        from bench.query import main as query_main

        return query_main(rest)
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
