"""`zerotrain preflight` against real hosts (the two ssh aliases of the `ssh_nodes` sshd), one that
refuses connections, one whose host key was never accepted, a master port in use; and the
judging of answers no machine here can give (other versions, GPUs)."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from common.errors import ZerotrainError
from engine.apps.preflight import Host, Probe, judge, read_hostfile
from tests.helpers import ROOT, VENV_BIN, free_port

pytestmark = pytest.mark.system


def preflight(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "zerotrain"), "preflight", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, errors="replace", timeout=300)


def lines_of(output: str, check: str) -> str:
    """The block of the report that belongs to one check."""
    block, inside = [], False
    for line in output.splitlines():
        if line[:4] in ("PASS", "FAIL", "SKIP"):
            inside = line[6:].split()[0] == check.split()[0]
        if inside:
            block.append(line)
    return "\n".join(block)


def test_two_hosts_pass(ssh_nodes, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=1\nnode-b slots=1\n")
    shared = tmp_path / "shared" / "run"
    proc = preflight(ssh_nodes.env(), "--hostfile", hostfile, "--output-dir", shared, "--master-port", free_port())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "all checks passed" in out and "FAIL" not in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("node-")}
    assert rows["node-a"][2] == "ok" and rows["node-b"][2] == "ok"
    assert rows["node-a"][-1] == "written" and rows["node-b"][-1] == "visible"
    assert "PASS  output dir" in out and "visible on every host" in out
    assert not list(shared.iterdir())  # the marker is cleaned up


def test_unreachable_hosts_and_a_busy_port_fail_clearly(ssh_nodes, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-down slots=1\nnode-nokey slots=1\n")
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = preflight(ssh_nodes.env(), "--hostfile", hostfile, "--output-dir", tmp_path / "out",
                         "--master-port", port, "--timeout", 5)
    out = proc.stdout
    assert proc.returncode != 0, out
    assert "2 of 7 checks failed (ssh, master)" in out, out
    ssh = lines_of(out, "ssh")
    assert "node-down: ssh: connect to host 127.0.0.1 port" in ssh and "Connection refused" in ssh
    assert "node-nokey: Host key verification failed." in ssh
    assert "-> set up key login" in ssh
    assert f"port {port} on node-a is taken" in lines_of(out, "master")
    # the other checks still ran, on the host that answered
    assert "PASS  versions" in out and "(2 did not)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("node-")}
    assert rows["node-down"][2] == "FAIL" and rows["node-nokey"][2] == "FAIL" and rows["node-a"][2] == "ok"
    assert "checks failed on" in proc.stderr


def test_missing_python_fails(ssh_nodes, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    proc = preflight(ssh_nodes.env(), "--hostfile", hostfile, "--python", tmp_path / "no-venv" / "bin" / "python",
                     "--output-dir", tmp_path / "out", "--master-port", free_port())
    assert proc.returncode != 0
    python = lines_of(proc.stdout, "python")
    assert "FAIL  python" in python and "node-a: " in python and "no-venv/bin/python not found" in python
    assert "PASS  ssh" in proc.stdout  # ssh itself worked


def test_one_local_host_needs_no_ssh(tmp_path):
    # an `ssh` that fails the test if anything calls it
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 'ssh was called' >&2\nexit 99\n")
    (bin_dir / "ssh").chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")
    proc = preflight(env, "--hostfile", ROOT / "hostfiles" / "localhost", "--output-dir", tmp_path / "run",
                     "--master-port", free_port())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ssh was called" not in proc.stderr
    assert "localhost  2      local" in proc.stdout
    assert "--no_ssh_check --master_addr 127.0.0.1" in proc.stdout


def test_hostfile_errors_name_the_line(tmp_path):
    bad = tmp_path / "hostfile"
    bad.write_text("node-a slots=8\nnode-b 8\n")
    with pytest.raises(ZerotrainError, match=r"hostfile:2: expected 'HOSTNAME slots=N'"):
        read_hostfile(bad)
    bad.write_text("node-a slots=8\nnode-a slots=8\n")
    with pytest.raises(ZerotrainError, match="listed twice"):
        read_hostfile(bad)
    assert [(h.name, h.slots) for h in read_hostfile(ROOT / "hostfiles" / "a100")] == [("a100-node1", 8),
                                                                                       ("a100-node2", 8)]


def _answer(name: str, slots: int, **info) -> Probe:
    base = {"python": "3.11.7", "torch": "2.13.0", "deepspeed": "0.19.8", "zerotrain": "0.1.0",
            "accelerators": [8, "cuda"], "workdir": True, "master_resolves": True, "marker": "visible"}
    return Probe(Host(name, slots), info={**base, **info})


def _judge(probes: list[Probe]) -> dict[str, tuple[bool | None, str]]:
    checks = judge(probes, local=False, workdir="/code", output_dir="/shared/run", master="10.0.0.1",
                   master_port=29500, python="/venv/bin/python")
    return {c.name: (c.ok, "\n".join(c.lines)) for c in checks}


def test_judge_versions_and_accelerators():
    good = _judge([_answer("n1", 8, marker="written", port_free=True), _answer("n2", 8)])
    assert all(ok for ok, _ in good.values()), good
    assert "n1: 8 slots, 8 cuda" in good["accelerators"][1]

    bad = _judge([_answer("n1", 8, marker="written", port_free=True),
                  _answer("n2", 8, torch="2.12.0", deepspeed=None, accelerators=[4, "cuda"]),
                  _answer("n3", 8, accelerators=[0, "cpu"], marker="missing", workdir=False,
                          master_reachable="timed out")])
    assert bad["versions"][0] is False
    assert "torch 2.13.0 on n1, but 2.12.0 on n2" in bad["versions"][1]
    assert "deepspeed is not installed on n2" in bad["versions"][1]
    assert bad["accelerators"][0] is False
    assert "n2: slots=8 but only 4 cuda devices" in bad["accelerators"][1]
    assert "n3: no GPU visible" in bad["accelerators"][1]
    assert bad["output dir"] == (False, "a file written in /shared/run on n1 is not visible on n3")
    assert bad["working dir"] == (False, "/code is missing on n3")
    assert "10.0.0.1:29500 cannot be reached from n3 (timed out)" in bad["master"][1]
