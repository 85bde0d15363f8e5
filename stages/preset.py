"""Write a complete params.yaml from a preset (configs/*.yaml list only what differs from the defaults, but
DVC reads every value it interpolates in dvc.yaml from params.yaml itself).

    python -m stages.preset configs/paper-ks.yaml [--out params.yaml]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from mmrobust import cli
from mmrobust.config import ConfigError, load_params
from mmrobust.io import atomic_file


def expand(preset: str | Path) -> str:
    """The preset with every default filled in, as params.yaml text (its leading comment kept on top)."""
    preset = Path(preset)
    params = load_params(preset)
    header = []
    for line in preset.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    header.append(f"# Complete params written from {preset} by `python -m stages.preset` (defaults filled in).")
    body = yaml.safe_dump(params.as_file_dict(), sort_keys=False, width=120)
    return "\n".join(header) + "\n" + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.preset", description=__doc__.splitlines()[0])
    ap.add_argument("preset", help="a preset file, e.g. configs/paper-ks.yaml")
    ap.add_argument("--out", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        text = expand(args.preset)
    except (ConfigError, FileNotFoundError) as err:
        return cli.fail("preset", err)
    with atomic_file(args.out) as fh:
        fh.write(text)
    print(f"preset: {args.preset} -> {args.out} (complete; `dvc repro` reads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
