"""Stage `vl-ingest`: store the image-text tasks of `vl.tasks` (ImageFolder trees or a dataset's extracted
visual frames) as arrays under vl.tasks_dir/<task>; unreadable images are skipped and listed.

    python -m stages.vl_ingest [--task shapes_seen] [--params params.yaml]     # default: every task
"""
from __future__ import annotations

import sys

from mmrobust import cli
from mmrobust.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__.splitlines()[0], dataset=False, prog="python -m stages.vl_ingest")
    ap.add_argument("--task", help="one task of vl.tasks (default: all)")
    args = ap.parse_args(argv)
    try:
        params = cli.load(args)
        if args.task is not None and args.task not in params.vl.tasks:
            raise ConfigError(f"--task: no task {args.task!r} in vl.tasks (have {sorted(params.vl.tasks)})")
    except ConfigError as err:
        return cli.fail("vl-ingest", err)
    from mmrobust.vl.data import ingest_task

    for task in [args.task] if args.task else list(params.vl.tasks):
        try:
            out, counts, skipped = ingest_task(params, task)
        except (FileNotFoundError, ValueError) as err:
            return cli.fail(f"vl-ingest {task}", err)
        print(f"vl-ingest {task}: {counts} images -> {out}/" +
              (f"; skipped {len(skipped)} (see {out}/skipped.csv), e.g. {skipped[0][0]}: {skipped[0][1]}"
               if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
