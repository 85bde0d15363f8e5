"""DVC stage `extract-frames@<dataset>-<modality>` / `extract-audio@...`: extract one modality (visual | audio |
flow | diff) for every clip of one dataset's manifest. A modality the dataset does not use (its overrides drop it,
e.g. audio for UCF101) leaves only `skipped.json` saying so."""
from __future__ import annotations

import sys
from pathlib import Path

from mmrobust import cli
from mmrobust.config import ConfigError
from mmrobust.data.extract import MODALITIES, ExtractError, extract
from mmrobust.io import atomic_dir, write_json


def skip(params, modality: str):
    """The stage's output for a modality the dataset leaves out: one file that says so (and why)."""
    out = Path(params.extract.out_dir) / modality
    with atomic_dir(out) as tmp:
        write_json(tmp / "skipped.json", {"dataset": params.dataset_id, "modality": modality,
                                          "reason": f"not in the dataset's modalities {params.extract.modalities}"})
    return out / "skipped.json"


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser(__doc__)
    ap.add_argument("--modality", required=True, choices=MODALITIES)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        params = cli.load(args)
        if args.modality not in params.extract.modalities:
            out = skip(params, args.modality)
            print(f"extract {args.modality}: dataset {params.dataset_id} does not use it "
                  f"(modalities {params.extract.modalities}); wrote {out}")
            return 0
        s = extract(args.modality, params.extract, params.data.out_dir, progress=not args.no_progress)
    except (ConfigError, ExtractError) as err:
        return cli.fail("extract", err)
    print(f"extract {s['modality']}: {s['extracted']}/{s['clips']} clips in {s['seconds']:.1f} s "
          f"({s['clips_per_s']:.1f} clips/s), {s['rejected']} rejected ({s['algorithm']}) -> {s['out_dir']}")
    if s["rejected"]:
        print(f"  rejected clips and reasons: {s['out_dir']}/rejected.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
