"""A real two-node Slurm cluster on this machine, for the tests.

``local_cluster(tmp_dir)`` writes one ``slurm.conf`` with two ``NodeName`` entries (both on this host,
``NodeAddr=127.0.0.1``, each its own ``Port=``), starts ``slurmctld`` and two ``slurmd -N <name>`` in the
foreground as child processes, waits until ``sinfo`` shows both nodes idle and yields a :class:`Cluster`
whose ``env`` (``SLURM_CONF``) points the client commands (``sbatch``, ``squeue``, ``scontrol``) at it.
On exit it stops every process it started (SIGTERM, then SIGKILL after a bound); every file it writes
lies under ``tmp_dir`` and it removes nothing.

No munge, no cgroups, no accounting daemon: ``AuthType=auth/none``, ``CredType=cred/none``,
``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``. Needs Debian's ``slurmctld``, ``slurmd``
and ``slurm-client`` and root (the daemons run as ``SlurmUser=root``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

NODES = ("node1", "node2")
PARTITION = "debug"
DAEMONS = ("slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scontrol")


def missing() -> str | None:
    """Why a local cluster cannot start here, or None when it can."""
    absent = [c for c in DAEMONS if shutil.which(c) is None]
    if absent:
        return f"Slurm is not installed (missing {', '.join(absent)}): apt-get install slurmctld slurmd slurm-client"
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root (SlurmUser=root)"
    return None


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1 (held together while chosen so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _conf(root: Path, host: str, ctld_port: int, node_ports: list[int]) -> str:
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
        f"CPUs=1 Boards=1 SocketsPerBoard=1 CoresPerSocket=1 ThreadsPerCore=1 RealMemory=1000 State=UNKNOWN"
        for name, port in zip(NODES, node_ports)
    )
    return f"""\
# Written by tests/slurm/cluster.py: a two-node cluster on this host, 127.0.0.1 only.
ClusterName=omnitest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job may start again cred_expire seconds after it ended (default 120 s; minimum 5): the
# revoked credential of its last run is forgotten then, so starting it sooner fails ("Job credential revoked").
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=300
SlurmdTimeout=300
MessageTimeout=30
BatchStartTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=600
SchedulerType=sched/backfill
# Schedule every 2 s, not 60 s: a requeued job starts soon after its BeginTime.
SchedulerParameters=sched_interval=2,bf_interval=2
{nodes}
PartitionName={PARTITION} Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    """A running local cluster: ``env`` for the client commands, ``run`` to call one."""

    root: Path
    conf: Path
    env: dict[str, str]
    nodes: tuple[str, ...] = NODES
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; text output."""
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout
        )

    def logs(self, lines: int = 30) -> str:
        """The tails of the daemons' logs (and of their stderr), for an error message."""
        out = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {path.name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (``JobState``, ``Restarts``, ``NodeList``, ...)."""
        text = self.run("scontrol", "-o", "show", "job", job_id).stdout
        fields = {}
        for word in text.split():
            key, _, value = word.partition("=")
            fields[key] = value
        return fields

    def wait_state(self, job_id: str, states: set[str], timeout: float = 60) -> dict[str, str]:
        """Poll ``scontrol show job`` until the job's state is one of ``states``; its fields."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(
            f"job {job_id} not in {sorted(states)} after {timeout:.0f} s: {info.get('JobState')}\n"
            + self.run("scontrol", "show", "job", job_id, check=False).stdout
            + self.logs()
        )

    def sbatch(self, *args: str) -> str:
        """Submit with ``sbatch --parsable``; the job id."""
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def _stop(self, grace: float = 10) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        # slurmstepd (and the job's processes) are started by slurmd in their own sessions: end the
        # ones that belong to this cluster (their command line or environment names our conf).
        for pid in _our_stragglers(self.conf):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _our_stragglers(conf: Path) -> list[int]:
    """Processes still alive whose environment has ``SLURM_CONF=<conf>`` (slurmstepd, job steps)."""
    mark = f"SLURM_CONF={conf}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if mark in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def local_cluster(tmp_dir: Path | str, *, ready_timeout: float = 60) -> Iterator[Cluster]:
    """Start a two-node Slurm cluster under ``tmp_dir``; stop it on exit."""
    why = missing()
    if why:
        raise RuntimeError(why)
    root = Path(tmp_dir)
    for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    conf = root / "slurm.conf"
    conf.write_text(_conf(root, host, ctld_port, node_ports))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
    env["SLURM_CONF"] = str(conf)
    cluster = Cluster(root=root, conf=conf, env=env)

    def start(name: str, *cmd: str) -> None:
        with open(root / "log" / f"{name}.stderr", "wb") as err:
            cluster.procs[name] = subprocess.Popen(
                list(cmd), env=env, stdout=err, stderr=subprocess.STDOUT, cwd=root, start_new_session=True
            )

    try:
        # -i: ignore saved state; -c: clear the job list (fresh start under a fresh folder anyway).
        start("slurmctld", "slurmctld", "-D", "-c", "-i", "-f", str(conf))
        for name in NODES:
            start(f"slurmd-{name}", "slurmd", "-D", "-N", name, "-f", str(conf))
        _wait_idle(cluster, ready_timeout)
        yield cluster
    finally:
        cluster._stop()


def _wait_idle(cluster: Cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    states = ""
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} while starting\n{cluster.logs()}")
        got = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=30)
        states = got.stdout.strip()
        idle = {line.split()[0] for line in states.splitlines() if line.split()[-1] == "idle"}
        if got.returncode == 0 and idle >= set(cluster.nodes):
            return
        time.sleep(0.5)
    raise RuntimeError(f"Slurm nodes not idle after {timeout:.0f} s (sinfo: {states!r})\n{cluster.logs()}")
