"""Stage `generate`: write the synthetic audio-visual dataset (Kinetics-Sounds layout) from params.yaml.

    python -m stages.generate [--params params.yaml]

Exit status 2 on a bad params file (message on stderr).
"""
from __future__ import annotations

import sys

from mmrobust import cli
from mmrobust.config import ConfigError
from mmrobust.data.synthetic import generate


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__.splitlines()[0], dataset=False, prog="python -m stages.generate").parse_args(argv)
    try:
        cfg = cli.load(args).generate
    except ConfigError as err:
        return cli.fail("generate", err)
    s = generate(cfg)
    print(f"generate: {s['classes']} classes, {s['train']} train + {s['test']} test clips in {s['out_dir']}/ "
          f"(videos/, train.txt, test.txt, classes.txt, meta.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
