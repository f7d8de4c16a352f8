"""Connecting a job to Ray: an existing cluster when one is named, else an embedded one.

Every job (training, segmentation, benchmarks) calls :func:`ensure_ray` first. Inside a Ray
Job (submitted through the Jobs API) ``RAY_ADDRESS`` is set and the job joins that cluster;
on a laptop or CI machine it starts a local Ray with the CPUs it is told to use.
"""

from __future__ import annotations

import os

import ray

__all__ = ["WORKER_ENV", "ensure_ray"]

WORKER_ENV: dict[str, str] = {
    # glibc's malloc hands every freed block above its mmap threshold (dynamic, at most 32 MB)
    # back to the OS and maps fresh pages on the next request, so an FCN's activations (tens
    # of MB an image) page-fault in again on every forward pass. Kept in the heap instead,
    # FCN-8s ResNet-18 at 512 px runs 1.4x faster (140 -> 99 ms, fp32), FCN-8s VGG16 at 500 px
    # 1.4-1.5x (measured; README). The price: a process keeps its peak heap.
    "MALLOC_MMAP_THRESHOLD_": str(2**32),
    "MALLOC_TRIM_THRESHOLD_": str(2**32),
}
"""Environment of every Ray worker of a job (set through the job's ``runtime_env``)."""

# Ray Train waits this long for its worker group (default 60 s): a loaded 2-core machine
# starting several Python processes that import torch can take longer. Train propagates
# the driver's value to its controller.
_TRAIN_DEFAULTS = {
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    # One process less to start per run; it watches for spot-instance preemption notices,
    # which an embedded or on-premises cluster never gets.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Train patches print() in workers to also log each line, so the driver shows it twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
}


def ensure_ray(*, num_cpus: int | None = None, address: str | None = None) -> None:
    """Connect to Ray once per process: ``address``, ``RAY_ADDRESS``, or a new local Ray.

    Joins nothing when Ray is already initialised (tests, notebooks, a caller that set it up).
    Either way it turns Ray Data's progress bars off (the jobs show their own) and hands the
    workers' output to an open output session (:mod:`pipeline.console`).

    Args:
        num_cpus: CPUs of a new local Ray (default: all cores); ignored when joining a
            cluster.
        address: A cluster address (``auto``, ``ray://...`` or ``HOST:PORT``); None uses
            ``RAY_ADDRESS`` when set, else starts a local Ray.
    """
    for key, value in _TRAIN_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        _init(num_cpus, address)
    _quiet_ray_data()
    from pipeline.console import attach_ray

    attach_ray()  # an open output session takes over the workers' output


def _quiet_ray_data() -> None:
    """Ray Data's own progress off: the jobs show theirs (:mod:`pipeline.progress`).

    Ray Data draws bars on a terminal (with tqdm, not installed here, or rich) and logs a
    block of operator states every few seconds elsewhere; neither tells a user how far the
    job is. Set in the driver before any dataset is made: each dataset keeps a copy of the
    context, and takes it to Ray Train's split coordinators.
    """
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


def _init(num_cpus: int | None, address: str | None) -> None:
    target = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"env_vars": WORKER_ENV}
    if target:
        ray.init(address=target, log_to_driver=True, runtime_env=runtime_env)
    else:
        # The dashboard serves the state API, which Ray Train's placement-group cleaner polls
        # (without it, it warns every few seconds); on loopback only.
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            runtime_env=runtime_env,
        )
