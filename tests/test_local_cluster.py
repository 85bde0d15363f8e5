"""Stopping `pipelines.local_cluster`'s head and warm driver leaves no process of that cluster behind: not the Ray
workers a Train fit leaves (`ray::TrainController`, ...), which run in process groups of their own, nor a process
an actor forked (it keeps the actor's title), nor one that left the head's session and process tree; and it leaves
another cluster on the machine alone."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mmrobust.ray_utils import STARTED_HEAD
from pipelines.local_cluster import start_head, start_warm_driver, stop_cluster, stop_head

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

# A driver connected through RAY_ADDRESS (like a stage): an actor that forks a child, a detached one whose child
# leaves the head's session and process tree (setsid after a double fork), and a one-worker Train fit; it writes the
# pids and stays connected, as the warm driver does.
DRIVER = r"""
import json, os, subprocess, sys, time
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

DAEMON = "import os, sys, time\nif os.fork(): os._exit(0)\nos.setsid()\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(600)"

@ray.remote(num_cpus=0)
class Holder:
    def start(self, daemon_file=None):
        if daemon_file is None:
            pid = os.fork()
            if pid == 0:
                time.sleep(600)
                os._exit(0)
            return os.getpid(), pid
        subprocess.run([sys.executable, "-c", DAEMON, daemon_file], check=True)
        while not (os.path.exists(daemon_file) and open(daemon_file).read()):
            time.sleep(0.05)
        return os.getpid(), int(open(daemon_file).read())

def train_fn():
    ray.train.report({"x": 1})

out = sys.argv[1]
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
normal, detached = Holder.remote(), Holder.options(name="holder", lifetime="detached").remote()
pids = [*ray.get(normal.start.remote()), *ray.get(detached.start.remote(os.path.join(out, "daemon.pid")))]
TorchTrainer(train_fn, scaling_config=ScalingConfig(num_workers=1),
             run_config=RunConfig(storage_path=os.path.join(out, "train"))).fit()
with open(os.path.join(out, "pids.tmp"), "w") as f:
    json.dump(pids, f)
os.rename(os.path.join(out, "pids.tmp"), os.path.join(out, "pids.json"))
time.sleep(600)
"""


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> list[int]:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-4000:]
        time.sleep(0.2)
    return json.loads(path.read_text())


def _processes(pids) -> list[psutil.Process]:
    procs = []
    for pid in set(pids):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass
    return procs


def _tree(pid: int) -> list[int]:
    try:
        return [pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _services(pid: int) -> list[psutil.Process]:
    """A head and its long-lived processes (GCS, raylet, agents): not its idle workers, which the raylet may
    replace at any time."""
    procs = []
    for p in _processes(_tree(pid)):
        try:
            if p.name() != "ray::IDLE" and not any("_worker.py" in a for a in p.cmdline()):
                procs.append(p)
        except psutil.Error:
            pass
    return procs


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    def alive(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False
    return [p for p in procs if alive(p)]


def _mentioning(port: str, before: float) -> list[psutil.Process]:
    """Processes started before `before` whose command line names the port (`--gcs-address=...:PORT`, ...)."""
    pattern = re.compile(rf"[:=]{port}\b")
    found = []
    for p in psutil.process_iter(["cmdline", "create_time"]):
        if (p.info["create_time"] or before) < before and pattern.search(" ".join(p.info["cmdline"] or ())):
            found.append(p)
    return _running(found)


def _describe(procs: list[psutil.Process]) -> list[str]:
    out = []
    for p in procs:
        try:
            out.append(f"{p.pid} (ppid {p.ppid()}, sid {os.getsid(p.pid)}): {' '.join(p.cmdline())[:120]}")
        except (psutil.Error, OSError):
            pass
    return out


def test_stopping_the_cluster_leaves_no_process_behind(tmp_path):
    head, address = start_head(num_cpus=2)
    other, _ = start_head(num_cpus=1)
    env = {**os.environ, "RAY_ADDRESS": address, STARTED_HEAD: address}
    warm, path = start_warm_driver(env)
    assert path, "the warm driver did not start"
    log = tmp_path / "driver.log"
    with open(log, "wb") as out:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    recorded: list[psutil.Process] = []
    try:
        children = _wait_for(tmp_path / "pids.json", driver, log)
        recorded = _processes([*_tree(head.pid), *_tree(warm.pid), *_tree(driver.pid), *children])
        others = _services(other.pid)
        names = {p.name() for p in _running(recorded)}
        assert "ray::Holder" in names and len(_running(_processes(children))) == 4, names
        stopped = time.time()
        stop_cluster(head, warm)
        took = time.time() - stopped
        left = _running(recorded) + _mentioning(address.rsplit(":", 1)[1], stopped)
        assert not left, _describe(left)
        driver.wait(timeout=5)  # stopped as a driver of this cluster (RAY_ADDRESS): only reaping is left
        assert took < 15, took
        assert len(_running(others)) == len(others), _describe(others)
    finally:
        for p in _running(recorded + _processes([driver.pid])):
            p.kill()
        stop_head(other)
