"""Section 4: the registry itself — htpasswd, config.yml, and the running service.

As in the document: an htpasswd file (bcrypt), a `config.yml` (the document's, with
`log.formatter` spelled right), and `docker run ... registry:2` on every registry host
with `/opt/k8s/registry/{auth,certs,config.yml}` mounted.  Or (runtime=systemd) Debian's
`docker-registry` package as a service.  Or (runtime=podman, hosts with podman and no docker:
RHEL/Rocky/Alma 8+) the same container run by podman and kept by a systemd unit.  Storage: Swift
against RGW auth v1 (the document's), S3 against RGW (the only RGW path in registry 3), or the
local filesystem.

runtime=podman, the contract other sections rely on (05-push, 06-operations, 07-faq):
- container name `registry` (CONTAINER_NAME, as with docker); `podman inspect registry` /
  `podman logs registry` read it; `podman_state(h)` -> (config hash label, running).
- the same mounts as docker's (`mounts()`): remote_dir (/opt/k8s/registry) auth/ -> /auth,
  certs/ -> /certs, config.yml -> /etc/docker/registry/config.yml (registry 3: /etc/distribution),
  data/ -> /var/lib/registry for storage=filesystem; each with `:Z` where SELinux is on
  (`volume_label()`), never `--privileged`.  Host networking; the image fully qualified
  (`full_image("registry:2")` = docker.io/library/registry:2, docker's own resolution).
- label `runbook.config-sha256` (LABEL) = `config_hash(ctx)`: the unit is regenerated and
  restarted only when it changes.
- unit `container-registry.service` (PODMAN_UNIT), from `podman generate systemd --new --name
  registry --restart-policy=always` (podman < 4.4) in /etc/systemd/system, enabled; with
  podman >= 4.4 Quadlet's /etc/containers/systemd/container-registry.container instead (the
  generated unit has the same name).  The unit owns the container: `systemctl stop|start|restart
  container-registry` (a stop removes the container: --new; start creates it again);
  `journalctl -u container-registry` is its log; `container_engine(h)` says which engine holds
  container `registry` on a host; `podman_unit_volumes(h)` are its unit's -v values (with
  options); `selinux_mount_problem(getenforce, volumes)` names the
  document's 503 cause under podman (SELinux on, a mount without :Z) with its fix.

Everything that can be wrong is checked first (`preflight`): certificates, the port,
the image, and the RGW credentials — tried from each registry host — so that a bad
input stops the run before a file is written or a container replaced.
"""
from __future__ import annotations

import hashlib
import html
import os
import re
import time

import yaml

from . import certs, journal, masking, packages, params as P, steps
from .errors import ParameterError, RunbookError
from .host import SYSTEMD_TEST, Command, cmd
from .journal import Result
from .steps import step

CONTAINER_NAME = "registry"
LABEL = "runbook.config-sha256"
REALM = "basic-realm"  # the document's
S3_REGION = "us-east-1"  # RGW accepts any region name; the driver needs one
SYSTEMD_CONFIG = "/etc/docker/registry/config.yml"
SYSTEMD_BIN = "/usr/bin/docker-registry"
PIDFILE = "/run/docker-registry.pid"
HASHFILE = "/run/docker-registry.config-sha256"
LOGFILE = "/var/log/docker-registry.log"
UNIT_PATH = "/etc/systemd/system/docker-registry.service"
OUR_PROCESSES = ("registry", "docker-registry")  # what may hold registry_port already
READY_TIMEOUT = 30.0
CONTAINER_RUNTIMES = ("docker", "podman")  # the registry runs as the image, config etc. bind-mounted
PODMAN_UNIT = "container-registry.service"  # podman generate systemd's name for container `registry`
PODMAN_UNIT_PATH = f"/etc/systemd/system/{PODMAN_UNIT}"
# Quadlet names the unit after the file: this file gives the same container-registry.service
QUADLET_PATH = "/etc/containers/systemd/container-registry.container"
# The registry (2.8, no draintimeout) exits 2 on podman stop's SIGTERM, 143 when killed by it:
# without these a plain `systemctl stop` leaves the unit failed and the host "degraded".
STOP_EXIT_STATUS = "SuccessExitStatus=2 143"
QUADLET_MIN = (4, 4)  # first podman with Quadlet (podman generate systemd is deprecated from 4.7)
DRAIN_TIMEOUT = "10s"  # http.draintimeout with a load balancer (06's restarts give docker 15 s before SIGKILL)


class RegistryError(RunbookError):
    pass


class ConfigError(RegistryError):
    """config.yml would not be accepted (or not do what was asked)."""

    def __init__(self, problems: list[str]):
        self.problems = [masking.mask(p) for p in problems]
        super().__init__("config.yml is not valid; nothing was deployed:\n" +
                         "\n".join(f"  - {p}" for p in self.problems),
                         "fix the parameters named above (storage, registry_version, ...) and run again")


# -------------------------------------------------------------------- config (pure)
def paths(runtime: str, remote_dir: str) -> dict:
    """Where the registry process sees its files (in the container, or on the host)."""
    if runtime in CONTAINER_RUNTIMES:
        return {"htpasswd": "/auth/htpasswd", "cert": "/certs/registry.pem", "key": "/certs/registry-key.pem",
                "config": "/etc/docker/registry/config.yml", "root": "/var/lib/registry"}
    return {"htpasswd": f"{remote_dir}/auth/htpasswd", "cert": f"{remote_dir}/certs/registry.pem",
            "key": f"{remote_dir}/certs/registry-key.pem", "config": SYSTEMD_CONFIG, "root": "/var/lib/docker-registry"}


def render_config(storage: str, *, port: int, http_secret: str, htpasswd_path: str = "/auth/htpasswd",
                  cert_path: str = "/certs/registry.pem", key_path: str = "/certs/registry-key.pem",
                  rgw_url: str = "", container: str = "registry", swift_user: str = "", swift_key: str = "",
                  s3_access: str = "", s3_secret: str = "", region: str = S3_REGION,
                  rootdirectory: str = "/var/lib/registry", addr: str = "0.0.0.0", realm: str = REALM,
                  readonly: bool = False, s3_rootdirectory: str = "", draintimeout: str = "",
                  s3_redirect: bool = False) -> dict:
    """The document's config.yml as a dict, for one storage backend.
    readonly: storage.maintenance.readonly on (pulls only; writes answer 405) and the upload
    purger off (08-migrate).  s3_rootdirectory: the s3 driver's key prefix (08-migrate sets the
    swift driver's `/files`, so that s3 reads the tree swift wrote).  draintimeout: http.draintimeout
    (on SIGTERM the registry stops accepting and lets in-flight requests finish that long; set when
    a load balancer is in front, issue 17).  s3_redirect: blob GETs answered with a 307 to a
    pre-signed RGW URL (the driver's default; off unless asked: clients must then reach RGW)."""
    if storage == "swift":
        driver = {"swift": {"authurl": f"{rgw_url}/auth/v1", "username": swift_user, "password": swift_key,
                            "container": container}}
    elif storage == "s3":
        driver = {"s3": {"accesskey": s3_access, "secretkey": s3_secret, "region": region,
                         "regionendpoint": rgw_url, "bucket": container, "forcepathstyle": True,
                         "secure": False, "v4auth": True}}
    elif storage == "filesystem":
        driver = {"filesystem": {"rootdirectory": rootdirectory}}
    else:
        driver = {storage: {}}
    extra = {}
    if storage == "s3":
        # else blob GETs get a 307 to a presigned RGW URL: clients would need to reach RGW too
        extra = {} if s3_redirect else {"redirect": {"disable": True}}
        if s3_rootdirectory:
            driver["s3"]["rootdirectory"] = s3_rootdirectory
    if readonly:
        extra["maintenance"] = {"readonly": {"enabled": True}, "uploadpurging": {"enabled": False}}
    http_extra = {"draintimeout": draintimeout} if draintimeout else {}
    return {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text", "fields": {"service": "registry"}},
        "storage": {"cache": {"blobdescriptor": "inmemory"}, "delete": {"enabled": True}, **extra, **driver},
        "auth": {"htpasswd": {"realm": realm, "path": htpasswd_path}},
        "http": {"addr": f"{addr}:{port}", "secret": http_secret, **http_extra,
                 "headers": {"X-Content-Type-Options": ["nosniff"]},
                 "tls": {"certificate": cert_path, "key": key_path}},
        "health": {"storagedriver": {"enabled": True, "interval": "10s", "threshold": 3}},
    }


# Keys distribution 2.8 knows, for the parts we write (a typo like `fromatter` is refused).
_KNOWN = {
    "": {"version", "log", "storage", "auth", "http", "health", "notifications", "redis", "middleware",
         "reporting", "proxy", "validation", "compatibility", "loglevel"},
    "log": {"level", "formatter", "fields", "accesslog", "hooks", "reportcaller"},
    "storage": {"filesystem", "s3", "swift", "inmemory", "azure", "gcs", "oss", "cache", "delete", "redirect",
                "maintenance", "tag"},
    "storage.swift": {"authurl", "username", "password", "container", "region", "tenant", "tenantid", "domain",
                      "domainid", "tenantdomain", "tenantdomainid", "trustid", "insecureskipverify", "chunksize",
                      "prefix", "secretkey", "accesskey", "authversion", "endpointtype", "tempurlcontainerkey",
                      "tempurlmethods"},
    "storage.s3": {"accesskey", "secretkey", "region", "regionendpoint", "bucket", "encrypt", "keyid", "secure",
                   "skipverify", "v4auth", "chunksize", "multipartcopychunksize", "multipartcopymaxconcurrency",
                   "multipartcopythresholdsize", "rootdirectory", "storageclass", "useragent", "usedualstack",
                   "accelerate", "objectacl", "forcepathstyle", "loglevel", "sessiontoken"},
    "storage.filesystem": {"rootdirectory", "maxthreads"},
    "storage.cache": {"blobdescriptor", "blobdescriptorsize"},
    "storage.delete": {"enabled"},
    "storage.redirect": {"disable"},
    "auth": {"htpasswd", "silly", "token"},
    "auth.htpasswd": {"realm", "path"},
    "http": {"addr", "net", "prefix", "host", "secret", "relativeurls", "draintimeout", "tls", "debug", "headers",
             "http2"},
    "http.tls": {"certificate", "key", "clientcas", "minimumtls", "ciphersuites", "letsencrypt"},
    "health": {"storagedriver", "file", "http", "tcp"},
    "health.storagedriver": {"enabled", "interval", "threshold"},
}
_REQUIRED = {
    "storage.swift": ("authurl", "username", "password", "container"),
    "storage.s3": ("accesskey", "secretkey", "region", "regionendpoint", "bucket"),
    "storage.filesystem": ("rootdirectory",),
    "auth.htpasswd": ("realm", "path"),
    "http.tls": ("certificate", "key"),
    "http": ("addr", "secret"),
}
DRIVERS = ("filesystem", "s3", "swift", "inmemory", "azure", "gcs", "oss")


def validate_config(cfg: dict, registry_version: int = 2) -> list[str]:
    """Every problem with a config dict ([] = good): unknown keys, missing values, a
    storage driver the registry version lacks, not exactly one driver."""
    problems = []

    def walk(d, path):
        known = _KNOWN.get(path)
        if known is None or not isinstance(d, dict):
            return
        for k, v in d.items():
            if k not in known:
                problems.append(f"unknown key {(path + '.' if path else '') + str(k)!r}"
                                + (" (did you mean 'formatter'?)" if k == "fromatter" else ""))
            walk(v, f"{path}.{k}" if path else k)

    walk(cfg, "")
    for path, keys in _REQUIRED.items():
        node = cfg
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            if path.startswith("storage.") or path == "auth.htpasswd" and "auth" not in cfg:
                continue
            problems.append(f"missing section {path!r}")
            continue
        for k in keys:
            if node.get(k) in (None, ""):
                problems.append(f"missing value {path}.{k}")
    drivers = [k for k in (cfg.get("storage") or {}) if k in DRIVERS]
    if len(drivers) != 1:
        problems.append(f"storage needs exactly one driver, found {drivers or 'none'}")
    if registry_version not in (2, 3):
        problems.append(f"registry_version {registry_version} is not 2 or 3")
    if registry_version >= 3 and "swift" in drivers:
        problems.append("storage swift: registry 3 removed the swift driver; use storage=s3 (RGW's S3 API) "
                        "or registry_version=2")
    if registry_version >= 3:
        problems += [p for p in registry3_problems(cfg) if not p.startswith("storage swift")]  # said above
    addr = str((cfg.get("http") or {}).get("addr", ""))
    if addr and not re.match(r"^[^:]*:\d{1,5}$", addr):
        problems.append(f"http.addr {addr!r} is not HOST:PORT")
    return problems


def to_yaml(cfg: dict) -> str:
    return ("# written by runbook_lib.registry (see notebooks/04-registry.ipynb)\n"
            + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False))


def render_unit(config: str = SYSTEMD_CONFIG, binary: str = SYSTEMD_BIN, user: str = "docker-registry") -> str:
    """The systemd unit for runtime=systemd (Debian's package ships one like it; ours
    makes sure the s3 driver does not see AWS_CA_BUNDLE)."""
    return f"""\
# written by runbook_lib.registry
[Unit]
Description=Docker registry (CNCF distribution), TLS + htpasswd
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={user}
# the s3 driver panics when AWS_CA_BUNDLE is set (LoadCustomCABundleError)
UnsetEnvironment=AWS_CA_BUNDLE
ExecStart={binary} serve {config}
Restart=always
RestartSec=2
NoNewPrivileges=true

[Install]
WantedBy=multi-user.target
"""


# -------------------------------------------------------------------- helpers
def _p(ctx, name, default=None):
    return ctx.params.get(name, default)


def _state(ctx) -> dict:
    return ctx.__dict__.setdefault("_registry", {})


def url(ctx, host: str) -> str:
    """https://HOST:PORT for a registry host."""
    h = f"[{host}]" if ":" in host else host
    return f"https://{h}:{ctx.registry_port}"


def password(ctx) -> str:
    return ctx.secret("registry_password", user=ctx.registry_user)


def session(ctx, auth: bool = True):
    """A requests Session that trusts only our CA (trust_env=False: REQUESTS_CA_BUNDLE
    would otherwise win over verify=) and logs in as registry_user."""
    import requests
    s = requests.Session()
    s.trust_env = False
    s.verify = certs.ca_path(ctx)
    if auth:
        s.auth = (ctx.registry_user, password(ctx))
    return s


def _http(s, method, u, host, **kw):
    """An HTTP call recorded in the journal (masked) like a command."""
    import requests
    t0 = time.monotonic()
    try:
        r = s.request(method, u, timeout=kw.pop("timeout", 10), **kw)
        code, err = r.status_code, ""
    except requests.RequestException as e:
        r, code, err = None, None, f"{type(e).__name__}: {str(e)[:200]}"
    journal.record(Result(host, f"{method} {u}", code if code is not None else -1, str(code or ""), err,
                          time.monotonic() - t0, read=method in ("GET", "HEAD"), kind="http"))
    return r, err


def _users(value) -> list[str]:
    return [u for u in P.as_list(value)]


def _curl_conf(**kv) -> str:
    """A curl config (read with -K -): keeps secrets off command lines and out of `ps`."""
    lines = []
    for k, v in kv.items():
        for item in (v if isinstance(v, list) else [v]):
            item = str(item).replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{k.replace("_", "-")} = "{item}"')
    return "\n".join(lines) + "\n"


def _rgw_url(ctx) -> str:
    return f"http://{ctx.rgw_host}:{ctx.rgw_port}"


def credentials(ctx) -> dict:
    """RGW credentials for the chosen storage, from the accounts module (registered as secrets)."""
    st = _state(ctx)
    if "creds" not in st:
        st["creds"] = _read_credentials(ctx)
    return st["creds"]


def _read_credentials(ctx) -> dict:
    from . import accounts
    try:
        if ctx.storage == "swift":
            user, key = accounts.swift_credentials(ctx)
            return {"swift_user": user, "swift_key": masking.register(key)}
        if ctx.storage == "s3":
            access, secret = accounts.s3_credentials(ctx)
            return {"s3_access": access, "s3_secret": masking.register(secret)}
        return {}
    except accounts.AccountError:
        if not ctx.dry_run:
            raise
        # A dry-run deploy previews 04 before 02 has really created the account:
        # show the plan with placeholders instead of failing.
        steps.note("dry-run: the RGW account does not exist yet (02-accounts would create it); "
                   "its keys are shown as placeholders")
        shown = ({"swift_user": f"{ctx.uid}:swift", "swift_key": "<swift key from 02-accounts>"}
                 if ctx.storage == "swift" else
                 {"s3_access": "<access key from 02-accounts>", "s3_secret": "<secret key from 02-accounts>"})
        return {**shown, "placeholder": True}


def _config_for(ctx) -> dict:
    rt, rd = ctx.runtime, _p(ctx, "remote_dir", "/opt/k8s/registry")
    pa = paths(rt, rd)
    http_secret = ctx.secret("registry_http_secret")
    return render_config(ctx.storage, port=ctx.registry_port, http_secret=http_secret,
                         htpasswd_path=pa["htpasswd"], cert_path=pa["cert"], key_path=pa["key"],
                         rgw_url=_rgw_url(ctx), container=_p(ctx, "container", "registry"),
                         rootdirectory=pa["root"], readonly=bool(_p(ctx, "readonly", False)),
                         s3_rootdirectory=_p(ctx, "s3_rootdirectory", "") or "",
                         draintimeout=DRAIN_TIMEOUT if (_p(ctx, "lb_host", "") or "").strip() else "",
                         s3_redirect=bool(_p(ctx, "s3_redirect", False)),
                         **{k: v for k, v in credentials(ctx).items() if k != "placeholder"})


def _listeners(h, port) -> list[tuple[str, str]]:
    """(process name, pid) listening on TCP port on host h."""
    out = h.run(cmd("ss -Hltnp {f}", f=f"sport = :{port}"), read=True, check=False).stdout
    found = []
    for line in out.splitlines():
        procs = re.findall(r'\("([^"]+)",pid=(\d+)', line)
        found += procs or [("?", "")]
    return found


# -------------------------------------------------------------------- steps
@step("Pre-flight: check every input before changing anything")
def preflight(ctx) -> dict:
    """Parameters that go together, certificates, port, runtime, image, RGW credentials
    (tried from each registry host), and the rendered config.  Raises before any change."""
    problems = []
    storage, version, rt = ctx.storage, _p(ctx, "registry_version", 2), ctx.runtime
    rd = _p(ctx, "remote_dir", "/opt/k8s/registry")
    if storage == "swift" and version >= 3:
        problems.append("storage: swift is not in registry 3 (it removed the driver); use storage=s3 or registry_version=2")
    if version >= 3 and _p(ctx, "image", "registry:2").endswith(":2"):
        problems.append(f"image: {ctx.image!r} is registry 2 but registry_version is {version}")
    if not rd or not rd.startswith("/") or rd.rstrip("/") == "":
        problems.append(f"remote_dir: {rd!r} must be an absolute directory (it holds auth/htpasswd, certs/, config.yml)")
    users = _users(_p(ctx, "htpasswd_users", ""))
    removed = _users(_p(ctx, "remove_users", ""))
    if ctx.registry_user in removed:
        problems.append(f"remove_users: cannot remove registry_user {ctx.registry_user!r} (the runbook logs in as it)")
    both = sorted(set(users) & set(removed))
    if both:
        problems.append(f"remove_users: {', '.join(both)} also in htpasswd_users")
    if _p(ctx, "rotate_password") and os.environ.get("REGISTRY_PASSWORD"):
        problems.append("rotate_password: REGISTRY_PASSWORD is set in the environment, its value would win; "
                        "change it there instead")
    if problems:
        raise ParameterError(problems)
    cert_problems = certs.verify(ctx)
    if cert_problems and ctx.dry_run and not os.path.exists(certs.cert_path(ctx)):
        # A dry-run deploy: 03-certs only said it would issue the certificate.
        steps.note("dry-run: no certificate yet (03-certs would issue it); shown as a placeholder")
        _state(ctx)["cert_placeholder"] = True
        cert_problems = []
    if cert_problems:
        raise RegistryError("the registry certificate is not usable: " + "; ".join(cert_problems),
                            "run notebooks/03-certs.ipynb with the same registry_host and state_dir")
    if not _state(ctx).get("cert_placeholder"):
        steps.fact("certificate", "chain valid, SANs cover " + ", ".join(P.as_list(ctx.registry_host)))
    hosts = ctx.hosts(ctx.registry_host)
    creds = credentials(ctx)

    def per_host(h):
        found = []
        for name, pid in _listeners(h, ctx.registry_port):
            if name not in OUR_PROCESSES:
                found.append(f"registry_port: {ctx.registry_port} is in use on {h.name} by {name}"
                             + (f" (pid {pid})" if pid else "") + "; choose another port")
        have = host_runtimes(h)  # said for every runtime: which engine this host really has
        _state(ctx).setdefault("runtimes", {})[h.name] = have
        steps.row(host=h.name, runtimes=describe_runtimes(have),
                  **({"volumes": "':Z' (SELinux " + have["selinux"] + ")"}
                     if rt == "podman" and volume_label(have["selinux"]) else {}))
        if rt in CONTAINER_RUNTIMES:
            bad = runtime_problem(rt, have, h.name)
            if bad:
                found.append(bad)
            else:
                image = ctx.image if rt == "docker" else full_image(ctx.image)
                r = h.run(cmd(rt + " image inspect --format {f} {i}", f="{{json .Config.Env}}", i=image),
                          read=True, check=False)
                if r.exit_code != 0:
                    steps.row(host=h.name, image=f"{image} not present: {rt} run will pull it")
                elif "AWS_CA_BUNDLE" in r.stdout and storage == "s3":
                    found.append(f"image: {image} sets AWS_CA_BUNDLE, which makes the s3 driver panic")
        elif not h.test(cmd("test -x {b}", b=SYSTEMD_BIN)) and not h.has_systemd():
            found.append(f"runtime: {SYSTEMD_BIN} is missing on {h.name} and it has no systemd/apt to install "
                         "the docker-registry package")
        found += _storage_probe(ctx, h, creds)
        return found

    for found in journal.parallel(per_host, hosts):
        problems += found
    if problems:
        raise RegistryError("pre-flight failed; nothing was changed:\n" + "\n".join(f"  - {p}" for p in problems))
    cfg = _config_for(ctx)
    bad = validate_config(cfg, version)
    if bad:
        raise ConfigError(bad)
    steps.fact("storage", {"swift": f"swift {_rgw_url(ctx)}/auth/v1 as {creds.get('swift_user')}",
                           "s3": f"s3 {_rgw_url(ctx)} bucket {ctx.container}",
                           "filesystem": "filesystem " + paths(rt, rd)["root"]}[storage])
    steps.fact("config.yml", "valid")
    _state(ctx)["config"] = cfg
    return {"config_ok": True}


def _storage_probe(ctx, h, creds) -> list[str]:
    """Try the RGW credentials from the registry host (the registry's own network path)."""
    storage = ctx.storage
    base = _rgw_url(ctx)
    if creds.get("placeholder"):
        steps.row(host=h.name, probe="RGW credentials", answer="not yet created (dry-run)")
        return []
    if storage == "swift":
        conf = _curl_conf(url=f"{base}/auth/v1", header=[f"X-Auth-User: {creds['swift_user']}",
                                                           f"X-Auth-Key: {creds['swift_key']}"])
        r = h.run(["curl", "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code}", "-K", "-"], stdin=conf,
                  read=True, check=False, no_log=True)
        code = r.stdout.strip()
        steps.row(host=h.name, probe=f"swift auth v1 as {creds['swift_user']}", answer=code)
        if code in ("200", "204"):
            return _swift_container_owner(ctx, creds)
        if code in ("000", ""):
            return [f"rgw_host: {base} does not answer from {h.name} (curl exit {r.exit_code})"]
        return [f"swift_subuser: RGW refused swift auth for {creds['swift_user']!r} from {h.name} "
                f"(HTTP {code}): wrong subuser or key; run notebooks/02-accounts.ipynb"]
    if storage == "s3":
        code = _s3(h, ctx, creds, "HEAD")
        steps.row(host=h.name, probe=f"S3 HEAD bucket {ctx.container}", answer=code)
        if code in ("200", "404"):
            _state(ctx).setdefault("bucket", {})[h.name] = code
            return []
        if code in ("000", ""):
            return [f"rgw_host: {base} does not answer from {h.name}"]
        return [f"uid: RGW refused the S3 keys of {ctx.uid!r} from {h.name} (HTTP {code}): wrong access/secret key, "
                "or the bucket belongs to another user; run notebooks/02-accounts.ipynb"]
    return []


def _swift_container_owner(ctx, creds) -> list[str]:
    """Container names are global in RGW: one owned by another user makes every registry
    write fail with 'Operation forbidden' (a crash-looping registry, then a timeout)."""
    from . import accounts, rgw
    container = _p(ctx, "container", "registry")
    storage_url, token = accounts.swift_auth(ctx, creds["swift_user"], creds["swift_key"])
    code = rgw.http("HEAD", f"{storage_url}/{container}", headers={"X-Auth-Token": token},
                    what=f"HEAD {storage_url}/{container} (X-Auth-Token: ****)").status_code
    if code == 403:
        return [f"container: the Swift container {container!r} on RGW belongs to another RGW user, not "
                f"{ctx.uid!r} (container names are global in RGW); choose another container for this uid"]
    return []


def _s3(h, ctx, creds, method) -> str:
    conf = _curl_conf(url=f"{_rgw_url(ctx)}/{ctx.container}", user=f"{creds['s3_access']}:{creds['s3_secret']}",
                      aws_sigv4=f"aws:amz:{S3_REGION}:s3", header="x-amz-content-sha256: UNSIGNED-PAYLOAD",
                      **({} if method == "HEAD" else {"request": method}))
    extra = ["-I"] if method == "HEAD" else []
    r = h.run(["curl", "-s", "-m", "15", *extra, "-o", "/dev/null", "-w", "%{http_code}", "-K", "-"], stdin=conf,
              read=method == "HEAD", check=False, no_log=True, changed=method != "HEAD")
    return r.stdout.strip() if not r.skipped else "skipped"


@step("S3 bucket {ctx.container} (the s3 driver does not create it)")
def bucket(ctx):
    """storage=s3 only: create the bucket first; the registry would otherwise fail every write."""
    if ctx.storage != "s3":
        steps.note(f"storage={ctx.storage}: nothing to do")
        return None
    creds = credentials(ctx)
    if creds.get("placeholder"):
        steps.mark_changed(f"dry-run: would create bucket {ctx.container} once 02-accounts made the S3 keys")
        return None
    h = ctx.host(P.as_list(ctx.registry_host)[0])
    code = _s3(h, ctx, creds, "HEAD")
    if code == "200":
        steps.fact("bucket", f"{ctx.container} exists")
        return code
    code = _s3(h, ctx, creds, "PUT")
    if code not in ("200", "skipped"):
        raise RegistryError(f"creating bucket {ctx.container!r} on {_rgw_url(ctx)} failed: HTTP {code}",
                            "HTTP 416 is the FAQ's PG limit: see notebooks/07-faq.ipynb")
    steps.fact("bucket", f"{ctx.container} created")
    return code


def _cost(ctx) -> int:
    return int(_p(ctx, "bcrypt_cost", 5))


def _crypt_context(cost):
    from passlib.context import CryptContext
    # $2y$ as htpasswd -B writes it (the document's hash); the registry accepts 2a/2b/2y
    return CryptContext(schemes=["bcrypt"], bcrypt__rounds=cost, bcrypt__ident="2y")


def build_htpasswd(existing: bytes | None, wanted: dict, remove=(), cost: int = 5, rotate=()) -> tuple[bytes, list[dict]]:
    """New htpasswd content: keep a user's hash when its password still verifies and its cost
    is the wanted one (bcrypt salts differ per run, so re-hashing would change the file every
    time); hash the others; drop `remove`.  Returns (content, rows of what happened)."""
    from passlib.apache import HtpasswdFile
    cc = _crypt_context(cost)
    ht = HtpasswdFile.from_string(existing or b"", context=cc) if existing else HtpasswdFile(new=True, context=cc)
    rows = []
    for u in ht.users():
        h = ht.get_hash(u)
        masking.register(h.decode() if isinstance(h, bytes) else h)
    for user, pw in wanted.items():
        old = ht.get_hash(user)
        old = old.decode() if isinstance(old, bytes) else old
        keep = False
        if old and user not in rotate:
            try:
                keep = ht.check_password(user, pw) and old.split("$")[2] == f"{cost:02d}"
            except (ValueError, IndexError):
                keep = False
        if keep:
            rows.append({"user": user, "hash": "kept (password verifies)"})
            continue
        ht.set_password(user, pw)
        new = ht.get_hash(user)
        masking.register(new.decode() if isinstance(new, bytes) else new)
        rows.append({"user": user, "hash": f"new bcrypt cost {cost}" + (" (rotated)" if user in rotate else
                                                                            "" if not old else " (changed)")})
    for user in remove:
        if ht.delete(user):
            rows.append({"user": user, "hash": "removed"})
    return ht.to_string(), rows


@step("htpasswd file (bcrypt cost {ctx.params[bcrypt_cost]})")
def htpasswd(ctx):
    """remote_dir/auth/htpasswd on every registry host: registry_user + htpasswd_users."""
    rd = ctx.remote_dir
    path = f"{rd}/auth/htpasswd"
    rotate = []
    if _p(ctx, "rotate_password"):
        new = __import__("secrets").token_urlsafe(24)
        masking.register(new)
        if not ctx.dry_run:
            ctx.save_secret("registry_password", new)
        ctx.__dict__["_rotated"] = new
        rotate = [ctx.registry_user]
    wanted = {ctx.registry_user: ctx.__dict__.get("_rotated") or password(ctx)}
    for u in _users(_p(ctx, "htpasswd_users", "")):
        wanted[u] = ctx.secret(f"htpasswd_password@{u}", user=u)
    hosts = ctx.hosts(ctx.registry_host)
    existing = [h.read_file(path) for h in hosts]
    # start from the first host's file; a hash that verifies on any host is kept
    base = next((e for e in existing if e), None)
    content, rows = build_htpasswd(base, wanted, _users(_p(ctx, "remove_users", "")), _cost(ctx), rotate)
    for r in rows:
        steps.row(**r)
    journal.parallel(lambda h: h.put_file(path, content, mode=_secret_mode(ctx, h), secret=True), hosts)
    steps.fact("file", f"{path} (0600, {len(content.splitlines())} user(s))")
    _state(ctx)["htpasswd"] = content
    return [r["user"] for r in rows]


def _secret_mode(ctx, h) -> int:
    """0600 (root reads it: docker, or our daemon); 0640 group docker-registry under systemd,
    where Debian's unit runs the registry as that user."""
    return 0o640 if ctx.runtime == "systemd" and h.has_systemd() else 0o600


def _files(ctx) -> dict:
    """Everything the registry process reads at start: {remote path: (content, mode)}."""
    st = _state(ctx)
    cfg = st.get("config") or _config_for(ctx)
    rd, rt = ctx.remote_dir, ctx.runtime
    if st.get("cert_placeholder"):
        cert, key = b"<certificate from 03-certs>", b"<key from 03-certs>"
    else:
        cert, key = certs.load_server(ctx)
    cfg_path = f"{rd}/config.yml" if rt in CONTAINER_RUNTIMES else SYSTEMD_CONFIG
    return {f"{rd}/certs/registry.pem": (cert, 0o644), f"{rd}/certs/registry-key.pem": (key, 0o600),
            cfg_path: (to_yaml(cfg).encode(), 0o600)}


def config_hash(ctx) -> str:
    """Changes when anything read only at start changes (config, cert, key, image, runtime)."""
    h = hashlib.sha256()
    for p, (content, mode) in sorted(_files(ctx).items()):
        h.update(p.encode() + b"\0" + content + b"\0")
    h.update(f"{ctx.image}\0{ctx.runtime}\0{ctx.storage}".encode())
    return h.hexdigest()


@step("Install docker-registry on every registry host ({ctx.runtime})")
def install(ctx):
    """runtime=systemd: Debian's docker-registry package (binary, user and group docker-registry,
    its unit).  Installing it starts its unit with the package's default config (port 5000);
    04 replaces the config and restarts it.  runtime=docker/podman: nothing to install (pre-flight
    refused a host without the engine, naming its package)."""
    if ctx.runtime != "systemd":
        steps.note(f"runtime={ctx.runtime}: the registry comes as the image {ctx.image}")
        return None

    def one(h):
        if packages.installed(h, "docker-registry") or (not h.has_systemd() and h.test(cmd("test -x {b}", b=SYSTEMD_BIN))):
            return {"host": h.name, "docker-registry": packages.installed(h, "docker-registry") or "present"}
        packages.install(h, ["docker-registry"])
        return {"host": h.name, "docker-registry": packages.installed(h, "docker-registry") or "would be installed"}
    for r in journal.parallel(one, ctx.hosts(ctx.registry_host)):
        steps.row(**r)


@step("Configuration and certificates on the registry hosts")
def configure(ctx):
    """config.yml (0600, holds secrets), registry.pem, registry-key.pem (0600) under remote_dir."""
    files = _files(ctx)
    hosts = ctx.hosts(ctx.registry_host)

    def put(h):
        # one read of every file's hash and mode, then only the writes needed
        h.put_files([(p, content, _secret_mode(ctx, h) if mode == 0o600 else mode, mode == 0o600)
                     for p, (content, mode) in files.items()])
        if ctx.storage == "filesystem" and ctx.runtime in CONTAINER_RUNTIMES:
            h.run(cmd("test -d {d} || mkdir -p {d}", d=f"{ctx.remote_dir}/data"),
                  changed=not h.exists(f"{ctx.remote_dir}/data"))
    journal.parallel(put, hosts)
    for p, (content, mode) in files.items():
        steps.row(file=p, mode=f"{mode:o}", bytes=len(content), sha256=hashlib.sha256(content).hexdigest()[:12])
    return config_hash(ctx)


class MaskedConfig:
    """config.yml as a reader may see it: every secret shown as ****."""

    def __init__(self, text: str, path: str):
        self.text, self.path = masking.mask(text), path

    def __repr__(self):
        return f"# {self.path}\n{self.text}"

    def _repr_html_(self):
        out = []
        for line in self.text.splitlines():
            e = html.escape(line)
            if line.lstrip().startswith("#"):
                e = f"<span style='color:#6e7781'>{e}</span>"
            else:
                e = re.sub(r"^(\s*-?\s*)([\w.-]+):", r"\1<span style='color:#0550ae'>\2</span>:", e)
                e = e.replace(masking.MASK, "<span style='background:#ffebe9;color:#cf222e;font-weight:bold'>"
                              f"{masking.MASK}</span>")
            out.append(e)
        return (f"<div><b>{html.escape(self.path)}</b> <span style='color:#6e7781'>(mode 600; secrets masked)</span>"
                f"<pre style='background:#f6f8fa;padding:6px;border-radius:4px'>{chr(10).join(out)}</pre></div>")


def show_config(ctx) -> MaskedConfig:
    """The config.yml that is deployed, masked."""
    cfg = _state(ctx).get("config") or _config_for(ctx)
    path = f"{ctx.remote_dir}/config.yml" if ctx.runtime in CONTAINER_RUNTIMES else SYSTEMD_CONFIG
    return MaskedConfig(to_yaml(cfg), path)


def mounts(remote_dir: str, storage: str, registry_version: int = 2) -> list[tuple[str, str]]:
    """(host path, container path) of every bind mount: the document's three, plus the data
    directory for storage=filesystem (it survives the container being replaced)."""
    rd = remote_dir
    m = [(f"{rd}/auth", "/auth"), (f"{rd}/certs", "/certs"),
         (f"{rd}/config.yml", container_config_path(registry_version))]
    if storage == "filesystem":
        m.append((f"{rd}/data", "/var/lib/registry"))
    return m


def _mounts(ctx) -> list[tuple[str, str]]:
    return mounts(ctx.remote_dir, ctx.storage, (getattr(ctx, "params", None) or {}).get("registry_version", 2))


def docker_run_argv(ctx, digest: str) -> list[str]:
    """The document's docker run, with --network host (the lab's dockerd runs with
    --bridge=none, where -p is silently ignored) and a label holding the config hash."""
    a = ["docker", "run", "-d", "--name", CONTAINER_NAME, "--restart", "always", "--network", "host",
         "--label", f"{LABEL}={digest}"]
    for src, dst in _mounts(ctx):
        a += ["-v", f"{src}:{dst}"]
    return a + [ctx.image]


def _docker_state(h) -> tuple[str | None, bool]:
    """(config hash label, running) of our container, (None, False) when absent."""
    return _container_state(h, "docker")


def _daemon_state(h) -> tuple[str | None, bool]:
    """(config hash, running) of the registry we run without systemd (pidfile)."""
    r = h.run(cmd("cat {h} 2>/dev/null; echo; pid=$(cat {p} 2>/dev/null) && kill -0 \"$pid\" 2>/dev/null "
                  "&& tr '\\0' ' ' < /proc/$pid/cmdline | grep -q docker-registry && echo running",
                  h=HASHFILE, p=PIDFILE), read=True, check=False)
    lines = r.stdout.splitlines()
    return (lines[0].strip() or None) if lines else None, "running" in r.stdout


def stop_daemon(h):
    """Stop the registry run without systemd (pidfile), waiting up to 5 s for it to exit."""
    h.run(cmd("pid=$(cat {p}) && kill \"$pid\"; for i in $(seq 50); do kill -0 \"$pid\" 2>/dev/null || break; "
              "sleep 0.1; done; rm -f {p} {h}", p=PIDFILE, h=HASHFILE), check=False)


def start_daemon(h, config: str, digest: str):
    """Start the registry binary without systemd, detached, its pid and config hash recorded."""
    inner = f"echo $$ > {PIDFILE}; exec {SYSTEMD_BIN} serve {config}"
    h.run(cmd("cd / && env -u AWS_CA_BUNDLE setsid -f /bin/sh -c {inner} >> {log} 2>&1 < /dev/null && "
              "echo {d} > {hf}", inner=inner, log=LOGFILE, d=digest, hf=HASHFILE))


# -------------------------------------------------------------------- runtime podman (issue 18)
def full_image(image: str) -> str:
    """The image as docker resolves a short name, spelled out: podman (without an alias in
    registries.conf.d) refuses or asks about short names, and its local store keeps full ones.
    registry:2 -> docker.io/library/registry:2; prom/x -> docker.io/prom/x; a name whose first
    component is a host (has '.' or ':', or is localhost) is left as it is."""
    first, sep, _ = image.partition("/")
    if not sep:
        return f"docker.io/library/{image}"
    if "." in first or ":" in first or first == "localhost":
        return image
    return f"docker.io/{image}"


def volume_label(getenforce: str | None) -> str:
    """The volume option for SELinux, from `getenforce`'s output (None/"": no getenforce).
    Enforcing or Permissive -> ":Z" (a private label for the registry's container: under
    enforcing it is what lets the container read its mounts, the document's 503, which it
    "fixed" with --privileged; under permissive the same denials are logged and a later
    `setenforce 1` would break the registry at once).  Disabled / no SELinux -> ""."""
    mode = (getenforce or "").strip().splitlines()[-1].strip().lower() if (getenforce or "").strip() else ""
    return ":Z" if mode in ("enforcing", "permissive") else ""


def podman_version(text: str) -> tuple[int, ...] | None:
    """'4.3.1' -> (4, 3, 1); None when podman did not answer."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return tuple(int(x) for x in m.groups() if x is not None) if m else None


def uses_quadlet(version: tuple | None) -> bool:
    return bool(version) and tuple(version[:2]) >= QUADLET_MIN


def podman_volumes(ctx, label: str = "") -> list[str]:
    """-v values of the registry's podman container (docker's mounts, SELinux label appended)."""
    return [f"{src}:{dst}{label}" for src, dst in _mounts(ctx)]


def podman_create_argv(ctx, digest: str, label: str = "") -> list[str]:
    """The container `podman generate systemd --new` turns into the unit's ExecStart (`podman run
    --rm --replace -d ...` of the same arguments).  No --restart: the unit restarts it."""
    a = ["podman", "create", "--name", CONTAINER_NAME, "--network", "host", "--label", f"{LABEL}={digest}"]
    for v in podman_volumes(ctx, label):
        a += ["-v", v]
    return a + [full_image(ctx.image)]


def render_quadlet(ctx, digest: str, label: str = "") -> str:
    """The same container as a Quadlet file (podman >= 4.4 reads /etc/containers/systemd/*.container
    at daemon-reload and generates container-registry.service from it; 4.3 ignores the file)."""
    vols = "".join(f"Volume={v}\n" for v in podman_volumes(ctx, label))
    return f"""\
# written by runbook_lib.registry: podman >= 4.4 (Quadlet); podman 4.3 uses podman generate systemd
[Unit]
Description=Docker registry (CNCF distribution) in podman, TLS + htpasswd
Wants=network-online.target
After=network-online.target

[Container]
ContainerName={CONTAINER_NAME}
Image={full_image(ctx.image)}
Network=host
Label={LABEL}={digest}
{vols}
[Service]
Restart=always
{STOP_EXIT_STATUS}

[Install]
WantedBy=multi-user.target default.target
"""


def with_stop_status(unit: str) -> str:
    """podman generate systemd's unit with STOP_EXIT_STATUS in its [Service] section (pure)."""
    if STOP_EXIT_STATUS in unit:
        return unit
    head, sep, tail = unit.partition("[Service]\n")
    if not sep:
        raise ValueError("no [Service] section in the generated unit")
    return f"{head}{sep}{STOP_EXIT_STATUS}\n{tail}"


def _container_state(h, engine: str) -> tuple[str | None, bool]:
    """(config hash label, running) of our container under docker or podman; (None, False) when absent."""
    r = h.run(cmd(engine + " inspect --format {f} {n}",
                  f="{{index .Config.Labels \"" + LABEL + "\"}} {{.State.Running}}", n=CONTAINER_NAME),
              read=True, check=False)
    if r.exit_code != 0:
        return None, False
    parts = r.stdout.split()
    return (parts[0] if len(parts) == 2 else ""), parts[-1] == "true"


HOST_TOOLS = ("docker", "podman", "apt-get", "dnf", "yum", "getenforce")


def host_runtimes(h) -> dict:
    """What a host can run the registry with (reads): {"docker": server version or "" (CLI only)
    or None, "podman": version or None, "systemd": bool, "pkg": apt-get|dnf|yum|None,
    "selinux": getenforce's answer or None}."""
    probe = " ".join(f"command -v {t} >/dev/null 2>&1 && echo have-{t};" for t in HOST_TOOLS)
    probe += f" {SYSTEMD_TEST} && echo have-systemd; echo probed"  # has_systemd's question, in the same command
    have = set(h.run(cmd("sh -c {s}", s=probe), read=True, check=False).stdout.split())
    if "probed" in have:  # the probe ran to its end: its systemd answer holds
        h.learned_systemd("have-systemd" in have)
    out = {"docker": None, "podman": None, "systemd": h.has_systemd(), "selinux": None,
           "pkg": next((t for t in ("apt-get", "dnf", "yum") if f"have-{t}" in have), None)}
    if "have-docker" in have:
        r = h.run(cmd("docker version --format {f}", f="{{.Server.Version}}"), read=True, check=False)
        out["docker"] = r.stdout.strip() if r.exit_code == 0 else ""
    if "have-podman" in have:
        r = h.run(cmd("podman version --format {f}", f="{{.Client.Version}}"), read=True, check=False)
        out["podman"] = r.stdout.strip() if r.exit_code == 0 else ""
    if "have-getenforce" in have:
        out["selinux"] = h.run(Command("getenforce"), read=True, check=False).stdout.strip() or None
    return out


def describe_runtimes(found: dict) -> str:
    """'docker 20.10.24, systemd' / 'podman 4.3.1, systemd, SELinux Enforcing' (pre-flight's row)."""
    parts = []
    if found.get("docker") is not None:
        parts.append(f"docker {found['docker']}" if found["docker"] else "docker CLI (daemon not answering)")
    if found.get("podman") is not None:
        parts.append(f"podman {found['podman'] or '?'}")
    parts.append("systemd" if found.get("systemd") else "no systemd")
    if found.get("selinux"):
        parts.append(f"SELinux {found['selinux']}")
    return ", ".join(parts) if (found.get("docker") is not None or found.get("podman") is not None) \
        else "no container engine, " + ", ".join(parts)


_INSTALL = {  # the package that brings each runtime, per package manager
    "docker": {"apt-get": "apt-get install docker.io",
               "dnf": "dnf install docker-ce (Docker's repository: RHEL 8+ ship podman instead)",
               "yum": "yum install docker"},
    "podman": {"apt-get": "apt-get install podman", "dnf": "dnf install podman", "yum": "yum install podman"},
}


def runtime_problem(runtime: str, found: dict, host: str) -> str | None:
    """Why `runtime` cannot run on this host (from host_runtimes), with the package to install
    and the runtime it does have; None when it can."""
    if runtime not in CONTAINER_RUNTIMES:
        return None
    other = "podman" if runtime == "docker" else "docker"
    have = describe_runtimes(found)
    alt = f" — or use runtime={other}" if found.get(other) else ""
    if found.get(runtime) is None:
        pkg = found.get("pkg")
        how = (_INSTALL[runtime][pkg] if pkg else
               f"{_INSTALL[runtime]['apt-get']} (Debian/Ubuntu) or {_INSTALL[runtime]['dnf']} (RHEL/Rocky/Alma)")
        return f"runtime: {runtime} is not installed on {host} (it has: {have}); install it: {how}{alt}"
    if runtime == "docker" and not found["docker"]:
        return f"runtime: docker does not answer on {host} (is dockerd running? systemctl start docker){alt}"
    if runtime == "podman" and not found.get("systemd"):
        return (f"runtime: podman on {host} needs systemd to keep the registry running (podman has no daemon "
                "that restarts containers) and this host has none; use runtime=docker or runtime=systemd")
    return None


def container_engine(h) -> str | None:
    """Which engine holds the registry's container `registry` on h: "docker", "podman" or None
    (a read; for sections that inspect or read the logs of whichever runs it)."""
    for engine in CONTAINER_RUNTIMES:
        if h.test(cmd("command -v " + engine + " >/dev/null 2>&1 && " + engine + " inspect --type container {n} "
                      ">/dev/null 2>&1", n=CONTAINER_NAME)):
            return engine
    return None


def unit_volumes(text: str) -> list[str]:
    """The -v values (with their options) of the registry's podman unit: the `podman run` of a unit
    from `podman generate systemd`, or the Volume= lines of a Quadlet file.  (Pure.)"""
    import shlex
    text = text or ""
    quadlet = [ln.split("=", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Volume=")]
    if quadlet:
        return quadlet
    joined = re.sub(r"\\\n\s*", " ", text)
    line = next((ln.split("=", 1)[1] for ln in joined.splitlines() if ln.startswith("ExecStart=")), "")
    words = shlex.split(line) if line else []
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-v", "--volume")]


def podman_unit_volumes(h) -> list[str]:
    """unit_volumes of the unit (or Quadlet file) on h; [] when there is none (a read)."""
    for path in (PODMAN_UNIT_PATH, QUADLET_PATH):
        raw = h.read_file(path)
        if raw:
            return unit_volumes(raw.decode(errors="replace"))
    return []


def selinux_mount_problem(getenforce: str | None, volumes: list[str]) -> str | None:
    """The document's 503 under podman: SELinux on (getenforce) and a bind mount of the registry
    without a relabel option (:Z or :z), so the container may not read its config, certificates or
    htpasswd.  volumes: the `-v` values of the container (from its unit's ExecStart or its create
    command).  -> the cause and the fix, or None.  (For 07-faq; pure.)"""
    if not volume_label(getenforce):
        return None
    bare = [v for v in volumes if not {"Z", "z"} & set(",".join(v.split(":")[2:]).split(","))]
    if not bare:
        return None
    mode = getenforce.strip().splitlines()[-1].strip()
    return (f"SELinux is {mode} and the registry's mounts {', '.join(bare)} carry no volume label: the "
            "container is denied its files (the document's 503, which it fixed with --privileged). Fix: the "
            ":Z label on each mount (04-registry runtime=podman adds it where getenforce says Enforcing or "
            "Permissive), not --privileged")


def podman_state(h) -> tuple[str | None, bool]:
    """(config hash label, running) of the registry's podman container on h; (None, False) when absent."""
    return _container_state(h, "podman")


def _start_podman(ctx, h, digest: str) -> dict:
    """The registry as container `registry`, owned by container-registry.service.  Unchanged
    (unit holds this config hash and these mounts, container running with the same label, unit
    active and enabled) -> nothing; else the unit is made again and restarted."""
    found = _state(ctx).get("runtimes", {}).get(h.name) or host_runtimes(h)
    ver = podman_version(found.get("podman") or "")
    label = volume_label(found.get("selinux"))
    quadlet = render_quadlet(ctx, digest, label)
    cur, running = _container_state(h, "podman")
    active = h.test(cmd("systemctl is-active --quiet {u}", u=PODMAN_UNIT))
    if uses_quadlet(ver):
        changed = h.put_file(QUADLET_PATH, quadlet, mode=0o644).changed
        if h.exists(PODMAN_UNIT_PATH):  # a unit in /etc/systemd/system would shadow Quadlet's
            h.run(cmd("systemctl disable {u}; rm -f {p}", u=PODMAN_UNIT, p=PODMAN_UNIT_PATH))
            changed = True
        if not changed and cur == digest and running and active:
            return {"host": h.name, "state": "running, config unchanged (Quadlet)"}
        h.run(cmd("systemctl daemon-reload && systemctl restart {u}", u=PODMAN_UNIT))
        return {"host": h.name, "state": "restarted (Quadlet)" if cur is not None else "created (Quadlet)"}
    _state(ctx).setdefault("quadlet", quadlet)  # shown by show_units: what podman >= 4.4 would use
    text = (h.read_file(PODMAN_UNIT_PATH) or b"").decode(errors="replace")
    want = [f"{LABEL}={digest}", full_image(ctx.image), STOP_EXIT_STATUS,
            *(f"-v {v}" for v in podman_volumes(ctx, label))]
    unit_ok = bool(text) and all(w in text for w in want)
    enabled = h.test(cmd("systemctl is-enabled --quiet {u}", u=PODMAN_UNIT))
    if unit_ok and cur == digest and running and active:
        if enabled:
            return {"host": h.name, "state": "running, config unchanged"}
        h.run(cmd("systemctl enable {u}", u=PODMAN_UNIT))
        return {"host": h.name, "state": "running; unit enabled (was not)"}
    if unit_ok and not active:
        h.run(cmd("systemctl enable {u} && systemctl start {u}", u=PODMAN_UNIT))
        return {"host": h.name, "state": "started (unit was stopped)"}
    # podman generate systemd --new needs the container to exist: create it, generate, remove it;
    # the unit then creates its own on every start (and removes it on stop)
    if active:
        h.run(cmd("systemctl stop {u}", u=PODMAN_UNIT))
    h.run(cmd("podman rm -f --ignore {n}", n=CONTAINER_NAME), changed=cur is not None)
    h.run(podman_create_argv(ctx, digest, label))
    gen = h.run(cmd("podman generate systemd --new --no-header --name {n} --restart-policy=always", n=CONTAINER_NAME),
                changed=False)
    h.run(cmd("podman rm {n}", n=CONTAINER_NAME), changed=False)
    if gen.skipped:  # dry run: no container was created, so there is no unit text to compare
        journal.record(Result(h.name, f"write {PODMAN_UNIT_PATH} (podman generate systemd's output)", None,
                              skipped=True, changed=True, kind="file"))
    else:
        if not gen.stdout.startswith("# " + PODMAN_UNIT):
            raise RegistryError(f"{h.name}: podman generate systemd did not make {PODMAN_UNIT}: {gen.stdout[:200]!r}")
        h.put_file(PODMAN_UNIT_PATH, with_stop_status(gen.stdout), mode=0o644)
    h.run(cmd("systemctl daemon-reload && systemctl enable {u} && systemctl restart {u}", u=PODMAN_UNIT))
    return {"host": h.name, "state": "replaced (config changed)" if cur is not None or text else "created"}


class Shown(list):
    """Several files shown one after the other (a notebook cell's output)."""

    def __repr__(self):
        return "\n".join(repr(x) for x in self)

    def _repr_html_(self):
        return "".join(x._repr_html_() for x in self)


def show_units(ctx) -> Shown:
    """runtime=podman: the unit that keeps the registry running, as on the first registry host
    (podman < 4.4: generated by `podman generate systemd --new`), and the Quadlet file for the
    same container (written instead where podman >= 4.4, else shown for such hosts)."""
    if ctx.runtime != "podman":
        how = {"docker": "docker's --restart always", "systemd": "the docker-registry unit"}[ctx.runtime]
        return Shown([MaskedConfig(f"runtime={ctx.runtime}: kept running by {how}", "no podman unit")])
    out = Shown()
    h = ctx.host(P.as_list(ctx.registry_host)[0])
    ver = podman_version((_state(ctx).get("runtimes", {}).get(h.name) or {}).get("podman") or "")
    if not uses_quadlet(ver):
        unit = h.read_file(PODMAN_UNIT_PATH)
        if unit:
            out.append(MaskedConfig(unit.decode(errors="replace"),
                                    f"{PODMAN_UNIT_PATH} on {h.name} (podman generate systemd --new; podman < 4.4)"))
    label = volume_label((_state(ctx).get("runtimes", {}).get(h.name) or {}).get("selinux"))
    q = _state(ctx).get("quadlet") or render_quadlet(ctx, config_hash(ctx), label)
    out.append(MaskedConfig(q, QUADLET_PATH + (" (written: podman >= 4.4, Quadlet)" if uses_quadlet(ver) else
                                               " (for podman >= 4.4, Quadlet; not written here)")))
    return out


@step("Start the registry ({ctx.runtime}) on every registry host")
def start(ctx):
    """Idempotent: same config and running -> ok; config changed -> replaced/restarted."""
    digest = config_hash(ctx)
    rt = ctx.runtime
    hosts = ctx.hosts(ctx.registry_host)

    def one(h):
        if rt == "docker":
            # one read for both units another runtime may have left (instead of is-active + is-enabled)
            units = h.unit_states("docker-registry", PODMAN_UNIT) if h.has_systemd() else None
            _stop_other_daemon(h, units)
            if units and units[PODMAN_UNIT]["enabled"]:
                h.run(cmd("systemctl disable --now {u}", u=PODMAN_UNIT))  # runtime podman before: its port
            label, running = _docker_state(h)
            if label == digest and running:
                return {"host": h.name, "state": "running, config unchanged"}
            if label == digest:
                h.run(cmd("docker start {n}", n=CONTAINER_NAME))
                return {"host": h.name, "state": "started (was stopped)"}
            if label is not None:
                h.run(cmd("docker rm -f {n}", n=CONTAINER_NAME))
            h.run(docker_run_argv(ctx, digest))
            return {"host": h.name, "state": "replaced (config changed)" if label is not None else "created"}
        if rt == "podman":
            _stop_other_daemon(h)
            if h.test(cmd("command -v docker >/dev/null 2>&1 && docker inspect {n} >/dev/null 2>&1", n=CONTAINER_NAME)):
                h.run(cmd("docker rm -f {n}", n=CONTAINER_NAME))  # runtime docker before: its port
            return _start_podman(ctx, h, digest)
        # runtime systemd
        if h.test(cmd("docker inspect {n} >/dev/null 2>&1", n=CONTAINER_NAME)):
            h.run(cmd("docker rm -f {n}", n=CONTAINER_NAME))
        if h.has_systemd() and h.test(cmd("systemctl is-enabled --quiet {u}", u=PODMAN_UNIT)):
            h.run(cmd("systemctl disable --now {u}", u=PODMAN_UNIT))  # runtime podman before
        if h.has_systemd():
            return _start_systemd(ctx, h, digest)
        old, running = _daemon_state(h)
        if old == digest and running:
            return {"host": h.name, "state": "running, config unchanged (pidfile)"}
        if running:
            stop_daemon(h)
        start_daemon(h, SYSTEMD_CONFIG, digest)
        return {"host": h.name, "state": "restarted (config changed)" if running else "started (no systemd: pidfile)"}

    for r in journal.parallel(one, hosts):
        steps.row(**r)
    if not ctx.dry_run:
        wait_ready(ctx)
    steps.fact("config sha256", digest[:16])
    return digest


def _stop_other_daemon(h, units: dict | None = None):
    """The registry of runtime=systemd (our daemon, or its unit) makes way.  units: h.unit_states
    already read for docker-registry (or None: asked here)."""
    old, running = _daemon_state(h)
    if running:
        stop_daemon(h)
    if units is None and h.has_systemd():
        units = h.unit_states("docker-registry")
    if units and units["docker-registry"]["active"]:
        h.run(cmd("systemctl disable --now docker-registry"))


def _start_systemd(ctx, h, digest):
    unit = render_unit()
    h.put_file(UNIT_PATH, unit, mode=0o644)
    # the unit runs as docker-registry: it reads the 0640 files through its group
    for p in (SYSTEMD_CONFIG, f"{ctx.remote_dir}/auth/htpasswd", f"{ctx.remote_dir}/certs/registry-key.pem"):
        if not h.test(cmd("test \"$(stat -c %G {p})\" = docker-registry", p=p)):
            h.run(cmd("chgrp docker-registry {p}", p=p))
    old = h.run(cmd("cat {f} 2>/dev/null || true", f=HASHFILE), read=True).stdout.strip()
    active = h.test(cmd("systemctl is-active --quiet docker-registry"))
    if old == digest and active:
        return {"host": h.name, "state": "active, config unchanged"}
    h.run(cmd("systemctl daemon-reload && systemctl enable docker-registry && systemctl restart docker-registry "
              "&& echo {d} > {f}", d=digest, f=HASHFILE))
    return {"host": h.name, "state": "restarted (systemd)"}


def wait_ready(ctx, timeout: float = READY_TIMEOUT, healthy: bool = False):
    """Until /v2/ answers on every host: 401 (TLS up, auth on), or with healthy=True
    200 with credentials (the storage health check passes too)."""
    s = session(ctx, auth=healthy)
    want = (200,) if healthy else (401, 200)
    for host in P.as_list(ctx.registry_host):
        deadline, last = time.monotonic() + timeout, ""
        while True:
            try:
                r = s.get(url(ctx, host) + "/v2/", timeout=3)
                if r.status_code in want:
                    break
                last = f"HTTP {r.status_code}"
            except Exception as e:  # noqa: BLE001 - anything until it answers
                last = type(e).__name__
            if time.monotonic() > deadline:
                raise RegistryError(f"{host}: the registry did not answer on {url(ctx, host)}/v2/ within "
                                    f"{timeout:.0f}s (last: {last})",
                                    "look at `docker logs registry` (podman: `podman logs registry`, "
                                    f"`journalctl -u {PODMAN_UNIT}`; or /var/log/docker-registry.log) on that host")
            time.sleep(0.05)  # a refused connect costs ~1 ms: poll often, answer as soon as it listens


def deploy(ctx):
    """All steps in order (deploy.ipynb, tests)."""
    out = [preflight(ctx), install(ctx), bucket(ctx), htpasswd(ctx), configure(ctx), start(ctx)]
    if (_p(ctx, "lb_host", "") or "").strip():
        from . import lb
        out += lb.deploy(ctx)
    return out


# -------------------------------------------------------------------- verification
def probe(ctx, host: str) -> dict:
    """What the registry on one host answers (no secrets)."""
    anon, auth = session(ctx, auth=False), session(ctx)
    u = url(ctx, host) + "/v2/"
    out = {}
    r, err = _http(anon, "GET", u, host)
    out["anonymous"] = r.status_code if r is not None else err
    out["www_authenticate"] = (r.headers.get("WWW-Authenticate", "") if r is not None else "")
    r, err = _http(auth, "GET", u, host)
    out["with_credentials"] = r.status_code if r is not None else err
    # /v2/ answers 200 before the first storage health check: _catalog really lists the storage
    r, err = _http(auth, "GET", u + "_catalog?n=1", host)
    out["storage"] = r.status_code if r is not None else err
    bad = session(ctx, auth=False)
    bad.auth = (ctx.registry_user, "not-the-password")
    r, err = _http(bad, "GET", u, host)
    out["wrong_password"] = r.status_code if r is not None else err
    plain = session(ctx, auth=False)
    r, err = _http(plain, "GET", u.replace("https://", "http://"), host)
    # Go's TLS server answers plain HTTP with 400 "Client sent an HTTP request to an HTTPS server"
    out["plain_http"] = "refused" if (r is None or r.status_code == 400) else f"HTTP {r.status_code}"
    return out


def check(ctx):
    """Verdict: every host answers /v2/ 401 without credentials (Basic), 200 with them
    (storage healthy: a failing storage driver makes it 503), and refuses plain HTTP."""
    if ctx.dry_run:
        ctx.verdict(True, "dry run: nothing deployed")
        return
    bad, facts = [], {}
    for host in P.as_list(ctx.registry_host):
        p = probe(ctx, host)
        okh = (p["anonymous"] == 401 and p["www_authenticate"].startswith("Basic")
               and p["with_credentials"] == 200 and p["wrong_password"] == 401 and p["plain_http"] == "refused"
               and p["storage"] == 200)
        facts[url(ctx, host)] = (f"{p['anonymous']} without credentials (Basic), {p['with_credentials']} with, "
                                 f"{p['wrong_password']} with a wrong password, plain http {p['plain_http']}, "
                                 f"storage listing {p['storage']}")
        if not okh:
            bad.append(f"{host}: {p}")
    facts["storage"] = ctx.storage
    facts["runtime"] = ctx.runtime
    n_hosts = len(facts) - 2
    if (_p(ctx, "lb_host", "") or "").strip():
        from . import lb
        lb_ok, lb_facts = lb.check(ctx)
        facts.update(lb_facts)
        if not lb_ok:
            bad.append(f"load balancer {ctx.lb_host}: {lb_facts}")
    if bad:
        ctx.verdict(False, "registry not healthy: " + "; ".join(bad),
                           hint="503 with credentials = storage health failing (see 07-faq)", **facts)
    ctx.verdict(True, f"registry answers with TLS + basic auth on {n_hosts} host(s)"
                + (f" and through the load balancer {ctx.lb_host}" if (_p(ctx, "lb_host", "") or "").strip() else ""),
                **facts)


# -------------------------------------------------------------------- public names for other sections
# (07-faq reads the registry's state and asks its storage through these; same behaviour as the
# private helpers the steps above use)
def http_call(s, method, u, host, **kw):
    """One HTTP call to a registry, journaled like a command: (response or None, error text)."""
    return _http(s, method, u, host, **kw)


def curl_conf(**kv) -> str:
    """A curl config for `curl -K -` (secrets on stdin, never on a command line)."""
    return _curl_conf(**kv)


def config_for(ctx) -> dict:
    """The config.yml (as a dict) 04 renders for these parameters."""
    return _config_for(ctx)


def docker_state(h) -> tuple[str | None, bool]:
    """(config hash label, running) of the registry container on h; (None, False) when absent."""
    return _docker_state(h)


def daemon_state(h) -> tuple[str | None, bool]:
    """(config hash, running) of the registry run without systemd (pidfile) on h."""
    return _daemon_state(h)


# -------------------------------------------------------------------- registry 3 (08-migrate)
# Where the image reads its config.  registry:3 (distribution 3.0, Dockerfile and the Docker Hub
# image) reads /etc/distribution/config.yml; a config mounted at 2.x's path is IGNORED there and the
# container serves an empty filesystem registry.
CONTAINER_CONFIG = {2: "/etc/docker/registry/config.yml", 3: "/etc/distribution/config.yml"}


def container_config_path(registry_version: int = 2) -> str:
    """The config path inside the registry image of that major version."""
    return CONTAINER_CONFIG[3 if int(registry_version or 2) >= 3 else 2]


def registry3_problems(cfg: dict) -> list[str]:
    """What distribution 3.0 refuses or would silently do differently in a 2.x config.dict:
    swift/oss removed (the app panics: StorageDriver not registered), reporting and
    compatibility.schema1 removed (ignored: not parsed strictly), s3 with regionendpoint no longer
    forces path-style (RGW without wildcard DNS needs forcepathstyle: true), an s3 region left
    out becomes "<nil>", and redis' addr/pool keys replaced by go-redis options (addrs, poolsize...)."""
    problems = []
    st = cfg.get("storage") or {}
    for gone in ("swift", "oss"):
        if gone in st:
            problems.append(f"storage {gone}: registry 3 removed the {gone} driver (startup panics); "
                            "move the data to s3 first (08-migrate)")
    for key, why in (("reporting", "bugsnag/newrelic reporting was removed"),
                     ("compatibility", "schema1 support was removed (schema1 manifests can no longer be read)")):
        if key in cfg:
            problems.append(f"key {key!r}: {why} in registry 3; remove it")
    s3 = st.get("s3")
    if isinstance(s3, dict):
        if s3.get("regionendpoint") and s3.get("forcepathstyle") is not True:
            problems.append("storage.s3.forcepathstyle: registry 3 no longer forces path-style with regionendpoint; "
                            "set forcepathstyle: true (RGW without wildcard DNS)")
        if not s3.get("region"):
            problems.append("storage.s3.region: registry 3 needs it set (else the string \"<nil>\" is used)")
    redis = cfg.get("redis")
    if isinstance(redis, dict):
        if "addr" in redis:
            problems.append("redis.addr: registry 3 uses redis.addrs: [..] (go-redis UniversalOptions)")
        if "pool" in redis:
            problems.append("redis.pool: registry 3 uses maxidleconns/poolsize/connmaxidletime")
    return problems
