"""A real single-node SLURM cluster for tests: munged + slurmctld + slurmd on localhost, stopped by PID afterwards.

The `slurm_cluster` fixture installs Debian's slurm-wlm and munge with apt when they are missing (CI runs as
root), writes a slurm.conf for this host into a temporary directory (every client finds it through
`SLURM_CONF`), starts the three daemons (daemonised, pid files and logs there), waits until the node
is idle, and stops exactly those processes at the end. proctrack/pgid lets slurmd kill a job's whole process
group, so no training process outlives its job.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = ("slurm-wlm", "munge")


@dataclass
class SlurmCluster:
    """Where the test cluster lives and the environment its clients need."""

    root: Path
    env: dict[str, str]

    def run(self, *command: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(
            command, env={**self.env, **(env or {})}, capture_output=True, text=True, timeout=60
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr}")
        return done

    def job_field(self, job_id: str, name: str) -> str | None:
        """One `Name=value` field of `scontrol show job` (the first array task's for an array), None if absent."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith(f"{name}="):
                return field.split("=", 1)[1]
        return None

    def job_state(self, job_id: str) -> str:
        return self.job_field(job_id, "JobState") or "UNKNOWN"

    def array_states(self, job_id: str) -> list[str]:
        """The JobState of every task of a job array (one entry for a plain job)."""
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        return [field.split("=", 1)[1] for field in out.split() if field.startswith("JobState=")]

    def wait_for(self, job_id: str, states: tuple[str, ...], timeout: float) -> str:
        deadline = time.time() + timeout
        state = self.job_state(job_id)
        while state not in states and time.time() < deadline:
            time.sleep(1)
            state = self.job_state(job_id)
        return state


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge when slurmctld is missing (needs root); skip if that is impossible."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("slurm-wlm is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(install, env=env, capture_output=True, check=True)


def _slurm_conf(root: Path, host: str, cpus: int, memory_mb: int) -> str:
    return f"""\
ClusterName=mmrettest
SlurmctldHost={host}
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=10
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""


def _stop(pid_file: Path) -> None:
    if not pid_file.is_file():
        return
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except (ValueError, ProcessLookupError):
        pass


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running slurmctld + slurmd (+ munged) on this host; yields a `SlurmCluster`."""
    ensure_installed()
    root = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir()
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 2
    (root / "slurm.conf").write_text(_slurm_conf(root, host, cpus, 2048))
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[key]
    socket_path = root / "munge" / "munge.socket"
    conf = (root / "slurm.conf").read_text() + f"AuthInfo=socket={socket_path}\n"
    (root / "slurm.conf").write_text(conf)
    subprocess.run(
        [
            "munged",
            "--force",
            f"--socket={socket_path}",
            f"--pid-file={root}/munged.pid",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munge/seed",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    subprocess.run(["slurmctld", "-c", "-i"], env=env, check=True, capture_output=True)
    subprocess.run(["slurmd", "-c"], env=env, check=True, capture_output=True)
    cluster = SlurmCluster(root=root, env=env)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            out = cluster.run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if out.startswith("idle"):
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"slurm node never became idle; see {root}/slurmctld.log and slurmd.log")
        yield cluster
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        for name in ("slurmd.pid", "slurmctld.pid", "munged.pid"):
            _stop(root / name)
