"""A one-node Slurm cluster for the tests: slurm.conf in a temporary directory, munged, slurmctld and
slurmd started here and stopped by their process ids. Installs nothing: .ci/run installs Debian's
slurm-wlm and munge."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
KILL_WAIT = 10
"""Seconds between Slurm's SIGTERM and its SIGKILL when it ends a job (KillWait; Slurm's default is
30): a preempted run must checkpoint and ask for its requeue within this."""
CRED_EXPIRE = 10
"""AuthInfo's cred_expire, which "also controls how long a requeued job must wait before starting
again" (slurm.conf(5)); Slurm's default of 120 s made each requeue in the tests wait two minutes."""


def available() -> str | None:
    """None when a cluster can be started here, else why not."""
    for tool in ("/usr/sbin/munged", "/usr/sbin/slurmctld", "/usr/sbin/slurmd", "sbatch"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the test cluster runs its daemons as root"
    return None


class Cluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.pids: list[int] = []
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> None:
        for sub in ("state", "spool", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        r = self.root
        self.conf.write_text(
            f"""ClusterName=qadisttest
SlurmctldHost={self.host}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket},cred_expire={CRED_EXPIRE}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerType=sched/backfill
MpiDefault=none
JobRequeue=1
KillWait={KILL_WAIT}
InactiveLimit=0
MinJobAge=600
NodeName={self.host} CPUs={os.cpu_count()} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
"""
        )
        self.pids.append(self._daemon(["/usr/sbin/slurmctld", "-D", "-f", str(self.conf)]))
        time.sleep(1.0)
        self.pids.append(self._daemon(["/usr/sbin/slurmd", "-D", "-f", str(self.conf)]))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
            if out.stdout.strip() in ("idle", "mixed"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the test Slurm node did not come up: {self.logs()}")

    def _start_munge(self) -> None:
        key = self.root / "munge.key"
        subprocess.run(["mungekey", "-c", "-f", "-k", str(key)], check=True, capture_output=True)
        os.chmod(key, 0o400)
        sock = self.root / "munge.socket"
        self.pids.append(
            self._daemon(
                [
                    "/usr/sbin/munged",
                    "-F",
                    "--force",
                    f"--key-file={key}",
                    f"--socket={sock}",
                    f"--pid-file={self.root / 'run' / 'munged.pid'}",
                    f"--log-file={self.root / 'log' / 'munged.log'}",
                    f"--seed-file={self.root / 'munge.seed'}",
                ]
            )
        )
        # Slurm's auth/munge plugin finds munged's socket through AuthInfo.
        self.munge_socket = sock
        time.sleep(0.5)

    def _daemon(self, cmd: list[str]) -> int:
        log = open(self.root / "log" / f"{Path(cmd[0]).name}.out", "w")  # noqa: SIM115 - lives with the daemon
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env).pid

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.root / "log").glob("*")) if p.is_file()
        )

    def stop(self) -> None:
        for pid in reversed(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in self.pids:
            for _ in range(50):
                try:
                    os.waitpid(pid, os.WNOHANG)
                    os.kill(pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    def wait_for(self, job: str, timeout: float = 600) -> str:
        """The job's final state (COMPLETED, FAILED, ...), polling scontrol."""
        deadline = time.time() + timeout
        state = "UNKNOWN"
        while time.time() < deadline:
            out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, env=self.env).stdout
            for field in out.split():
                if field.startswith("JobState="):
                    state = field.split("=", 1)[1]
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(1.0)
        return f"still {state} after {timeout:.0f} s"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
