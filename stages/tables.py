"""DVC stage `tables`: combine the evaluations of every dataset into <evaluate.out_dir>/tables/T1 (a column group
per dataset, the paper's layout) and <evaluate.out_dir>/README.md (links to each dataset's tables and figures)."""
from __future__ import annotations

import sys
from pathlib import Path

from mmrobust import cli
from mmrobust.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__, dataset=False).parse_args(argv)
    try:
        params = cli.load(args)
    except ConfigError as err:
        return cli.fail("tables", err)
    from mmrobust.tables import write_across_datasets

    out = Path(params.evaluate.out_dir)
    folders = {name: Path(params.for_dataset(name).evaluate.out_dir) for name in params.datasets}
    ids = params.evaluate.models if params.evaluate.models is not None else list(params.all_models)
    try:
        readme = write_across_datasets(folders, out, params.evaluate.joint_eps,
                                       {m: params.all_models[m].method for m in ids if m in params.all_models})
    except FileNotFoundError as err:
        return cli.fail("tables", err)
    print(f"tables: T1 over {len(folders)} dataset(s) -> {out / 'tables' / 'T1.md'}; index: {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
