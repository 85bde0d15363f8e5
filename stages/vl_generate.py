"""Stage `vl-generate`: the embedded ImageFolder tree of the vision-language family (4 shapes x 4 colours).

    python -m stages.vl_generate [--params params.yaml]
"""
from __future__ import annotations

import sys

from mmrobust import cli
from mmrobust.config import ConfigError


def main(argv: list[str] | None = None) -> int:
    args = cli.parser(__doc__.splitlines()[0], dataset=False, prog="python -m stages.vl_generate").parse_args(argv)
    try:
        cfg = cli.load(args).vl.shapes
    except ConfigError as err:
        return cli.fail("vl-generate", err)
    from mmrobust.vl.data import render_shapes

    counts = render_shapes(cfg, cfg.out_dir)
    print(f"vl-generate: {len(counts) // 2} classes, {sum(counts.values())} images in {cfg.out_dir}/"
          f"{{train,test}}/<class>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
