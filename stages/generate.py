"""Stage `generate`: write the synthetic audio-visual dataset (Kinetics-Sounds layout) from params.yaml.

    python -m stages.generate [--params params.yaml]

Exit status 2 on a bad params file (message on stderr).
"""
from __future__ import annotations

import argparse
import sys

from mmrobust.config import ConfigError, load_params
from mmrobust.data.synthetic import generate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.generate", description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = ap.parse_args(argv)
    try:
        cfg = load_params(args.params).generate
    except ConfigError as err:
        print(f"generate: error: {err}", file=sys.stderr)
        return 2
    s = generate(cfg)
    print(f"generate: {s['classes']} classes, {s['train']} train + {s['test']} test clips in {s['out_dir']}/ "
          f"(videos/, train.txt, test.txt, classes.txt, meta.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
