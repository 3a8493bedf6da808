"""A throw-away single-node Slurm cluster on this machine, for testing the SLURM profile.

Debian's Slurm 22.05 packages (munge, slurmctld, slurmd, slurm-client), no slurmdbd, no systemd:

    cluster = SlurmCluster()
    cluster.start()            # installs what is missing, writes /etc/slurm/*.conf, starts the daemons
    ...                        # sbatch / squeue / scontrol work; jobs run as root on this machine
    cluster.stop()             # the daemons it started, by PID; removes its config files and state folder

The node offers two fake GPUs (gres `gpu`, files /dev/null and /dev/zero): Slurm schedules them and sets
CUDA_VISIBLE_DEVICES in a job that asks for them, which is what a workflow test needs. Without slurmdbd
there is no job accounting (`sacct` fails); finished jobs stay visible to `scontrol show job` and
`squeue --states=all` for MinJobAge seconds. Every step is bounded in time; a failure raises
ClusterUnavailable (packages or privileges missing) or ClusterError (a daemon did not come up), both
with the relevant log lines.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("munge", "slurmctld", "slurmd", "slurm-client")
COMMANDS = ("munged", "munge", "unmunge", "slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol", "scancel")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
MARKER = "# Written by wanda-bench tests/slurm_cluster.py: a single-node test cluster."


class ClusterUnavailable(Exception):
    """This machine cannot host the test cluster (not root, no apt, packages not installable, a foreign config)."""


class ClusterError(Exception):
    """The cluster was set up but did not come up in time."""


def which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=path)


def run(cmd, timeout=30, check=True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stdout}{proc.stderr}".strip())
    return proc


def ensure_packages(timeout: float = 300) -> None:
    """Install the Slurm and munge packages when a command is missing (apt-get update once)."""
    if all(which(c) for c in COMMANDS):
        return
    if os.geteuid() != 0:
        raise ClusterUnavailable("Slurm is not installed and installing it needs root")
    if not which("apt-get"):
        raise ClusterUnavailable("Slurm is not installed and there is no apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + timeout
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"{' '.join(cmd)} took more than {timeout:.0f} s") from None
        if proc.returncode != 0:
            raise ClusterUnavailable(f"{' '.join(cmd)} failed: {(proc.stdout + proc.stderr)[-2000:]}")
    missing = [c for c in COMMANDS if not which(c)]
    if missing:
        raise ClusterUnavailable(f"installed {', '.join(PACKAGES)} but still missing: {', '.join(missing)}")


def node_hardware() -> dict:
    """What `slurmd -C` reports for this machine (NodeName, CPUs, ..., RealMemory)."""
    out = run([which("slurmd"), "-C"]).stdout
    line = next(line for line in out.splitlines() if line.startswith("NodeName="))
    return dict(field.split("=", 1) for field in line.split())


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:
        return False


def _terminate(pid: int | None, timeout: float = 15) -> None:
    """SIGTERM, then SIGKILL after `timeout` seconds; reaps it when it is our child."""
    if not _alive(pid):
        return
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not _alive(pid):
                return
            time.sleep(0.1)


class SlurmCluster:
    """One node (this machine) with `gpus` fake GPUs, in the cluster's default partition `debug` and,
    when `partition` is another name, also in that (non-default) partition."""

    def __init__(self, partition: str = "debug", gpus: int = 2, conf_dir: str | Path = "/etc/slurm",
                 state_root: str | Path = "/var/lib/slurm/wanda-test", log_dir: str | Path = "/var/log/slurm",
                 min_job_age: int = 600):
        self.partition, self.gpus, self.min_job_age = partition, gpus, min_job_age
        self.conf_dir, self.state_root, self.log_dir = Path(conf_dir), Path(state_root), Path(log_dir)
        self.node = socket.gethostname().split(".")[0]
        self.ctld_pidfile = self.state_root / "slurmctld.pid"
        self.slurmd_pidfile = self.state_root / "slurmd.pid"
        self.ctld_log = self.log_dir / "wanda-test-slurmctld.log"
        self.slurmd_log = self.log_dir / "wanda-test-slurmd.log"
        self.started: list[int] = []  # daemons this object started (munged included), in start order
        self._children: list[subprocess.Popen] = []

    # -- configuration -------------------------------------------------------------------------------

    def slurm_conf(self, hardware: dict) -> str:
        hw = {k: hardware[k] for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
              if k in hardware}
        # Below what slurmd measures, or the node is drained for "Low RealMemory".
        memory = max(1000, int(int(hardware.get("RealMemory", 2000)) * 0.9))
        node = " ".join(f"{k}={v}" for k, v in hw.items())
        return "\n".join([
            MARKER,
            "ClusterName=wandatest",
            f"SlurmctldHost={self.node}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            "ReturnToService=2",
            "SlurmctldPort=6817",
            "SlurmdPort=6818",
            f"StateSaveLocation={self.state_root / 'slurmctld'}",
            f"SlurmdSpoolDir={self.state_root / 'slurmd'}",
            f"SlurmctldPidFile={self.ctld_pidfile}",
            f"SlurmdPidFile={self.slurmd_pidfile}",
            f"SlurmctldLogFile={self.ctld_log}",
            f"SlurmdLogFile={self.slurmd_log}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # Finished jobs stay in slurmctld's memory this long: squeue/scontrol are the only job
            # history without slurmdbd, and the executor plugin trusts squeue only when this is at
            # least 3x its initial status-check delay.
            f"MinJobAge={self.min_job_age}",
            "SchedulerParameters=sched_interval=2",
            "GresTypes=gpu",
            f"NodeName={self.node} NodeAddr=127.0.0.1 {node} RealMemory={memory} Gres=gpu:{self.gpus} State=UNKNOWN",
            *(f"PartitionName={name} Nodes={self.node} Default={'YES' if name == 'debug' else 'NO'} "
              "MaxTime=INFINITE State=UP" for name in dict.fromkeys(["debug", self.partition])),
            "",
        ])

    def gres_conf(self) -> str:
        files = ",".join(["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"][: self.gpus])
        return f"{MARKER}\nAutoDetect=off\nNodeName={self.node} Name=gpu File={files}\n"

    def write_config(self) -> None:
        if self.gpus > 5:
            raise ValueError("at most 5 fake GPUs (one per character device used as a stand-in)")
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        for name in ("slurm.conf", "gres.conf"):
            path = self.conf_dir / name
            if path.exists() and MARKER not in path.read_text(errors="replace"):
                raise ClusterUnavailable(f"{path} exists and was not written by this helper: not overwriting it")
        (self.conf_dir / "slurm.conf").write_text(self.slurm_conf(node_hardware()))
        (self.conf_dir / "gres.conf").write_text(self.gres_conf())

    # -- daemons -------------------------------------------------------------------------------------

    def remove_config(self) -> None:
        """Remove the config files this helper wrote. Left behind, they make every Slurm client (and so every
        Snakemake start with the SLURM plugin installed, which asks `scontrol show config`) wait ~10 s for a
        controller that is gone; without them the clients fail at once."""
        for name in ("slurm.conf", "gres.conf"):
            path = self.conf_dir / name
            try:
                if MARKER in path.read_text(errors="replace"):
                    path.unlink()
            except OSError:
                pass

    def start_munge(self, timeout: float = 20) -> None:
        if run(f"{which('munge')} -n | {which('unmunge')}", shell=True, check=False).returncode == 0:
            return  # a munged is already serving (ours from before, or the system's): use it
        if not Path("/etc/munge/munge.key").exists():
            run(["runuser", "-u", "munge", "--", which("mungekey"), "--create"])
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        run(["runuser", "-u", "munge", "--", which("munged")])  # forks into the background
        deadline = time.monotonic() + timeout
        while run(f"{which('munge')} -n | {which('unmunge')}", shell=True, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise ClusterError("munged did not answer `munge -n | unmunge` within "
                                   f"{timeout:.0f} s; see /var/log/munge/munged.log")
            time.sleep(0.2)
        pid = _read_pid(Path("/run/munge/munged.pid"))
        if pid:
            self.started.append(pid)

    def _spawn(self, daemon: str, log: Path) -> int:
        # -D: stay in the foreground, so that the PID is ours; own session, so that a Ctrl-C in the
        # test run reaches the daemons only through stop().
        with open(log, "ab") as out:
            proc = subprocess.Popen([which(daemon), "-D"], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self._children.append(proc)
        self.started.append(proc.pid)
        return proc.pid

    def stop_stale(self) -> None:
        """Stop daemons a previous (killed) run of this helper left behind, by their PID files."""
        for pidfile, name in ((self.slurmd_pidfile, "slurmd"), (self.ctld_pidfile, "slurmctld")):
            pid = _read_pid(pidfile)
            if pid and _alive(pid):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if name.encode() in cmdline:
                    _terminate(pid)
            pidfile.unlink(missing_ok=True)

    def start(self, timeout: float = 60) -> "SlurmCluster":
        """Install if needed, configure, start munge, slurmctld and slurmd; wait until the node is idle."""
        if os.geteuid() != 0:
            raise ClusterUnavailable("running slurmctld and slurmd needs root")
        ensure_packages()
        self.write_config()
        self.stop_stale()
        shutil.rmtree(self.state_root, ignore_errors=True)  # no jobs, node states or job ids from before
        for sub in ("slurmctld", "slurmd"):
            (self.state_root / sub).mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for log in (self.ctld_log, self.slurmd_log):
            log.write_text("")
        self.start_munge()
        self._spawn("slurmctld", self.ctld_log)
        deadline = time.monotonic() + timeout
        while run([which("scontrol"), "ping"], check=False).stdout.count("UP") < 1:
            self._check_children()
            if time.monotonic() > deadline:
                raise ClusterError(f"slurmctld did not answer within {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.3)
        self._spawn("slurmd", self.slurmd_log)
        while self.node_state() not in ("idle", "mixed", "allocated"):
            self._check_children()
            if time.monotonic() > deadline:
                raise ClusterError(f"node {self.node} not idle within {timeout:.0f} s "
                                   f"(state {self.node_state()!r})\n{self.logs()}")
            time.sleep(0.3)
        return self

    def _check_children(self) -> None:
        for proc in self._children:
            if proc.poll() is not None:
                raise ClusterError(f"{proc.args[0]} exited with status {proc.returncode}\n{self.logs()}")

    def node_state(self) -> str:
        proc = run([which("sinfo"), "-h", "-N", "-n", self.node, "-o", "%t"], check=False)
        states = {line.strip().rstrip("*~#!%$@^-") for line in proc.stdout.splitlines() if line.strip()}
        return states.pop() if proc.returncode == 0 and len(states) == 1 else ",".join(sorted(states))

    def logs(self, lines: int = 30) -> str:
        out = []
        for log in (self.ctld_log, self.slurmd_log):
            try:
                tail = log.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                continue
            out.append(f"--- {log} (last {lines} lines)\n" + "\n".join(tail))
        return "\n".join(out)

    def cancel_jobs(self, timeout: float = 20) -> None:
        """Cancel the jobs still pending or running (a run that failed or timed out), bounded in time."""
        active = [i for i, job in self.jobs().items() if job.get("JobState") in ("PENDING", "RUNNING",
                                                                              "CONFIGURING", "COMPLETING")]
        if not active:
            return
        run([which("scancel"), *active], check=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
                self.jobs().get(i, {}).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")
                for i in active):
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel leftover jobs, then stop what start() started (slurmd, slurmctld, munged), newest first, by PID."""
        if self.started:
            try:
                self.cancel_jobs()
            except (OSError, subprocess.SubprocessError, ClusterError):
                pass
        ours = bool(self.started)
        for pid in reversed(self.started):
            _terminate(pid)
        if ours:
            self.remove_config()
            shutil.rmtree(self.state_root, ignore_errors=True)  # job states and spool; the logs stay for a look
        for proc in self._children:
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self.started.clear()
        self._children.clear()

    # -- job history ---------------------------------------------------------------------------------

    def jobs(self) -> dict[str, dict]:
        """Every job slurmctld still remembers (MinJobAge), by job id: `scontrol show job -o` fields."""
        proc = run([which("scontrol"), "show", "job", "-o"], check=False)
        jobs = {}
        for line in proc.stdout.splitlines():
            fields = {}
            for token in line.split():
                if "=" in token:
                    key, value = token.split("=", 1)
                    fields.setdefault(key, value)
            if "JobId" in fields:
                jobs[fields["JobId"]] = fields
        return jobs

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()
