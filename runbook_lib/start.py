"""The start page's library calls (notebooks/00-start.ipynb): the topology for the
given parameters, and whether the runbook can reach every host (reads only)."""
from __future__ import annotations

import pathlib
import socket
import time

import yaml

from . import diagram, params as P
from .errors import RunbookError
from .host import cmd
from .steps import fact, row, step

LAB_YAML = pathlib.Path(__file__).resolve().parent.parent / "params" / "lab.yaml"


def topology(ctx) -> diagram.Topology:
    """The picture of the hosts, ports and protocols these parameters describe."""
    return diagram.Topology(**ctx.params, title="Topology for these parameters")


def _hosts(ctx) -> list[tuple[str, str]]:
    """(parameter, address) for every host parameter, each address once."""
    seen, out = set(), []
    for name, value in ctx.params.items():
        if not name.endswith("_host"):
            continue
        for h in P.as_list(value):
            if h and h != "local" and h not in seen:
                seen.add(h)
                out.append((name, h))
    return out


def _is_lab(ctx) -> bool:
    try:
        lab = yaml.safe_load(LAB_YAML.read_text())
    except OSError:
        return False
    return all(str(ctx.params.get(k)) == str(lab[k]) for k in ("rgw_host", "registry_host") if k in lab)


@step("Reach every host: TCP to the SSH port, then an SSH login")
def reach(ctx, timeout: float = 3.0) -> list[str]:
    """Reads only: a TCP connect to ssh_port, then `hostname` over SSH (host key checked
    against known_hosts).  Returns the problems (empty: every host is reachable)."""
    port = ctx.params.get("ssh_port", 22)
    problems = []
    for name, h in _hosts(ctx):
        t0 = time.monotonic()
        try:
            with socket.create_connection((h, port), timeout=timeout):
                pass
            tcp = f"open ({(time.monotonic() - t0) * 1000:.0f} ms)"
        except OSError as e:
            why = e.strerror or type(e).__name__
            row(parameter=name, address=h, tcp=f"{port}: {why}", ssh="not tried", hostname="")
            problems.append(f"{name} {h}: TCP port {port} does not answer ({why})")
            continue
        try:
            r = ctx.host(h).run(cmd("hostname"), read=True, timeout=15)
            hostname = r.stdout.strip()
            row(parameter=name, address=h, tcp=tcp, ssh=f"login as {ctx.params.get('ssh_user', 'root')} ok",
                hostname=hostname)
            fact(h, f"{hostname} ({name})")
        except RunbookError as e:
            first = str(e).splitlines()[0]
            row(parameter=name, address=h, tcp=tcp, ssh=f"failed: {first}", hostname="")
            problems.append(f"{name} {h}: SSH login failed: {str(e)}")
    return problems


def check(ctx) -> None:
    """The start page's verdict: PASS when every host answers over SSH (prints it;
    raises CheckFailed with a hint when not)."""
    rep = reach(ctx)
    problems = rep.value
    hosts = ", ".join(f"{n} {h}" for n, h in _hosts(ctx))
    port = ctx.params.get("ssh_port", 22)
    if not problems:
        ctx.verdict(True, f"every host is reachable over SSH :{port} ({hosts}); next: open 01-rgw.ipynb",
                    **rep.facts)
        return
    if _is_lab(ctx):
        hint = ("these are the local lab's addresses and the lab does not answer: start it with `make lab-up` "
                "(or `python -m runbook_lib.lab up`) in a terminal (JupyterLab: File > New > Terminal), then "
                "run this cell again")
    else:
        hint = ("check each address, that sshd listens on ssh_port there, that ssh_key is authorized for "
                "ssh_user, and that known_hosts has the host's key (ssh-keyscan -p PORT HOST >> known_hosts, "
                "after checking the fingerprint)")
    ctx.verdict(False, "; ".join(problems), hint=hint)


def lab_defaults() -> dict:
    """The lab's parameters (params/lab.yaml): the start page's defaults."""
    return yaml.safe_load(LAB_YAML.read_text())
