"""DVC stage `plan`: write plan/<model>.yaml, the method params group of every model (see mmrobust/plan.py)."""
from __future__ import annotations

import sys

from mmrobust import cli
from mmrobust.config import ConfigError
from mmrobust.plan import write_plans


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__, dataset=False)
    ap.add_argument("--out", default="plan")
    args = ap.parse_args(argv)
    try:
        written = write_plans(cli.load(args), args.out)
    except ConfigError as err:
        return cli.fail("plan", err)
    print(f"plan: method params of {len(written)} models -> {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
