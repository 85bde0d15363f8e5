"""docker/: Dockerfiles pass hadolint (no Docker engine here), the images install the pinned requirements, and
the KubeRay recipe wires the pieces the README promises."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_lints_clean_and_installs_the_pins(name):
    text = (ROOT / "docker" / name).read_text()
    proc = subprocess.run([HADOLINT, str(ROOT / "docker" / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pip install -r requirements.txt" in text and "torch==2.13.0" in text
    assert "COPY requirements.txt" in text and "pip install --no-deps -e ." in text


def test_hadolint_really_checks():
    bad = subprocess.run([HADOLINT, "-"], input="FROM python\nRUN cd /tmp && apt-get install curl\n",
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "DL3" in bad.stdout


def test_kuberay_recipe_shares_storage_and_tracking():
    docs = list(yaml.safe_load_all((ROOT / "docker" / "rayjob.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"PersistentVolumeClaim", "Deployment", "Service", "RayJob"}
    job = kinds["RayJob"]["spec"]
    assert job["entrypoint"].startswith("python -m pipelines.train --model ")
    assert "MLFLOW_TRACKING_URI: http://mlflow:5000" in job["runtimeEnvYAML"]
    claim = kinds["PersistentVolumeClaim"]["metadata"]["name"]
    pods = [job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in job["rayClusterSpec"]["workerGroupSpecs"]]
    assert all(p["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim for p in pods)
    assert any("nvidia.com/gpu" in c["resources"]["limits"] for p in pods for c in p["containers"])
