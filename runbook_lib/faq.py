"""Section 7: the document's two failures (its FAQ), diagnosed from evidence and fixed.

416 Requested Range Not Satisfiable: RGW creates a pool on demand (bucket index, then data
on the first object write); when PGs per OSD would exceed `mon_max_pg_per_osd` the mon answers
ERANGE and RGW maps it to 416 `InvalidRange` (https://tracker.ceph.com/issues/21497).

503 Service Unavailable on login: the registry's storage-driver health check failed 3 times
(10 s apart), so every request, `/v2/` included, answers 503 `health check failed`.  Causes:
RGW down or unreachable, credentials refused, the bucket/container missing, and (the
document's) the container not allowed to use its mounted files (SELinux: `:z` / `--privileged`).
With runtime=podman the evidence is podman's (`podman inspect/logs/exec registry`, and the
journal of container-registry.service when the unit's container is gone), and SELinux's denial
is named with podman's answer: the `:Z` volume label, never `--privileged`.

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
from .context import faq_hint
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

# Every cause, in the order the report and the notebook tell them: the document's two cases
# first (416, then 503), then by what the user sees (401, x509, connection refused, 5xx on push).
CAUSES = {
    "pg-limit": "RGW cannot create a pool: PGs per OSD would exceed mon_max_pg_per_osd (ERANGE, HTTP 416)",
    "rgw-down": "RGW does not answer: the registry's storage driver cannot reach it",
    "storage-credentials": "RGW refuses the storage credentials in the registry's config.yml",
    "storage-container-missing": "the registry's Swift container / S3 bucket does not exist",
    "mount-access": "the registry process cannot read its mounted files (config.yml, certs, htpasswd)",
    "selinux-volume-label": "SELinux denies the registry's container its mounted files: the volumes carry no "
                            ":Z/:z label (the document's 503, which it answered with --privileged)",
    "registry-down": "the registry is not running",
    "rgw-unreachable-from-registry": "RGW answers the control node but not the registry host (network path)",
    # 401
    "htpasswd-wrong-password": "the htpasswd hash of the user does not verify the password the runbook holds (401)",
    "htpasswd-user-missing": "the user is not in the registry's htpasswd (401)",
    "htpasswd-missing": "the registry has no readable htpasswd of the runbook's (missing, a directory, or "
                        "provisioned by the registry with its default user)",
    "client-login-stale": "the client's stored login for the registry holds another password (push: 401)",
    # x509
    "tls-ca-not-trusted": "the client does not trust the registry's CA for the exact HOST:PORT it uses",
    "tls-name-missing": "the registry's certificate does not name the address the client uses",
    "tls-expired": "the registry's certificate is expired or not yet valid",
    "registry-speaks-http": "the registry answers plain HTTP on its port (server gave HTTP response to HTTPS client)",
    "client-speaks-http": "the client speaks plain HTTP to the registry's HTTPS port",
    # connection refused
    "port-closed": "the registry runs but nothing listens on its port",
    "wrong-port": "the registry listens on another port than the one the client uses",
    "listening-elsewhere": "the registry listens on the port, but only on another address",
    # 5xx on push
    "rgw-user-suspended": "the RGW user the registry stores its data as is suspended",
    "rgw-quota-exceeded": "an RGW quota (user or bucket) is full: RGW refuses writes, the push gets 500",
    "osd-full": "an OSD is full (HEALTH_ERR): Ceph blocks every write, pushes hang or fail",
    "unexplained": "the registry fails but none of the known causes was seen",
}
FAMILY = {"pg-limit": "416", "rgw-down": "503", "storage-credentials": "503", "storage-container-missing": "503",
          "mount-access": "503", "selinux-volume-label": "503", "registry-down": "refused",
          "rgw-unreachable-from-registry": "503",
          "htpasswd-wrong-password": "401", "htpasswd-user-missing": "401", "htpasswd-missing": "401",
          "client-login-stale": "401", "tls-ca-not-trusted": "x509", "tls-name-missing": "x509",
          "tls-expired": "x509", "registry-speaks-http": "x509", "client-speaks-http": "x509",
          "port-closed": "refused", "wrong-port": "refused", "listening-elsewhere": "refused",
          "rgw-user-suspended": "5xx", "rgw-quota-exceeded": "5xx", "osd-full": "5xx", "unexplained": ""}
FIX_ORDER = ("pg-limit", "rgw-down", "storage-credentials", "storage-container-missing", "selinux-volume-label",
             "mount-access",
             "registry-down", "registry-speaks-http", "listening-elsewhere", "tls-name-missing", "tls-expired",
             "htpasswd-missing", "htpasswd-user-missing", "tls-ca-not-trusted", "client-login-stale")
# fixed by re-deploying the registry as 04-registry renders it (config.yml, certificate, container)
REDEPLOY = ("storage-credentials", "mount-access", "selinux-volume-label", "registry-down",
            "storage-container-missing", "registry-speaks-http", "listening-elsewhere", "tls-name-missing", "tls-expired")
PROVISIONED_LOG = "htpasswd is missing, provisioning with default user"
PROVISIONED_USER = "docker"  # the user registry 2.8 writes into a missing htpasswd (password in its log)
QUOTA_FULL = 0.9  # a quota this full fails the next push (a push writes many objects)


class FAQError(RunbookError):
    pass


@dataclass
class Finding:
    cause: str
    where: str
    evidence: list = field(default_factory=list)
    fix: str = ""
    fixable: bool = True
    commands: list = field(default_factory=list)  # what to run by hand when fix=True does not apply it

    @property
    def title(self) -> str:
        return CAUSES[self.cause]

    @property
    def family(self) -> str:
        return FAMILY.get(self.cause, "")

    def todo(self) -> str:
        """One line: what to do about it."""
        how = "fix=True applies it" if self.fixable else "not applied by fix=True: run it yourself"
        return masking.mask(f"{self.fix} ({how})" + "".join(f"\n      $ {c}" for c in self.commands))

    def __str__(self):
        return masking.mask(f"{self.cause} on {self.where}: {self.title}\n" +
                            "".join(f"    evidence: {e}\n" for e in self.evidence) +
                            f"    fix: {self.fix}" + ("" if self.fixable else " (not applied automatically)") +
                            "".join(f"\n      $ {c}" for c in self.commands))


# ---------------------------------------------------------------- pure helpers (unit-tested)
hint_for = faq_hint  # kept in context.py: a section's verdict points here without importing this module


SYMPTOMS = (  # (family, pattern): the first that matches what the client printed
    ("416", r"\b416\b|InvalidRange|Requested Range"),
    ("x509", r"server gave HTTP response to HTTPS client|Client sent an HTTP request to an HTTPS server"),
    ("x509", r"x509|certificate|tls:|TLS handshake|SSL"),
    ("401", r"\b401\b|unauthorized|authentication required|incorrect username or password|"
            r"invalid username/password"),
    ("refused", r"connection refused|no route to host|i/o timeout|dial tcp|connect:|Connection timed out|"
                r"Could not connect|Failed to connect"),
    ("503", r"\b503\b|Service Unavailable|health check failed"),
    ("5xx", r"\b50[0-24]\b|Internal Server Error|received unexpected HTTP status: 5|blob upload unknown|"
            r"QuotaExceeded|EOF"),
)


def symptom_family(text: str) -> str | None:
    """What the user saw, as a family of causes: 416, 503, 401, x509, refused, 5xx (None: not known)."""
    for fam, pat in SYMPTOMS:
        if re.search(pat, text or "", re.I):
            return fam
    return None


def symptom_address(text: str) -> str | None:
    """The HOST:PORT a client's message names (`Get "https://HOST:PORT/v2/": ...`), if any."""
    m = re.search(r"https?://([A-Za-z0-9.\-]+|\[[0-9a-fA-F:]+\]):(\d{1,5})/", text or "")
    return f"{m.group(1)}:{m.group(2)}" if m else None


def order_findings(found: list, family: str | None) -> list:
    """The symptom's family first (then the order classify found them in)."""
    return sorted(found, key=lambda f: 0 if family and f.family == family else 1)


def check_htpasswd(text: str | None, user: str, password: str | None) -> dict:
    """What the registry's htpasswd says about user and password (bcrypt verified here, on the
    control node; the hash is never returned): {users, user_present, bcrypt, verifies}."""
    out = {"users": [], "user_present": False, "bcrypt": None, "verifies": None}
    hashes = {}
    for line in (text or "").splitlines():
        u, sep, hsh = line.strip().partition(":")
        if sep and u:
            hashes[u] = hsh.strip()
    out["users"] = sorted(hashes)
    if user not in hashes:
        return out
    out["user_present"] = True
    hsh = hashes[user]
    out["bcrypt"] = bool(re.match(r"^\$2[abxy]?\$\d\d\$", hsh))
    if password and out["bcrypt"]:
        from passlib.hash import bcrypt
        try:
            out["verifies"] = bool(bcrypt.verify(password, hsh))
        except (ValueError, TypeError):
            out["verifies"] = False
    elif password:
        out["verifies"] = False  # the registry accepts bcrypt only
    return out


def listener_problem(listeners: list[dict], port: int, procs=("registry", "docker-registry")) -> dict:
    """From `ss -Hltnp` rows of the registry host: does the registry listen on port on every address?
    {"ok": bool, "ours": [local addresses of the registry's sockets], "kind": None|wrong-port|
    listening-elsewhere|port-closed}."""
    ours = [l["local"] for l in listeners if set(l.get("procs", [])) & set(procs)]
    on_port = [a for a in ours if a.rpartition(":")[2] == str(port)]
    wild = [a for a in on_port if a.rpartition(":")[0] in ("*", "0.0.0.0", "[::]", "::", "[::ffff:0.0.0.0]")]
    if wild:
        return {"ok": True, "ours": ours, "kind": None}
    if on_port:
        return {"ok": False, "ours": ours, "kind": "listening-elsewhere"}
    if ours:
        return {"ok": False, "ours": ours, "kind": "wrong-port"}
    return {"ok": False, "ours": ours, "kind": "port-closed"}


def cert_facts(cert, name: str, when, ca=None) -> dict:
    """What a client checks in the registry's certificate, for the address it uses (pure):
    {sans, covers, not_before, not_after, expired, not_yet_valid, signed_by_ca}."""
    from . import certs
    sans = certs.cert_sans(cert)
    out = {"sans": sans, "covers": not certs.missing_sans(cert, [name]),
           "not_before": cert.not_valid_before_utc, "not_after": cert.not_valid_after_utc,
           "expired": when > cert.not_valid_after_utc, "not_yet_valid": when < cert.not_valid_before_utc}
    if ca is not None:
        out["signed_by_ca"] = certs.signed_by(cert, ca)
    return out


def certs_d_state(entries: dict, address: str, same_registry: list[str], ca_sha: str | None) -> dict:
    """The client's certs.d ({dir name: sha256 of its ca.crt or None}) for the address it uses:
    {"state": ok|missing|other-ca|no-ca-file, "others": dirs naming the same registry otherwise}."""
    others = [d for d in entries if d != address and d in same_registry]
    if address not in entries:
        return {"state": "missing", "others": others}
    have = entries[address]
    if have is None:
        return {"state": "no-ca-file", "others": others}
    if ca_sha and have != ca_sha:
        return {"state": "other-ca", "others": others}
    return {"state": "ok", "others": others}


def quota_usage(quota: dict, size: int, objects: int) -> list[str]:
    """`radosgw-admin` quota JSON ({enabled, max_size, max_objects}) against usage: the limits
    that are (nearly) full, as sentences, e.g. ['12 of max 12 objects (100%)']."""
    out = []
    if not quota or not quota.get("enabled"):
        return out
    ms, mo = int(quota.get("max_size", -1)), int(quota.get("max_objects", -1))
    if mo >= 0 and objects >= mo * QUOTA_FULL:
        out.append(f"{objects} of max {mo} objects ({(objects / mo * 100) if mo else 100:.0f}%)")
    if ms >= 0 and size >= ms * QUOTA_FULL:
        out.append(f"{size / 1e6:.1f} MB of max {ms / 1e6:.1f} MB ({(size / ms * 100) if ms else 100:.0f}%)")
    return out


def stored_login(config_text, address: str, user: str, password: str | None) -> dict:
    """The client's stored login for address against the runbook's (masked): {state: current|stale|
    absent|helper, user}.  Compares base64(user:password) as docker keeps it; shows the user only."""
    import base64
    try:
        d = json.loads(config_text) if config_text else {}
    except ValueError:
        d = {}
    auths = d.get("auths") or {}
    entry = auths.get(address) or auths.get(f"https://{address}") or {}
    if not entry.get("auth"):
        helper = (d.get("credHelpers") or {}).get(address) or d.get("credsStore")
        return {"state": "helper" if helper and address in str(d) else "absent", "user": None}
    try:
        u = base64.b64decode(entry["auth"]).decode(errors="replace").partition(":")[0]
    except ValueError:
        u = "?"
    want = base64.b64encode(f"{user}:{password}".encode()).decode() if password else None
    return {"state": "current" if want and entry["auth"] == want else "stale", "user": u}


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


def parse_binds(binds: list[str] | None) -> list[dict]:
    """HostConfig.Binds of `docker inspect` / `podman inspect` ("SRC:DST[:opt,opt]") ->
    [{"source", "destination", "options"}]."""
    out = []
    for b in binds or []:
        parts = b.split(":")
        if len(parts) < 2:
            continue
        out.append({"source": parts[0], "destination": parts[1],
                    "options": [o for o in (parts[2] if len(parts) > 2 else "").split(",") if o]})
    return out


def selinux_mode(text: str | None) -> str:
    """`getenforce` (Enforcing | Permissive | Disabled) or /sys/fs/selinux/enforce (1 | 0) -> enforcing |
    permissive | disabled | absent (no SELinux on the host)."""
    t = (text or "").strip().splitlines()[-1].strip().lower() if (text or "").strip() else ""
    return {"enforcing": "enforcing", "1": "enforcing", "permissive": "permissive", "0": "permissive",
            "disabled": "disabled"}.get(t, "absent")


DENIED_RE = re.compile(r"(/[\w./-]+)[\"']?:? permission denied", re.I)


def selinux_label_problem(selinux: str, binds: list[dict], log_lines: list[str],
                          denied_files: list[str] = ()) -> dict | None:
    """The SELinux volume-label cause, decided from facts: SELinux enforcing on the registry host,
    the registry denied a path (its log: "open /certs/registry.pem: permission denied", or a
    mounted file it cannot read), and the mount holding that path has neither :Z nor :z.
    -> {"paths": denied paths, "mounts": [DST of unlabelled mounts]}, or None (not this cause:
    no SELinux, permissive, or the mounts are labelled and the denial is something else)."""
    if selinux != "enforcing":
        return None
    paths = list(dict.fromkeys([m.group(1) for line in log_lines for m in DENIED_RE.finditer(line)]
                               + list(denied_files)))
    hit = []
    for path in paths:
        for b in binds:
            d = b["destination"].rstrip("/") or "/"
            if path == d or path.startswith(d + "/"):
                if not {"z", "Z"} & set(b["options"]) and d not in hit:
                    hit.append(d)
    return {"paths": paths, "mounts": hit} if hit else None


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
    found += _classify_storage(ev)
    acct = ev.get("account") or {}

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
        elif st.get("auth") in ("401", "403") and rgw.get("answers", True) and not acct.get("suspended"):
            found.append(Finding("storage-credentials", host, lead + [
                f"{st.get('what')} from {host} with the credentials in config.yml: HTTP {st['auth']}"]
                + ([r["creds_vs_rgw"]] if r.get("creds_vs_rgw") else []) + r.get("log_hits", [])[-2:],
                "re-run the registry's config step (04-registry: credentials re-read from RGW, config.yml "
                "rewritten, registry restarted)", fixable=not r.get("driver_mismatch")))
        elif st.get("container") == "404":
            found.append(Finding("storage-container-missing", host, lead + [
                f"{st.get('what_container')}: HTTP 404"], "create it (S3: 04-registry's bucket step; Swift: PUT)"))
        ht_gone = (r.get("htpasswd") or {}).get("kind") in ("missing", "directory")
        denied = [f for f, s in r.get("files", {}).items() if s != "ok" and not (ht_gone and f.endswith("htpasswd"))]
        perm_logs = [line for line in r.get("log_lines", []) if "permission denied" in line.lower()]
        sel = selinux_label_problem(r.get("selinux", "absent"), r.get("binds") or [], perm_logs, denied)
        podman = r.get("runtime") == "podman"
        label = ":Z" if podman else ":z"  # podman's answer is a private label; the runbook's docker fix shares it
        if sel:
            ev_ = lead + [f"SELinux on {host}: enforcing (getenforce)",
                          "mounts without a :Z/:z label: " + ", ".join(sel["mounts"]),
                          "denied: " + ", ".join(sel["paths"])] + list(dict.fromkeys(perm_logs))[-3:]
            if r.get("security"):
                ev_.append(r["security"])
            found.append(Finding("selinux-volume-label", host, ev_,
                                 f"re-create the container with {label} on every -v, so that the files are relabelled "
                                 "for it" + (" (04-registry's podman unit does so where getenforce says Enforcing)"
                                             if podman else "")
                                 + "; not the document's --privileged, which turns SELinux's confinement off"))
        elif denied or perm_logs:
            ev_ = lead + [f"inside the registry: {f} {r['files'][f]}" for f in denied] + list(dict.fromkeys(perm_logs))[-3:]
            if r.get("state"):
                ev_.append(f"registry process: {r['state']}")
            if r.get("security"):
                ev_.append(r["security"])
            fixev = ("re-create the container as the runbook runs it (root, mounts"
                     + (f" relabelled with {label}: SELinux is enforcing; the document used --privileged" if
                        r.get("selinux") == "enforcing" else
                        "; under SELinux add :Z to each -v (podman's answer), never --privileged" if podman else
                        "; under SELinux add :z to each -v, or --privileged as the document did") + ")")
            found.append(Finding("mount-access", host, ev_, fixev))
        elif not r.get("running") and not any(f.cause == "rgw-down" for f in found) and \
                st.get("auth") not in ("401", "403"):
            mism = r.get("runtime_mismatch")  # e.g. runtime=docker given for a podman-run registry
            found.append(Finding("registry-down", host, lead + [f"registry process: {r.get('state', 'absent')}"]
                                 + ([mism["text"]] if mism else []) + r.get("log_hits", [])[-3:],
                                 f"run this notebook again with -p runtime {mism['engine']} (as 04-registry deployed it)"
                                 if mism else
                                 "deploy it: run notebooks/04-registry.ipynb" if r.get("not_deployed") else
                                 "start it (04-registry's start step)", fixable=not (r.get("not_deployed") or mism)))
        elif r.get("running") and (v2.get("anonymous") == 503 or v2.get("with_credentials") == 503) and \
                not any(f.where in (host, rgw_where) for f in found):
            found.append(Finding("unexplained", host, lead + r.get("log_hits", [])[-5:],
                                 "read the registry's log; /debug/health lists the failing check", fixable=False))
    found += _classify_registry_access(ev, found)
    found += _classify_client(ev, found)
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


def _nb(notebook: str, params: dict, **extra) -> str:
    """The papermill command line that re-runs a section with these hosts (and extra parameters)."""
    keys = ("rgw_host", "registry_host", "registry_port", "storage", "runtime", "uid", "container", "state_dir")
    ps = {k: params.get(k) for k in keys if params.get(k) not in (None, "")}
    ps.update(extra)
    return (f"papermill notebooks/{notebook}.ipynb out-{notebook}.ipynb "
            + " ".join(f"-p {k} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}" for k, v in ps.items()))


def _classify_storage(ev: dict) -> list[Finding]:
    """5xx on push: the RGW user suspended, a quota full, an OSD full."""
    out = []
    acct = ev.get("account") or {}
    rgw_where = (ev.get("rgw") or {}).get("where", "rgw_host")
    uid = acct.get("uid", "UID")
    if acct.get("suspended"):
        e = [f"radosgw-admin user info --uid={uid}: \"suspended\": 1"]
        for host, r in ev.get("registry", {}).items():
            st = r.get("storage", {})
            if st.get("auth"):
                e.append(f"{st.get('what')} from {host}: HTTP {st['auth']}")
        out.append(Finding("rgw-user-suspended", rgw_where, e,
                           "re-enable the user if its suspension was not meant (an RGW admin decision)", fixable=False,
                           commands=[f"radosgw-admin user enable --uid={uid}   # on {rgw_where}"]))
    for q in acct.get("quotas_full", []):
        out.append(Finding("rgw-quota-exceeded", rgw_where, [q["what"]] + acct.get("quota_log", [])[-2:],
                           f"raise or lift the {q['scope']} quota (an RGW admin decision), or delete images and run "
                           "garbage collection (06-operations) and wait for RGW's GC", fixable=False,
                           commands=q["commands"]))
    ceph = ev.get("ceph") or {}
    if ceph.get("osd_full"):
        e = [f"ceph health: {ceph.get('health')} — " + "; ".join(ceph["osd_full"])]
        e += ceph.get("osd_usage", [])
        probe = ev.get("probe") or {}
        if "timeout" in (probe.get("container"), probe.get("object")):
            e.append(f"swift PUT {probe.get('name')} did not answer within {probe.get('timeout')} s (writes blocked)")
        out.append(Finding("osd-full", rgw_where, e,
                           "give the full OSD space (add OSDs or grow it), or delete data; to delete with the cluster "
                           "full, raise the full ratio for a moment and set it back", fixable=False,
                           commands=["ceph osd df   # which OSD, how full", "ceph osd set-full-ratio 0.97   "
                                     "# only while deleting; back to 0.95 after", "ceph osd set-full-ratio 0.95"]))
    return out


def _classify_registry_access(ev: dict, found: list) -> list[Finding]:
    """On each registry host: htpasswd (401), what listens (connection refused), TLS (x509)."""
    out = []
    params = ev.get("params") or {}
    user = params.get("registry_user", "USER")
    for host, r in ev.get("registry", {}).items():
        if any(f.where == host and f.cause in ("registry-down", "mount-access", "selinux-volume-label") for f in found):
            continue
        ht = r.get("htpasswd") or {}
        path = ht.get("path", "htpasswd")
        v2 = r.get("v2", {})
        lead = [f"GET /v2/: {v2.get('anonymous')} without credentials, {v2.get('with_credentials')} with"]
        logs = ht.get("log", [])
        if ht.get("kind") in ("missing", "directory") or ht.get("provisioned"):
            e = lead + ([f"{path} on {host}: {ht['kind']}"] if ht.get("kind") != "file" else
                        [f"{path} on {host} holds only the user(s) {', '.join(ht.get('users', []))}"])
            if ht.get("provisioned"):
                e.append(f"registry log: '{PROVISIONED_LOG}' — registry 2.8 found no htpasswd at its start, wrote one "
                         f"with the user '{PROVISIONED_USER}' and printed that user's password in its log (masked here)")
            elif ht.get("kind") in ("missing", "directory"):
                e.append("registry 2.8 then answers 400 to every request with credentials (401 without); at its "
                         "next start it would write its own htpasswd with a default user")
            out.append(Finding("htpasswd-missing", host, e + logs[-2:],
                               f"write {path} again with {user}'s bcrypt hash (04-registry's htpasswd step"
                               + (f", dropping the provisioned user '{PROVISIONED_USER}'" if ht.get("provisioned") else "")
                               + "); the registry re-reads it, no restart"))
        elif ht.get("kind") == "file" and not ht.get("user_present"):
            out.append(Finding("htpasswd-user-missing", host, lead + [
                f"{path} on {host}: no line for '{user}' (users: {', '.join(ht.get('users', [])) or 'none'})"] + logs[-2:],
                f"add {user} with the runbook's password (04-registry's htpasswd step: other users are kept)"))
        elif ht.get("kind") == "file" and ht.get("verifies") is False:
            e = lead + [f"{path} on {host}: the hash for '{user}' " + (
                "does not verify the password the runbook holds (checked with bcrypt on the control node)"
                if ht.get("bcrypt") else "is not bcrypt: registry 2.x accepts only bcrypt ($2y$) hashes")]
            cmds = []
            if ht.get("env_differs") and ht.get("state_verifies"):
                e.append("REGISTRY_PASSWORD is set and differs from the password in the state dir's "
                         "secrets/registry_password, which the htpasswd verifies")
                fix = "use the deployed password: unset REGISTRY_PASSWORD (or set it to the state dir's)"
                cmds = ["unset REGISTRY_PASSWORD"]
            else:
                if ht.get("password_from"):
                    e.append(f"the runbook's password comes from {ht['password_from']}")
                fix = ("give the runbook the password the registry has (REGISTRY_PASSWORD), or make the runbook's "
                       "the registry's by re-running 04-registry (it re-hashes it; every client must then log in again)")
                cmds = ["export REGISTRY_PASSWORD='<the password the registry has>'",
                        _nb("04-registry", params)]
            out.append(Finding("htpasswd-wrong-password", host, e + logs[-2:], fix, fixable=False, commands=cmds))
        # reachability
        ls = r.get("listen") or {}
        port = params.get("registry_port", "PORT")
        if r.get("running") and ls and not ls.get("ok") and r.get("port_open") != "open":
            kind = ls.get("kind")
            e = [f"TCP {host}:{port} from the control node: {r.get('port_open')}",
                 f"the registry's sockets on {host} (ss -ltnp): {', '.join(ls.get('ours')) or 'none'}"]
            if kind == "wrong-port":
                other = ls["ours"][0].rpartition(":")[2]
                out.append(Finding("wrong-port", host, e + r.get("addr_cfg", []),
                                   f"the registry listens on port {other}: use {host}:{other}, or move it back to "
                                   f"{port} with 04-registry", fixable=False,
                                   commands=[f"docker login {host}:{other}   # the port it listens on",
                                             _nb("04-registry", params)]))
            elif kind == "listening-elsewhere":
                out.append(Finding("listening-elsewhere", host, e + r.get("addr_cfg", []),
                                   f"listen on every address, as 04-registry renders it (http.addr :{port}), and restart"))
            else:
                out.append(Finding("port-closed", host, e + r.get("log_hits", [])[-2:],
                                   "restart the registry and read its log", fixable=False,
                                   commands=[f"docker restart registry; docker logs --tail 20 registry   # on {host}"
                                             if params.get("runtime", "docker") == "docker" else
                                             f"systemctl restart container-registry; podman logs --tail 20 registry   "
                                             f"# on {host}" if params.get("runtime") == "podman" else
                                             f"systemctl restart docker-registry   # on {host}"]))
        # TLS, as every client sees it
        tls = r.get("tls") or {}
        if tls.get("handshake") == "http":
            out.append(Finding("registry-speaks-http", host, [
                f"TLS handshake with {host}:{port}: {tls.get('error')}",
                f"GET http://{host}:{port}/v2/: HTTP {r.get('plain_http')} (plain HTTP answers)"] + r.get("tls_cfg", []),
                "serve TLS again: config.yml as 04-registry renders it (http.tls with the certificate), restart"))
        c = tls.get("cert") or {}
        name = tls.get("name", host)
        if c and not c.get("covers"):
            e = [f"certificate served on {host}:{port} names {', '.join(c.get('sans', [])) or 'nothing'}; the client "
                 f"uses {name}"]
            if tls.get("state_covers"):
                e.append("the certificate in the state dir (03-certs) names it: it is not the one deployed")
                out.append(Finding("tls-name-missing", host, e, "deploy the state dir's certificate (04-registry's "
                                   "configure and start)"))
            else:
                out.append(Finding("tls-name-missing", host, e, f"issue the certificate with {name} in its SANs, then "
                                   "deploy it", fixable=False,
                                   commands=[_nb("03-certs", params, cert_sans=name), _nb("04-registry", params)]))
        if c and (c.get("expired") or c.get("not_yet_valid")):
            when = (f"expired on {c['not_after']:%Y-%m-%d %H:%M} UTC" if c.get("expired")
                    else f"not valid before {c['not_before']:%Y-%m-%d %H:%M} UTC")
            e = [f"certificate served on {host}:{port}: {when} (now {tls.get('now', '?')} on the control node)"]
            if tls.get("state_valid"):
                e.append("the certificate in the state dir (03-certs) is valid now: it is not the one deployed")
                out.append(Finding("tls-expired", host, e, "deploy the state dir's certificate (04-registry's configure "
                                   "and start)"))
            else:
                out.append(Finding("tls-expired", host, e, "re-issue the certificate (03-certs renews one that expires "
                                   "or is not yet valid), then deploy it", fixable=False,
                                   commands=[_nb("03-certs", params), _nb("04-registry", params)]))
    return out


def _classify_client(ev: dict, found: list) -> list[Finding]:
    """What the client on client_host sees: its trust for the exact HOST:PORT, its stored login,
    its clock, and the error its own login prints."""
    out = []
    cl = ev.get("client") or {}
    if not cl:
        return out
    where, addr, client = cl.get("where", "client_host"), cl.get("address", "HOST:PORT"), cl.get("client", "docker")
    login = cl.get("login") or {}
    said = [f"{client} login {addr} on {where}: " + (login.get("text") or "?")[-300:]] if login.get("text") else []
    tls_bad = any(f.cause in ("tls-name-missing", "tls-expired", "registry-speaks-http") for f in found)
    cd = cl.get("certs_d") or {}
    if cd and cd.get("state") != "ok" and not tls_bad and not (login.get("ok") and cd.get("state") == "missing"
                                                                and cl.get("system_trust")):
        e = [f"{cd.get('dir')}/{addr}/ca.crt on {where}: " + {
            "missing": "absent", "no-ca-file": "the directory has no ca.crt", "other-ca": "a different CA"}[cd["state"]]]
        if cd.get("others"):
            e.append(f"{cd.get('dir')} has {', '.join(cd['others'])} for the same registry: the directory must be "
                     f"named exactly as the client addresses it ({addr})")
        if cd.get("state") == "other-ca":
            out.append(Finding("tls-ca-not-trusted", where, e + said, f"put the registry's CA (the state dir's) at "
                               f"{cd.get('dir')}/{addr}/ca.crt", fixable=False,
                               commands=[f"install -D -m 644 <state_dir>/ca/ca.pem {cd.get('dir')}/{addr}/ca.crt   "
                                         f"# on {where} (replaces the CA there)"]))
        elif login.get("ok") is not True:
            out.append(Finding("tls-ca-not-trusted", where, e + said,
                               f"install the registry's CA at {cd.get('dir')}/{addr}/ca.crt on {where} (05-push's trust "
                               "step does the same)"))
    if cl.get("clock_skew") is not None and abs(cl["clock_skew"]) > 300 and (
            "x509" in (login.get("text") or "") or any(f.cause == "tls-expired" for f in found)):
        out.append(Finding("tls-expired", where, [f"the clock on {where} is {cl['clock_skew']:+.0f} s off the control "
                                                  "node's"] + said,
                           f"set the clock on {where} right (NTP)", fixable=False,
                           commands=[f"timedatectl set-ntp true   # on {where}"]))
    st = cl.get("stored") or {}
    if st.get("state") == "stale" and login.get("ok"):  # stale only against a password the registry takes
        out.append(Finding("client-login-stale", where, [
            f"{cl.get('stored_path')} on {where} holds a login for {addr} as '{st.get('user')}' whose base64 "
            "user:password is not the runbook's (****): docker push/pull use it, and get 401",
            f"the password the runbook holds logs in ({client} login with a throw-away credentials file)"],
            f"log in again on {where} ({client} login {addr} -u {ev.get('params', {}).get('registry_user')} "
            "--password-stdin)"))
    if login.get("ok") is False and not out and not found:
        fam = symptom_family(login.get("text", ""))
        if fam == "x509" and re.search(r"Client sent an HTTP request to an HTTPS server", login.get("text", "")):
            out.append(Finding("client-speaks-http", where, said, "address the registry with https:// (docker: take it "
                               f"out of insecure-registries, put the CA in /etc/docker/certs.d/{addr}/ca.crt)",
                               fixable=False, commands=[f"curl --cacert ca.pem https://{addr}/v2/"]))
    sym = ev.get("symptom") or ""
    if re.search(r"Client sent an HTTP request to an HTTPS server", sym) and not any(
            f.cause == "client-speaks-http" for f in out):
        reg = next(iter((ev.get("registry") or {}).values()), {})
        out.append(Finding("client-speaks-http", where, [f"the symptom: {sym.strip()[-200:]}",
                                                        f"GET http://{addr}/v2/: HTTP {reg.get('plain_http')} — the "
                                                        "port speaks HTTPS, the client sent plain HTTP"],
                           "make the client use https:// (docker: remove the registry from insecure-registries in "
                           "/etc/docker/daemon.json; curl: https:// and --cacert)", fixable=False,
                           commands=[f"curl --cacert <state_dir>/ca/ca.pem https://{addr}/v2/"]))
    return out


# ---------------------------------------------------------------- context helpers
def _state(ctx) -> dict:
    return ctx.__dict__.setdefault("_faq", {})


ADMIN_TIMEOUT = 20  # radosgw-admin blocks when Ceph refuses writes (a full OSD): bounded here


def _user_info(ctx) -> dict:
    """`radosgw-admin user info` of uid on rgw_host, bounded (keys registered, output never logged);
    asked once per run.  Raises FAQError when it does not answer (a full cluster blocks it)."""
    from . import accounts
    st = _state(ctx)
    if "user_info" not in st:
        h = ctx.host(ctx.rgw_host)
        r = h.run(cmd("timeout {t} radosgw-admin user info --uid={u}", t=ADMIN_TIMEOUT, u=ctx.uid), read=True,
                  check=False, no_log=True)
        if r.exit_code == 124:
            st["user_info"] = FAQError(f"radosgw-admin user info --uid={ctx.uid} did not answer within "
                                       f"{ADMIN_TIMEOUT} s on {h.name} (Ceph blocks writes? see its health)")
        elif r.exit_code != 0:
            st["user_info"] = FAQError(f"radosgw-admin user info --uid={ctx.uid} failed on {h.name} "
                                       f"(exit {r.exit_code}): {masking.mask(r.stderr.strip())[-200:]}")
        else:
            try:
                raw = json.loads(r.stdout)
                st["user_info"] = {"raw": raw, "info": accounts.register_secrets(accounts.parse_user_info(r.stdout))}
            except ValueError as e:
                st["user_info"] = FAQError(f"radosgw-admin user info: {e}")
    v = st["user_info"]
    if isinstance(v, Exception):
        raise v
    return v


def _swift_creds(ctx) -> tuple[str, str]:
    """(swift user, key) of the account, as accounts.swift_credentials, with a bounded radosgw-admin."""
    from . import accounts
    sub = ctx.params.get("swift_subuser") or f"{ctx.uid}:swift"
    key = accounts.swift_key_of(_user_info(ctx)["info"], sub)
    if not key:
        raise FAQError(f"RGW has no Swift key for {sub} on {ctx.rgw_host}", hint="run notebooks/02-accounts.ipynb first")
    return sub, key


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
        r, err = registry.http_call(_registry_session(ctx, auth), "GET", u, host, timeout=5)
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
        user, key = _swift_creds(ctx)
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


@step("Evidence seen from the client ({ctx.params[client]} on client_host {ctx.params[client_host]})")
def client_evidence(ctx) -> dict:
    """On client_host, as the user's client sees the registry: the CA it trusts for the exact
    HOST:PORT it uses (certs.d), its stored login (compared masked), its clock, and the error its
    own `docker login` / `podman login` / `skopeo login` prints (with a throw-away credentials file:
    the user's is never touched)."""
    from . import certs, push
    st = _state(ctx)
    client = ctx.params.get("client", "docker")
    where = ctx.params.get("client_host") or ""
    if not where:
        note("client_host is empty: the client side is not checked (give local or the address of the host "
             "where the failing client runs)")
        st["client"] = {}
        return {}
    h = push.client_of(ctx)
    addr = _client_address(ctx)
    out: dict = {"where": where, "client": client, "address": addr}
    pw = _password_known(ctx)
    # the real client's login
    if client == "docker":
        c = cmd('d=$(mktemp -d) && DOCKER_CONFIG="$d" timeout 40 docker login {t} -u {u} --password-stdin 2>&1; '
                'rc=$?; rm -rf "$d"; exit $rc', t=addr, u=ctx.registry_user)
    elif client == "podman":
        c = cmd('d=$(mktemp -d) && timeout 40 podman login --authfile "$d/auth.json" -u {u} --password-stdin {t} 2>&1; '
                'rc=$?; rm -rf "$d"; exit $rc', t=addr, u=ctx.registry_user)
    else:
        c = cmd('d=$(mktemp -d) && timeout 40 skopeo login --authfile "$d/auth.json" -u {u} --password-stdin {t} 2>&1; '
                'rc=$?; rm -rf "$d"; exit $rc', t=addr, u=ctx.registry_user)
    if pw:
        r = h.run(c, read=True, check=False, stdin=pw + "\n", timeout=60)
        text = masking.mask((r.stdout + r.stderr).strip())
        text = "\n".join(x for x in text.splitlines() if "WARNING" not in x and "unencrypted" not in x
                         and "credential-stores" not in x and x.strip()) or text
        out["login"] = {"ok": r.exit_code == 0 and "Login Succeeded" in text, "rc": r.exit_code, "text": text[-500:]}
        row(check=f"{client} login {addr} on {where} (throw-away credentials file)", answer=text.splitlines()[-1][:200]
            if text else f"exit {r.exit_code}")
    else:
        note("no registry password known (REGISTRY_PASSWORD or the state dir's): the client's login is not tried")
    # the CA it trusts for exactly that HOST:PORT
    base = "/etc/docker/certs.d" if client == "docker" else "/etc/containers/certs.d"
    ls = h.run(cmd('for d in {b}/*/; do [ -d "$d" ] || continue; n=$(basename "$d"); if [ -f "$d/ca.crt" ]; then '
                   'echo "$n $(sha256sum < "$d/ca.crt" | cut -d" " -f1)"; else echo "$n -"; fi; done', b=base),
               read=True, check=False).stdout
    entries = {}
    for line in ls.splitlines():
        n, _, sha = line.strip().rpartition(" ")
        if n:
            entries[n] = None if sha == "-" else sha
    try:
        import hashlib
        ca_sha = hashlib.sha256(open(certs.ca_path(ctx), "rb").read()).hexdigest()
    except (RunbookError, OSError):
        ca_sha = None
    port = addr.rpartition(":")[2]
    same = set()
    for host in P.as_list(ctx.registry_host):
        same.add(f"{host}:{port}")
        hn = ctx.host(host).run(Command("hostname; hostname -f 2>/dev/null; hostname -I 2>/dev/null"), read=True,
                                check=False).stdout.split()
        same |= {f"{x}:{port}" for x in hn} | {x for x in hn} | {host}
    out["certs_d"] = {"dir": base, **certs_d_state(entries, addr, sorted(same), ca_sha)}
    row(check=f"{base} on {where}", answer=", ".join(f"{k} ({'the CA from 03-certs' if v == ca_sha else 'no ca.crt' if v is None else 'another CA'})"
                                                  for k, v in entries.items()) or "empty")
    # the stored login
    path = push.stored_login_path(ctx)
    out["stored_path"] = path
    out["stored"] = stored_login(h.read_file(path), addr, ctx.registry_user, pw)
    row(check=f"stored login for {addr} in {path}", answer=out["stored"]["state"]
        + (f" (user {out['stored']['user']})" if out["stored"].get("user") else ""))
    # its clock (certificates are judged by it)
    if where != "local":
        t = h.run(Command("date +%s"), read=True, check=False).stdout.strip()
        if t.isdigit():
            out["clock_skew"] = int(t) - time.time()
    st["client"] = out
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
    full = [k for k in checks if k in ("OSD_FULL", "POOL_FULL", "OSD_BACKFILLFULL", "OSD_NEARFULL")]
    if any(k in ("OSD_FULL", "POOL_FULL") for k in full):
        det = _ceph(h, "ceph health detail -f json").stdout
        try:
            dchecks = json.loads(det or "{}").get("checks", {})
        except ValueError:
            dchecks = {}
        out["osd_full"] = [checks[k]["summary"]["message"] + ": " + "; ".join(
            d.get("message", "") for d in (dchecks.get(k) or {}).get("detail", [])) for k in full]
        try:
            nodes = json.loads(_ceph(h, "ceph osd df -f json").stdout or "{}").get("nodes", [])
        except ValueError:
            nodes = []
        out["osd_usage"] = [f"{n.get('name')}: {float(n.get('utilization', 0)):.1f}% used "
                            f"({int(n.get('kb_used', 0)) // 1024} MiB of {int(n.get('kb', 0)) // 1024} MiB)"
                            for n in nodes]
        try:
            ratios = json.loads(_ceph(h, "ceph osd dump -f json").stdout or "{}")
            out["osd_usage"].append(f"full_ratio {ratios.get('full_ratio')}, nearfull_ratio {ratios.get('nearfull_ratio')}")
        except ValueError:
            pass
        fact("full", "; ".join(out["osd_full"]))
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
        did = rgw.daemon_of(ctx)
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
        did = rgw.daemon_of(ctx)
        p = rgw.paths(did)
        if h.has_systemd():
            a = h.test(cmd("systemctl is-active --quiet {u}", u=p["unit"]))
            info["process"] = f"{p['unit']} " + ("active" if a else "not active")
        else:
            pid = rgw.running_pid(h, p["pid"])
            info["process"] = f"running (pid {pid})" if pid else f"not running (pidfile {p['pid']})"
        info["log"] = p["log"]
        tail = h.run(cmd("tail -n 3 {f}", f=p["log"]), read=True, check=False).stdout.strip().splitlines()
        info["log_tail"] = [masking.mask(x[:200]) for x in tail]
    except RunbookError as e:
        info["process"] = f"unknown ({str(e).splitlines()[0]})"
    fact("RGW", f"{url}: {seen}; radosgw {info['process']}")
    st.setdefault("rgw", {}).update(info)
    st["account"] = _account_evidence(ctx, h) if ctx.storage in ("swift", "s3") else {}
    regs = {}
    for host in P.as_list(ctx.registry_host):
        regs[host] = _registry_host_evidence(ctx, host)
    st["registry"] = regs
    return {"rgw": info, "registry": regs}


def _account_evidence(ctx, h) -> dict:
    """The RGW user the registry stores its data as: suspended?  quotas against usage (user,
    and the container's bucket), read with radosgw-admin on rgw_host (its output holds keys: no_log)."""
    uid = ctx.uid
    out: dict = {"uid": uid}
    try:
        info = _user_info(ctx)["raw"]
    except FAQError as e:
        out["error"] = str(e)
        note(str(e))
        return out
    out["suspended"] = bool(info.get("suspended"))
    full = []
    uq, bq = info.get("user_quota") or {}, info.get("bucket_quota") or {}
    if uq.get("enabled"):
        t = h.run(cmd("timeout {t} radosgw-admin user stats --uid={u} --sync-stats", t=ADMIN_TIMEOUT, u=uid), read=True,
                  check=False).stdout
        try:
            stt = json.loads(t or "{}").get("stats", {})
        except ValueError:
            stt = {}
        size, objs = int(stt.get("size_actual", stt.get("size", 0))), int(stt.get("num_objects", 0))
        for u in quota_usage(uq, size, objs):
            full.append({"scope": "user", "what": f"user quota of {uid}: {u}", "commands": [
                f"radosgw-admin user stats --uid={uid} --sync-stats   # usage",
                f"radosgw-admin quota set --quota-scope=user --uid={uid} --max-objects=-1 --max-size=-1   "
                "# or a larger limit", f"radosgw-admin quota disable --quota-scope=user --uid={uid}"]})
    bucket = ctx.params.get("container", "registry")
    t = h.run(cmd("timeout {t} radosgw-admin bucket stats --bucket={b}", t=ADMIN_TIMEOUT, b=bucket), read=True,
              check=False).stdout if bq.get("enabled") or uq.get("enabled") else ""
    try:
        bs = json.loads(t) if t.strip().startswith("{") else {}
    except ValueError:
        bs = {}
    bq_eff = bs.get("bucket_quota") if (bs.get("bucket_quota") or {}).get("enabled") else bq
    if bs and (bq_eff or {}).get("enabled"):
        main = (bs.get("usage") or {}).get("rgw.main") or {}
        for u in quota_usage(bq_eff, int(main.get("size_actual", 0)), int(main.get("num_objects", 0))):
            full.append({"scope": "bucket", "what": f"bucket quota of {bucket}: {u}", "commands": [
                f"radosgw-admin bucket stats --bucket={bucket}   # usage",
                f"radosgw-admin quota set --quota-scope=bucket --uid={uid} --max-objects=-1 --max-size=-1   "
                "# or a larger limit", f"radosgw-admin quota disable --quota-scope=bucket --uid={uid}"]})
    out["quotas_full"] = full
    fact(f"RGW user {uid}", ("SUSPENDED" if out["suspended"] else "active")
         + ("; " + "; ".join(q["what"] for q in full) if full else
            "; quotas: " + ", ".join(f"{k} {'on' if q.get('enabled') else 'off'}" for k, q in
                                     (("user", uq), ("bucket", bq)))))
    return out


def _deployed_config(ctx, h) -> tuple[dict | None, str]:
    from . import registry
    path = f"{ctx.remote_dir}/config.yml" if ctx.runtime in ("docker", "podman") else registry.SYSTEMD_CONFIG
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
        r = _curl(h, ["-o", "/dev/null", "-D", "-", "-w", "\\n%{http_code}"], registry.curl_conf(
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
                      registry.curl_conf(url=f"{surl}/{c}", header=[f"X-Auth-Token: {token}"]))
            out["container"] = r.stdout.strip()
        return out
    if "s3" in s:
        s3 = s["s3"]
        u = f"{str(s3.get('regionendpoint', '')).rstrip('/')}/{s3.get('bucket')}"
        out = {"kind": "s3", "what": f"S3 HEAD {u} (SigV4)", "what_container": f"S3 HEAD {u}"}
        r = _curl(h, ["-I", "-o", "/dev/null", "-w", "%{http_code}"], registry.curl_conf(
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
    from . import registry
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
            user, key = _swift_creds(ctx)
            sw = cfg["storage"]["swift"]
            ev["creds_vs_rgw"] = ("config.yml's Swift key differs from the one RGW has now for "
                                  f"{user} (rotated? `key create --gen-secret` replaces it)"
                                  if sw.get("username") == user and sw.get("password") != key else
                                  f"config.yml authenticates as {sw.get('username')}, the account is {user}")
        except RunbookError:
            pass
    # the process: state, log, identity, and its view of the mounted files
    lines: list[str] = []
    ev["runtime"] = ctx.runtime
    if ctx.runtime in ("docker", "podman"):
        eng = ctx.runtime  # podman's inspect/logs/exec take docker's arguments and templates
        r = h.run(cmd("{e} inspect --format {f} {n}", e=eng, n=registry.CONTAINER_NAME,
                      f="{{json .State}}\t{{.Config.User}}\t{{.HostConfig.Privileged}}\t{{json .HostConfig.Binds}}"
                        "\t{{json .HostConfig.SecurityOpt}}"), read=True, check=False)
        if r.exit_code != 0:
            ev["running"], ev["state"] = False, "no container named registry"
            other = registry.container_engine(h)
            if other and other != eng:
                ev["runtime_mismatch"] = {"engine": other, "text": f"{other} on {host} runs container registry; this "
                                          f"run says runtime={eng}: pass -p runtime {other} as 04-registry did"}
        if r.exit_code != 0 and eng == "podman":
            # the unit's container is gone (podman generate systemd --new: a stopped or crash-looping
            # unit removes it): the unit's state and its journal are what is left
            u = registry.PODMAN_UNIT
            show = h.run(cmd("systemctl show -p ActiveState -p SubState -p NRestarts -p UnitFileState {u}", u=u),
                         read=True, check=False).stdout
            kv = dict(x.split("=", 1) for x in show.split() if "=" in x)
            ev["state"] = (f"no container named registry; {u} {kv.get('ActiveState', '?')} ({kv.get('SubState', '?')}"
                           + (f", {kv['NRestarts']} restarts" if kv.get("NRestarts", "0") != "0" else "")
                           + f", {kv.get('UnitFileState', '?')})")
            vols = registry.podman_unit_volumes(h)  # the unit's (or Quadlet file's) -v values, options kept
            ev["binds"] = parse_binds(vols)
            if vols:
                ev["security"] = "mounts in the unit: " + ", ".join(vols)
            lg = h.run(cmd("journalctl -u {u} -n 50 --no-pager -o cat", u=u), read=True, check=False, no_log=True)
            lines = _register_log_secrets(lg.stdout).splitlines()
        elif r.exit_code == 0:
            state, user, priv, binds, secopt = (r.stdout.strip().split("\t") + [""] * 5)[:5]
            sj = json.loads(state)
            ev["running"] = bool(sj.get("Running")) and not sj.get("Restarting")
            ev["state"] = ("restarting (exit code %s, restart loop)" % sj.get("ExitCode") if sj.get("Restarting")
                           else sj.get("Status", "?") + (f" (exit code {sj.get('ExitCode')})" if not sj.get("Running")
                                                         else ""))
            ev["binds"] = parse_binds(json.loads(binds or "null"))
            ev["security"] = (f"container user {user or 'root (image default)'}, privileged {priv}, "
                              f"mounts {', '.join(json.loads(binds) or [])}, security-opt {secopt}")
            # no_log: registry 2.8 prints a provisioned htpasswd password in its log (registered below)
            lg = h.run(cmd("{e} logs --tail 50 {n} 2>&1; {e} logs {n} 2>&1 | grep -F {p} | tail -1", e=eng,
                           n=registry.CONTAINER_NAME, p=PROVISIONED_LOG), read=True, check=False, no_log=True)
            lines = _register_log_secrets(lg.stdout).splitlines()
            if ev["running"]:
                script = "; ".join(f"if head -c1 {f} >/dev/null 2>&1; then echo '{f} ok'; else echo '{f} "
                                   f"DENIED'; fi" for f in MOUNTED)
                x = h.run(cmd("{e} exec {n} sh -c {s}", e=eng, n=registry.CONTAINER_NAME,
                              s=f"id -un 2>/dev/null; {script}"), read=True, check=False)
                files = {}
                for line in x.stdout.splitlines()[1:]:
                    f, _, res = line.rpartition(" ")
                    files[f] = "ok" if res == "ok" else "cannot be read"
                ev["files"] = files
                ls = h.run(cmd("{e} exec {n} ls -l /auth /certs", e=eng, n=registry.CONTAINER_NAME), read=True,
                           check=False)
                ev["ls"] = ls.stdout.strip()
    else:
        old, running = registry.daemon_state(h) if not h.has_systemd() else (None, h.test(
            cmd("systemctl is-active --quiet docker-registry")))
        ev["running"] = running
        ev["state"] = "running" if running else "not running"
        src = (cmd("tail -n 50 {f}", f=registry.LOGFILE) if not h.has_systemd()
               else cmd("journalctl -u docker-registry -n 50 --no-pager"))
        lines = _register_log_secrets(h.run(src, read=True, check=False, no_log=True).stdout).splitlines()
        if h.has_systemd():
            files = {}
            for f in (f"{ctx.remote_dir}/auth/htpasswd", f"{ctx.remote_dir}/certs/registry-key.pem", path):
                okr = h.test(cmd("runuser -u docker-registry -- test -r {f}", f=f))
                files[f] = "ok" if okr else "cannot be read by user docker-registry"
            ev["files"] = files
    _access_evidence(ctx, h, host, cfg, ev, lines)
    se = h.run(Command("getenforce 2>/dev/null || cat /sys/fs/selinux/enforce 2>/dev/null || echo absent"), read=True,
               check=False).stdout.strip()
    ev["selinux"] = selinux_mode(se)
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


def _register_log_secrets(text: str) -> str:
    """Register what a registry log line gives away (registry 2.8's provisioned htpasswd password)."""
    for m in re.finditer(r"provisioning with default user.*?password=\"?([^\s\"]+)", text or ""):
        if len(m.group(1)) >= masking.MIN_LEN:
            masking.register(m.group(1))
    return text or ""


def _password_known(ctx) -> str | None:
    """The password the runbook holds for registry_user (never generated here)."""
    return ctx.secret("registry_password", user=ctx.registry_user, generate=False)


def _state_password(ctx) -> str | None:
    import os
    p = os.path.join(ctx.state_dir, "secrets", "registry_password")
    if not os.path.exists(p):
        return None
    with open(p) as f:
        v = f.read().strip()
    if v:
        masking.register(v, derived_for_user=ctx.registry_user)
    return v or None


def tls_probe(host: str, port: int, timeout: float = 5) -> dict:
    """A TLS handshake with host:port from the control node WITHOUT verifying (to read the
    certificate every client gets): {"handshake": ok|http|refused|timeout|error, "der", "error"}."""
    import socket
    import ssl
    from .journal import Result, record
    c = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    c.check_hostname, c.verify_mode = False, ssl.CERT_NONE
    t0 = time.monotonic()
    out: dict = {}
    try:
        with socket.create_connection((host, port), timeout=timeout) as raw:
            with c.wrap_socket(raw, server_hostname=host) as t:
                out = {"handshake": "ok", "der": t.getpeercert(binary_form=True)}
    except ssl.SSLError as e:
        out = {"handshake": "http" if re.search(r"WRONG_VERSION_NUMBER|record layer|http request", str(e), re.I)
               else "error", "error": f"{type(e).__name__}: {e.reason or e}"}
    except ConnectionRefusedError:
        out = {"handshake": "refused", "error": "connection refused"}
    except (socket.timeout, TimeoutError):
        out = {"handshake": "timeout", "error": f"no answer within {timeout} s"}
    except OSError as e:
        out = {"handshake": "error", "error": str(e)}
    record(Result("local", f"TLS handshake {host}:{port} (certificate read, not verified)",
                  0 if out["handshake"] == "ok" else 1, "", out.get("error", ""), time.monotonic() - t0, read=True,
                  kind="http"))
    return out


def _client_address(ctx) -> str:
    """The HOST:PORT the client uses: registry_address, else the one the symptom names, else the first
    registry_host with registry_port."""
    a = ctx.params.get("registry_address") or symptom_address(ctx.params.get("symptom", ""))
    if a:
        return a if re.search(r":\d+$", a) else f"{a}:{ctx.registry_port}"
    return f"{P.as_list(ctx.registry_host)[0]}:{ctx.registry_port}"


def _access_evidence(ctx, h, host, cfg, ev, lines):
    """401, connection refused and x509 evidence on one registry host (reads only)."""
    import os
    from cryptography import x509
    from . import certs, rgw
    port = int(ctx.registry_port)
    # htpasswd: what it holds, checked against the runbook's password here (the hash never leaves this code)
    path = f"{ctx.remote_dir}/auth/htpasswd"
    kind = h.run(cmd("if [ -d {p} ]; then echo directory; elif [ -f {p} ]; then echo file; else echo missing; fi",
                     p=path), read=True, check=False).stdout.strip() or "missing"
    ht = {"path": path, "kind": kind}
    pw = _password_known(ctx)
    if kind == "file":
        text = (h.read_file(path) or b"").decode(errors="replace")
        ht.update(check_htpasswd(text, ctx.registry_user, pw))
        ht["provisioned"] = bool(any(PROVISIONED_LOG in x for x in lines) and ht["users"] == [PROVISIONED_USER])
        if ht.get("verifies") is False:
            envpw, statepw = os.environ.get("REGISTRY_PASSWORD"), _state_password(ctx)
            ht["password_from"] = ("the environment (REGISTRY_PASSWORD)" if envpw else
                                   f"{ctx.state_dir}/secrets/registry_password")
            if envpw and statepw and envpw != statepw:
                ht["env_differs"] = True
                ht["state_verifies"] = bool(check_htpasswd(text, ctx.registry_user, statepw).get("verifies"))
    fails = [x for x in lines if "error authenticating user" in x or "htpasswd" in x.lower()]
    ht["log"] = [masking.mask(x[:240]) for x in fails[-3:]]
    ev["htpasswd"] = ht
    row(host=host, check=f"htpasswd {path}", answer=(
        kind if kind != "file" else
        f"users {', '.join(ht['users'])}; {ctx.registry_user}: " + (
            "absent" if not ht["user_present"] else "not bcrypt" if not ht["bcrypt"] else
            "the runbook's password verifies" if ht["verifies"] else "the runbook's password does NOT verify"
            if ht["verifies"] is False else "no password known")))
    # what listens (ss on the registry host), and what the control node gets on the port
    ss = h.run(Command("ss -Hltnp"), read=True, check=False).stdout
    ev["listen"] = listener_problem(rgw.parse_listeners(ss), port)
    addr = str((cfg.get("http") or {}).get("addr", ""))
    ev["addr_cfg"] = [f"config.yml http.addr: {addr}"] if addr else []
    ev["tls_cfg"] = ([] if (cfg.get("http") or {}).get("tls") else ["config.yml has no http.tls section"])
    tp = tls_probe(host, port)
    ev["port_open"] = "open" if tp["handshake"] in ("ok", "http", "error") else tp["handshake"]
    tls = {"handshake": tp["handshake"], "error": tp.get("error", "")}
    name = _client_address(ctx).rpartition(":")[0].strip("[]")
    name = name if name else host
    if tp.get("der"):
        cert = x509.load_der_x509_certificate(tp["der"])
        try:
            ca = certs.load_cert(open(certs.ca_path(ctx), "rb").read(), "CA")
        except (RunbookError, OSError):
            ca = None
        now = certs.now()
        tls["now"] = f"{now:%Y-%m-%d %H:%M} UTC"
        tls["cert"] = cert_facts(cert, name, now, ca)
        tls["name"] = name
        try:
            mine = certs.load_cert(open(certs.cert_path(ctx), "rb").read(), "certificate")
            tls["state_same"] = mine.fingerprint(mine.signature_hash_algorithm) == cert.fingerprint(
                cert.signature_hash_algorithm)
            tls["state_covers"] = not tls["state_same"] and not certs.missing_sans(mine, [name])
            tls["state_valid"] = not tls["state_same"] and mine.not_valid_before_utc <= now <= mine.not_valid_after_utc
        except (OSError, RunbookError):
            pass
        c = tls["cert"]
        row(host=host, check=f"TLS certificate on :{port} (for {name})",
            answer=f"SANs {', '.join(c['sans'])}; {'names' if c['covers'] else 'does NOT name'} {name}; valid "
                   f"{c['not_before']:%Y-%m-%d} .. {c['not_after']:%Y-%m-%d}"
                   + (" — EXPIRED" if c["expired"] else " — NOT YET VALID" if c["not_yet_valid"] else ""))
    else:
        row(host=host, check=f"TLS handshake on :{port}", answer=tls["handshake"] + (f" ({tls['error']})" if
                                                                                  tls["error"] else ""))
    ev["tls"] = tls
    if tp["handshake"] in ("http", "ok"):
        import requests
        try:
            s = requests.Session()
            s.trust_env = False
            ev["plain_http"] = s.get(f"http://{host}:{port}/v2/", timeout=5).status_code
        except requests.RequestException as e:
            ev["plain_http"] = type(e).__name__
    row(host=host, check="registry sockets (ss -ltnp)", answer=", ".join(ev["listen"]["ours"]) or "none")


# ---------------------------------------------------------------- diagnose / fix / check
class Diagnosis(list):
    """The findings, shown as a readable list (masked)."""

    def __repr__(self):
        if not self:
            return "no problem found"
        todo = [f"{i}. {f.cause} on {f.where}: {f.todo()}" for i, f in enumerate(self, 1)]
        return masking.mask("what to do: " + "\n".join(todo) + "\n\nfound:\n" + "\n".join(str(f) for f in self))


@step("Diagnosis")
def _diagnose(ctx) -> Diagnosis:
    st = _state(ctx)
    ev = {"rgw": st.get("rgw", {}), "probe": st.get("symptoms", {}).get("probe", {}),
          "ceph": st.get("ceph", {}), "registry": st.get("registry", {}), "client": st.get("client", {}),
          "account": st.get("account", {}), "symptom": ctx.params.get("symptom", ""),
          "params": {k: v for k, v in ctx.params.items() if k in (
              "rgw_host", "registry_host", "registry_port", "registry_user", "storage", "runtime", "uid",
              "container", "state_dir", "remote_dir")}}
    if ev["ceph"].get("log"):
        ev["rgw"] = {**ev["rgw"], "log": ev["ceph"]["log"], "erange": ev["ceph"].get("erange"),
                     "erange_count": ev["ceph"].get("erange_count", 0)}
    fam = symptom_family(ev["symptom"]) or symptom_family((ev["client"].get("login") or {}).get("text", "")
                                                          if not (ev["client"].get("login") or {}).get("ok") else "")
    found = Diagnosis(order_findings(classify(ev), fam))
    st["findings"] = found
    if fam:
        fact("symptom", f"{fam} (" + ("the symptom given" if symptom_family(ev["symptom"]) else
                                      "what the client printed") + "): those causes first")
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
    if "client" not in st:
        client_evidence(ctx)
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
    elif ctx.runtime == "podman":
        h.run(cmd("systemctl restart {u}", u=registry.PODMAN_UNIT))  # the unit owns the container
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
    hosts_cfg = {f.where for f in todo if f.cause in REDEPLOY}
    if hosts_cfg:
        _sub(registry.preflight(ctx))
        if "storage-container-missing" in causes:
            _create_container(ctx)
            done.append("container/bucket created")
        cfg_rep = _sub(registry.configure(ctx))
        for host in hosts_cfg:
            h = ctx.host(host)
            mount = any(f.cause in ("mount-access", "selinux-volume-label") and f.where == host for f in todo)
            if mount and ctx.runtime == "podman":
                # the unit as 04-registry makes it (root, its mounts, :Z where getenforce says so): drop the
                # unit that runs otherwise, start() below generates it again
                h.run(cmd("systemctl stop {u}; rm -f {p}; podman rm -f --ignore {n}", u=registry.PODMAN_UNIT,
                          p=registry.PODMAN_UNIT_PATH, n=registry.CONTAINER_NAME))
                done.append(f"{host}: registry unit and container re-created")
            elif mount and ctx.runtime == "docker":
                # the container as the runbook runs it; :z when SELinux enforces (the document: --privileged)
                h.run(cmd("docker rm -f {n}", n=registry.CONTAINER_NAME))
                ev = _state(ctx).get("registry", {}).get(host, {})
                if ev.get("selinux") == "enforcing":
                    h.run(add_selinux_label(registry.docker_run_argv(ctx, registry.config_hash(ctx))))
                done.append(f"{host}: registry container re-created")
            elif cfg_rep.changed:
                state = {"docker": registry.docker_state, "podman": registry.podman_state}.get(ctx.runtime)
                label_ok = state is None or state(h)[0] == registry.config_hash(ctx)
                if label_ok:
                    _restart_registry(ctx, h)  # same start-time hash: start() alone would keep the old process
        _sub(registry.start(ctx))
        done.append("registry configured and started")
    for f in todo:
        if f.cause in ("htpasswd-missing", "htpasswd-user-missing"):
            done.append(_fix_htpasswd(ctx, f.where, drop=[PROVISIONED_USER] if f.cause == "htpasswd-missing" and
                                      (_state(ctx).get("registry", {}).get(f.where, {}).get("htpasswd") or {})
                                      .get("provisioned") else []))
    if "tls-ca-not-trusted" in causes:
        done.append(_fix_trust(ctx))
    if "client-login-stale" in causes:
        done.append(_fix_login(ctx))
    fact("applied", "; ".join(done))
    mark_changed()
    return done


def _fix_htpasswd(ctx, host: str, drop=()) -> str:
    """registry_user's bcrypt hash of the runbook's password in remote_dir/auth/htpasswd (other
    users kept, the registry's provisioned default user dropped); registry 2.8 re-reads the file."""
    from . import registry
    h = ctx.host(host)
    path = f"{ctx.remote_dir}/auth/htpasswd"
    pw = _password_known(ctx)
    if not pw:
        raise FAQError("no registry password known", hint="set REGISTRY_PASSWORD or use the state dir of 04-registry")
    if h.test(cmd("test -d {p}", p=path)):
        h.run(cmd("rmdir {p}", p=path))
    old = h.read_file(path)
    cost = int(ctx.params.get("bcrypt_cost", 5))
    content, rows = registry.build_htpasswd(old, {ctx.registry_user: pw}, remove=list(drop), cost=cost)
    for r in rows:
        row(cause="", where=host, fix=f"htpasswd: {r['user']} {r['hash']}", applied="yes")
    mode = 0o640 if ctx.runtime == "systemd" and h.has_systemd() else 0o600
    h.put_file(path, content, mode=mode, secret=True)
    if mode == 0o640:
        h.run(cmd("chgrp docker-registry {p}", p=path))
    return f"{host}: {path} holds {ctx.registry_user}" + (f" (dropped {', '.join(drop)})" if drop else "")


def _fix_trust(ctx) -> str:
    """The CA at certs.d/<the exact HOST:PORT the client uses>/ca.crt on client_host."""
    from . import certs, push
    cl = _state(ctx).get("client") or {}
    h = push.client_of(ctx)
    path = f"{(cl.get('certs_d') or {}).get('dir', '/etc/docker/certs.d')}/{cl.get('address', _client_address(ctx))}/ca.crt"
    with open(certs.ca_path(ctx), "rb") as f:
        h.put_file(path, f.read(), mode=0o644)
    return f"{h.name}: CA installed at {path}"


def _fix_login(ctx) -> str:
    """Log in again on client_host (the client's own credentials file: what its push uses)."""
    from . import push
    h = push.client_of(ctx)
    addr = _client_address(ctx)
    pw = _password_known(ctx)
    if ctx.params.get("client", "docker") in ("docker", "podman"):
        c = cmd("{e} login {t} -u {u} --password-stdin", e=ctx.params.get("client", "docker"), t=addr,
                u=ctx.registry_user)
    else:
        c = cmd("skopeo login --authfile {a} -u {u} --password-stdin {t}", a=push.stored_login_path(ctx),
                u=ctx.registry_user, t=addr)
    h.run(c, stdin=pw + "\n", timeout=60)
    return f"{h.name}: logged in again to {addr}"


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
    user, key = _swift_creds(ctx)
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
    if not any(f.fixable for f in found):  # nothing was applied: nothing to wait for
        ctx.verdict(False, f"found {names}; still failing: " + "; ".join(f"{f.cause} not fixable here" for f in found),
                    hint="run the commands listed above", **{f.cause: f.fix for f in found})
        return
    v2 = _wait_v2(ctx)
    probe = _swift_probe(ctx, timeout=30)
    bad = [f"{h}: /v2/ {v['anonymous']} without credentials, {v['with_credentials']} with"
           for h, v in v2.items() if v["anonymous"] != 401 or v["with_credentials"] != 200]
    if not _probe_ok(probe):
        bad.append(f"swift PUT {probe['name']}: container {probe.get('container')}, object {probe.get('object')}"
                   + (f" ({probe['auth']})" if probe.get("auth") else ""))
    if st.get("client") and not ctx.dry_run:
        st.pop("client")
        cl = client_evidence(ctx).value or {}
        if (cl.get("login") or {}).get("ok") is False:
            bad.append(f"{cl.get('client')} login {cl.get('address')} on {cl.get('where')}: "
                       f"{(cl['login'].get('text') or '').splitlines()[-1:]}")
        if (cl.get("stored") or {}).get("state") == "stale":
            bad.append(f"the stored login in {cl.get('stored_path')} is still stale")
    unfixed = [f.cause for f in found if not f.fixable]
    if bad or unfixed:
        ctx.verdict(False, f"found {names}; still failing: " + "; ".join(bad + [f"{c} not fixable here" for c in unfixed]),
                    hint="see the evidence above")
        return
    ctx.verdict(True, f"fixed {names}: registry {regs} answers /v2/ 401 without credentials and 200 with; "
                      f"RGW {rgw_addr} accepts a container and an object",
                **{f.cause: f.fix for f in found})
