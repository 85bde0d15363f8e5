"""Stage `ingest@<dataset>`: validate one dataset's layout (`datasets.<id>`, `data`) and write its clip manifest.

    python -m stages.ingest [--dataset ID] [--params params.yaml]

Exit status 2 on a bad params file or a layout that cannot be ingested (message on stderr).
"""
from __future__ import annotations

import sys
from pathlib import Path

from mmrobust import cli
from mmrobust.config import ConfigError
from mmrobust.data.ingest import IngestError, ingest
from mmrobust.io import read_csv

SHOW_REJECTED = 5


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__.splitlines()[0], prog="python -m stages.ingest").parse_args(argv)
    try:
        cfg = cli.load(args).data
        summary = ingest(cfg)
    except (ConfigError, IngestError) as err:
        return cli.fail("ingest", err)
    out = Path(cfg.out_dir)
    counts = ", ".join(f"{k} {v}" for k, v in summary["counts"].items())
    print(f"ingest: {summary['dataset']} at {summary['root']}: {summary['num_classes']} classes; {counts}; "
          f"{summary['rejected']} rejected")
    print(f"ingest: manifest in {out}/ (clips.csv, classes.csv, rejected.csv, summary.json)")
    for r in read_csv(out / "rejected.csv")[:SHOW_REJECTED]:
        print(f"  rejected {r['source']}:{r['line']}: {r['reason']}")
    if summary["rejected"] > SHOW_REJECTED:
        print(f"  ... {summary['rejected'] - SHOW_REJECTED} more in {out / 'rejected.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
