"""The load balancer in front of the registry replicas (issue 17): Debian's haproxy under
systemd on `lb_host`, every `registry_host` behind it.

TLS pass-through (haproxy in TCP mode), not termination: the replicas keep the one certificate
03-certs issues (its SANs name the LB address too), TLS runs end to end from the client to the
registry, and no private key or password ever sits on the LB.  What pass-through costs: haproxy
cannot retry an HTTP request that failed half-way, so a replica is taken out of the LB (drained)
BEFORE it is restarted (`rolling` below), and haproxy only retries/redispatches connections that
could not be opened (`retries 3`, `option redispatch`).

Health: `GET /v2/` over TLS (verified against our CA) every CHECK_INTER_MS; 401 (auth on, storage
healthy) is UP; anything else (503: the storage health check fails; no answer) counts as a failure,
FALL of them in a row take the replica out, RISE good ones put it back.
"""
from __future__ import annotations

import hashlib
import time

from . import certs, journal, packages, params as P, steps
from .errors import RunbookError
from .host import cmd
from .steps import step

HAPROXY_CFG = "/etc/haproxy/haproxy.cfg"
CA_FILE = "/etc/haproxy/runbook-registry-ca.pem"
ADMIN_SOCK = "/run/haproxy/admin.sock"
BACKEND = "registry"
CHECK_INTER_MS = 1000   # a dead replica is out after FALL * CHECK_INTER_MS (+ the check timeout)
FALL, RISE = 2, 2
DRAIN_TIMEOUT = 10.0    # how long `drain` waits for a replica's sessions to end: TCP mode cannot tell an idle
                        # keep-alive connection (clients keep them for minutes) from a pull in flight; after
                        # that the registry's http.draintimeout (same 10 s) lets in-flight requests finish


class LBError(RunbookError):
    pass


# -------------------------------------------------------------------- pure
def server_name(addr: str) -> str:
    """haproxy's name for a replica, from its address (stable across re-runs)."""
    return "reg_" + "".join(c if c.isalnum() else "_" for c in addr)


def render_haproxy(backends: list[str], port: int, *, bind: str = "", backend_port: int | None = None,
                   ca_file: str = CA_FILE, inter_ms: int = CHECK_INTER_MS, fall: int = FALL, rise: int = RISE) -> str:
    """haproxy.cfg: TCP (TLS pass-through) on bind:port, leastconn over every backend, each
    health-checked with GET /v2/ over verified TLS expecting 401."""
    if not backends:
        raise ValueError("no backend")
    bport = backend_port or port
    b = f"[{bind}]" if ":" in bind else bind
    lines = [
        "# written by runbook_lib.lb (see notebooks/04-registry.ipynb); a re-run rewrites it",
        "global",
        "    log /dev/log local0",
        "    chroot /var/lib/haproxy",
        f"    stats socket {ADMIN_SOCK} mode 600 level admin",
        "    stats timeout 30s",
        "    user haproxy",
        "    group haproxy",
        "    daemon",
        "",
        "defaults",
        "    mode tcp",
        "    log global",
        "    option tcplog",
        "    option dontlognull",
        "    # a connection refused by a replica (restarting, dead) is retried, the last time on another one",
        "    retries 3",
        "    option redispatch",
        "    timeout connect 2s",
        "    timeout client 5m",
        "    timeout server 5m",
        "    timeout check 2s",
        "",
        f"frontend {BACKEND}_tls",
        f"    bind {b}:{port}",
        f"    default_backend {BACKEND}",
        "",
        f"backend {BACKEND}",
        "    balance leastconn",
        "    # no `on-marked-down shutdown-sessions`: a replica drained for a restart (state maint) keeps its",
        "    # running sessions until they end; a dead one's connections are reset by its kernel anyway",
        "    # /v2/ without credentials: 401 = up (TLS, auth, storage healthy); 503 or no answer = down",
        "    option httpchk GET /v2/",
        "    http-check expect status 401",
        f"    default-server check check-ssl verify required ca-file {ca_file} inter {inter_ms} fall {fall} "
        f"rise {rise}",
    ]
    for a in backends:
        host = f"[{a}]" if ":" in a else a
        lines.append(f"    server {server_name(a)} {host}:{bport}")
    return "\n".join(lines) + "\n"


def parse_stat(csv_text: str) -> dict:
    """`show stat` CSV -> {server name: {"status": UP/DOWN/MAINT/..., "scur": int}} of our backend."""
    out, header = {}, None
    for line in csv_text.splitlines():
        if line.startswith("# "):
            header = line[2:].split(",")
            continue
        if not header or not line.strip():
            continue
        row = dict(zip(header, line.split(",")))
        if row.get("pxname") == BACKEND and row.get("svname") not in ("BACKEND", "FRONTEND"):
            out[row["svname"]] = {"status": row.get("status", ""), "scur": int(row.get("scur") or 0)}
    return out


# -------------------------------------------------------------------- context helpers
def lb_host(ctx) -> str:
    return (ctx.params.get("lb_host") or "").strip()


def enabled(ctx) -> bool:
    return bool(lb_host(ctx))


def address(ctx) -> str:
    """The host clients use: lb_host when there is one, else the first registry host."""
    return lb_host(ctx) or P.as_list(ctx.registry_host)[0]


def config_text(ctx) -> str:
    return render_haproxy(P.as_list(ctx.registry_host), ctx.registry_port, bind=lb_host(ctx))


def _admin(h, command: str, read: bool = True):
    return h.run(cmd("echo {c} | socat stdio {s}", c=command, s=ADMIN_SOCK), read=read, check=False, timeout=30)


def states(ctx) -> dict:
    """{registry address: {"status", "scur"}} as haproxy sees them now (a read)."""
    h = ctx.host(lb_host(ctx))
    r = _admin(h, "show stat")
    by_name = parse_stat(r.stdout)
    return {a: by_name.get(server_name(a), {"status": "?", "scur": 0}) for a in P.as_list(ctx.registry_host)}


# -------------------------------------------------------------------- steps
@step("Load balancer: haproxy on lb_host")
def install(ctx):
    """Debian's haproxy (and socat, for its admin socket) on lb_host; nothing without lb_host."""
    if not enabled(ctx):
        steps.note("lb_host empty: no load balancer, clients use registry_host directly")
        return None
    h = ctx.host(lb_host(ctx))
    done = packages.install(h, ["haproxy", "socat"], hint="haproxy comes from Debian's main archive")
    steps.fact("haproxy", packages.installed(h, "haproxy") or "would be installed")
    if done:
        steps.mark_changed(f"installed {', '.join(done)}")
    return done


@step("Load balancer: haproxy.cfg (TLS pass-through to every registry host), reload on change")
def configure(ctx):
    """The CA for health checks and haproxy.cfg, written only when they differ; `haproxy -c`
    first (a bad config never reaches the running haproxy), then `systemctl reload haproxy`."""
    if not enabled(ctx):
        steps.note("lb_host empty: nothing to configure")
        return None
    h = ctx.host(lb_host(ctx))
    text = config_text(ctx)
    try:
        with open(certs.ca_path(ctx), "rb") as f:
            ca = f.read()
    except (FileNotFoundError, certs.CertError):
        if not ctx.dry_run:
            raise LBError(f"no CA at {certs.ca_path(ctx)}: haproxy verifies the replicas' certificates with it",
                          "run notebooks/03-certs.ipynb with the same state_dir first") from None
        ca = b"<CA from 03-certs>"
    r_ca = h.put_file(CA_FILE, ca, mode=0o644)
    old = h.read_file(HAPROXY_CFG)
    changed = old != text.encode() or r_ca.changed
    if old != text.encode():
        tmp = HAPROXY_CFG + ".runbook-new"
        h.put_file(tmp, text, mode=0o644)
        r = h.run(cmd("haproxy -c -q -f {f}", f=tmp), check=False)
        if r.exit_code not in (0, None):
            raise LBError(f"haproxy refuses the rendered config on {h.name}: {(r.stderr or r.stdout)[-500:]}",
                          "this is a bug in runbook_lib.lb.render_haproxy; the running haproxy was not touched")
        h.run(cmd("mv -f {t} {f}", t=tmp, f=HAPROXY_CFG))
    active = h.test(cmd("systemctl is-active --quiet haproxy"))
    if not active:
        h.run(cmd("systemctl enable haproxy >/dev/null 2>&1; systemctl restart haproxy"))
    elif changed:
        h.run(cmd("systemctl reload haproxy"))
    for a in P.as_list(ctx.registry_host):
        steps.row(server=server_name(a), backend=f"{a}:{ctx.registry_port}", check="GET /v2/ -> 401, TLS verified")
    steps.fact("frontend", f"{lb_host(ctx)}:{ctx.registry_port} (TCP, TLS pass-through)")
    steps.fact("health check", f"every {CHECK_INTER_MS} ms; down after {FALL} failures, up after {RISE} passes")
    steps.fact("haproxy.cfg sha256", hashlib.sha256(text.encode()).hexdigest()[:12])
    if not ctx.dry_run:
        wait_up(ctx)
    return {"changed": changed or not active}


def wait_up(ctx, hosts: list[str] | None = None, timeout: float = 30.0) -> dict:
    """Until haproxy says UP for those replicas (default: every one)."""
    want = hosts or P.as_list(ctx.registry_host)
    deadline, st = time.monotonic() + timeout, {}
    while True:
        st = states(ctx)
        if all(st[a]["status"].startswith("UP") and "going" not in st[a]["status"] for a in want):
            return st
        if time.monotonic() > deadline:
            raise LBError(f"haproxy on {lb_host(ctx)} does not see every replica UP within {timeout:.0f}s: {st}",
                          "GET /v2/ on each registry host must answer 401 over TLS signed by our CA (04-registry)")
        time.sleep(0.3)


def drain(ctx, addr: str, timeout: float = DRAIN_TIMEOUT) -> float:
    """Take one replica out of the LB (state maint: no new connection goes there) and wait until
    its connections ended.  -> seconds waited."""
    h = ctx.host(lb_host(ctx))
    _admin(h, f"set server {BACKEND}/{server_name(addr)} state maint", read=False)
    t0 = time.monotonic()
    if ctx.dry_run:
        return 0.0
    while time.monotonic() - t0 < timeout:
        if states(ctx)[addr]["scur"] == 0:
            break
        time.sleep(0.2)
    return time.monotonic() - t0


def undrain(ctx, addr: str, timeout: float = 30.0):
    """Put the replica back (state ready) and wait until its health check says UP."""
    h = ctx.host(lb_host(ctx))
    _admin(h, f"set server {BACKEND}/{server_name(addr)} state ready", read=False)
    if not ctx.dry_run:
        wait_up(ctx, [addr], timeout)


def rolling(ctx, action, hosts: list[str] | None = None) -> list:
    """action(addr) on one replica at a time; with a load balancer each replica is drained first
    and back UP in haproxy before the next one is touched (pulls never lose their last replica)."""
    out = []
    for a in hosts or P.as_list(ctx.registry_host):
        if enabled(ctx):
            drain(ctx, a)
        try:
            out.append(action(a))
        finally:
            if enabled(ctx):
                undrain(ctx, a)
    return out


def check(ctx):
    """Verdict part: through the LB, /v2/ answers 401 without and 200 with credentials, and
    haproxy sees every replica UP.  -> (ok, facts)."""
    from . import registry
    if not enabled(ctx) or ctx.dry_run:
        return True, {}
    facts, ok = {}, True
    p = registry.probe(ctx, lb_host(ctx))
    facts[f"load balancer {registry.url(ctx, lb_host(ctx))}"] = (
        f"{p['anonymous']} without credentials, {p['with_credentials']} with, storage listing {p['storage']}")
    ok &= p["anonymous"] == 401 and p["with_credentials"] == 200 and p["storage"] == 200
    st = states(ctx)
    facts["haproxy backends"] = ", ".join(f"{a} {s['status']}" for a, s in st.items())
    ok &= all(s["status"].startswith("UP") for s in st.values())
    return ok, facts


def deploy(ctx):
    return [install(ctx), configure(ctx)]


__all__ = ["render_haproxy", "parse_stat", "server_name", "install", "configure", "drain", "undrain", "rolling",
           "wait_up", "states", "address", "enabled", "check", "journal"]
