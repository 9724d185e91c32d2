"""Section 7: the document's two failures (its FAQ), diagnosed from evidence and fixed.

416 Requested Range Not Satisfiable: RGW creates a pool on demand (bucket index, then data
on the first object write); when PGs per OSD would exceed `mon_max_pg_per_osd` the mon answers
ERANGE and RGW maps it to 416 `InvalidRange` (https://tracker.ceph.com/issues/21497).

503 Service Unavailable on login: the registry's storage-driver health check failed 3 times
(10 s apart), so every request, `/v2/` included, answers 503 `health check failed`.  Causes:
RGW down or unreachable, credentials refused, the bucket/container missing, and (the
document's) the container not allowed to use its mounted files (SELinux: `:z` / `--privileged`).

The notebook gathers evidence (reads only, plus a probe container it creates and deletes),
names every cause it finds with that evidence (`diagnose`), and with fix=True applies the
fixes in dependency order and proves the symptoms are gone (`check`).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field

import yaml

from . import masking, params as P
from . import rgw as _rgw
from .errors import RunbookError
from .host import Command, cmd
from .steps import fact, mark_changed, note, row, step

HEALTH_INTERVAL = 10  # registry health check: every 10 s, 3 failures -> 503 (registry.render_config)
HEALTH_WAIT = 45.0    # bound on waiting for /v2/ to change after a fix
RGW_POOLS = (".rgw.root", "default.rgw.log", "default.rgw.control", "default.rgw.meta",
             "default.rgw.buckets.index", "default.rgw.buckets.data")
MIN_OSDS_COUNTED = 3  # the mon assumes at least 3 OSDs when it checks a new pool (OSDMonitor::check_pg_num)
RAISED_LIMIT = 500
ERANGE_LOG = "pool_create returned (34)"
LIMIT_KEY = "mon max pg per osd"
MOUNTED = ("/etc/docker/registry/config.yml", "/auth/htpasswd", "/certs/registry.pem", "/certs/registry-key.pem")

CAUSES = {
    "pg-limit": "RGW cannot create a pool: PGs per OSD would exceed mon_max_pg_per_osd (ERANGE, HTTP 416)",
    "rgw-down": "RGW does not answer: the registry's storage driver cannot reach it",
    "storage-credentials": "RGW refuses the storage credentials in the registry's config.yml",
    "storage-container-missing": "the registry's Swift container / S3 bucket does not exist",
    "mount-access": "the registry process cannot read its mounted files (config.yml, certs, htpasswd)",
    "registry-down": "the registry is not running",
    "rgw-unreachable-from-registry": "RGW answers the control node but not the registry host (network path)",
    "unexplained": "the registry fails but none of the known causes was seen",
}
FIX_ORDER = ("pg-limit", "rgw-down", "storage-credentials", "storage-container-missing", "mount-access",
             "registry-down")


class FAQError(RunbookError):
    pass


@dataclass
class Finding:
    cause: str
    where: str
    evidence: list = field(default_factory=list)
    fix: str = ""
    fixable: bool = True

    @property
    def title(self) -> str:
        return CAUSES[self.cause]

    def __str__(self):
        return masking.mask(f"{self.cause} on {self.where}: {self.title}\n" +
                            "".join(f"    evidence: {e}\n" for e in self.evidence) +
                            f"    fix: {self.fix}" + ("" if self.fixable else " (not applied automatically)"))


# ---------------------------------------------------------------- pure helpers (unit-tested)
def hint_for(section: str, params: dict) -> str:
    """What another section's error hint says to run: this notebook with the same hosts."""
    keys = ["rgw_host", "rgw_port", "registry_host", "registry_port", "storage", "runtime", "remote_dir",
            "container", "uid", "state_dir"]
    parts = []
    for k in keys:
        v = params.get(k)
        if v in (None, ""):
            continue
        if isinstance(v, (list, tuple)):
            v = ",".join(map(str, v))
        parts.append(f"-p {k} {v}")
    return (f"{section}: to find the cause, run notebooks/07-faq.ipynb with " + " ".join(parts)
            + " (add -p fix True to apply the fix)")


def parse_pools(text: str) -> list[dict]:
    """`ceph osd pool ls detail -f json` -> [{name, pg_num, size}]."""
    return [{"name": p["pool_name"], "pg_num": int(p.get("pg_num", 0)), "size": int(p.get("size", 1))}
            for p in json.loads(text or "[]")]


def pg_budget(pools: list[dict], osds_in: int, limit: int, default_pg_num: int, default_size: int) -> dict:
    """What the mon computes before it creates a pool: sum(pg_num x size) + the new pool's,
    against mon_max_pg_per_osd x max(OSDs in, 3).  Lists the RGW pools still to be created and
    whether each would be refused (ERANGE)."""
    total = sum(p["pg_num"] * p["size"] for p in pools)
    capacity = limit * max(osds_in, MIN_OSDS_COUNTED)
    have = {p["name"] for p in pools}
    missing = [n for n in RGW_POOLS if n not in have]
    each = default_pg_num * default_size
    refused, running = [], total
    for n in missing:
        running += each
        if running > capacity:
            refused.append(n)
    need = total + each * len(missing)
    return {"pgs": total, "capacity": capacity, "osds_in": osds_in, "limit": limit, "per_osd": (
        total / osds_in if osds_in else float("inf")), "missing": missing, "refused": refused,
        "new_pool_pgs": each, "needed_limit": math.ceil(need / max(osds_in, MIN_OSDS_COUNTED))}


def raised_limit(budget: dict, floor: int = RAISED_LIMIT) -> int:
    """The mon_max_pg_per_osd the fix sets: at least 500 (the document's "high value"), more
    if the pools and the ones RGW still needs (plus one more of the default size) need it."""
    need = math.ceil((budget["pgs"] + budget["new_pool_pgs"] * (len(budget["missing"]) + 1))
                     / max(budget["osds_in"], MIN_OSDS_COUNTED))
    return max(floor, int(math.ceil(need / 50.0) * 50))


def conf_sets(text: str, key: str = LIMIT_KEY, sections=("global", "mon", "osd")) -> dict:
    """{section: value} where ceph.conf text sets key (any spelling: spaces, _ or -)."""
    out = {}
    for sec in sections:
        v = (_rgw.conf_section(text or "", sec) or {}).get(_rgw.norm_key(key))
        if v is not None:
            out[sec] = v.split("#")[0].split(";")[0].strip()
    return out


def set_conf_value(text: str, sections, key: str, value) -> str:
    """ceph.conf text with key set to value in each of sections (existing lines replaced in
    place, whatever their spelling); other lines untouched."""
    lines, cur, out = text.splitlines(), None, []
    for line in lines:
        s = line.strip()
        m = re.match(r"^\[(.+)\]$", s)
        if m:
            cur = m.group(1).strip()
        elif cur in sections and "=" in s and s[0] not in "#;" and _rgw.norm_key(s.partition("=")[0]) == _rgw.norm_key(key):
            indent = line[:len(line) - len(line.lstrip())]
            line = f"{indent}{key} = {value}"
        out.append(line)
    return "\n".join(out) + "\n"


def add_selinux_label(argv: list[str]) -> list[str]:
    """`-v host:container` -> `-v host:container:z` (docker relabels the files so that a
    container may use them under SELinux: the precise form of the document's --privileged)."""
    out = list(argv)
    for i in range(len(out) - 1):
        if out[i] == "-v" and out[i + 1].count(":") == 1:
            out[i + 1] += ":z"
    return out


def classify(ev: dict) -> list[Finding]:
    """Findings from gathered evidence (pure: every decision is made here, on data)."""
    found: list[Finding] = []
    rgw = ev.get("rgw", {})
    probe = ev.get("probe", {})
    ceph = ev.get("ceph", {})
    rgw_where = rgw.get("where", "rgw_host")
    budget = ceph.get("budget") or {}

    codes = [probe.get("container"), probe.get("object")]
    e416 = [x for x in codes if x == 416]
    hang = probe.get("object") == "timeout" or probe.get("container") == "timeout"
    if e416 or budget.get("refused") or (hang and ceph.get("limits_differ")):
        evidence = []
        if e416:
            evidence.append(f"swift PUT {probe.get('name')}: container {probe.get('container')}, object "
                            f"{probe.get('object')} (416 = InvalidRange)")
        if hang:
            evidence.append(f"swift PUT {probe.get('name')} did not answer within {probe.get('timeout')} s")
        if ceph.get("too_many_pgs"):
            evidence.append(f"ceph health: {ceph['too_many_pgs']}")
        if budget:
            evidence.append(f"pools hold {budget['pgs']} PGs (pg_num x size); the mon allows "
                            f"{budget['limit']} x max({budget['osds_in']} OSDs in, 3) = {budget['capacity']}; "
                            f"a new pool adds {budget['new_pool_pgs']}")
            if budget.get("refused"):
                evidence.append("pools RGW still needs that would be refused: " + ", ".join(budget["refused"]))
        if ceph.get("limit_where"):
            evidence.append(f"mon_max_pg_per_osd = {budget.get('limit')} from {ceph['limit_where']}")
        if ceph.get("limits_differ"):
            evidence.append("daemons disagree on mon_max_pg_per_osd: " + ceph["limits_differ"])
        if rgw.get("erange"):
            evidence.append(f"{rgw.get('log')}: {rgw['erange_count']} x '{ERANGE_LOG}', last: {rgw['erange']}")
        target = ceph.get("fix_limit", RAISED_LIMIT)
        how = (f"set mon_max_pg_per_osd = {target} in ceph.conf [{', '.join(ceph['conf_sections'])}] "
               "(it wins over `ceph config set`) and inject it into every mon and OSD (`ceph tell`), no restart"
               if ceph.get("conf_sections") else
               f"`ceph config set global mon_max_pg_per_osd {target}` (mons and OSDs, live, no restart)")
        found.append(Finding("pg-limit", rgw_where, evidence, how + "; or lower osd_pool_default_pg_num/pgp_num "
                             "(e.g. 8) for the pools still to be created"))

    if rgw and not rgw.get("answers"):
        ev_ = [f"GET {rgw.get('url')}/ from the control node: {rgw.get('seen')}",
               f"radosgw on {rgw_where}: {rgw.get('process', 'unknown')}"]
        for host, r in ev.get("registry", {}).items():
            if r.get("storage", {}).get("auth") == "000":
                ev_.append(f"from {host} (the registry's path): no answer")
            v = r.get("v2", {})
            if 503 in (v.get("anonymous"), v.get("with_credentials")):
                ev_.append(f"GET /v2/ on {host}: 503" + (f" ({v['body']})" if v.get("body") else ""))
        found.append(Finding("rgw-down", rgw_where, ev_, "start RGW (01-rgw's start step) and wait until it answers"))

    for host, r in ev.get("registry", {}).items():
        v2 = r.get("v2", {})
        st = r.get("storage", {})
        lead = [f"GET /v2/: {v2.get('anonymous')} without credentials, {v2.get('with_credentials')} with"
                + (f" ({v2['body']})" if v2.get("body") else "")]
        if r.get("driver_mismatch"):
            lead.append(r["driver_mismatch"])
        if st.get("auth") == "000" and rgw.get("answers"):
            found.append(Finding("rgw-unreachable-from-registry", host, lead + [
                f"{st.get('what')} from {host}: no answer",
                f"GET {rgw.get('url')}/ from the control node: answers"] + r.get("log_hits", [])[-2:],
                f"check the network path from {host} to {rgw.get('url')} (routes, firewalls, the rgw_host "
                "address as the registry host sees it)", fixable=False))
        elif st.get("auth") in ("401", "403") and rgw.get("answers", True):
            found.append(Finding("storage-credentials", host, lead + [
                f"{st.get('what')} from {host} with the credentials in config.yml: HTTP {st['auth']}"]
                + ([r["creds_vs_rgw"]] if r.get("creds_vs_rgw") else []) + r.get("log_hits", [])[-2:],
                "re-run the registry's config step (04-registry: credentials re-read from RGW, config.yml "
                "rewritten, registry restarted)", fixable=not r.get("driver_mismatch")))
        elif st.get("container") == "404":
            found.append(Finding("storage-container-missing", host, lead + [
                f"{st.get('what_container')}: HTTP 404"], "create it (S3: 04-registry's bucket step; Swift: PUT)"))
        denied = [f for f, s in r.get("files", {}).items() if s != "ok"]
        perm_logs = [line for line in r.get("log_lines", []) if "permission denied" in line.lower()]
        if denied or perm_logs:
            ev_ = lead + [f"inside the registry: {f} {r['files'][f]}" for f in denied] + list(dict.fromkeys(perm_logs))[-3:]
            if r.get("state"):
                ev_.append(f"registry process: {r['state']}")
            if r.get("security"):
                ev_.append(r["security"])
            fixev = ("re-create the container as the runbook runs it (root, mounts"
                     + (" relabelled with :z: SELinux is enforcing; the document used --privileged" if
                        r.get("selinux") == "enforcing" else "; under SELinux add :z to each -v, or --privileged as "
                        "the document did") + ")")
            found.append(Finding("mount-access", host, ev_, fixev))
        elif not r.get("running") and not any(f.cause == "rgw-down" for f in found) and \
                st.get("auth") not in ("401", "403"):
            found.append(Finding("registry-down", host, lead + [f"registry process: {r.get('state', 'absent')}"]
                                 + r.get("log_hits", [])[-3:],
                                 "deploy it: run notebooks/04-registry.ipynb" if r.get("not_deployed") else
                                 "start it (04-registry's start step)", fixable=not r.get("not_deployed")))
        elif r.get("running") and (v2.get("anonymous") == 503 or v2.get("with_credentials") == 503) and \
                not any(f.where in (host, rgw_where) for f in found):
            found.append(Finding("unexplained", host, lead + r.get("log_hits", [])[-5:],
                                 "read the registry's log; /debug/health lists the failing check", fixable=False))
    for host, r in ev.get("registry", {}).items():
        v = r.get("v2", {})
        explained = any(f.where == host or f.cause in ("rgw-down", "pg-limit") for f in found)
        if not explained and v and (v.get("anonymous"), v.get("with_credentials")) != (401, 200):
            found.append(Finding("unexplained", host, [f"GET /v2/: {v.get('anonymous')} without credentials, "
                                                       f"{v.get('with_credentials')} with (401 and 200 expected)"]
                                 + r.get("log_hits", [])[-5:], "read the registry's log", fixable=False))
    if not found and probe and "container" in probe and not (probe.get("container") in (201, 202)
                                                              and probe.get("object") == 201):
        found.append(Finding("unexplained", rgw_where, [
            f"swift PUT {probe.get('name')}: container {probe.get('container')}, object {probe.get('object', '-')}"]
            + rgw.get("log_tail", []), "read RGW's log on rgw_host", fixable=False))
    return found


# ---------------------------------------------------------------- context helpers
def _state(ctx) -> dict:
    return ctx.__dict__.setdefault("_faq", {})


def _rgw_url(ctx) -> str:
    from . import rgw
    return rgw.endpoint(ctx)


def _registry_session(ctx, auth: bool):
    from . import certs, registry
    try:
        return registry.session(ctx, auth=auth)
    except certs.CertError:
        import requests
        s = requests.Session()
        s.trust_env = False
        s.verify = False
        if auth:
            s.auth = (ctx.registry_user, registry.password(ctx))
        note("no CA in state_dir: the registry's certificate is not verified by these probes")
        return s


def _v2(ctx, host: str) -> dict:
    from . import registry
    u = registry.url(ctx, host) + "/v2/"
    out = {}
    for key, auth in (("anonymous", False), ("with_credentials", True)):
        r, err = registry._http(_registry_session(ctx, auth), "GET", u, host, timeout=5)
        kind = err.split(":")[0]
        out[key] = r.status_code if r is not None else (
            "TLS error (state_dir's CA does not verify its certificate)" if kind == "SSLError" else
            "timeout" if "Timeout" in kind else "refused" if kind == "ConnectionError" else kind)
        if r is not None and r.status_code >= 500:
            out["body"] = masking.mask(r.text.strip()[:160])
    return out


def _swift_probe(ctx, timeout: float = 10) -> dict:
    """The FAQ's symptom: as the account, PUT a container and an object in it (the first
    object write makes RGW create its data pool), then delete both."""
    import requests
    from . import accounts
    from .rgw import http
    name = ctx.params.get("probe_container", "runbook-faq-probe")
    out = {"name": name, "timeout": timeout}
    try:
        user, key = accounts.swift_credentials(ctx)
        storage_url, token = accounts.swift_auth(ctx, user, key)
    except requests.RequestException as e:
        out["auth"] = f"no answer ({type(e).__name__})"
        return out
    except RunbookError as e:
        out["auth"] = str(e).splitlines()[0]
        return out
    hdr = {"X-Auth-Token": token}
    try:
        r = http("PUT", f"{storage_url}/{name}", headers=hdr, timeout=timeout, read=False,
                 what=f"PUT {storage_url}/{name} (X-Auth-Token: ****)")
        out["container"] = r.status_code
        if r.status_code in (201, 202):
            r = http("PUT", f"{storage_url}/{name}/probe", headers=hdr, data=b"runbook faq probe\n", timeout=timeout,
                     read=False, what=f"PUT {storage_url}/{name}/probe (X-Auth-Token: ****)")
            out["object"] = r.status_code
    except requests.Timeout:
        out["object" if "container" in out else "container"] = "timeout"
    except requests.RequestException as e:
        out.setdefault("container", f"no answer ({type(e).__name__})")
    finally:
        for path in (f"{name}/probe", name):
            try:
                http("DELETE", f"{storage_url}/{path}", headers=hdr, timeout=timeout, read=False,
                     what=f"DELETE {storage_url}/{path} (X-Auth-Token: ****)")
            except requests.RequestException:
                pass
    return out


def _probe_ok(p: dict) -> bool:
    return p.get("container") in (201, 202) and p.get("object") == 201


# ---------------------------------------------------------------- steps: evidence
@step("Symptoms: the registry's /v2/ and a write to RGW")
def symptoms(ctx) -> dict:
    """GET /v2/ on every registry host (without and with credentials), and the document's
    failing call: a Swift container PUT (then an object) as the account, cleaned up after."""
    st = _state(ctx)
    out = {"v2": {}, "probe": {}}
    for host in P.as_list(ctx.registry_host):
        v = _v2(ctx, host)
        out["v2"][host] = v
        fact(f"/v2/ on {host}", f"{v['anonymous']} without credentials, {v['with_credentials']} with"
             + (f" ({v['body']})" if v.get("body") else ""))
        row(check=f"GET https://{host}:{ctx.registry_port}/v2/",
            answer=f"{v['anonymous']} without credentials, {v['with_credentials']} with"
                   + (f" — {v['body']}" if v.get("body") else ""))
    if ctx.dry_run:
        note("dry run: the probe container is not written")
    else:
        p = _swift_probe(ctx)
        out["probe"] = p
        fact(f"swift PUT {p['name']}", p.get("auth") or f"container {p.get('container')}, object {p.get('object', '-')}")
        row(check=f"swift PUT {p['name']} on {_rgw_url(ctx)}",
            answer=p.get("auth") or f"container {p.get('container')}, object {p.get('object', '-')}")
    st["symptoms"] = out
    return out


def _ceph(h, c: str, read=True, **kw):
    return h.run(Command(f"timeout 30 {c}"), read=read, check=False, **kw)


@step("Evidence for 416: PGs per OSD on {ctx.params[rgw_host]}")
def ceph_evidence(ctx) -> dict:
    """ceph health, pool PG counts x sizes vs mon_max_pg_per_osd x OSDs in, where the limit
    comes from (ceph.conf wins over the config database), what each daemon runs with, and
    RGW's log line `pool_create returned (34)`."""
    from . import rgw
    h = ctx.host(ctx.rgw_host)
    out: dict = {}
    r = _ceph(h, "ceph -s -f json --connect-timeout 20")
    if r.exit_code != 0:
        note(f"`ceph -s` failed on {h.name} (exit {r.exit_code}): no Ceph evidence")
        _state(ctx)["ceph"] = out
        return out
    s = json.loads(r.stdout)
    checks = s.get("health", {}).get("checks", {})
    out["health"] = s.get("health", {}).get("status")
    if "TOO_MANY_PGS" in checks:
        out["too_many_pgs"] = checks["TOO_MANY_PGS"]["summary"]["message"]
    fact("health", out["health"] + (f" ({out['too_many_pgs']})" if "too_many_pgs" in out else ""))
    pools = parse_pools(_ceph(h, "ceph osd pool ls detail -f json").stdout)
    osds_in = int(json.loads(_ceph(h, "ceph osd stat -f json").stdout or "{}").get("num_in_osds", 0))

    def get(who, opt):
        v = _ceph(h, f"ceph config get {who} {opt}").stdout.strip()
        return int(v) if v.isdigit() else 0
    db_limit = get("mon", "mon_max_pg_per_osd")
    pg_num, size = get("mon", "osd_pool_default_pg_num"), get("mon", "osd_pool_default_size") or 1
    conf = (h.read_file(rgw.CONF) or b"").decode()
    sections = conf_sets(conf)
    conf_pg = conf_sets(conf, "osd pool default pg num", ("global", "mon"))
    if conf_pg:
        pg_num = int(list(conf_pg.values())[-1])
    size_conf = conf_sets(conf, "osd pool default size", ("global", "mon"))
    if size_conf:
        size = int(list(size_conf.values())[-1])
    # what the daemons really run with (a runtime `ceph tell ... config set` beats both)
    running = {}
    for who in ("mon", "osd"):
        t = _ceph(h, f"ceph tell '{who}.*' config get mon_max_pg_per_osd")
        vals = sorted({int(v) for v in re.findall(r'"mon_max_pg_per_osd":\s*"(\d+)"', t.stdout)})
        if vals:
            running[who] = vals
    limit = (running.get("mon") or [int(list(sections.values())[-1]) if sections else db_limit])[0]
    out["limit_where"] = (f"ceph.conf [{', '.join(sections)}] on {h.name} (wins over `ceph config set`)" if sections
                          else "the config database (`ceph config get mon`)" if db_limit else "the default")
    if running.get("mon") and running.get("osd") and running["mon"] != running["osd"]:
        out["limits_differ"] = f"mons {running['mon']}, OSDs {running['osd']}"
    out["conf_sections"] = list(sections)
    budget = pg_budget(pools, osds_in, limit, pg_num, size)
    out["budget"] = budget
    out["fix_limit"] = raised_limit(budget)
    out["running"] = running
    for p in pools:
        row(pool=p["name"], pg_num=p["pg_num"], size=p["size"], pgs=p["pg_num"] * p["size"])
    fact("PGs (pg_num x size)", f"{budget['pgs']} of {budget['capacity']} allowed "
                                f"({limit} x max({osds_in} OSDs in, {MIN_OSDS_COUNTED}))")
    fact("mon_max_pg_per_osd", f"{limit} from {out['limit_where']}"
         + (f"; running: mons {running.get('mon')}, OSDs {running.get('osd')}" if running else ""))
    fact("new pools", f"osd_pool_default_pg_num {pg_num} x size {size} = {budget['new_pool_pgs']} PGs each")
    if budget["missing"]:
        fact("RGW pools not yet created", ", ".join(budget["missing"])
             + (f" (refused: {', '.join(budget['refused'])})" if budget["refused"] else " (they fit)"))
    # RGW's own log
    try:
        did = rgw._did(ctx)
        log = rgw.paths(did)["log"]
        g = h.run(cmd("grep -cF {p} {f}; grep -F {p} {f} | tail -1", p=ERANGE_LOG, f=log), read=True, check=False)
        lines = g.stdout.splitlines()
        out["log"] = log
        if lines and lines[0].isdigit() and int(lines[0]) > 0:
            out["erange_count"] = int(lines[0])
            out["erange"] = lines[1][:300] if len(lines) > 1 else ""
            fact("RGW log", f"{log}: {lines[0]} x '{ERANGE_LOG}'")
        else:
            fact("RGW log", f"{log}: no '{ERANGE_LOG}'")
    except RunbookError:
        pass
    _state(ctx)["ceph"] = out
    return out


@step("Evidence for 503: RGW, the storage the registry uses, its process and files")
def registry_evidence(ctx) -> dict:
    """RGW from the control node and on its host; on each registry host: the deployed
    config.yml's storage (its credentials tried from there, on curl's stdin), the registry's
    state and log, and whether it can read its mounted files."""
    from . import rgw
    st = _state(ctx)
    url = _rgw_url(ctx)
    ok, seen = rgw.answers(url)
    info = {"url": url, "answers": ok, "seen": seen, "where": ctx.rgw_host}
    h = ctx.host(ctx.rgw_host)
    try:
        did = rgw._did(ctx)
        p = rgw.paths(did)
        if h.has_systemd():
            a = h.test(cmd("systemctl is-active --quiet {u}", u=p["unit"]))
            info["process"] = f"{p['unit']} " + ("active" if a else "not active")
        else:
            pid = rgw._pid(h, p["pid"])
            info["process"] = f"running (pid {pid})" if pid else f"not running (pidfile {p['pid']})"
        info["log"] = p["log"]
        tail = h.run(cmd("tail -n 3 {f}", f=p["log"]), read=True, check=False).stdout.strip().splitlines()
        info["log_tail"] = [masking.mask(x[:200]) for x in tail]
    except RunbookError as e:
        info["process"] = f"unknown ({str(e).splitlines()[0]})"
    fact("RGW", f"{url}: {seen}; radosgw {info['process']}")
    st.setdefault("rgw", {}).update(info)
    regs = {}
    for host in P.as_list(ctx.registry_host):
        regs[host] = _registry_host_evidence(ctx, host)
    st["registry"] = regs
    return {"rgw": info, "registry": regs}


def _deployed_config(ctx, h) -> tuple[dict | None, str]:
    from . import registry
    path = f"{ctx.remote_dir}/config.yml" if ctx.runtime == "docker" else registry.SYSTEMD_CONFIG
    data = h.read_file(path)
    if not data:
        return None, path
    cfg = yaml.safe_load(data) or {}
    s = cfg.get("storage") or {}
    for drv in ("swift", "s3"):
        for k in ("password", "secretkey", "accesskey"):
            v = (s.get(drv) or {}).get(k)
            if v and len(str(v)) >= masking.MIN_LEN:
                masking.register(str(v))
    sec = (cfg.get("http") or {}).get("secret")
    if sec and len(str(sec)) >= masking.MIN_LEN:
        masking.register(str(sec))
    return cfg, path


def _curl(h, args: list, conf: str, no_log=True):
    return h.run(["curl", "-s", "-m", "10", *args, "-K", "-"], stdin=conf, read=True, check=False, no_log=no_log)


def _storage_from(ctx, h, cfg: dict) -> dict:
    """The storage backend's own answer to the registry's credentials, from the registry host."""
    from . import registry
    s = cfg.get("storage") or {}
    if "swift" in s:
        sw = s["swift"]
        out = {"kind": "swift", "what": f"swift auth v1 {sw.get('authurl')} as {sw.get('username')}"}
        r = _curl(h, ["-o", "/dev/null", "-D", "-", "-w", "\\n%{http_code}"], registry._curl_conf(
            url=sw.get("authurl", ""), header=[f"X-Auth-User: {sw.get('username')}", f"X-Auth-Key: {sw.get('password')}"]))
        lines = r.stdout.strip().splitlines()
        out["auth"] = lines[-1].strip() if lines else "000"
        heads = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[:-1]) if v}
        token, surl = heads.get("x-auth-token", ""), heads.get("x-storage-url", "")
        if token:
            masking.register(token)
        if out["auth"] in ("200", "204") and token and surl:
            c = sw.get("container", "")
            out["what_container"] = f"HEAD {surl}/{c}"
            r = _curl(h, ["-I", "-o", "/dev/null", "-w", "%{http_code}"],
                      registry._curl_conf(url=f"{surl}/{c}", header=[f"X-Auth-Token: {token}"]))
            out["container"] = r.stdout.strip()
        return out
    if "s3" in s:
        s3 = s["s3"]
        u = f"{str(s3.get('regionendpoint', '')).rstrip('/')}/{s3.get('bucket')}"
        out = {"kind": "s3", "what": f"S3 HEAD {u} (SigV4)", "what_container": f"S3 HEAD {u}"}
        r = _curl(h, ["-I", "-o", "/dev/null", "-w", "%{http_code}"], registry._curl_conf(
            url=u, user=f"{s3.get('accesskey')}:{s3.get('secretkey')}",
            aws_sigv4=f"aws:amz:{s3.get('region', registry.S3_REGION)}:s3",
            header="x-amz-content-sha256: UNSIGNED-PAYLOAD"))
        code = r.stdout.strip()
        out["auth"] = code if code != "404" else "200"
        if code == "404":
            out["container"] = "404"
        return out
    return {"kind": next(iter(k for k in s if k not in ("cache", "delete", "redirect", "maintenance")), "none")}


def _registry_host_evidence(ctx, host: str) -> dict:
    from . import accounts, registry
    h = ctx.host(host)
    ev: dict = {"v2": (_state(ctx).get("symptoms", {}).get("v2", {}).get(host) or _v2(ctx, host))}
    cfg, path = _deployed_config(ctx, h)
    if cfg is None:
        ev.update(running=False, not_deployed=True, state=f"not deployed (no {path})")
        row(host=host, check="config.yml", answer=f"{path} missing (04-registry not run?)")
        return ev
    drivers = [k for k in (cfg.get("storage") or {}) if k in registry.DRIVERS]
    if drivers and drivers[0] != ctx.storage:
        ev["driver_mismatch"] = (f"the deployed config.yml uses storage {drivers[0]}, this run says storage="
                                 f"{ctx.storage}: pass -p storage {drivers[0]} as the deploy did")
    st = _storage_from(ctx, h, cfg)
    ev["storage"] = st
    if "what" in st:
        row(host=host, check=st["what"] + " (from this host, key on curl's stdin)", answer=f"HTTP {st.get('auth')}")
    if "container" in st:
        row(host=host, check=st["what_container"], answer=f"HTTP {st['container']}")
    if st.get("kind") == "swift" and st.get("auth") in ("401", "403"):
        try:
            user, key = accounts.swift_credentials(ctx)
            sw = cfg["storage"]["swift"]
            ev["creds_vs_rgw"] = ("config.yml's Swift key differs from the one RGW has now for "
                                  f"{user} (rotated? `key create --gen-secret` replaces it)"
                                  if sw.get("username") == user and sw.get("password") != key else
                                  f"config.yml authenticates as {sw.get('username')}, the account is {user}")
        except RunbookError:
            pass
    # the process: state, log, identity, and its view of the mounted files
    lines: list[str] = []
    if ctx.runtime == "docker":
        r = h.run(cmd("docker inspect --format {f} {n}", n=registry.CONTAINER_NAME,
                      f="{{json .State}}\t{{.Config.User}}\t{{.HostConfig.Privileged}}\t{{json .HostConfig.Binds}}"
                        "\t{{json .HostConfig.SecurityOpt}}"), read=True, check=False)
        if r.exit_code != 0:
            ev["running"], ev["state"] = False, "no container named registry"
        else:
            state, user, priv, binds, secopt = (r.stdout.strip().split("\t") + [""] * 5)[:5]
            sj = json.loads(state)
            ev["running"] = bool(sj.get("Running")) and not sj.get("Restarting")
            ev["state"] = ("restarting (exit code %s, restart loop)" % sj.get("ExitCode") if sj.get("Restarting")
                           else sj.get("Status", "?") + (f" (exit code {sj.get('ExitCode')})" if not sj.get("Running")
                                                         else ""))
            ev["security"] = (f"container user {user or 'root (image default)'}, privileged {priv}, "
                              f"mounts {', '.join(json.loads(binds) or [])}, security-opt {secopt}")
            lg = h.run(cmd("docker logs --tail 50 {n} 2>&1", n=registry.CONTAINER_NAME), read=True, check=False)
            lines = lg.stdout.splitlines()
            if ev["running"]:
                script = "; ".join(f"if head -c1 {f} >/dev/null 2>&1; then echo '{f} ok'; else echo '{f} "
                                   f"DENIED'; fi" for f in MOUNTED)
                x = h.run(cmd("docker exec {n} sh -c {s}", n=registry.CONTAINER_NAME, s=f"id -un 2>/dev/null; {script}"),
                          read=True, check=False)
                files = {}
                for line in x.stdout.splitlines()[1:]:
                    f, _, res = line.rpartition(" ")
                    files[f] = "ok" if res == "ok" else "cannot be read"
                ev["files"] = files
                ls = h.run(cmd("docker exec {n} ls -l /auth /certs", n=registry.CONTAINER_NAME), read=True, check=False)
                ev["ls"] = ls.stdout.strip()
    else:
        old, running = registry._daemon_state(h) if not h.has_systemd() else (None, h.test(
            cmd("systemctl is-active --quiet docker-registry")))
        ev["running"] = running
        ev["state"] = "running" if running else "not running"
        src = (cmd("tail -n 50 {f}", f=registry.LOGFILE) if not h.has_systemd()
               else cmd("journalctl -u docker-registry -n 50 --no-pager"))
        lines = h.run(src, read=True, check=False).stdout.splitlines()
        if h.has_systemd():
            files = {}
            for f in (f"{ctx.remote_dir}/auth/htpasswd", f"{ctx.remote_dir}/certs/registry-key.pem", path):
                okr = h.test(cmd("runuser -u docker-registry -- test -r {f}", f=f))
                files[f] = "ok" if okr else "cannot be read by user docker-registry"
            ev["files"] = files
    se = h.run(Command("cat /sys/fs/selinux/enforce 2>/dev/null || echo absent"), read=True, check=False).stdout.strip()
    ev["selinux"] = {"1": "enforcing", "0": "permissive"}.get(se, "absent")
    ev["log_lines"] = [masking.mask(x[:300]) for x in lines]
    hits = [masking.mask(x[:300]) for x in lines
            if re.search(r"level=(error|fatal|panic)|panic:|permission denied|health", x, re.I)]
    ev["log_hits"] = list(dict.fromkeys(reversed(hits)))[:5][::-1]  # the last 5 distinct
    row(host=host, check="registry process", answer=ev.get("state", "?"))
    for f, res in ev.get("files", {}).items():
        if res != "ok":
            row(host=host, check=f"read {f}", answer=res)
    row(host=host, check="SELinux", answer=ev["selinux"])
    if ev["log_hits"]:
        row(host=host, check="log (errors)", answer=ev["log_hits"][-1][:200])
    return ev


# ---------------------------------------------------------------- diagnose / fix / check
class Diagnosis(list):
    """The findings, shown as a readable list (masked)."""

    def __repr__(self):
        if not self:
            return "no problem found"
        return "\n".join(str(f) for f in self)


@step("Diagnosis")
def _diagnose(ctx) -> Diagnosis:
    st = _state(ctx)
    ev = {"rgw": st.get("rgw", {}), "probe": st.get("symptoms", {}).get("probe", {}),
          "ceph": st.get("ceph", {}), "registry": st.get("registry", {})}
    if ev["ceph"].get("log"):
        ev["rgw"] = {**ev["rgw"], "log": ev["ceph"]["log"], "erange": ev["ceph"].get("erange"),
                     "erange_count": ev["ceph"].get("erange_count", 0)}
    found = Diagnosis(classify(ev))
    st["findings"] = found
    if not found:
        fact("verdict", "no problem found (" + ", ".join(c for c in CAUSES if c != "unexplained") + " checked)")
    for f in found:
        row(cause=f.cause, where=f.where, what=f.title, evidence=" | ".join(f.evidence), fix=f.fix)
    return found


def diagnose(ctx) -> Diagnosis:
    """Everything this section checks, in one call (other notebooks may point here):
    symptoms, the 416 and the 503 evidence, then the findings."""
    st = _state(ctx)
    if "symptoms" not in st:
        symptoms(ctx)
    if "ceph" not in st:
        ceph_evidence(ctx)
    if "registry" not in st:
        registry_evidence(ctx)
    rep = _diagnose(ctx)
    try:
        from IPython import get_ipython
        from IPython.display import display
        if get_ipython() is not None:
            display(rep)
    except ImportError:
        pass
    return rep.value


def _fix_pg_limit(ctx, finding):
    h = ctx.host(ctx.rgw_host)
    ceph = _state(ctx).get("ceph", {})
    target = ceph.get("fix_limit", RAISED_LIMIT)
    sections = ceph.get("conf_sections") or []
    if sections:
        from . import rgw
        text = (h.read_file(rgw.CONF) or b"").decode()
        new = set_conf_value(text, sections, LIMIT_KEY, target)
        if new != text:
            mode = h.run(cmd("stat -c %a {p}", p=rgw.CONF), read=True).stdout.strip() or "644"
            h.put_file(rgw.CONF, new, mode=int(mode, 8))
        note(f"ceph.conf on {h.name} now sets mon_max_pg_per_osd = {target}; copy it to every Ceph node "
             "(the document: ceph-deploy config push HOSTS)")
        for who in ("mon", "osd"):
            h.run(Command(f"timeout 60 ceph tell '{who}.*' config set mon_max_pg_per_osd {int(target)}"))
    else:
        h.run(Command(f"timeout 60 ceph config set global mon_max_pg_per_osd {int(target)}"))
    # a mon-only raise let the pool be created while the OSD withheld its PGs (a 10-minute hang)
    deadline = time.monotonic() + 30
    while not ctx.dry_run:
        vals = {}
        for who in ("mon", "osd"):
            t = _ceph(h, f"ceph tell '{who}.*' config get mon_max_pg_per_osd").stdout
            vals[who] = {int(v) for v in re.findall(r'"mon_max_pg_per_osd":\s*"(\d+)"', t)}
        if vals["mon"] == {target} and vals["osd"] == {target}:
            fact("mon_max_pg_per_osd", f"{target} on every mon and OSD (running)")
            break
        if time.monotonic() > deadline:
            raise FAQError(f"mon_max_pg_per_osd did not reach {target} on every daemon: {vals}",
                           hint="a value in ceph.conf on the daemons' own hosts wins: set it there and restart them")
        time.sleep(1)
    return f"mon_max_pg_per_osd = {target}"


def _wait_v2(ctx, want=(401,), auth_want=(200,), timeout: float = HEALTH_WAIT) -> dict:
    """Poll /v2/ on every host until it answers as wanted (bounded: health checks run every 10 s)."""
    seen = {}
    for host in P.as_list(ctx.registry_host):
        deadline = time.monotonic() + timeout
        while True:
            v = _v2(ctx, host)
            seen[host] = v
            if v["anonymous"] in want and v["with_credentials"] in auth_want:
                break
            if time.monotonic() > deadline:
                break
            time.sleep(1)
    return seen


def _restart_registry(ctx, h):
    from . import registry
    if ctx.runtime == "docker":
        h.run(cmd("docker restart {n}", n=registry.CONTAINER_NAME))
    else:
        h.run(cmd("systemctl restart docker-registry") if h.has_systemd() else
              cmd("pid=$(cat {p}) && kill \"$pid\" && for i in $(seq 50); do kill -0 \"$pid\" 2>/dev/null || "
                  "break; sleep 0.1; done; rm -f {p} {hf}", p=registry.PIDFILE, hf=registry.HASHFILE))


@step("Fix what was found (fix={ctx.params[fix]})")
def fix(ctx) -> list:
    """With fix=False: shows what would be done.  With fix=True: the fixes in dependency order
    (Ceph's limit, RGW, then the registry's config, container, process)."""
    from . import registry, rgw
    found = _state(ctx).get("findings")
    if found is None:
        found = diagnose(ctx)
    if not found:
        note("no problem found: nothing to fix")
        return []
    done = []
    todo = sorted((f for f in found if f.fixable), key=lambda f: FIX_ORDER.index(f.cause))
    for f in found:
        row(cause=f.cause, where=f.where, fix=f.fix, applied="yes" if (ctx.params.get("fix") and f.fixable) else "no")
    if not ctx.params.get("fix"):
        note("fix=False: nothing changed; run again with -p fix True to apply the fixes above")
        return []
    causes = {f.cause for f in todo}
    if "pg-limit" in causes:
        done.append(_fix_pg_limit(ctx, None))
    if "rgw-down" in causes:
        _sub(rgw.start(ctx))
        done.append("RGW started")
    hosts_cfg = {f.where for f in todo if f.cause in ("storage-credentials", "mount-access", "registry-down",
                                                      "storage-container-missing")}
    if hosts_cfg:
        _sub(registry.preflight(ctx))
        if "storage-container-missing" in causes:
            _create_container(ctx)
            done.append("container/bucket created")
        cfg_rep = _sub(registry.configure(ctx))
        for host in hosts_cfg:
            h = ctx.host(host)
            mount = any(f.cause == "mount-access" and f.where == host for f in todo)
            if mount and ctx.runtime == "docker":
                # the container as the runbook runs it; :z when SELinux enforces (the document: --privileged)
                h.run(cmd("docker rm -f {n}", n=registry.CONTAINER_NAME))
                ev = _state(ctx).get("registry", {}).get(host, {})
                if ev.get("selinux") == "enforcing":
                    h.run(add_selinux_label(registry.docker_run_argv(ctx, registry.config_hash(ctx))))
                done.append(f"{host}: registry container re-created")
            elif cfg_rep.changed:
                label_ok = ctx.runtime != "docker" or registry._docker_state(h)[0] == registry.config_hash(ctx)
                if label_ok:
                    _restart_registry(ctx, h)  # same start-time hash: start() alone would keep the old process
        _sub(registry.start(ctx))
        done.append("registry configured and started")
    fact("applied", "; ".join(done))
    mark_changed()
    return done


def _sub(rep):
    """A step run inside the fix step: shown as a row of it."""
    row(cause="", where="", fix=f"{rep.title}: {rep.status}" + (f" ({rep.message})" if rep.message else ""),
        applied="yes")
    return rep


def _create_container(ctx):
    from . import accounts, registry
    if ctx.storage == "s3":
        registry.bucket(ctx)
        return
    from .rgw import http
    user, key = accounts.swift_credentials(ctx)
    surl, token = accounts.swift_auth(ctx, user, key)
    c = ctx.params.get("container", "registry")
    http("PUT", f"{surl}/{c}", headers={"X-Auth-Token": token}, read=False,
         what=f"PUT {surl}/{c} (X-Auth-Token: ****)")


def check(ctx) -> None:
    """The verdict: no problem found; or, with fix=True, every cause fixed and the symptoms gone
    (/v2/ 401 without credentials and 200 with, the probe container and object written)."""
    st = _state(ctx)
    found = st.get("findings")
    if found is None:
        found = diagnose(ctx)
    regs = ", ".join(f"{h}:{ctx.registry_port}" for h in P.as_list(ctx.registry_host))
    rgw_addr = f"{ctx.rgw_host}:{ctx.rgw_port}"
    checked = ", ".join(c for c in CAUSES if c != "unexplained")
    if not found:
        ctx.verdict(True, f"no problem found: registry {regs} answers /v2/ 401 without credentials and 200 with; "
                          f"RGW {rgw_addr} accepts a container and an object", checked=checked)
        return
    names = ", ".join(f"{f.cause} on {f.where}" for f in found)
    if ctx.dry_run and ctx.params.get("fix"):
        ctx.verdict(True, f"found {names}; dry run: the fixes were shown, not applied",
                    **{f.cause: f.fix for f in found})
        return
    if not ctx.params.get("fix"):
        ctx.verdict(False, f"found {names}",
                    hint="the evidence and the fix are listed above; run again with -p fix True to apply it",
                    **{f.cause: f.title for f in found})
        return
    v2 = _wait_v2(ctx)
    probe = _swift_probe(ctx, timeout=30)
    bad = [f"{h}: /v2/ {v['anonymous']} without credentials, {v['with_credentials']} with"
           for h, v in v2.items() if v["anonymous"] != 401 or v["with_credentials"] != 200]
    if not _probe_ok(probe):
        bad.append(f"swift PUT {probe['name']}: container {probe.get('container')}, object {probe.get('object')}"
                   + (f" ({probe['auth']})" if probe.get("auth") else ""))
    unfixed = [f.cause for f in found if not f.fixable]
    if bad or unfixed:
        ctx.verdict(False, f"found {names}; still failing: " + "; ".join(bad + [f"{c} not fixable here" for c in unfixed]),
                    hint="see the evidence above")
        return
    ctx.verdict(True, f"fixed {names}: registry {regs} answers /v2/ 401 without credentials and 200 with; "
                      f"RGW {rgw_addr} accepts a container and an object",
                **{f.cause: f.fix for f in found})
