"""Look at the MLflow UI as a user would: serve the store, open the runs page, the logged models and the
comparison of two runs in headless Chromium, and save screenshots (and the rendered text, checked for what
each page must show).

    python scripts/mlflow_screenshots.py [--store sqlite:///mlflow.db] [--out results/screenshots]
    make screenshots

Needs Chromium (`apt-get install chromium`). Compares the first two finished training runs of the experiment
(a JT and a CRMT run when there are both), so run it after `make reproduce`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmrobust import tracking  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def browser() -> str:
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    raise SystemExit(f"no headless browser found ({', '.join(BROWSERS)}): apt-get install chromium")


def chromium(url: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no state from an earlier look
        cmd = [browser(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--window-size=2200,1300", "--virtual-time-budget=15000", f"--user-data-dir={profile}", *args, url]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def pages(c, experiment: str) -> dict[str, tuple[str, list[str]]]:
    """{name: (UI fragment, texts the page must show)} for the runs list, the models and a 2-run comparison."""
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"no experiment {experiment!r} in this store (run `make reproduce` first)")
    runs = [r for r in c.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'", max_results=500)
            if "method" in r.data.tags and not r.data.tags.get("model_id", "").startswith("pretrain_")]
    if len(runs) < 2:
        raise SystemExit(f"experiment {experiment!r} has {len(runs)} finished training runs; 2 are needed")
    crmt = [r for r in runs if r.data.tags["method"].startswith("crmt")]
    others = [r for r in runs if not r.data.tags["method"].startswith("crmt")]
    pair = [others[0], crmt[0]] if crmt and others else runs[:2]
    names = [r.info.run_name for r in pair]
    ids = urllib.parse.quote(json.dumps([r.info.run_id for r in pair]))
    exps = urllib.parse.quote(json.dumps([exp.experiment_id]))
    ml = "workflowType=machine_learning"  # the UI's model-training navigation, not its GenAI one
    return {"runs": (f"#/experiments/{exp.experiment_id}/runs?{ml}", names),
            "models": (f"#/experiments/{exp.experiment_id}/models?{ml}",  # logged under the model id
                       [f">{r.data.tags.get('model_id', r.data.tags['method'])}<" for r in pair]),
            "compare": (f"#/compare-runs?runs={ids}&experiments={exps}&{ml}", names)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="sqlite:///mlflow.db")
    ap.add_argument("--experiment", default="mmrobust")
    ap.add_argument("--out", default="results/screenshots")
    args = ap.parse_args(argv)
    store = tracking.resolve_uri(args.store)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = pages(tracking.client(store), args.experiment)
    missing = []
    with tempfile.TemporaryDirectory() as artifacts, tracking.tracking_server(store, artifacts) as server:
        for name, (fragment, texts) in wanted.items():
            url = f"{server}/{fragment}"
            shot = chromium(url, f"--screenshot={(out / f'{name}.png').resolve()}")
            dom = chromium(url, "--dump-dom").stdout
            if shot.returncode != 0 or not (out / f"{name}.png").exists():
                raise SystemExit(f"{name}: chromium failed ({shot.returncode}): {shot.stderr[-1000:]}")
            (out / f"{name}.html").write_text(dom)
            absent = [t for t in texts if t not in dom]
            missing += [f"{name}: {t!r}" for t in absent]
            print(f"[screenshots] {name}: {out / f'{name}.png'} ({url})" + (f"; MISSING {absent}" if absent else ""))
    if missing:
        print(f"[screenshots] pages lack what they should show: {missing}", file=sys.stderr)
        return 1
    print(f"[screenshots] -> {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
