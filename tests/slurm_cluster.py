"""A real single-node SLURM cluster for the test suite (Debian's slurm-wlm 22.05 + munge).

`slurm_cluster` (pytest fixture, module scope) installs ``slurmctld slurmd slurm-client munge``
with apt when ``slurmctld`` is missing, writes slurm.conf / gres.conf / cgroup.conf under a temp
dir, starts munged, slurmctld and slurmd in the foreground as child processes (no systemd, no
files outside the temp dir), waits for the node to be idle and, at teardown, cancels the jobs
still on the cluster and stops exactly those three processes by PID.

Everything lives under the temp dir: free TCP ports are picked per cluster, munged listens on a
private socket (``AuthInfo=socket=...``), and ``SLURM_CONF`` points the clients at the config.
The snakemake SLURM plugin runs each job's step as ``srun`` with every ``SLURM_*`` variable
removed, ``SLURM_CONF`` included, so :attr:`SlurmCluster.env` also puts an ``srun`` wrapper
first on ``PATH`` that restores ``SLURM_CONF`` (the alternative, a link at
``/etc/slurm/slurm.conf``, would touch the machine). The wrapper also appends one line per job
step to :attr:`SlurmCluster.step_record`: the job id (and array task) and the ``CUDA_VISIBLE_DEVICES`` that SLURM
gave the step, which is the environment the rule's code runs in.

The node has ``GPUS`` fake GPUs (character devices like /dev/null, made with mknod, and
``AutoDetect=off``) so SLURM schedules ``--gpus`` and sets ``CUDA_VISIBLE_DEVICES`` per job;
torch sees no CUDA device, so the workflow's ``device: auto`` runs on the CPU. The node
declares more CPUs and memory than the machine has (``SlurmdParameters=config_overrides``, no
cgroup enforcement) so the profile's real requests (4 CPUs, 16 GB per feature job) fit.

Run ``python tests/slurm_cluster.py`` (as root) to start a cluster by hand: it prints the
environment to export and stops everything on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTITION = "nullcov"
GPUS = 2
CPUS = 8
REAL_MEMORY_MB = 64000
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


class SlurmUnavailable(Exception):
    """SLURM cannot be installed or started here for an external reason (not root, no apt)."""


def _run(command, **kwargs):
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def ensure_installed() -> None:
    """Install Debian's SLURM and munge when slurmctld is missing (root only)."""
    if all(shutil.which(tool, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
           for tool in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("SLURM is not installed and installing it needs root (apt-get)")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("SLURM is not installed and there is no apt-get to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    result = _run(install, env=env, timeout=600)
    if result.returncode == 0:
        return
    # Maybe only the package lists are missing or stale (fresh CI images have none).
    update = _run(["apt-get", "update", "-q"], env=env, timeout=600)
    result = _run(install, env=env, timeout=600)
    if result.returncode == 0:
        return
    report = f"{update.stdout[-2000:]}{update.stderr[-2000:]}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    if update.returncode != 0 or "Err:" in update.stdout or "Failed to fetch" in result.stdout + result.stderr:
        raise SlurmUnavailable(f"apt is unreachable (apt-get update / install could not fetch):\n{report}")
    # apt reaches its mirrors but the install fails: a real failure, not a reason to skip.
    raise RuntimeError(f"apt-get install {' '.join(PACKAGES)} failed:\n{report}")


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the process that started us dies (even by SIGKILL)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _sbin(name: str) -> str:
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        raise RuntimeError(f"{name} not found after installing {' '.join(PACKAGES)}")
    return path


class SlurmCluster:
    """One slurmctld + one slurmd (``GPUS`` fake GPUs) + munged, all under ``root``."""

    def __init__(self, root: Path, gpus: int = GPUS, cpus: int = CPUS):
        self.root = Path(root)
        self.gpus = gpus
        self.cpus = cpus
        self.node = f"nc{os.getpid() % 100000}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "etc" / "slurm.conf"
        self.bin = self.root / "bin"
        self.step_record = self.root / "steps.tsv"
        self.munge_socket = self.root / "munge" / "munge.socket"

    # -- configuration -----------------------------------------------------------------------
    def write_config(self) -> None:
        root = self.root
        for sub in ("etc", "state", "spool", "log", "dev", "bin", "munge", "munge-lib"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(root / "munge", 0o755)  # munged refuses a socket dir that is not 755
        os.chmod(root / "munge-lib", 0o700)
        key = root / "munge-lib" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        devices = []
        for index in range(self.gpus):
            device = root / "dev" / f"nvidia{index}"
            if not device.exists():
                os.mknod(device, 0o666 | 0o020000, os.makedev(1, 3))  # a /dev/null twin
            devices.append(device)
        controller_port, node_port = _free_ports(2)
        host = socket.gethostname()
        self.conf.write_text(
            "\n".join([
                f"ClusterName=nullcov{os.getpid() % 100000}",
                f"SlurmctldHost={host}(127.0.0.1)",
                f"SlurmctldPort={controller_port}",
                f"SlurmdPort={node_port}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                f"AuthInfo=socket={self.munge_socket}",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                "SlurmctldDebug=info",
                "SlurmdDebug=info",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "MpiDefault=none",
                "ReturnToService=2",
                # No slurmdbd: sacct cannot work, so the profile's squeue status command must, and
                # finished jobs must stay visible to squeue/scontrol long enough (the plugin falls
                # back to sacct when MinJobAge < 3 x its init seconds).
                "AccountingStorageType=accounting_storage/none",
                "JobAcctGatherType=jobacct_gather/none",
                "JobCompType=jobcomp/none",
                "MinJobAge=600",
                "SchedulerParameters=batch_sched_delay=0",
                "SchedulerType=sched/backfill",
                "DefMemPerCPU=1000",  # a job without --mem must not take the whole node
                "GresTypes=gpu",
                # The node declares what the profile asks for, not what this machine has.
                "SlurmdParameters=config_overrides",
                "InactiveLimit=0",
                "KillWait=5",
                "Waittime=0",
                f"NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={self.cpus} "
                f"RealMemory={REAL_MEMORY_MB} Gres=gpu:{self.gpus} State=UNKNOWN",
                f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP",
                "",
            ])
        )
        (root / "etc" / "gres.conf").write_text(
            "AutoDetect=off\n"
            + "".join(f"NodeName={self.node} Name=gpu File={device}\n" for device in devices)
        )
        (root / "etc" / "cgroup.conf").write_text("CgroupAutomount=no\nConstrainDevices=no\n")
        real_srun = _sbin("srun")
        recorder = self.bin / "record-step"
        recorder.write_text(
            "#!/bin/sh\n"
            "# Test cluster only: note the job and the GPUs SLURM gave this step, then run the command.\n"
            "printf '%s\\t%s\\t%s\\t%s\\n' \"$SLURM_JOB_ID\" \"${CUDA_VISIBLE_DEVICES-unset}\" \"$(date +%s.%N)\" "
            "\"${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}\" "
            f">> '{self.step_record}'\n"
            'exec "$@"\n'
        )
        srun = self.bin / "srun"
        srun.write_text(
            "#!/bin/bash\n"
            "# Test cluster only: the SLURM plugin strips SLURM_CONF from the job step's srun.\n"
            f"export SLURM_CONF='{self.conf}'\n"
            "n=0; for a in \"$@\"; do case $a in -*) n=$((n+1));; *) break;; esac; done\n"
            f"(( $# > n )) || exec {real_srun} \"$@\"\n"
            f'exec {real_srun} "${{@:1:n}}" {recorder} "${{@:n+1}}"\n'
        )
        for script in (srun, recorder):
            os.chmod(script, 0o755)

    @property
    def env(self) -> dict[str, str]:
        """Variables for SLURM clients (sbatch, squeue, srun via the wrapper) to reach this cluster."""
        return {"SLURM_CONF": str(self.conf), "PATH": f"{self.bin}:{os.environ.get('PATH', '')}"}

    # -- processes ---------------------------------------------------------------------------
    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True, preexec_fn=_die_with_parent)
        log.close()

    def start(self, timeout: float = 60) -> None:
        self.write_config()
        root = self.root
        self._start("munged", [
            _sbin("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={root / 'munge-lib' / 'munge.key'}", f"--pid-file={root / 'munge' / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}", f"--seed-file={root / 'munge-lib' / 'munged.seed'}",
        ])
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged to create its socket")
        self._start("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self.scontrol("ping").returncode == 0 and "UP" in self.scontrol("ping").stdout,
                   timeout, "slurmctld to answer ping")
        self._start("slurmd", [_sbin("slurmd"), "-D", "-N", self.node, "-f", str(self.conf)])
        self._wait(self.node_idle, timeout, f"node {self.node} to become idle")

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited with {process.returncode} while waiting for {what}:\n"
                                       f"{self.logs()}")
            if ready():
                return
            time.sleep(0.1)
        raise RuntimeError(f"timed out after {timeout} s waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} (last 3000 chars)\n{text[-3000:]}")
        return "\n".join(parts)

    def client(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return _run(list(command), env=dict(os.environ, **self.env), timeout=timeout)

    def scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return self.client("scontrol", *args)

    def node_state(self) -> str:
        result = self.client("sinfo", "-h", "-N", "-n", self.node, "-o", "%T")
        return result.stdout.strip()

    def node_idle(self) -> bool:
        return self.node_state() == "idle"

    def jobs(self) -> dict[str, dict[str, str]]:
        """``scontrol show job -d`` of every job slurmctld still knows (MinJobAge keeps finished ones)."""
        result = self.scontrol("show", "job", "-d", "-o")
        jobs = {}
        for line in result.stdout.splitlines():
            fields = {}
            for token in line.split():
                if "=" in token:
                    key, _, value = token.partition("=")
                    fields.setdefault(key, value)
            if "JobId" in fields:
                jobs[fields["JobId"]] = fields
        return jobs

    def steps(self) -> list[tuple[str, str, float]]:
        """(job id, CUDA_VISIBLE_DEVICES, start time) of every job step started through srun."""
        return [(job, devices, started) for job, devices, started, _ in self.array_steps()]

    def array_steps(self) -> list[tuple[str, str, float, str]]:
        """:meth:`steps` plus the step's array task (``<array job id>_<task id>``, "" outside arrays).

        ``<array>_<task>`` is what the plugin and ``squeue`` name a task by (``scontrol`` lists it
        with ArrayJobId/ArrayTaskId). Plugin 2.8 runs an array's first task in the batch step
        without srun, so that task has no row here.
        """
        if not self.step_record.exists():
            return []
        rows = []
        for line in self.step_record.read_text().splitlines():
            job, devices, started, task = line.split("\t")
            rows.append((job, devices, float(started), task))
        return rows

    def cancel_all(self) -> None:
        """Cancel every job on this (private) cluster and wait until none runs."""
        if "slurmctld" not in self.processes or self.processes["slurmctld"].poll() is not None:
            return
        self.client("scancel", "--partition", PARTITION)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            queue = self.client("squeue", "-h", "-t", "PD,R,CG,CF,S", "-o", "%i")
            if queue.returncode != 0 or not queue.stdout.strip():
                return
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel the jobs, then stop slurmd, slurmctld and munged: only the PIDs started here."""
        try:
            self.cancel_all()
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                process = self.processes.pop(name, None)
                if process is None or process.poll() is not None:
                    continue
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)


try:
    import pytest
except ImportError:  # pragma: no cover - only for `python tests/slurm_cluster.py` without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture(scope="module")
    def slurm_cluster(tmp_path_factory):
        """A running cluster; its client variables are set in os.environ for the module's tests."""
        if os.geteuid() != 0:
            pytest.skip("the SLURM tests start slurmctld/slurmd/munged and may apt-get install them: they need root")
        try:
            ensure_installed()
        except SlurmUnavailable as reason:
            pytest.skip(f"cannot install SLURM: {reason}")
        # A short path: munge's socket path must fit in sockaddr_un (108 bytes).
        root = Path(tempfile.mkdtemp(prefix="nc-slurm-", dir="/tmp"))
        cluster = SlurmCluster(root)
        patch = pytest.MonkeyPatch()
        try:
            cluster.start()
            for key, value in cluster.env.items():
                patch.setenv(key, value)
            # The plugin also reads these; they must not leak in from a surrounding allocation.
            for key in [k for k in os.environ if k.startswith(("SLURM_JOB", "SBATCH_", "SRUN_"))]:
                patch.delenv(key)
            yield cluster
        finally:
            patch.undo()
            cluster.stop()
            shutil.rmtree(root, ignore_errors=True)


def main() -> None:  # pragma: no cover - manual use
    import signal

    ensure_installed()
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="nc-slurm-", dir="/tmp"))
    cluster = SlurmCluster(root)
    start = time.perf_counter()
    cluster.start()
    print(f"node {cluster.node} idle after {time.perf_counter() - start:.1f} s; partition {PARTITION}")
    print(f"export SLURM_CONF={cluster.env['SLURM_CONF']} PATH={cluster.bin}:$PATH")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
