"""Section 1: deploy a RADOS Gateway (RGW) on rgw_host.

Methods: `packages` (install radosgw, key, ceph.conf section, run it: what
`ceph-deploy rgw create` does, done step by step), `ceph-deploy` (the
document's command), `cephadm` (`ceph orch apply rgw`, today's way), and
`existing` (verify only).  Every Ceph command runs on rgw_host, which must
hold the cluster's admin keyring.
"""
from __future__ import annotations

import re
import time

from . import masking, packages
from .errors import RunbookError
from .host import Command, cmd
from .journal import Result, record
from .steps import fact, note, row, step

DEFAULT_PORT = 7480
CAPS = ["mon", "allow rw", "osd", "allow rwx", "mgr", "allow rw"]
CONF = "/etc/ceph/ceph.conf"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RGWError(RunbookError):
    """RGW cannot be deployed or does not answer."""


# -- pure helpers (unit-tested) -------------------------------------------------

def daemon_id(rgw_name: str, hostname: str) -> str:
    """The daemon id as ceph-deploy names it: "rgw.<short hostname>" by default;
    a name given without the "rgw." prefix gets it ("gw1" -> "rgw.gw1")."""
    name = rgw_name or hostname.split(".")[0]
    return name if name.startswith("rgw.") else f"rgw.{name}"


def paths(did: str) -> dict:
    """Where a daemon's files live (ceph-deploy's layout; cluster "ceph")."""
    return {
        "entity": f"client.{did}",
        "keyring": f"/var/lib/ceph/radosgw/ceph-{did}/keyring",
        "log": f"/var/log/ceph/ceph-client.{did}.log",
        "pid": f"/var/run/ceph/ceph-client.{did}.pid",
        "unit": f"ceph-radosgw@{did}",
    }


def frontend(host: str, port: int, nodelay: bool = True) -> str:
    """beast's endpoint= needs an IP; for a host name listen on every address.

    tcp_nodelay=1 (not in the document): without it every small request RGW answers waits ~40 ms
    for a delayed ACK (Nagle), and the registry makes ~15 small requests per blob; measured on the
    lab, a 16 MB blob push took 1.0 s without it and 0.2 s with it (bench/results.md)."""
    import ipaddress
    opt = " tcp_nodelay=1" if nodelay else ""
    try:
        ip = ipaddress.ip_address(host)
        addr = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"beast endpoint={addr}:{port}{opt}"
    except ValueError:
        return f"beast port={port}{opt}"


def conf_entries(did: str, host: str, port: int, nodelay: bool = True) -> dict:
    p = paths(did)
    return {"rgw frontends": frontend(host, port, nodelay), "keyring": p["keyring"], "log file": p["log"]}


def norm_key(k: str) -> str:
    # ceph.conf treats "rgw frontends", "rgw_frontends" and "rgw-frontends" alike.
    return re.sub(r"[\s_-]+", " ", k.strip().lower())


def conf_section(text: str, section: str) -> dict | None:
    """The key/values of [section] in a ceph.conf text (keys normalized), or None."""
    cur, found, out = None, False, {}
    for line in text.splitlines():
        s = line.strip()
        if not s or s[0] in "#;":
            continue
        m = re.match(r"^\[(.+)\]$", s)
        if m:
            cur = m.group(1).strip()
            found = found or cur == section
            continue
        if cur == section and "=" in s:
            k, _, v = s.partition("=")
            out[norm_key(k)] = v.strip()
    return out if found else None


def set_conf_section(text: str, section: str, entries: dict) -> str:
    """ceph.conf text with [section] replaced by entries (appended if absent);
    every other line kept as it is."""
    lines = text.splitlines()
    out, skip = [], False
    for line in lines:
        m = re.match(r"^\s*\[(.+)\]\s*$", line)
        if m:
            skip = m.group(1).strip() == section
        if not skip:
            out.append(line)
    while out and not out[-1].strip():
        out.pop()
    block = [f"[{section}]"] + [f"{k} = {v}" for k, v in entries.items()]
    return "\n".join(out + ([""] if out else []) + block) + "\n"


def conf_matches(text: str, section: str, entries: dict) -> bool:
    have = conf_section(text, section)
    if have is None:
        return False
    return all(have.get(norm_key(k)) == v for k, v in entries.items())


def deploy_commands(method: str, host: str, did: str, port: int = DEFAULT_PORT) -> list[Command]:
    """The commands a tool-based method runs on the admin node.

    ceph-deploy: `ceph-deploy rgw create HOST` as in the document (RGW listens on
    7480 by default); a daemon name other than rgw.<HOST> is `HOST:NAME`.
    cephadm: `ceph orch apply rgw NAME --placement=HOST --port=PORT` (HOST as the
    orchestrator knows it: its host name).
    """
    short = did[len("rgw."):] if did.startswith("rgw.") else did
    if method == "ceph-deploy":
        target = host if short == host.split(".")[0] else f"{host}:{short}"
        out = [cmd("ceph-deploy rgw create {t}", t=target)]
        if port != DEFAULT_PORT:
            # ceph-deploy has no port option: the frontend comes from ceph.conf.
            out.insert(0, cmd("ceph config set {who} rgw_frontends {fe}", who=f"client.{did}",
                              fe=f"beast port={port}"))
        return out
    if method == "cephadm":
        return [cmd("ceph orch apply rgw {n} --placement={h} --port={p}", n=short, h=host, p=port)]
    raise ValueError(f"method {method!r} has no deploy commands")


def parse_listeners(ss_output: str) -> list[dict]:
    """`ss -Hltnp` lines -> [{"local": "0.0.0.0:22", "procs": ["sshd"]}]."""
    out = []
    for line in ss_output.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        local = parts[3]
        procs = re.findall(r'\(\("?([^",]+)"?,pid=', line) or re.findall(r'"([^"]+)",pid=', line)
        out.append({"local": local, "procs": sorted(set(procs))})
    return out


def parse_auth_get(text: str) -> tuple[str | None, dict]:
    """`ceph auth get ENTITY -f json` -> (key, caps); (None, {}) for anything else."""
    import json
    try:
        d = json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None, {}
    e = d[0] if isinstance(d, list) and d and isinstance(d[0], dict) else {}
    return (e.get("key") or None), (e.get("caps") or {})


def keyring_key(text: str) -> str | None:
    """The `key = ...` of a keyring file's text, or None."""
    m = re.search(r"^\s*key\s*=\s*(\S+)\s*$", text or "", re.M)
    return m.group(1) if m else None


def endpoint(ctx) -> str:
    """The RGW's HTTP endpoint, e.g. http://198.18.0.2:7480 (Swift auth is <endpoint>/auth/v1)."""
    h = ctx.params["rgw_host"]
    if ":" in h:
        h = f"[{h}]"
    return f"http://{h}:{int(ctx.params.get('rgw_port', DEFAULT_PORT))}"


# -- context helpers --------------------------------------------------------------

def _opts(ctx) -> dict:
    p = ctx.params
    return {"method": p.get("method", "packages"), "name": p.get("rgw_name", ""),
            "admin": p.get("ceph_admin_host") or p["rgw_host"], "port": int(p.get("rgw_port", DEFAULT_PORT)),
            "nodelay": bool(p.get("rgw_tcp_nodelay", True))}


def _state(ctx) -> dict:
    """What earlier steps learned (hostname, systemd, restart needed), kept on ctx."""
    return ctx.__dict__.setdefault("_rgw", {})


def _did(ctx) -> str:
    st = _state(ctx)
    if "did" not in st:
        h = ctx.host(ctx.params["rgw_host"])
        st["hostname"] = h.run(Command("hostname -s"), read=True).stdout.strip()
        st["did"] = daemon_id(_opts(ctx)["name"], st["hostname"])
    return st["did"]


def http(method: str, url: str, *, headers=None, data=None, timeout: float = 10, read: bool = True,
         what: str | None = None):
    """One HTTP call from the control node, journaled like a command (masked).
    trust_env=False: proxies and REQUESTS_CA_BUNDLE from the environment must not apply."""
    import requests

    s = requests.Session()
    s.trust_env = False
    t0 = time.monotonic()
    try:
        r = s.request(method, url, headers=headers, data=data, timeout=timeout, allow_redirects=False)
    except requests.RequestException as e:
        record(Result("local", what or f"{method} {url}", 1, "", str(e), time.monotonic() - t0, read=read, kind="http"))
        raise
    finally:
        s.close()
    record(Result("local", what or f"{method} {url}", r.status_code, "", "", time.monotonic() - t0, read=read,
                  kind="http", no_log=True))
    return r


def answers(url: str, timeout: float = 3) -> tuple[bool, str]:
    """(is it an S3 endpoint answering anonymously, what was seen)."""
    import requests
    try:
        r = http("GET", url + "/", timeout=timeout)
    except requests.RequestException as e:
        return False, f"no answer ({type(e).__name__})"
    ok = r.status_code == 200 and "ListAllMyBucketsResult" in r.text
    return ok, f"HTTP {r.status_code}" + (", S3 ListAllMyBucketsResult" if ok else f", {len(r.content)} bytes")


# -- steps --------------------------------------------------------------------------

@step("Preflight on {ctx.params[rgw_host]}")
def preflight(ctx):
    """Reads only: admin keyring usable, the port free or RGW's, tools present."""
    o = _opts(ctx)
    rgw_host = ctx.params["rgw_host"]
    h = ctx.host(rgw_host)
    r = h.run(Command("timeout 20 ceph -s --connect-timeout 15"), read=True, check=False)
    if r.exit_code != 0:
        raise RGWError(f"no Ceph admin keyring on {rgw_host}: `ceph -s` failed (exit {r.exit_code}): "
                       f"{(r.stderr or r.stdout).strip()[-300:]}; nothing was changed",
                       hint="rgw_host must be a Ceph node with /etc/ceph/ceph.conf and the client.admin keyring "
                            "(ceph-deploy admin HOST copies them), or point rgw_host at one")
    health = re.search(r"health:\s*(\S+)", r.stdout)
    fact("ceph", health.group(1) if health else "answers")
    did = _did(ctx)
    fact("hostname", _state(ctx)["hostname"])
    fact("daemon", f"client.{did}")
    fact("method", o["method"])
    systemd = h.has_systemd()
    _state(ctx)["systemd"] = systemd
    fact("systemd", "yes" if systemd else "no (the daemon is run and supervised by the runbook)")

    ss = h.run(cmd("ss -Hltnp {f}", f=f"sport = :{o['port']}"), read=True)
    listeners = parse_listeners(ss.stdout)
    others = sorted({p for l in listeners for p in l["procs"]} - {"radosgw"})
    if listeners and (others or not any(l["procs"] for l in listeners)):
        raise RGWError(f"rgw_port {o['port']} on {rgw_host} is already taken by "
                       f"{', '.join(others) or 'another process'} ({', '.join(l['local'] for l in listeners)}); "
                       "nothing was changed",
                       hint="choose a free rgw_port, or stop what listens there")
    fact("port", f"{o['port']}: " + ("RGW already listens" if listeners else "free"))

    if o["method"] in ("ceph-deploy", "cephadm"):
        tool = "ceph-deploy" if o["method"] == "ceph-deploy" else "ceph"
        a = ctx.host(o["admin"])
        if not a.test(cmd("command -v {t}", t=tool)):
            msg = f"{tool} is not installed on ceph_admin_host {o['admin']}"
            if ctx.dry_run:
                note(msg + " (dry-run: the commands are only shown)")
            else:
                raise RGWError(msg + "; nothing was changed",
                               hint="run from the admin node (ceph_admin_host=...), or use method=packages")
        if o["method"] == "cephadm" and not ctx.dry_run:
            if not a.test(Command("timeout 20 ceph orch status --connect-timeout 15")):
                raise RGWError(f"no orchestrator on {o['admin']} (`ceph orch status` failed); nothing was changed",
                               hint="cephadm needs a cluster deployed by cephadm; use method=packages otherwise")
    return did


@step("Install radosgw on {ctx.params[rgw_host]}")
def install(ctx):
    o = _opts(ctx)
    if o["method"] != "packages":
        note(f"not used with method={o['method']}")
        return None
    h = ctx.host(ctx.params["rgw_host"])
    version = packages.installed(h, "radosgw")
    if version:
        fact("radosgw", version + " (installed)")
        return version
    if not packages.has_apt(h) and h.test(Command("command -v radosgw")):
        fact("radosgw", "present (not from a Debian package)")
        return "present"
    packages.install(h, ["radosgw"], hint="check the host's apt sources (radosgw must match the cluster's "
                                          "Ceph release: `ceph versions`)")
    version = packages.installed(h, "radosgw") if not ctx.dry_run else None
    fact("radosgw", f"{version} installed" if version else "would be installed")
    return version or "installed"


@step("Create the key client.rgw.* on {ctx.params[rgw_host]}")
def create_key(ctx):
    """`ceph auth get-or-create client.rgw.NAME mon 'allow rw' osd 'allow rwx' mgr 'allow rw'`
    into the daemon's keyring (only when the key or the file is missing)."""
    o = _opts(ctx)
    if o["method"] != "packages":
        note(f"not used with method={o['method']} (the tool creates the key)")
        return None
    did = _did(ctx)
    p = paths(did)
    h = ctx.host(ctx.params["rgw_host"])
    fact("entity", p["entity"])
    fact("keyring", p["keyring"])
    # one read gives the key and its caps (`ceph auth get` exits 2, ENOENT, when there is none)
    r = h.run(cmd("ceph auth get {e} -f json", e=p["entity"]), read=True, check=False, no_log=True)
    key, have = parse_auth_get(r.stdout) if r.exit_code == 0 else (None, {})
    if key:
        masking.register(key)
        want = dict(zip(CAPS[::2], CAPS[1::2]))
        if have != want:
            h.run(cmd("ceph auth caps {e} {caps}", e=p["entity"], caps=CAPS))
            note(f"caps set to {want}")
    data = h.read_file(p["keyring"])
    if key and data and key.encode() in data:
        fact("key", "exists, keyring in place")
        return p["keyring"]
    # One command: the keyring printed back (no_log) gives the key to mask, and a systemd unit runs
    # radosgw as the ceph user, who must read its keyring (chown where that user exists).
    r = h.run(cmd("mkdir -p {d} && ceph auth get-or-create {e} {caps} -o {k} && chmod 600 {k} && "
                  "{{ if id ceph >/dev/null 2>&1; then chown -R ceph:ceph {d}; fi; }} && cat {k}",
                  d=p["keyring"].rsplit("/", 1)[0], e=p["entity"], caps=CAPS, k=p["keyring"]), no_log=True)
    if not r.skipped:
        key = keyring_key(r.stdout)
        if key:
            masking.register(key)
    fact("key", "created" if not ctx.dry_run else "would be created")
    _state(ctx)["restart"] = True
    return p["keyring"]


@step("Configure [client.rgw.*] in ceph.conf on {ctx.params[rgw_host]}")
def configure(ctx):
    o = _opts(ctx)
    if o["method"] == "existing":
        note("not used with method=existing")
        return None
    did = _did(ctx)
    entries = conf_entries(did, ctx.params["rgw_host"], o["port"], o["nodelay"])
    section = f"client.{did}"
    if o["method"] != "packages":
        # The tools write their own config; show what it amounts to.
        note(f"method={o['method']}: the tool configures the daemon (rgw frontends port {o['port']})")
        return None
    h = ctx.host(ctx.params["rgw_host"])
    text = (h.read_file(CONF) or b"").decode()
    if not text:
        raise RGWError(f"{CONF} is missing on {h.name}", hint="rgw_host must be a configured Ceph node")
    for k, v in entries.items():
        row(section=section, option=k, value=v)
    if conf_matches(text, section, entries):
        fact(CONF, f"[{section}] up to date")
        return entries
    mode = h.run(cmd("stat -c %a {p}", p=CONF), read=True).stdout.strip() or "644"
    h.put_file(CONF, set_conf_section(text, section, entries), mode=int(mode, 8))
    fact(CONF, f"[{section}] written")
    _state(ctx)["restart"] = True
    return entries


def _pid(h, pidfile: str) -> int | None:
    """The running radosgw's pid from its pidfile, or None (stale file: None)."""
    r = h.run(cmd("p=$(cat {f} 2>/dev/null) && [ -n \"$p\" ] && grep -qx radosgw /proc/$p/comm && echo $p",
                  f=pidfile), read=True, check=False)
    return int(r.stdout.strip()) if r.exit_code == 0 and r.stdout.strip().isdigit() else None


def _newer_than_process(h, pid: int, files: list[str]) -> bool:
    """Was any of files modified after the process started?  (ps etimes, not /proc/PID's
    mtime: procfs inodes are re-created later.)"""
    r = h.run(cmd("stat -c %Y {files} 2>/dev/null; echo $(( $(date +%s) - $(ps -o etimes= -p {pid}) ))",
                  files=files, pid=pid), read=True, check=False)
    t = [int(x) for x in r.stdout.split() if x.lstrip("-").isdigit()]
    return len(t) >= 2 and max(t[:-1]) > t[-1]


def wait_answering(url: str, timeout: float = 60, interval: float = 0.5) -> str:
    deadline = time.monotonic() + timeout
    seen = ""
    while True:
        ok, seen = answers(url, timeout=3)
        if ok:
            return seen
        if time.monotonic() > deadline:
            raise RGWError(f"RGW does not answer on {url} after {timeout:.0f}s ({seen})",
                           hint="see the daemon's log file (/var/log/ceph/ceph-client.rgw.*.log) on rgw_host")
        time.sleep(interval)


@step("Start RGW on {ctx.params[rgw_host]}")
def start(ctx, timeout: float = 60):
    """systemd host: `systemctl enable --now ceph-radosgw@rgw.NAME`; without systemd
    (the lab) run `radosgw -n client.rgw.NAME` (it daemonizes) unless it runs;
    restart it when its config or key changed.  Then wait until it answers."""
    o = _opts(ctx)
    rgw_host = ctx.params["rgw_host"]
    url = endpoint(ctx)
    if o["method"] == "existing":
        note("method=existing: nothing is started")
        return url
    did = _did(ctx)
    p = paths(did)
    st = _state(ctx)
    if o["method"] in ("ceph-deploy", "cephadm"):
        a = ctx.host(o["admin"])
        # cephadm places daemons on hosts by the name the orchestrator knows them by.
        target = st["hostname"] if o["method"] == "cephadm" else rgw_host
        commands = deploy_commands(o["method"], target, did, o["port"])
        for c in commands:
            row(host=o["admin"], command=str(c))
        note(f"{o['method']} on {o['admin']}: " + " ; ".join(commands))
        if answers(url)[0]:
            fact("RGW", f"already answers on {url}: nothing to run")
            return url
        for c in commands:
            a.run(c, timeout=600)
    else:
        h = ctx.host(rgw_host)
        restart = st.get("restart", False)
        if st.get("systemd", h.has_systemd()):
            u = h.unit_states(p["unit"])[p["unit"]]  # enabled, active and MainPID in one read
            enabled, active = u["enabled"], u["active"]
            if active and not restart:
                restart = u["pid"] > 0 and _newer_than_process(h, u["pid"], [CONF, p["keyring"]])
            if not (enabled and active):
                h.run(cmd("systemctl enable --now {u}", u=p["unit"]))
            elif restart:
                h.run(cmd("systemctl restart {u}", u=p["unit"]))
                note("restarted: its config or key changed")
            fact("unit", p["unit"] + (" (enabled, active)" if enabled and active else ""))
        else:
            pid = _pid(h, p["pid"])
            if pid and (restart or _newer_than_process(h, pid, [CONF, p["keyring"]])):
                # Config or key changed since it started: stop it, wait for the port to free.
                h.run(cmd("kill {pid}; for i in $(seq 100); do [ -d /proc/{pid} ] || exit 0; sleep 0.1; done; "
                          "kill -9 {pid}", pid=pid))
                note("restarted: its config or key changed")
                pid = None
            if pid is None:
                h.run(cmd("mkdir -p /var/run/ceph /var/log/ceph && radosgw -n {e} --pid-file {f} "
                          "</dev/null >/dev/null 2>&1", e=p["entity"], f=p["pid"]),
                      hint=f"see {p['log']} on {rgw_host}")
            else:
                fact("pid", f"{pid} (running)")
            fact("pidfile", p["pid"])
    if ctx.dry_run:
        fact("RGW", f"would answer on {url}")
        return url
    fact("RGW", wait_answering(url, timeout))
    fact("endpoint", url)
    return url


@step("Check RGW on {ctx.params[rgw_host]}")
def _probe(ctx):
    url = endpoint(ctx)
    ok, seen = answers(url)
    fact("anonymous GET /", seen)
    h = ctx.host(ctx.params["rgw_host"])
    r = h.run(Command("timeout 30 rados lspools"), read=True, check=False)
    pools = r.stdout.split() if r.exit_code == 0 else []
    fact("pools", ", ".join(pools) or f"(rados lspools failed: exit {r.exit_code})")
    has_pools = ".rgw.root" in pools and any(p.startswith("default.rgw.") for p in pools)
    return ok, has_pools, seen


def check(ctx) -> None:
    """The section's outcome: RGW answers S3 anonymously and its pools exist.
    Prints the verdict (raises CheckFailed when it does not hold)."""
    o = _opts(ctx)
    addr = f"{ctx.params['rgw_host']}:{o['port']}"
    try:
        ok, has_pools, seen = _probe(ctx).value
    except RunbookError:
        if not ctx.dry_run:
            raise
        ok = has_pools = False
    if ctx.dry_run and not (ok and has_pools):
        ctx.verdict(True, f"nothing deployed (dry run); RGW would answer on {addr}")
    elif not ok:
        ctx.verdict(False, f"RGW does not answer on {addr} ({seen})",
                    hint="run the start step again; see the log file on rgw_host")
    elif not has_pools:
        ctx.verdict(False, f"RGW answers on {addr} but its pools (.rgw.root, default.rgw.*) are missing")
    else:
        ctx.verdict(True, f"RGW answers on {addr}", endpoint=endpoint(ctx), method=o["method"],
                    anonymous_get=seen, pools=".rgw.root and default.rgw.* present")


# -- public names for other sections (07-faq reads RGW's daemon, pid and log through these) --------

def daemon_of(ctx) -> str:
    """The RGW daemon id on rgw_host ("rgw.<short hostname>" or rgw_name), asked once per run."""
    return _did(ctx)


def running_pid(h, pidfile: str) -> int | None:
    """The pid of the radosgw named by pidfile, or None (no file, stale file)."""
    return _pid(h, pidfile)
