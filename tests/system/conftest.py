"""Daemons for the system tests, each started by its fixture and stopped by pid at the end:

- `ssh_nodes`: an sshd on a loopback port with its own host key, and ssh aliases `node-a` and
  `node-b` for it (two "nodes" on one machine), plus `node-down` (a closed port) and
  `node-nokey` (a host key nobody accepted). The aliases live in a private ssh config, put in
  front of every `ssh` call by an `ssh` wrapper early on PATH: deepspeed runs plain `ssh HOST
  hostname` to check a hostfile and pdsh execs `ssh` from PATH, so neither needs ~/.ssh touched.
- `slurm_cluster`: munged, slurmctld and slurmd for a one-node cluster, configured under a
  temporary directory and reached through SLURM_CONF (nothing under /etc is changed).

Missing packages are installed with apt-get (openssh-server and pdsh; slurm-wlm and munge);
the tests are skipped, with the reason, only where that cannot be done.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import VENV_BIN, free_port, launcher_env

SBIN = "/usr/local/sbin:/usr/sbin:/sbin"


def which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":" + SBIN)


def ensure_packages(packages: list[str], commands: list[str]) -> None:
    """apt-get install `packages` unless every one of `commands` is already there."""
    if all(which(c) for c in commands):
        return
    missing = [c for c in commands if not which(c)]
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip(f"{', '.join(missing)} not installed, and installing {' '.join(packages)} needs apt-get as root")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    # Debian starts a service when its package is installed (an sshd on port 22, munged, ...),
    # unless policy-rc.d says no; say no for the length of the install, if nothing else does.
    policy = Path("/usr/sbin/policy-rc.d")
    own_policy = not policy.exists()
    if own_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        proc = subprocess.run(install, env=env, capture_output=True, text=True)
        if proc.returncode != 0:  # a fresh machine has no package lists yet
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True)
            proc = subprocess.run(install, env=env, capture_output=True, text=True)
    finally:
        if own_policy:
            policy.unlink()
    if proc.returncode != 0:
        pytest.skip(f"apt-get install {' '.join(packages)} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    still = [c for c in commands if not which(c)]
    if still:
        pytest.fail(f"installed {' '.join(packages)}, but {', '.join(still)} is still missing")


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (CI runs the system tests as root)")


def stop(proc: subprocess.Popen) -> None:
    """Stop a daemon this session started: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def wait_for(condition, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
    pytest.fail(f"{what} within {timeout:.0f} s\n{tail}")


# --------------------------------------------------------------------------- ssh


@dataclass
class SSHNodes:
    dir: Path
    port: int
    bin_dir: Path  # holds the `ssh` wrapper
    config: Path

    def env(self, **extra: str) -> dict[str, str]:
        """launcher_env with the ssh wrapper and the venv first on PATH."""
        env = launcher_env(**extra)
        env["PATH"] = f"{self.bin_dir}:{VENV_BIN}:{env['PATH']}"
        return env


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def ssh_nodes(tmp_path_factory) -> SSHNodes:
    require_root("sshd with its own host key")
    ensure_packages(["openssh-server", "openssh-client", "pdsh"], ["sshd", "ssh", "ssh-keygen", "pdsh"])
    d = tmp_path_factory.mktemp("sshd")
    d.chmod(0o700)
    for key in ("host_key", "client_key"):
        subprocess.run([which("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    port = free_port()
    (d / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d}/host_key
AuthorizedKeysFile {d}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile {d}/sshd.pid
""")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = d / "sshd.log"
    proc = subprocess.Popen([which("sshd"), "-D", "-e", "-f", str(d / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    try:
        wait_for(lambda: _port_open(port) or proc.poll() is not None, 20, "sshd did not listen", log)
        if proc.poll() is not None:
            pytest.fail(f"sshd exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        host_key = " ".join((d / "host_key.pub").read_text().split()[:2])
        (d / "known_hosts").write_text(f"zerotrain-test-sshd {host_key}\n")
        (d / "empty_known_hosts").write_text("")

        def alias(names: str, port: int, known_hosts: str) -> str:
            return (f"Host {names}\n  HostName 127.0.0.1\n  Port {port}\n  HostKeyAlias zerotrain-test-sshd\n"
                    f"  UserKnownHostsFile {d}/{known_hosts}\n  StrictHostKeyChecking yes\n"
                    f"  IdentityFile {d}/client_key\n  IdentitiesOnly yes\n")

        (d / "ssh_config").write_text(alias("node-a node-b", port, "known_hosts")
                                      + alias("node-nokey", port, "empty_known_hosts")
                                      + alias("node-down", free_port(), "known_hosts"))
        bin_dir = d / "bin"
        bin_dir.mkdir()
        (bin_dir / "ssh").write_text(f"#!/bin/sh\nexec {which('ssh')} -F {d}/ssh_config \"$@\"\n")
        (bin_dir / "ssh").chmod(0o755)
        nodes = SSHNodes(d, port, bin_dir, d / "ssh_config")
        check = subprocess.run(["ssh", "-o", "BatchMode=yes", "node-b", "echo", "ok"], env=nodes.env(),
                               capture_output=True, text=True, timeout=30)
        assert check.stdout.strip() == "ok", f"ssh node-b failed: {check.stderr}\n{log.read_text()[-2000:]}"
        yield nodes
    finally:
        stop(proc)


# --------------------------------------------------------------------------- SLURM


@dataclass
class SlurmCluster:
    dir: Path
    conf: Path
    node: str

    def env(self, **extra: str) -> dict[str, str]:
        """launcher_env for sbatch & co: this cluster's config, and no SLURM_* of an outer job."""
        env = {k: v for k, v in launcher_env(**extra).items()
               if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([which(cmd[0]), *cmd[1:]], env=self.env(), capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed: {proc.stdout}{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)


def _node_hardware() -> str:
    """This machine as slurmd sees it (CPUs, sockets, cores, threads, memory), for NodeName=."""
    out = subprocess.run([which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0].split()
    return " ".join(f for f in first if not f.startswith("NodeName="))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> SlurmCluster:
    require_root("slurmd (it starts jobs as their user)")
    ensure_packages(["slurm-wlm", "munge"], ["slurmctld", "slurmd", "sbatch", "munged"])
    d = tmp_path_factory.mktemp("slurm")
    d.chmod(0o700)
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    (d / "munge.key").write_bytes(os.urandom(1024))
    (d / "munge.key").chmod(0o600)
    short = socket.gethostname().split(".")[0]
    try:  # the master address of a job is its first node's name: it must resolve
        socket.gethostbyname(short)
        node = short
    except OSError:
        node = "localhost"
    conf = d / "slurm.conf"
    conf.write_text(f"""\
ClusterName=zerotrain-test
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s)
AuthInfo=socket={d}/munge.socket,cred_expire=10
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
JobRequeue=1
ReturnToService=2
MinJobAge=3600
NodeName={node} NodeAddr=127.0.0.1 {_node_hardware()} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    procs: list[subprocess.Popen] = []
    cluster = SlurmCluster(d, conf, node)
    try:
        procs.append(subprocess.Popen(
            [which("munged"), "--foreground", "--force", f"--key-file={d}/munge.key", f"--socket={d}/munge.socket",
             f"--pid-file={d}/munged.pid", f"--log-file={d}/log/munged.log", f"--seed-file={d}/munged.seed"],
            stdout=subprocess.DEVNULL, stderr=open(d / "log" / "munged.out", "w")))
        wait_for(lambda: (d / "munge.socket").exists(), 20, "munged did not start", d / "log" / "munged.out")
        for daemon, args in (("slurmctld", []), ("slurmd", ["-N", node])):
            procs.append(subprocess.Popen([which(daemon), "-D", "-f", str(conf), *args], env=cluster.env(),
                                          stdout=subprocess.DEVNULL, stderr=open(d / "log" / f"{daemon}.out", "w")))

        def idle() -> bool:
            for p in procs:
                if p.poll() is not None:
                    pytest.fail(f"{p.args[0]} exited with {p.returncode}: see {d}/log")
            return cluster.run("sinfo", "-h", "-o", "%t", check=False).stdout.strip() == "idle"

        wait_for(idle, 60, "the SLURM node was not idle", d / "log" / "slurmd.log")
        yield cluster
    finally:
        if procs:
            jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if jobs:
                cluster.run("scancel", *jobs, check=False)
        for proc in reversed(procs):
            stop(proc)
