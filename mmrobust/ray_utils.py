"""Ray connection: reuse the cluster in RAY_ADDRESS (e.g. `ray start --head`, or `ray job submit`), else start a
local one for this process and stop it at the end."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# Every Ray process of ours, drivers included: the same auth mode everywhere (a stray token file would otherwise
# switch later clusters to token auth).
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# Train settings for the clusters we start: set in the head's (or local cluster's) environment, which every worker
# inherits. Train copies any of them it finds in a *driver's* environment into its controller's runtime env, and a
# controller with its own runtime env cannot reuse the job's idle worker process (~3 s more per run, measured); so a
# driver sets them itself only for a cluster that lacks them (one it did not start: `ray job submit`, a user's head).
TRAIN_ENV = {
    "RAY_TRAIN_V2_ENABLED": "1",
    # The Train controller notices a finished worker group at its next health check (default every 2 s, which
    # adds ~4 s to every short run here).
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    # Train routes a worker's print() to its logger and, once anything has wrapped sys.stdout (MLflow does),
    # also to the original print: every epoch line reached the driver twice. Plain prints, once.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}
# Only on the one-machine clusters we start: no spot-instance preemption to watch for there, and Train's watcher
# actor logs a Ray-internal error line ("constructor arguments in the object store and max_restarts > 0") per run.
LOCAL_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled", **TRAIN_ENV, **LOCAL_ENV}
# local_cluster sets this to the address of the head it started with CLUSTER_ENV
STARTED_HEAD = "MMROBUST_RAY_HEAD"


def quiet_worker_logs() -> None:
    """Runs in every worker process of our jobs (`worker_process_setup_hook`). Train's PlacementGroupCleaner
    polls the State API each second and, on a head without the dashboard (ours, to start faster), warns each
    time that it cannot reach it; the placement group is still removed when the run ends."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


# merged with a job's own runtime env (`ray job submit --runtime-env-json`): no key in common
RUNTIME_ENV = {"worker_process_setup_hook": "mmrobust.ray_utils.quiet_worker_logs"}


@contextmanager
def ray_session(num_cpus: int | None = None, log=print) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if os.environ.get(STARTED_HEAD) != address:
            for key, value in TRAIN_ENV.items():
                os.environ.setdefault(key, value)
        ray.init(address=address, log_to_driver=True, runtime_env=RUNTIME_ENV)
        log(f"ray: connected to {address}")
    else:
        tmp = Path(tempfile.gettempdir()) / "mmrobust-ray"
        tmp.mkdir(parents=True, exist_ok=True)
        added = {k: v for k, v in {**TRAIN_ENV, **LOCAL_ENV}.items() if k not in os.environ}
        os.environ.update(added)  # inherited by the cluster's processes, then out of this driver's environment
        try:
            # address="local": always a fresh cluster, never a stale one recorded in the temp dir
            ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), include_dashboard=False,
                     runtime_env=RUNTIME_ENV, _temp_dir=str(tmp), log_to_driver=True, configure_logging=True,
                     logging_level="WARNING")
        finally:
            for key in added:
                os.environ.pop(key, None)
        log(f"ray: started a local cluster ({num_cpus or os.cpu_count()} CPUs); set RAY_ADDRESS to use yours")
    try:
        yield
    finally:
        ray.shutdown()
