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


def _pins(text: str) -> dict[str, str]:
    import re
    pins = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s#;]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _pip_indexes() -> list[str]:
    """The indexes, find-links and constraints pip is configured with here (pip.conf and PIP_* variables), as
    `uv pip` options."""
    import ast
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                         check=True).stdout
    options = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
               "constraint": "--constraint"}
    found: dict[tuple[str, str], None] = {}  # ordered, without repeats (pip.conf and PIP_* may both set one)
    for line in out.splitlines():  # global.extra-index-url='a b' / :env:.find-links='/opt/wheels'
        key, _, value = line.partition("=")
        option = options.get(key.rsplit(".", 1)[-1])
        if option:
            found.update({(option, item): None for item in ast.literal_eval(value).split()})
    return [arg for pair in found for arg in pair]


def test_image_requirements_resolve_to_the_pins(tmp_path):
    """Both images install torch==<pin> from PyTorch's index, then requirements.txt: resolve that file from
    scratch for a bare Python 3.11 x86_64 image (uv's resolver, pip's rule of taking the best version across all
    indexes; pip itself needs ~90 s here) and check every pin lands at its version."""
    uv = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    lock = tmp_path / "resolved.txt"
    proc = subprocess.run([uv, "pip", "compile", str(ROOT / "requirements.txt"), "--python-version", "3.11",
                           "--python-platform", "x86_64-manylinux_2_28", "--index-strategy", "unsafe-best-match",
                           *_pip_indexes(), "--cache-dir", str(tmp_path / "cache"), "--no-header", "--quiet",
                           "-o", str(lock)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = _pins(lock.read_text())
    assert len(resolved) > 100  # the whole dependency tree, not just the top-level pins
    pins = _pins((ROOT / "requirements.txt").read_text())
    assert len(pins) >= 15
    for name, version in pins.items():
        assert resolved.get(name, "").split("+")[0] == version, (name, version, resolved.get(name))
    for name in ("Dockerfile.cpu", "Dockerfile.cuda"):
        text = (ROOT / "docker" / name).read_text()
        assert f"torch=={pins['torch']}" in text  # the image's torch wheel is the pinned version
        for line in text.splitlines():  # everything the image copies exists in the repo
            if line.startswith("COPY "):
                for src in line.split()[1:-1]:
                    assert (ROOT / src).exists(), f"{name}: COPY {src} does not exist"
