"""DVC stage `evaluate@<dataset>`: evaluate every trained model of one dataset under every attack; write its
tables, figures and metrics under <evaluate.out_dir>/datasets/<dataset>/ (the `tables` stage combines datasets)."""
from __future__ import annotations

import sys

from mmrobust import cli
from mmrobust.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--models-dir", default=None, help="default: <train.out_dir>/<dataset>")
    args = ap.parse_args(argv)
    try:
        params = cli.load(args)
    except ConfigError as err:
        return cli.fail("evaluate", err)
    from mmrobust.evaluation import evaluate_all
    from mmrobust.checkpoint import CheckpointError

    try:
        evaluate_all(params, args.models_dir or params.train.out_dir,
                     cache_dir=f".cache/eval/{params.dataset_id}")
    except (FileNotFoundError, CheckpointError) as err:
        return cli.fail("evaluate", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
