"""The prologue every stage and pipeline CLI shares: `--params` (and `--dataset`), loading and validating the
params, and one way of failing on bad input (the message on stderr, exit status 2)."""
from __future__ import annotations

import argparse
import sys

from mmrobust.config import Params, load_params


def parser(doc: str | None, dataset: bool = True, prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    if dataset:
        ap.add_argument("--dataset", help="an id of `datasets` (default: the only one)")
    return ap


def load(args: argparse.Namespace) -> Params:
    """The params file of `args`, resolved for `args.dataset` when the CLI has that option."""
    params = load_params(args.params)
    return params.for_dataset(args.dataset) if hasattr(args, "dataset") else params


def fail(name: str, err: Exception) -> int:
    print(f"{name}: error: {err}", file=sys.stderr)
    return 2
