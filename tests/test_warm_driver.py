"""The warm driver: a stage command forwarded to a long-lived driver gets the same output and exit status as in
its own process; without a driver (or with a dead socket) the command runs in its own process. The real
`dvc repro` test runs every training stage through one (tests/test_dvc_pipeline.py)."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipelines.warm_driver import ENV_VAR, forward

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    """A warm driver on a local Ray cluster of its own (no RAY_ADDRESS: `ray_session` starts one)."""
    tmp = tmp_path_factory.mktemp("warm")
    path = str(tmp / "d.sock")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ENV_VAR)}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.warm_driver", "--socket", path], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 180
    while not os.path.exists(path):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    yield path
    proc.terminate()
    assert proc.wait(timeout=60) == 0
    assert not os.path.exists(path)  # the socket goes with it


def _stage(args, cwd, env_extra):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "pipelines.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_bad_arguments_give_the_same_error_through_the_driver(driver, tmp_path):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "other.yaml").write_text("train: {epochs: -1}\n")
    for args in (["--model", "nosuch"], ["--params", "other.yaml", "--method", "jt"]):
        own = _stage(args, tmp_path, {ENV_VAR: ""})
        warm = _stage(args, tmp_path, {ENV_VAR: driver})
        assert own.returncode == warm.returncode == 2, (own.stderr, warm.stderr)
        assert own.stderr.strip() and own.stderr == warm.stderr  # relative paths read in the client's directory
        assert "warm driver pid" in warm.stdout and "warm driver" not in own.stdout
    usage = _stage(["--no-such-flag"], tmp_path, {ENV_VAR: driver})  # argparse's exit inside the driver
    assert usage.returncode == 2 and "unrecognized arguments: --no-such-flag" in usage.stderr


def test_driver_refuses_other_modules_and_keeps_serving(driver, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(ENV_VAR, driver)
    assert forward("os", []) == 1
    assert "cannot run 'os'" in capfd.readouterr().err
    monkeypatch.chdir(tmp_path)
    assert forward("pipelines.train", ["--model", "nosuch"]) == 2  # still serving after the refusal
    assert "error: params.yaml" in capfd.readouterr().err  # read in the client's working directory


def test_without_a_driver_the_stage_runs_in_its_own_process(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert forward("pipelines.train", []) is None
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "gone.sock"))
    assert forward("pipelines.train", []) is None
    assert "does not answer" in capfd.readouterr().err
