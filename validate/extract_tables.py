"""Regenerate the measured expert-time tables in ``moesim/perf/tables`` from a measurement folder.

Usage: ``python validate/extract_tables.py [MEASUREMENT_DIR] [--out DIR] [--check]``

MEASUREMENT_DIR defaults to ``validate/measurements/external/h100-sxm``. ``--check`` writes nothing
and exits 1 when a committed table differs from what the data gives (useful in CI).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moesim.hardware.fit import TABLE_FILES, render_table, table_dir, write_tables


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` compare) the GPU and CPU expert tables; returns the exit code."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("measurements", nargs="?", default=None, help="measurement folder")
    ap.add_argument("--out", default=None, help="output folder (default moesim/perf/tables)")
    ap.add_argument("--check", action="store_true", help="compare with the committed tables only")
    args = ap.parse_args(argv)
    if args.check:
        out = Path(args.out) if args.out else table_dir()
        stale = [
            name
            for name, build in TABLE_FILES.items()
            if not (out / name).is_file()
            or (out / name).read_text(encoding="utf-8") != render_table(build(args.measurements))
        ]
        for name in stale:
            print(f"stale: {out / name}")
        return 1 if stale else 0
    for path in write_tables(args.measurements, args.out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
