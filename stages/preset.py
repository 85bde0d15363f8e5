"""Write a complete params.yaml from a preset (configs/*.yaml list only what differs from the defaults, but
DVC reads every value it interpolates in dvc.yaml from params.yaml itself).

    python -m stages.preset configs/paper-ks.yaml [--out params.yaml]
    python -m stages.preset configs/full.yaml --base params.yaml   # the preset merged over a params file
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mmrobust import cli
from mmrobust.config import ConfigError, deep_merge, load_params, parse_params, read_yaml
from mmrobust.io import atomic_file


def expand(preset: str | Path, base: str | Path | None = None) -> str:
    """The preset with every default filled in, as params.yaml text (its leading comment kept on top); `base`: a
    params file the preset is deep-merged over (its `models` are added to the base's, and so on)."""
    preset = Path(preset)
    if base is None:
        params = load_params(preset)
    else:
        raw = deep_merge(read_yaml(base), read_yaml(preset))
        params = parse_params(raw, f"{preset} over {base}")
    header = []
    for line in preset.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    over = f" over {base}" if base is not None else ""
    header.append(f"# Complete params written from {preset}{over} by `python -m stages.preset` (defaults filled in).")
    body = yaml.safe_dump(params.as_file_dict(), sort_keys=False, width=120)
    return "\n".join(header) + "\n" + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.preset", description=__doc__.splitlines()[0])
    ap.add_argument("preset", help="a preset file, e.g. configs/paper-ks.yaml")
    ap.add_argument("--out", default="params.yaml")
    ap.add_argument("--base", help="a params file the preset is merged over (default: the built-in defaults)")
    args = ap.parse_args(argv)
    try:
        text = expand(args.preset, args.base)
    except (ConfigError, FileNotFoundError) as err:
        return cli.fail("preset", err)
    with atomic_file(args.out) as fh:
        fh.write(text)
    print(f"preset: {args.preset} -> {args.out} (complete; `dvc repro` reads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
