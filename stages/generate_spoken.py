"""Stage `generate-spoken@<set>`: write one real-content set (spoken digit names + handwritten digits, Kinetics-Sounds
layout) from the `spoken` group of params.yaml.

    python -m stages.generate_spoken --set <id of spoken.sets> [--params params.yaml]

Exit status 2 on a bad params file or an unknown set (message on stderr).
"""
from __future__ import annotations

import sys

from mmrobust import cli
from mmrobust.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__.splitlines()[0], dataset=False, prog="python -m stages.generate_spoken")
    ap.add_argument("--set", required=True, help="an id of spoken.sets")
    args = ap.parse_args(argv)
    try:
        cfg = cli.load(args).spoken
        if args.set not in cfg.sets:
            raise ConfigError(f"spoken.sets.{args.set}: no such set; configured: {sorted(cfg.sets) or 'none'}")
    except ConfigError as err:
        return cli.fail("generate-spoken", err)
    from mmrobust.data.spoken import generate

    s = generate(cfg, args.set)
    print(f"generate-spoken: {s['classes']} classes, {s['train']} train + {s['test']} test clips in {s['out_dir']}/ "
          f"(videos/, train.txt, test.txt, classes.txt, meta.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
