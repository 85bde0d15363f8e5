"""Stage `vl-evaluate`: zero-shot clean and robust accuracy of every vision-language method on the tuning task
and the zero-shot tasks; writes <vl.evaluate.out_dir>/{zero_shot.md, results.json} and logs each method's
numbers and the table to its MLflow training run.

    python -m stages.vl_evaluate [--params params.yaml]
"""
from __future__ import annotations

import sys

from mmrobust import cli
from mmrobust.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__.splitlines()[0], dataset=False, prog="python -m stages.vl_evaluate").parse_args(argv)
    try:
        params = cli.load(args)
    except ConfigError as err:
        return cli.fail("vl-evaluate", err)
    from mmrobust.vl.evaluate import run_evaluation

    try:
        run_evaluation(params)
    except FileNotFoundError as err:
        return cli.fail("vl-evaluate", err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
