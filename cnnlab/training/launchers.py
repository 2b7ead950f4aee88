"""Sweeps on a cluster: Ray and SLURM (submitit) launchers, checked before any job starts.

Three things the launcher plugins leave to the application:

- a cluster that does not answer: `ray.init` retries an unreachable address for minutes,
  and `sbatch` missing surfaces only once jobs are submitted. `check_launcher` fails in
  seconds instead, before the sweep's parent MLflow run exists (MlflowSweep calls it);
- CPU threads: every job would start torch with one thread per core of its node, however
  many jobs share that node. `job_threads` gives each job the CPUs its scheduler gave it;
- working directory: Ray starts workers in the folder `ray start` ran in, so a relative
  `paths.runs` would land somewhere else on every node. `ray_worker_setup` (a Ray worker
  setup hook, see conf/hydra/launcher/ray_cluster.yaml) moves them to the driver's folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import sys
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from omegaconf import DictConfig, OmegaConf

from cnnlab.errors import ConfigError

log = logging.getLogger("cnnlab")

CONNECT_TIMEOUT_S = 5.0  # a head node on the same network answers in milliseconds
RAY_CLIENT_PORT = 10001  # Ray Client's default (ray://host without a port)
DRIVER_CWD_VAR = "CNNLAB_DRIVER_CWD"  # set by the ray_cluster preset for ray_worker_setup


def launcher_name(config: DictConfig) -> str:
    """The launcher's class name (RayLauncher, SlurmLauncher, JoblibLauncher...), '' if none."""
    target = OmegaConf.select(config, "hydra.launcher._target_") or ""
    return str(target).rsplit(".", 1)[-1]


def ray_address(init: Mapping[str, Any]) -> str | None:
    """The address `ray.init(**init)` will connect to, or None when it starts a private Ray.

    Follows ray.init: an explicit address, else $RAY_ADDRESS; `auto` is the cluster that
    `ray start` last started on this machine; `local` (or nothing) starts a new one.
    """
    address = init.get("address") or os.environ.get("RAY_ADDRESS") or None
    if address == "auto":
        try:
            from ray._private.services import get_ray_address_from_environment
        except ImportError:  # Ray moved its helper: leave `auto` to ray.init itself
            return None
        try:
            return get_ray_address_from_environment("auto", init.get("_temp_dir"))
        except ConnectionError:
            raise ConfigError("hydra.launcher.ray.init.address is auto, but no Ray cluster runs on this "
                              "machine and RAY_ADDRESS is not set; start one with `ray start --head`, "
                              "or give the head's HOST:PORT") from None
    return None if address in (None, "local") else str(address)


def host_port(address: str) -> tuple[str, int]:
    """'10.0.0.5:6379' -> ('10.0.0.5', 6379); 'ray://head' -> ('head', 10001)."""
    client = address.startswith("ray://")
    parsed = urlsplit("//" + address.removeprefix("ray://"))
    try:
        port = parsed.port
    except ValueError:
        port = -1
    if port is None and client:
        port = RAY_CLIENT_PORT
    if not parsed.hostname or port is None or port < 1:
        raise ConfigError(f"hydra.launcher.ray.init.address must be HOST:PORT (the head's `ray start "
                          f"--port`), ray://HOST[:PORT], auto or null, got {address!r}")
    return parsed.hostname, port


def check_reachable(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when something accepts TCP connections at host:port, else why not (in words)."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror:
        return f"unknown host {host!r}"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as error:
        return (error.strerror or type(error).__name__).lower()


def check_launcher(config: DictConfig, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in seconds, before any job or MLflow run, when the sweep's cluster cannot be used."""
    name = launcher_name(config)
    if name == "RayLauncher":
        # Only the keys that locate the cluster: the rest may hold interpolations that resolve
        # only once the launcher runs.
        init = {key: OmegaConf.select(config, f"hydra.launcher.ray.init.{key}") for key in ("address", "_temp_dir")}
        address = ray_address(init)
        if address is None:
            return  # the launcher starts a private Ray on this machine
        host, port = host_port(address)
        problem = check_reachable(host, port, timeout_s)
        if problem:
            raise ConfigError(f"the Ray cluster at {address} (hydra.launcher.ray.init.address or "
                              f"RAY_ADDRESS) cannot be reached: {problem}; start its head with `ray start "
                              f"--head --port={port}`, check the address, or set it to null to run the "
                              f"sweep on a private Ray on this machine")
    elif name == "SlurmLauncher" and shutil.which("sbatch") is None:
        raise ConfigError("hydra/launcher=slurm submits jobs with SLURM's sbatch, which is not on PATH "
                          "here; launch the sweep from the cluster's login node, or try it on this "
                          "machine with hydra/launcher=submitit_local")


def available_cores() -> int:
    """The cores this process may run on (a SLURM or cgroup allocation), not the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1


def _ray_task_cpus() -> int | None:
    """Inside a Ray task: the CPUs Ray reserved for it (ray.remote's num_cpus)."""
    ray = sys.modules.get("ray")  # never import Ray just to find out it is not running
    if ray is None or not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # the driver, or a Ray version without this API: no reservation known
        return None
    return max(int(cpus), 1) if cpus else None


def _positive_int(value: Any) -> int | None:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def job_threads(launcher: Mapping[str, Any]) -> int | None:
    """Torch threads for a job that configured none: the CPUs its launcher gave it.

    `launcher` is the job's hydra.launcher node. None keeps torch's default (which honours
    OMP_NUM_THREADS), right for a job that has the whole machine to itself.
    """
    ray_cpus = _ray_task_cpus()
    if ray_cpus:
        return ray_cpus
    jobs = launcher.get("n_jobs")  # joblib: parallel jobs share this process's cores
    if isinstance(jobs, int) and not isinstance(jobs, bool) and jobs != 1:
        cores = available_cores()
        jobs = jobs if jobs > 0 else max(cores + 1 + jobs, 1)  # joblib: -1 = all cores
        return max(cores // jobs, 1)
    # A SLURM job step (sbatch/srun -c N, submitit's slurm launcher), else submitit_local's
    # cpus_per_task, which the local executor does not enforce: its jobs all run at once.
    return _positive_int(os.environ.get("SLURM_CPUS_PER_TASK")) or _positive_int(launcher.get("cpus_per_task"))


def ray_worker_setup() -> None:
    """Ray worker setup hook: work in the folder the sweep was launched from.

    Relative paths (paths.runs=runs, the sweep dir) then mean on every node what they meant
    to the driver, as long as that folder exists there (a shared filesystem).
    """
    cwd = os.environ.get(DRIVER_CWD_VAR)
    if not cwd:
        return
    if os.path.isdir(cwd):
        os.chdir(cwd)
    else:
        log.warning("the sweep's folder %s does not exist on this Ray node; relative paths resolve "
                    "in %s instead (give paths.runs as an absolute path on a shared filesystem, or "
                    "use a tracking server)", cwd, os.getcwd())
