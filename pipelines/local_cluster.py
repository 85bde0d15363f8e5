"""Run a command (e.g. `dvc repro`) against one local Ray head that lives as long as the command.

    python -m pipelines.local_cluster -- dvc repro

Every stage then connects through RAY_ADDRESS instead of starting and stopping a cluster of its own (several
seconds per stage). If RAY_ADDRESS is already set, the command runs against that cluster and nothing is
started. The head runs in a session of its own (`ray start --block`); at the end it is stopped, and then every
process left of this cluster, found by this head's session, process tree, GCS port, raylet or address, never by
name: other Ray clusters on the machine are left alone.

Beside the head runs a warm driver (`pipelines/warm_driver.py`, unless `--no-warm-driver`): one long-lived Ray
driver that runs every training stage's `main()`, so that each stage skips the imports, the connection and the
first-fit costs of a new Ray job (~10 s per stage, measured in docs/decisions.md).
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from mmrobust.ray_utils import CLUSTER_ENV, STARTED_HEAD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def start_head(num_cpus: int | None = None, timeout: float = 120.0, dashboard_port: int | None = None
               ) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` in its own process group; with `dashboard_port`, also the dashboard and job
    server on 127.0.0.1 (what `ray job submit --address http://127.0.0.1:<port>` talks to)."""
    env = {**CLUSTER_ENV, **os.environ}  # the user's settings win over our defaults
    port = _free_port()
    tmp = Path(tempfile.gettempdir()) / "mmrobust-ray"
    tmp.mkdir(parents=True, exist_ok=True)
    ray = str(Path(sys.executable).with_name("ray"))
    cmd = [ray, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus or os.cpu_count()}", "--disable-usage-stats", f"--temp-dir={tmp}"]
    if dashboard_port:
        cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"]
    else:
        cmd += ["--include-dashboard=false"]
    log = open(tmp / f"head-{port}.log", "wb")  # a file, not a pipe: a full pipe would block the head
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start failed ({proc.returncode}); see {log.name}")
        if all(_listening(p) for p in (port, dashboard_port) if p):
            return proc, address
        time.sleep(0.5)
    stop_head(proc)
    raise TimeoutError(f"ray head on {address} did not come up in {timeout:.0f} s")


def stop_head(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """Stop the head, then whatever is left of its cluster (`_reap`). Its process group is not the cluster: every
    Ray worker (actors such as `ray::TrainController`) runs in a process group of its own and only exits once it
    notices that its raylet is gone, and a process a worker started does not even do that."""
    port = _arg_port(proc.args)
    tree = _tree(proc.pid)
    raylets = {str(p.pid) for p in tree if _name(p) == "raylet"}
    since = time.time()
    _signal_head(proc, grace)
    _reap(tree + _strays(proc.pid, port, raylets, port and f"127.0.0.1:{port}", since))


def _signal_head(proc: subprocess.Popen, grace: float) -> None:
    """SIGINT lets `ray start --block` shut its cluster down (about a second when idle); after a long pipeline it
    often did not react at all (the whole 10 s of the former grace in `make reproduce`), and SIGTERM drains for up
    to 30 s: the rest of the group is then killed."""
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            if sig == signal.SIGINT:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _arg_port(args) -> int | None:
    ports = [a.split("=", 1)[1] for a in args if isinstance(a, str) and a.startswith("--port=")]
    return int(ports[0]) if ports else None


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _tree(pid: int) -> list[psutil.Process]:
    """`pid` and its descendants, taken before stopping: a process re-parented to init is no longer among them."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _strays(sid: int, port: int | None = None, raylets: set[str] = frozenset(), address: str | None = None,
            since: float = float("inf")) -> list[psutil.Process]:
    """The processes now alive that belong to the cluster of the session `sid` (a head or a driver started with
    start_new_session): in that session, or with its raylet's pid in their environment (RAY_RAYLET_PID, which
    every worker and anything it starts inherits: a worker's arguments are replaced by its title, and a child may
    have left the session), or, started before `since` (when the port was still this head's), with its GCS port
    in their arguments or its address in their environment (drivers)."""
    gcs_arg = re.compile(rf"--(?:gcs-address|address|gcs_server_port|port)=(?:\S*:)?{port}") if port else None
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for p in psutil.process_iter(["cmdline", "environ", "create_time"]):
        env, args = p.info["environ"] or {}, p.info["cmdline"] or ()
        old = (p.info["create_time"] or since) < since
        if p.pid not in mine and (
                _sid(p.pid) == sid or env.get("RAY_RAYLET_PID") in raylets
                or old and address and address in (env.get("RAY_ADDRESS"), env.get(STARTED_HEAD))
                or old and gcs_arg and any(gcs_arg.fullmatch(a) for a in args)):
            found.append(p)
    return found


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _reap(procs: list[psutil.Process], grace: float = 2.0) -> None:
    """SIGTERM, up to `grace` seconds to exit, then SIGKILL (nothing runs on the cluster by now)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        procs = _alive(procs)
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.time() + wait
        while procs and time.time() < deadline:
            time.sleep(0.05)
            procs = _alive(procs)
        if not procs:
            return


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running; a zombie has exited (its parent has yet to reap it). A process stays itself only
    while its start time does (psutil checks it): a reused pid is not ours."""
    alive = []
    for p in {p.pid: p for p in procs}.values():
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def start_warm_driver(env: dict, timeout: float = 60.0) -> tuple[subprocess.Popen | None, str | None]:
    """`python -m pipelines.warm_driver` on a socket beside the head's logs, as soon as it listens (it goes on
    loading torch and Ray; an early stage waits in its backlog); (None, None) and a note if it does not listen
    (the stages then run in their own processes)."""
    from pipelines.warm_driver import ENV_VAR

    path = str(Path(tempfile.gettempdir()) / "mmrobust-ray" / f"warm-{os.getpid()}.sock")
    log = open(Path(path).with_suffix(".log"), "wb")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.warm_driver", "--socket", path],
                            env={k: v for k, v in env.items() if k != ENV_VAR}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(path):
            return proc, path
        time.sleep(0.2)
    print(f"ray: the warm driver did not start (see {log.name}); each stage runs in its own process", flush=True)
    stop_warm_driver(proc)
    return None, None


def stop_warm_driver(proc: subprocess.Popen | None) -> None:
    """SIGTERM (idle by now: it disconnects from Ray and exits), then whatever is left of its session and tree."""
    if proc is None:
        return
    tree = _tree(proc.pid)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    _reap(tree + _strays(proc.pid))


def stop_cluster(head: subprocess.Popen, driver: subprocess.Popen | None = None) -> None:
    """The end of `main`: the warm driver, then the head; no process of either is left."""
    stop_warm_driver(driver)
    stop_head(head)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    warm = not (argv and argv[0] == "--no-warm-driver")
    if not warm:
        argv = argv[2:] if argv[1:2] == ["--"] else argv[1:]
    if not argv:
        print("usage: python -m pipelines.local_cluster [--no-warm-driver] -- COMMAND...", file=sys.stderr)
        return 2
    if os.environ.get("RAY_ADDRESS"):
        return subprocess.call(argv)
    from mmrobust.tracking import PARENT_RUN_ENV
    from pipelines.warm_driver import ENV_VAR

    proc, address = start_head()
    env = {**os.environ, "RAY_ADDRESS": address, STARTED_HEAD: address}
    driver, path = start_warm_driver(env) if warm else (None, None)
    if path:
        env[ENV_VAR] = path
    print(f"ray: local head at {address}{' and a warm driver' if path else ''} for `{' '.join(argv)}`", flush=True)
    parent, status = None, 1
    try:
        parent = open_repro_run(argv)
        if parent:
            env[PARENT_RUN_ENV] = parent[1]
        status = subprocess.call(argv, env=env)
        return status
    finally:
        stop_cluster(proc, driver)
        print("ray: local head stopped", flush=True)
        if parent:
            close_repro_run(*parent, status)


def open_repro_run(argv: list[str], params_file: str = "params.yaml") -> tuple | None:
    """For `dvc repro`: one MLflow parent run that every stage's run joins (tag mlflow.parentRunId), so the
    runs list groups the runs of one reproduction. None for other commands or without a params file."""
    if not ("dvc" in " ".join(argv) and "repro" in argv) or not Path(params_file).exists():
        return None
    from mmrobust import tracking
    from mmrobust.config import ConfigError, load_params

    try:
        params = load_params(params_file)
    except ConfigError:
        return None  # the stages will say what is wrong with it
    uri = tracking.resolve_uri(params.tracking.uri)
    c = tracking.client(uri)
    exp = tracking.experiment_id(uri, params.tracking.experiment)
    commit = tracking.git_commit() or "no git"
    tags = {"dvc_repro": " ".join(argv), "mlflow.source.name": "dvc repro", "mlflow.source.type": "PROJECT"}
    if commit != "no git":
        tags["mlflow.source.git.commit"] = commit
    run = c.create_run(exp, run_name=f"dvc repro @ {commit[:8]}", tags=tags)
    print(f"mlflow: parent run {run.info.run_id} ({uri}) groups this reproduction's runs", flush=True)
    return c, run.info.run_id


def close_repro_run(c, run_id: str, status: int) -> None:
    c.set_terminated(run_id, "FINISHED" if status == 0 else "FAILED")


if __name__ == "__main__":
    sys.exit(main())
