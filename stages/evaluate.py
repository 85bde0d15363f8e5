"""DVC stage `evaluate@<dataset>`: evaluate every trained model of one dataset under every attack; write its
tables, figures and metrics under <evaluate.out_dir>/datasets/<dataset>/ (the `tables` stage combines datasets)."""
from __future__ import annotations

import argparse
import sys

from mmrobust.config import ConfigError, load_params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--dataset", help="an id of `datasets` (default: the only one)")
    ap.add_argument("--models-dir", default=None, help="default: <train.out_dir>/<dataset>")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params).for_dataset(args.dataset)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from mmrobust.evaluation import evaluate_all

    try:
        evaluate_all(params, args.models_dir or params.train.out_dir,
                     cache_dir=f".cache/eval/{params.dataset_id}")
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
