"""Sweeps on a cluster: a real local Ray cluster, submitit's local executor, the SLURM preset,
and the pre-flight checks that stop a sweep in seconds when its cluster cannot be reached."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

import cnnlab.training.launchers as launchers
from cnnlab.errors import ConfigError

TINY = ["data=synthetic", "model.widths=[4]", "model.dense=[8]", "trainer.max_epochs=1",
        "trainer.accelerator=cpu", "tracking.log_model=false", "trainer.enable_progress_bar=false"]


def _cnnlab(*args: str, cwd: Path | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _runs(store: Path) -> tuple[object, list]:
    """The sweep's parent run and its children, from the SQLite store `store`."""
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    (parent,) = [r for r in runs if r.data.tags.get("sweep") == "parent"]
    children = [r for r in runs if r.data.tags.get("sweep") != "parent"]
    return parent, children


def _threads_logged(sweep_dir: Path) -> list[str]:
    """The torch thread count each job logged in its own log file."""
    return sorted(line.rsplit(", ", 1)[-1].strip() for log in sweep_dir.glob("*/train.log")
                  for line in log.read_text().splitlines() if line.endswith("torch threads"))


# Ray 2.60's token authentication, as on a real cluster, with this test's own token: `ray start`
# turns it on by itself when ~/.ray/auth_token exists, and a driver given an address uses it
# only when told (RAY_AUTH_MODE=token), so leaving it to the machine would make the test flaky.
RAY_AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with 2 CPUs, started in its own folder and process group;
    yields its address. Teardown ends exactly that process group (not `ray stop`, which
    would stop every Ray on the machine), even when the test failed."""
    gcs, client, dashboard, agent = _free_ports(4)
    head_dir = tmp_path / "head"
    head_dir.mkdir()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    log = open(tmp_path / "ray_head.log", "w")
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
         "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false",
         f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", "--disable-usage-stats", f"--temp-dir={temp}"],
        cwd=head_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, **RAY_AUTH})
    try:
        deadline = time.monotonic() + 90
        while "Ray runtime started" not in (tmp_path / "ray_head.log").read_text():
            assert head.poll() is None, (tmp_path / "ray_head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray head did not start within 90 s"
            time.sleep(0.5)
        yield f"127.0.0.1:{gcs}"
    finally:
        _end_group(head)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _end_group(leader: subprocess.Popen) -> None:
    """SIGTERM the leader's process group (Ray's GCS, raylet, workers...), SIGKILL what is left.

    Ray's own graceful stop takes 20 s and more on a busy machine; this throwaway cluster
    gets 2 s."""
    for sig, grace_s in ((signal.SIGTERM, 2), (signal.SIGKILL, 20)):
        try:
            os.killpg(leader.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            leader.poll()  # reap the leader, or the group never looks empty
            try:
                os.killpg(leader.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def test_ray_sweep_through_a_running_cluster_lands_in_one_store(tmp_path, ray_head):
    driver = tmp_path / "driver"
    driver.mkdir()
    start = time.monotonic()
    # A relative paths.runs: the jobs must resolve it in the driver's folder, not where the
    # Ray head was started (ray_worker_setup moves the workers there).
    done = _cnnlab("train", "-m", *TINY, "paths.runs=runs", "seed=0,1,2,3", "tracking.experiment=ray",
                   "hydra/launcher=ray_cluster", f"hydra.launcher.ray.init.address={ray_head}", cwd=driver,
                   env=RAY_AUTH)
    elapsed = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "head" / "runs").exists()
    parent, children = _runs(driver / "runs" / "mlflow.db")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.launcher"] == "RayLauncher"
    assert sorted(c.data.tags["knob.seed"] for c in children) == ["0", "1", "2", "3"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    # ray.remote.num_cpus=1 in the preset: each job runs one torch thread.
    assert _threads_logged(driver / "runs" / "multirun" / "ray") == ["1 torch threads"] * 4
    print(f"4-job Ray sweep: {elapsed:.1f} s")


@pytest.mark.slow  # 35-60 s on 2 cores: each job is a fresh process importing torch, Lightning, MLflow
def test_submitit_local_sweep_lands_in_one_store(tmp_path):
    done = _cnnlab("train", "-m", *TINY, f"paths.runs={tmp_path}", "seed=0,1", "tracking.experiment=sub",
                   "hydra/launcher=submitit_local", "hydra.launcher.cpus_per_task=1")
    assert done.returncode == 0, done.stderr[-3000:]
    parent, children = _runs(tmp_path / "mlflow.db")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.launcher"] == "LocalLauncher"
    assert sorted(c.data.tags["knob.seed"] for c in children) == ["0", "1"]
    assert all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    # submitit's local executor runs all jobs at once whatever cpus_per_task says: cnnlab keeps
    # each to its cpus_per_task threads (torch's default here would be every core).
    assert _threads_logged(tmp_path / "multirun" / "sub") == ["1 torch threads"] * 2


def test_unreachable_ray_address_fails_in_seconds_before_any_run(tmp_path):
    (port,) = _free_ports(1)  # nothing listens there
    start = time.monotonic()
    done = _cnnlab("train", "-m", *TINY, f"paths.runs={tmp_path}", "seed=0,1", "hydra/launcher=ray_cluster",
                   f"hydra.launcher.ray.init.address=127.0.0.1:{port}", timeout=60)
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: the Ray cluster at 127.0.0.1:{port} ")
    assert "cannot be reached: connection refused" in done.stderr and "ray start --head" in done.stderr
    assert "Traceback" not in done.stderr
    assert elapsed < 15  # ray.init would retry this address for minutes
    assert list(tmp_path.iterdir()) == []  # no store, no parent run, no sweep dir


def test_unreachable_tracking_server_stops_a_ray_sweep_before_any_job(tmp_path):
    with socket.socket() as head:  # something answers at the Ray address: the cluster check passes
        head.bind(("127.0.0.1", 0))
        head.listen()
        (port,) = _free_ports(1)
        done = _cnnlab("train", "-m", *TINY, f"paths.runs={tmp_path}", "seed=0,1", "hydra/launcher=ray_cluster",
                       f"hydra.launcher.ray.init.address=127.0.0.1:{head.getsockname()[1]}",
                       f"tracking.uri=http://127.0.0.1:{port}", "tracking.timeout_s=2", timeout=60)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith(f"error: the MLflow tracking server at http://127.0.0.1:{port} did not answer")
    assert "Ray Launcher is launching" not in done.stdout + done.stderr
    assert not (tmp_path / "multirun").exists()


def _launcher_cfg(*overrides: str) -> dict:
    done = _cnnlab("train", *overrides, "--cfg", "hydra", "-p", "hydra.launcher", timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    return OmegaConf.to_container(OmegaConf.create(done.stdout))


def test_slurm_preset_composes_with_partition_gpus_time_and_array_parallelism():
    default = _launcher_cfg("hydra/launcher=slurm")
    assert default["_target_"].endswith("SlurmLauncher")
    assert (default["gpus_per_node"], default["cpus_per_task"], default["timeout_min"],
            default["array_parallelism"]) == (1, 4, 60, 8)
    node = _launcher_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
                         "hydra.launcher.timeout_min=240", "hydra.launcher.array_parallelism=3",
                         "hydra.launcher.mem_gb=32")
    assert {k: node[k] for k in ("partition", "gpus_per_node", "timeout_min", "array_parallelism", "mem_gb")} == {
        "partition": "gpu", "gpus_per_node": 2, "timeout_min": 240, "array_parallelism": 3, "mem_gb": 32}
    ray = _launcher_cfg("hydra/launcher=ray_cluster", "hydra.launcher.ray.init.address=head:6379")
    assert ray["_target_"].endswith("RayLauncher")
    assert ray["ray"]["init"]["address"] == "head:6379" and ray["ray"]["remote"]["num_cpus"] == 1
    assert ray["ray"]["init"]["object_store_memory"] is None  # ray.init refuses it for a running cluster
    hook = ray["ray"]["init"]["runtime_env"]["worker_process_setup_hook"]
    assert hook == "cnnlab.training.launchers.ray_worker_setup"


@pytest.mark.skipif(shutil.which("sbatch") is not None, reason="SLURM is installed here")
def test_slurm_without_sbatch_fails_before_any_run(tmp_path):
    done = _cnnlab("train", "-m", *TINY, f"paths.runs={tmp_path}", "seed=0,1", "hydra/launcher=slurm",
                   timeout=60)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.startswith("error: hydra/launcher=slurm submits jobs with SLURM's sbatch")
    assert list(tmp_path.iterdir()) == []


def test_ray_addresses_follow_ray_init(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert launchers.ray_address({"address": None}) is None  # a private local Ray
    assert launchers.ray_address({"address": "local"}) is None
    assert launchers.ray_address({"address": "10.0.0.5:6379"}) == "10.0.0.5:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.6:6380")
    assert launchers.ray_address({"address": None}) == "10.0.0.6:6380"
    assert launchers.host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert launchers.host_port("ray://head") == ("head", 10001)
    assert launchers.host_port("ray://head:20001") == ("head", 20001)
    assert launchers.host_port("[::1]:6379") == ("::1", 6379)
    for bad in ("head", "head:port", "head:0", ":6379"):
        with pytest.raises(ConfigError, match=f"must be HOST:PORT .* got '{bad}'"):
            launchers.host_port(bad)


def test_a_silent_address_times_out_within_the_limit():
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737), for documentation: nothing answers there, whether
    # the network drops the SYN (a timeout) or says so (unreachable).
    start = time.monotonic()
    problem = launchers.check_reachable("192.0.2.123", 6379, timeout_s=1.0)
    assert problem is not None and time.monotonic() - start < 3
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        assert launchers.check_reachable("127.0.0.1", server.getsockname()[1]) is None


def test_slurm_check_needs_sbatch(monkeypatch):
    cfg = OmegaConf.create({"hydra": {"launcher": {"_target_": "x.SlurmLauncher"}}})
    monkeypatch.setattr(launchers.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="sbatch, which is not on PATH"):
        launchers.check_launcher(cfg)
    monkeypatch.setattr(launchers.shutil, "which", lambda name: f"/usr/bin/{name}")
    launchers.check_launcher(cfg)  # sbatch found: nothing to say


def test_job_threads_follow_what_the_launcher_gave_the_job(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    monkeypatch.setattr(launchers, "available_cores", lambda: 8)
    monkeypatch.setitem(sys.modules, "ray", None)  # not inside a Ray task
    assert launchers.job_threads({}) is None  # the basic launcher: the job has the machine
    assert launchers.job_threads({"n_jobs": 2}) == 4  # joblib: cores split between parallel jobs
    assert launchers.job_threads({"n_jobs": -1}) == 1  # joblib's -1: as many jobs as cores
    assert launchers.job_threads({"n_jobs": 1}) is None
    assert launchers.job_threads({"cpus_per_task": 3}) == 3  # submitit_local
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")  # a SLURM job step: its allocation wins
    assert launchers.job_threads({"cpus_per_task": 3}) == 6
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")

    context = SimpleNamespace(get_assigned_resources=lambda: {"CPU": 2.0})
    fake_ray = SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", fake_ray)  # inside a Ray task with num_cpus=2
    assert launchers.job_threads({}) == 2
    context.get_assigned_resources = lambda: {"CPU": 0.5}
    assert launchers.job_threads({}) == 1


def test_ray_workers_move_to_the_driver_folder(tmp_path, monkeypatch, caplog):
    driver, elsewhere = tmp_path / "driver", tmp_path / "elsewhere"
    driver.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv(launchers.DRIVER_CWD_VAR, str(driver))
    launchers.ray_worker_setup()
    assert Path.cwd() == driver
    monkeypatch.setenv(launchers.DRIVER_CWD_VAR, str(tmp_path / "missing"))
    launchers.ray_worker_setup()
    assert Path.cwd() == driver and "does not exist on this Ray node" in caplog.text
