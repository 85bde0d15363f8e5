"""DVC stage: extract one modality (visual | audio | flow | diff) for every clip of the manifest."""
from __future__ import annotations

import argparse
import sys

from mmrobust.config import ConfigError, load_params
from mmrobust.data.extract import MODALITIES, ExtractError, extract


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--modality", required=True, choices=MODALITIES)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params)
        s = extract(args.modality, params.extract, params.data.out_dir, progress=not args.no_progress)
    except (ConfigError, ExtractError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"extract {s['modality']}: {s['extracted']}/{s['clips']} clips in {s['seconds']:.1f} s "
          f"({s['clips_per_s']:.1f} clips/s), {s['rejected']} rejected ({s['algorithm']}) -> {s['out_dir']}")
    if s["rejected"]:
        print(f"  rejected clips and reasons: {s['out_dir']}/rejected.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
