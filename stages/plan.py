"""DVC stage `plan`: write plan/<model>.yaml, the method params group of every model (see mmrobust/plan.py)."""
from __future__ import annotations

import argparse
import sys

from mmrobust.config import ConfigError, load_params
from mmrobust.plan import write_plans


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="plan")
    args = ap.parse_args(argv)
    try:
        written = write_plans(load_params(args.params), args.out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"plan: method params of {len(written)} models -> {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
