"""`zerotrain preflight --hostfile H`: check the hosts of a multi-node run before it takes a queue slot.

What `deepspeed --hostfile H` needs, checked the way it will use it: every host reachable over
ssh without a password or a prompt (pdsh runs one ssh per host); the same Python path there
(the launch command names this interpreter, `sys.executable`); the same python, torch,
deepspeed and zerotrain versions; this working directory on every host (each node `cd`s into
it); the output directory shared (a marker file written on the first host is visible on every
other one); the master port free on the first host (node rank 0, where the rendezvous store
listens), the master address resolvable and reachable from every host; accelerators against slots.

Each host answers one small Python probe (over ssh, or in a subprocess for a one-host
hostfile, which deepspeed launches on this machine without pdsh). Every check runs even when
others fail; the caller gets a table and a list of failures.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ZerotrainError

DEFAULT_MASTER_PORT = 29500  # deepspeed's and torchrun's default
RESULT_TAG = "ZEROTRAIN_PREFLIGHT"
PROBE_SECONDS = 120  # on top of the ssh connect timeout: a cold `import torch` on a shared filesystem is slow
LOCAL_NAMES = {"localhost", "127.0.0.1", "::1"}

# Runs on each host as `python - OPTIONS_JSON` with this source on stdin. Standard library only,
# apart from `import torch` for the accelerator count; package versions come from their metadata.
PROBE = r'''
import json, os, platform, socket, subprocess, sys
from importlib import metadata

opts = json.loads(sys.argv[1])
if opts.get("remove_marker"):
    try:
        os.remove(opts["marker"])
    except OSError:
        pass
    print("ZEROTRAIN_PREFLIGHT {}", flush=True)
    sys.exit()
out = {"hostname": socket.gethostname(), "python": platform.python_version(), "executable": sys.executable}
for name in ("torch", "deepspeed", "zerotrain"):
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out[name] = None
try:
    import torch
    if torch.cuda.is_available():
        out["accelerators"] = [torch.cuda.device_count(), "rocm" if torch.version.hip else "cuda"]
    elif hasattr(torch, "xpu") and torch.xpu.is_available():
        out["accelerators"] = [torch.xpu.device_count(), "xpu"]
    else:
        out["accelerators"] = [0, "cpu"]
except Exception as e:
    out["accelerators_error"] = f"{type(e).__name__}: {e}"
out["workdir"] = os.path.isdir(opts["workdir"])
if opts.get("detect_master"):  # what deepspeed does without --master_addr: `ssh FIRST_HOST hostname -I`
    try:
        out["detected_master"] = subprocess.run(["hostname", "-I"], capture_output=True, text=True,
                                                timeout=10).stdout.split()[0]
    except (OSError, IndexError, subprocess.SubprocessError) as e:
        out["detect_error"] = f"`hostname -I` gave no address ({type(e).__name__}: {e})"
if opts.get("master_addr"):
    try:
        socket.getaddrinfo(opts["master_addr"], None)
        out["master_resolves"] = True
    except OSError as e:
        out["master_resolves"] = str(e)
if opts.get("connect_port"):  # refused is fine (nothing listens yet); silence means a firewall or no route
    try:
        socket.create_connection((opts["master_addr"], opts["connect_port"]), timeout=5).close()
        out["master_reachable"] = True
    except ConnectionRefusedError:
        out["master_reachable"] = True
    except OSError as e:
        out["master_reachable"] = str(e) or type(e).__name__
if opts.get("bind_port"):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store does: TIME_WAIT is no clash
    try:
        s.bind(("", opts["bind_port"]))
        out["port_free"] = True
    except OSError as e:
        out["port_free"] = e.strerror or str(e)
    finally:
        s.close()
marker = opts.get("marker")
if marker and opts.get("write_marker"):
    try:
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        with open(marker, "w") as f:
            f.write(socket.gethostname() + "\n")
        out["marker"] = "written"
    except OSError as e:
        out["marker"] = f"cannot write: {e}"
elif marker:
    out["marker"] = "visible" if os.path.exists(marker) else "missing"
print("ZEROTRAIN_PREFLIGHT " + json.dumps(out), flush=True)  # RESULT_TAG: login banners may print too
'''


@dataclass
class Host:
    name: str
    slots: int


@dataclass
class Probe:
    """One host's answer, or why there is none (`error`)."""

    host: Host
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    python_missing: bool = False


@dataclass
class Check:
    name: str
    ok: bool | None  # None: skipped
    lines: list[str]
    hint: str = ""


@dataclass
class Report:
    hosts: list[Host]
    probes: list[Probe]
    checks: list[Check]
    local: bool
    master: str
    python: str
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]


def read_hostfile(path: str | os.PathLike) -> list[Host]:
    """Hosts of a DeepSpeed hostfile (`NAME slots=N` a line, `#` comments), in order."""
    p = Path(path)
    if not p.is_file():
        raise ZerotrainError(f"hostfile {path} does not exist")
    hosts: list[Host] = []
    for number, raw in enumerate(p.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[1].startswith("slots=") or not parts[1][6:].isdigit():
            raise ZerotrainError(f"{path}:{number}: expected 'HOSTNAME slots=N', got {raw.strip()!r}")
        if any(h.name == parts[0] for h in hosts):
            raise ZerotrainError(f"{path}:{number}: host {parts[0]} is listed twice (deepspeed refuses that)")
        hosts.append(Host(parts[0], int(parts[1][6:])))
    if not hosts:
        raise ZerotrainError(f"hostfile {path} lists no hosts ('HOSTNAME slots=N' a line)")
    return hosts


def is_this_machine(name: str) -> bool:
    return name in LOCAL_NAMES or name in (socket.gethostname(), socket.gethostname().split(".")[0], socket.getfqdn())


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_probe(host: Host, opts: dict[str, Any], *, python: str, local: bool, ssh_port: int | None,
              timeout: float) -> Probe:
    """Run the probe on `host` (over ssh unless `local`) and parse its answer."""
    argument = json.dumps(opts)
    if local:
        cmd = [python, "-", argument]
    else:
        # BatchMode: fail instead of asking for a password, a passphrase or a new host key.
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(timeout))}"]
        if ssh_port is not None:
            cmd += ["-p", str(ssh_port)]
        cmd += [host.name, "--", f"{shlex.quote(python)} - {shlex.quote(argument)}"]
    try:
        proc = subprocess.run(cmd, input=PROBE, capture_output=True, text=True, errors="replace",
                              timeout=timeout + PROBE_SECONDS)
    except subprocess.TimeoutExpired:
        return Probe(host, error=f"no answer within {timeout + PROBE_SECONDS:.0f} s")
    except OSError as e:  # no ssh client, or (local) no such python
        return Probe(host, error=f"cannot run {cmd[0]}: {e.strerror or e}", python_missing=local)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG + " "):
            return Probe(host, info=json.loads(line[len(RESULT_TAG) + 1:]))
    if not local and proc.returncode == 255:
        return Probe(host, error=_last_line(proc.stderr) or "ssh failed (exit 255)")
    if proc.returncode == 127:
        return Probe(host, error=f"{python} not found", python_missing=True)
    return Probe(host, error=f"probe failed (exit {proc.returncode}): {_last_line(proc.stderr)}")


def preflight(hostfile: str | os.PathLike, *, output_dir: str | None = None, master_addr: str | None = None,
              master_port: int = DEFAULT_MASTER_PORT, ssh_port: int | None = None, timeout: float = 10.0,
              python: str | None = None) -> Report:
    """Probe every host of `hostfile` and judge the results; never raises for a failed check."""
    if not 0 < master_port < 65536:
        raise ZerotrainError(f"--master-port must be in 1..65535, got {master_port}")
    if timeout <= 0:
        raise ZerotrainError(f"--timeout must be positive, got {timeout}")
    hosts = read_hostfile(hostfile)
    python = python or sys.executable
    workdir = os.getcwd()  # where deepspeed's launch command cds on every node
    # deepspeed starts a one-host hostfile on this machine (no pdsh), whatever the host is called.
    local = len(hosts) == 1
    if local and master_addr is None:
        master_addr = "127.0.0.1"
    marker = (os.path.join(os.path.abspath(output_dir), f".zerotrain-preflight-{uuid.uuid4().hex[:12]}")
              if output_dir else None)
    base = {"workdir": workdir, "marker": marker}

    def probe(host: Host, **opts: Any) -> Probe:
        return run_probe(host, {**base, **opts}, python=python, local=local, ssh_port=ssh_port, timeout=timeout)

    # The first host writes the marker, owns the master port and (as deepspeed does without
    # --master_addr) names the master address, before the other hosts look for all three.
    first = probe(hosts[0], write_marker=True, bind_port=master_port, master_addr=master_addr,
                  detect_master=master_addr is None)
    master = master_addr or first.info.get("detected_master")
    with ThreadPoolExecutor(max_workers=min(32, max(1, len(hosts) - 1))) as pool:
        rest = list(pool.map(lambda h: probe(h, master_addr=master, connect_port=master_port if master else None),
                             hosts[1:]))
    if marker and first.info.get("marker") == "written":
        probe(hosts[0], remove_marker=True)
    probes = [first, *rest]

    report = Report(hosts, probes, [], local, f"{master or '?'}:{master_port}", python)
    if local and not is_this_machine(hosts[0].name):
        report.notes.append(f"a one-host hostfile runs on this machine: deepspeed starts {hosts[0].name}'s ranks "
                            "here, without ssh")
    if local:
        report.notes.append(f"deepspeed still runs `ssh {hosts[0].name} hostname` (and, without --master_addr, "
                            f"`ssh {hosts[0].name} hostname -I`) for any hostfile: pass --no_ssh_check "
                            "--master_addr 127.0.0.1 unless ssh to it works")
    report.checks = judge(probes, local=local, workdir=workdir, output_dir=output_dir, master=master,
                          master_port=master_port, python=python)
    return report


@dataclass
class Answers:
    """What every check of `judge` reads: the probes, those that answered, and how to say "on every
    host that answered"."""

    probes: list[Probe]
    answered: list[Probe]
    everywhere: str

    @property
    def first(self) -> Probe:
        """The first host: node rank 0, where the rendezvous store listens."""
        return self.probes[0]


def judge(probes: list[Probe], *, local: bool, workdir: str, output_dir: str | None, master: str | None,
          master_port: int, python: str) -> list[Check]:
    """Turn the probes' answers into pass/fail checks (pure: no I/O). A check that no host could
    answer is skipped (None); hosts that did not answer are named by the ssh check."""
    answered = [p for p in probes if p.error is None]
    silent = len(probes) - len(answered)
    everywhere = ("on every host" if len(probes) > 1 else f"on {probes[0].host.name}") + (
        f" that answered ({silent} did not)" if silent else "")
    answers = Answers(probes, answered, everywhere)
    return [_ssh(answers, local), _python(answers, python), _versions(answers), _workdir(answers, workdir),
            _output_dir(answers, output_dir), _master(answers, master, master_port), _accelerators(answers)]


def _ssh(a: Answers, local: bool) -> Check:
    if local:
        return Check("ssh", True, ["one host: launched locally, ssh not needed"])
    failing = [p for p in a.probes if p.error is not None and not p.python_missing]
    return Check("ssh", not failing,
                 [f"{p.host.name}: {p.error}" for p in failing]
                 or [f"{len(a.probes)}/{len(a.probes)} hosts reachable without a password"],
                 "set up key login from this machine (ssh-copy-id HOST), accept each host key once (ssh HOST true), "
                 "and check that `ssh -o BatchMode=yes HOST true` works")


def _python(a: Answers, python: str) -> Check:
    missing = [p for p in a.probes if p.python_missing]
    return Check("python", not missing if a.answered or missing else None,
                 [f"{p.host.name}: {python} not found" for p in missing]
                 or [f"{python} {a.everywhere}" if a.answered else "not checked: no host answered"],
                 "deepspeed runs the same interpreter path on every node: install the same environment at the same "
                 "path (or on a shared filesystem), or pass --python")


def _versions(a: Answers) -> Check:
    lines, ok = [], True
    for key in ("python", "torch", "deepspeed", "zerotrain"):
        values = {p.host.name: p.info.get(key) for p in a.answered}
        if not values:
            continue
        if key in ("torch", "deepspeed") and None in values.values():
            ok = False
            lines.append(f"{key} is not installed on " + ", ".join(h for h, v in values.items() if v is None))
        reference_host = a.answered[0].host.name
        differing = {h: v for h, v in values.items() if v != values[reference_host]}
        if differing:
            ok = False
            lines.append(f"{key} {values[reference_host] or 'missing'} on {reference_host}, but "
                         + ", ".join(f"{v or 'missing'} on {h}" for h, v in differing.items()))
    if a.answered and ok:
        lines.append(", ".join(f"{k} {a.answered[0].info.get(k) or '-'}" for k in ("python", "torch", "deepspeed",
                                                                                 "zerotrain")) + f" {a.everywhere}")
    return Check("versions", ok if a.answered else None, lines or ["not checked: no host answered"],
                 "install the same versions everywhere (one shared venv, or the same requirements)")


def _workdir(a: Answers, workdir: str) -> Check:
    absent = [p.host.name for p in a.answered if not p.info.get("workdir")]
    return Check("working dir", not absent if a.answered else None,
                 [f"{workdir} is missing on " + ", ".join(absent)] if absent else [f"{workdir} exists {a.everywhere}"],
                 "each node cds into the launch directory and runs the script from there: put the code on a shared "
                 "filesystem or at the same path everywhere")


def _output_dir(a: Answers, output_dir: str | None) -> Check:
    first = a.first
    if not output_dir:
        return Check("output dir", None, ["not checked (no --output-dir)"])
    if first.error is not None:
        return Check("output dir", None, [f"not checked: {first.host.name} did not answer"])
    if first.info.get("marker") != "written":
        return Check("output dir", False, [f"{first.host.name}: {output_dir}: {first.info.get('marker')}"],
                     "the run directory must be writable on every node")
    blind = [p.host.name for p in a.answered[1:] if p.info.get("marker") != "visible"]
    return Check("output dir", not blind,
                 [f"a file written in {output_dir} on {first.host.name} is not visible on " + ", ".join(blind)] if blind
                 else [f"{output_dir}: a file written on {first.host.name} is visible {a.everywhere}"
                       if len(a.probes) > 1 else f"{output_dir} is writable on {first.host.name}"],
                 "checkpoints are written by every rank into one directory: use a shared filesystem (NFS, Lustre, ...) "
                 "mounted at the same path on every node")


def _master(a: Answers, master: str | None, master_port: int) -> Check:
    first, lines, ok = a.first, [], True
    if first.error is not None:
        ok = None
        lines.append(f"not checked: {first.host.name} did not answer")
    else:
        if first.info.get("port_free") is not True:
            ok = False
            lines.append(f"port {master_port} on {first.host.name} is taken ({first.info.get('port_free')})")
        if master is None:
            ok = False
            lines.append(f"no master address: deepspeed takes the first of `hostname -I` on {first.host.name}, "
                         f"and there {first.info.get('detect_error', 'it failed')}")
        unresolved = [f"{p.host.name} ({p.info['master_resolves']})" for p in a.answered
                      if master and p.info.get("master_resolves", True) is not True]
        if unresolved:
            ok = False
            lines.append(f"{master} does not resolve on " + ", ".join(unresolved))
        unreachable = [f"{p.host.name} ({p.info['master_reachable']})" for p in a.answered
                       if p.info.get("master_reachable", True) is not True]
        if unreachable:
            ok = False
            lines.append(f"{master}:{master_port} cannot be reached from " + ", ".join(unreachable))
        if ok:
            reached = ", reachable from every other host" if len(a.answered) > 1 else ""
            lines.append(f"{master}:{master_port} free on {first.host.name}{reached}")
    return Check("master", ok, lines,
                 "pick another port (--master_port for deepspeed, --master-port here) or stop what holds it; "
                 "pass --master_addr with an address of the first host that every node can reach (and open "
                 "the port range between nodes in the firewall)")


def _accelerators(a: Answers) -> Check:
    lines, ok = [], True
    errors = [f"{p.host.name}: torch failed ({p.info['accelerators_error']})" for p in a.answered
              if "accelerators_error" in p.info]
    devices = {p.host.name: p.info["accelerators"] for p in a.answered if "accelerators" in p.info}
    any_gpu = any(n > 0 for n, _ in devices.values())
    for p in a.answered:
        if p.host.name not in devices:
            continue
        n, kind = devices[p.host.name]
        if any_gpu and n == 0:
            ok = False
            lines.append(f"{p.host.name}: no GPU visible, while other hosts have some")
        elif 0 < n < p.host.slots:
            ok = False
            lines.append(f"{p.host.name}: slots={p.host.slots} but only {n} {kind} device{'s' * (n != 1)}")
    if errors:
        ok = False
        lines += errors
    if ok and devices:
        if any_gpu:
            lines.append(", ".join(f"{p.host.name}: {p.host.slots} slots, {' '.join(map(str, devices[p.host.name]))}"
                                   for p in a.answered if p.host.name in devices))
        else:
            slots = sum(p.host.slots for p in a.answered)
            lines.append(f"no GPU: {slots} slot{'s' * (slots != 1)} run as CPU ranks (gloo)")
    return Check("accelerators", ok if a.answered else None, lines or ["not checked: no host answered"],
                 "slots must not exceed the devices of a host: lower slots= in the hostfile, or check "
                 "CUDA_VISIBLE_DEVICES and the driver on that host")


def _cells(probe: Probe, local: bool) -> list[str]:
    info = probe.info
    if probe.error is not None:
        reached = "ok" if probe.python_missing and not local else ("local" if local else "FAIL")
        return [probe.host.name, str(probe.host.slots), reached, "-", "-", "-", "-", "-", "-"]
    accel = info.get("accelerators")
    return [probe.host.name, str(probe.host.slots), "local" if local else "ok", info.get("python") or "-",
            info.get("torch") or "-", info.get("deepspeed") or "-", info.get("zerotrain") or "-",
            f"{accel[0]} {accel[1]}" if accel and accel[0] else ("cpu" if accel else "?"),
            info.get("marker") or "-"]


def format_report(report: Report, hostfile: str) -> str:
    header = ["host", "slots", "ssh", "python", "torch", "deepspeed", "zerotrain", "accelerators", "output dir"]
    rows = [header] + [_cells(p, report.local) for p in report.probes]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    slots = sum(h.slots for h in report.hosts)
    out = [f"hostfile {hostfile}: {len(report.hosts)} host{'s' * (len(report.hosts) != 1)}, {slots} slots; "
           f"master {report.master}; python {report.python}", ""]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    out.append("")
    for check in report.checks:
        status = {True: "PASS", False: "FAIL", None: "SKIP"}[check.ok]
        out.append(f"{status}  {check.name:<12}  {check.lines[0]}")
        out += [f"{'':<6}{'':<12}  {line}" for line in check.lines[1:]]
        if check.ok is False and check.hint:
            out.append(f"{'':<6}{'':<12}  -> {check.hint}")
    for note in report.notes:
        out.append(f"note: {note}")
    failed = report.failed
    out.append("")
    out.append(f"preflight: {len(failed)} of {len(report.checks)} checks failed ({', '.join(c.name for c in failed)})"
               if failed else "preflight: all checks passed")
    return "\n".join(out)
