"""Section 5: push an image to the registry and prove it landed in RGW.

As the document: trust the CA where the client's engine looks
(`/etc/docker/certs.d/HOST:PORT/ca.crt`), `docker login`, `docker tag`, `docker push`,
then `rados --pool default.rgw.buckets.data ls` shows `docker/registry/v2/...` objects.
Clients: docker (the control node's dockerd), podman (RHEL/Rocky/Alma 8-9 and hardened Debian
hosts ship it and no docker: `/etc/containers/certs.d/HOST:PORT/ca.crt`, `podman login
--password-stdin`, `podman push --digestfile`) or skopeo.  No image can be pulled in the lab, so
the image is made locally: a tiny rootfs (busybox-static and one text file), tarred
deterministically, `docker import`ed / `podman import`ed, or laid out as an OCI image (skopeo).

Public: `trust`, `make_image`, `login`, `push`, `verify`, `storage_objects`, `logout`, `check`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time

from . import masking, params as P
from .errors import CheckFailed, CommandFailed, RunbookError
from .host import Command, cmd
from .journal import Result, record
from .steps import fact, mark_changed, note, row, step

DOCKER_CERTS = "/etc/docker/certs.d"
CONTAINERS_CERTS = "/etc/containers/certs.d"
DATA_POOL = "default.rgw.buckets.data"
V2 = "docker/registry/v2/"
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
)
ACCEPT = ", ".join(MANIFEST_TYPES)
MTIME = 1700000000  # fixed: the rootfs tar (hence the layer digest) is the same on every run
CREATED = "2023-11-14T22:13:20Z"
TIMEOUT_LOGIN = 60
TIMEOUT_PUSH = 600
SHOW_ROWS = 12
DIGEST_IN_TEXT = re.compile(r"digest: (sha256:[a-f0-9]{64})", re.I)


class PushError(CommandFailed):
    """A client command failed; `reason` names the cause (tls-untrusted, tls-name, auth, ...)."""

    def __init__(self, host, command, exit_code, stdout, stderr, reason, explanation, hint):
        super().__init__(host, command, exit_code, stdout, stderr, hint)
        self.reason = reason
        self.message = masking.mask(f"{explanation}\n{self.message}")


class TLSUntrusted(PushError):
    pass


class TLSNameMismatch(PushError):
    pass


class AuthFailed(PushError):
    pass


class RegistryUnreachable(PushError):
    pass


# -- pure helpers (unit-tested) -------------------------------------------------------

def split_image(image: str) -> tuple[str, str]:
    """'prom/node-exporter:v0.16.0' -> ('prom/node-exporter', 'v0.16.0'); no tag -> 'latest'."""
    last = image.split("/")[-1]
    if ":" in last:
        name, _, tag = image.rpartition(":")
        return name, tag
    return image, "latest"


def explain(text: str, target: str, client: str) -> tuple[str, str, str] | None:
    """(reason, explanation, hint) for a client's error text, or None when unknown."""
    t = text or ""
    certs = f"{DOCKER_CERTS}/{target}/ca.crt" if client == "docker" else f"{CONTAINERS_CERTS}/{target}/ca.crt"
    m = re.search(r"certificate is valid for ([^\n]*?), not ([^\s\"]+)", t)
    if m:
        return ("tls-name", f"TLS: the registry's certificate does not name the address used "
                f"({m.group(2)}); it is valid for {m.group(1)}.",
                f"re-issue the certificate with {m.group(2)} in its SANs (03-certs, then 04-registry), "
                "or push to an address the certificate names")
    if "crypto/rsa: verification error" in t or "verification error\" while trying to verify" in t:
        return ("tls-untrusted", f"TLS: {client} trusts a CA with the same name but another key: the registry's "
                "certificate was issued by a different CA (x509: certificate signed by unknown authority).",
                f"03-certs and 04-registry must have run with the same state_dir as this notebook (the CA at "
                f"{certs} must be the one that signed the registry's certificate); re-run 04-registry, then this")
    if ("certificate signed by unknown authority" in t or "unknown authority" in t
            or "certificate is not trusted" in t or "failed to verify certificate" in t):
        return ("tls-untrusted", f"TLS: {client} does not trust the registry's CA "
                f"(x509: certificate signed by unknown authority).",
                f"run the trust step (trust_ca=True) so that the CA is at {certs} on the client host, "
                f"and check that the directory is named exactly {target}")
    if "x509:" in t or "tls: " in t:
        return ("tls", "TLS handshake with the registry failed.",
                "check the registry's certificate (03-certs) and the CA the client trusts")
    if re.search(r"\b401\b|unauthorized|authentication required|invalid username/password", t, re.I):
        return ("auth", "401 Unauthorized: the registry refused the user name or password "
                "(unauthorized: authentication required).",
                "check registry_user and the password (env REGISTRY_PASSWORD or <state_dir>/secrets); "
                "04-registry writes the htpasswd entry for them")
    if re.search(r"\b405\b|UNSUPPORTED|operation is unsupported|method not allowed", t, re.I):
        return ("readonly", "405 from the registry: the registry is read-only for GC (storage.maintenance.readonly: "
                "06-operations garbage collection, gc_mode=readonly, is running); pulls work, pushes are refused.",
                "push again when garbage collection is done (06-operations switches every replica back to "
                "read-write one at a time)")
    if "server gave HTTP response to HTTPS client" in t:
        return ("http", "The registry answers plain HTTP, not HTTPS.",
                "deploy the registry with TLS (04-registry)")
    if re.search(r"\b503\b|Service Unavailable", t):
        return ("503", "503 from the registry: its storage driver health check fails.",
                "see 07-faq (login 503): GET /debug/health on the registry, check the storage backend")
    if re.search(r"\b416\b|InvalidRange", t):
        return ("416", "416 from RGW through the registry: RGW could not create a pool.",
                "see 07-faq (login 416): lower osd_pool_default_pg_num or raise mon_max_pg_per_osd")
    if re.search(r"connection refused|no route to host|i/o timeout|timed out|deadline exceeded"
                 r"|network is unreachable", t, re.I):
        return ("unreachable", f"The registry at {target} cannot be reached from the client host.",
                "check that 04-registry ran and the registry listens on registry_host:registry_port")
    return None


CLIENT_PACKAGES = {  # what to install for a client (Debian/Ubuntu; RHEL/Rocky/Alma)
    "docker": "docker.io (Debian/Ubuntu) or docker-ce; on RHEL/Rocky/Alma 8-9 use client=podman",
    "podman": "podman (apt-get install podman / dnf install podman)",
    "skopeo": "skopeo (apt-get install skopeo / dnf install skopeo)",
}


def client_problem(client: str, have: dict, rc: int, text: str) -> tuple[str, str]:
    """(why, hint) when `client` does not work on a host; have: {program: installed?} of
    docker/podman/skopeo there (what the host offers instead)."""
    others = [c for c in ("docker", "podman", "skopeo") if c != client and have.get(c)]
    if rc == 127 or not have.get(client, True):
        why = f"{client} is not installed"
        hint = f"install {CLIENT_PACKAGES[client]}"
        if others:
            hint += f", or use client={others[0]} (this host has {', '.join(others)})"
        return why, hint
    if client == "docker" and ("Cannot connect" in text or "docker daemon" in text):
        return "cannot reach its daemon", "start dockerd there (systemctl start docker), or choose another client_host"
    return "does not work", ("choose a client_host where the client works (local: the lab's control dockerd and "
                             "skopeo), or another client (docker | podman | skopeo)")


def error_for(reason: str):
    return {"tls-untrusted": TLSUntrusted, "tls-name": TLSNameMismatch, "tls": TLSUntrusted,
            "auth": AuthFailed, "unreachable": RegistryUnreachable}.get(reason, PushError)


def auth_b64(user: str, password: str) -> str:
    return base64.b64encode(f"{user}:{password}".encode()).decode()


def stored_auth(config_text: str | bytes | None, target: str) -> str | None:
    """The base64 'auth' a docker/containers auth file holds for target, or None."""
    if not config_text:
        return None
    try:
        d = json.loads(config_text)
    except ValueError:
        return None
    entry = (d.get("auths") or {}).get(target) or (d.get("auths") or {}).get(f"https://{target}") or {}
    return entry.get("auth")


def parse_push_digest(text: str) -> str | None:
    """`docker push` ends with 'TAG: digest: sha256:... size: N'."""
    found = DIGEST_IN_TEXT.findall(text or "")
    return found[-1] if found else None


def podman_auth_path_script() -> str:
    """Shell that prints podman's default auth file, as containers/image picks it:
    $REGISTRY_AUTH_FILE, else $XDG_RUNTIME_DIR/containers/auth.json, else /run/containers/UID/auth.json
    (root through sudo: /run/containers/0/auth.json, a tmpfs: gone after a reboot)."""
    return ('if [ -n "$REGISTRY_AUTH_FILE" ]; then printf %s "$REGISTRY_AUTH_FILE"; '
            'elif [ -n "$XDG_RUNTIME_DIR" ]; then printf %s "$XDG_RUNTIME_DIR/containers/auth.json"; '
            'else printf %s "/run/containers/$(id -u)/auth.json"; fi')


def parse_pull_digest(text: str) -> str | None:
    m = re.search(r"Digest: (sha256:[a-f0-9]{64})", text or "")
    return m.group(1) if m else None


def oci_docs(layer_digest: str, layer_size: int, diff_id: str, tag: str, arch: str = "amd64",
             image: str = "") -> dict[str, bytes]:
    """config, manifest and index.json of a one-layer OCI image (deterministic bytes)."""
    def dumps(o):
        return json.dumps(o, sort_keys=True, separators=(",", ":")).encode()
    config = dumps({
        "architecture": arch, "os": "linux", "created": CREATED,
        "config": {"Cmd": ["/bin/sh"], "Labels": {"org.opencontainers.image.ref.name": image or tag,
                                                   "runbook.stand-in": "made by 05-push"}},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": CREATED, "created_by": "runbook 05-push: busybox rootfs"}],
    })
    cdig = "sha256:" + hashlib.sha256(config).hexdigest()
    manifest = dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cdig, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest,
                    "size": layer_size}],
    })
    mdig = "sha256:" + hashlib.sha256(manifest).hexdigest()
    index = dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": mdig, "size": len(manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag}}]})
    return {"config": config, "config_digest": cdig.encode(), "manifest": manifest,
            "manifest_digest": mdig.encode(), "index": index}


def manifest_type(manifest: dict) -> str:
    """The manifest's media type; OCI manifests may leave the field out (podman's do): then by its config."""
    if manifest.get("mediaType"):
        return manifest["mediaType"]
    if "oci" in ((manifest.get("config") or {}).get("mediaType") or ""):
        return "application/vnd.oci.image.manifest.v1+json"
    return "?"


def manifest_digests(manifest: dict) -> tuple[list[str], str | None]:
    """(layer digests, config digest) of a schema 2 / OCI manifest (not schema 1's fsLayers)."""
    return [l["digest"] for l in manifest.get("layers", [])], (manifest.get("config") or {}).get("digest")


def classify_keys(keys: list[str], repo: str, blobs: list[str], infix: str | None = None
                  ) -> tuple[list[dict], list[str]]:
    """RADOS object names -> (rows about the repository and its blobs, blob digests found as data).

    RGW names a RADOS object `<bucket marker>_<key>`; the swift driver's keys are
    `[prefix/]files/docker/registry/v2/...`, the s3 driver's `[rootdirectory/]docker/registry/v2/...`.
    infix: what must stand between the marker's `_` and `docker/` (None: anything)."""
    rows, found = [], []
    rprefix = f"{V2}repositories/{repo}/"
    wanted = {b.split(":", 1)[1]: b for b in blobs}
    for k in sorted(keys):
        i = k.find(V2)
        if i < 0:
            continue
        if infix is not None and not k[:i].endswith("_" + infix):
            continue
        path = k[i:]
        if path.startswith(rprefix):
            rest = path[len(rprefix):]
            kind = ("layer link" if rest.startswith("_layers/") else "tag" if "/tags/" in rest
                    else "manifest revision" if "/revisions/" in rest else "upload" if rest.startswith("_uploads/")
                    else "other")
            m = re.search(r"sha256/([a-f0-9]{64})", rest)
            rows.append({"kind": kind, "digest": f"sha256:{m.group(1)[:12]}" if m else "",
                         "object": "…/" + _abbrev(rest)})
        else:
            m = re.match(rf"{V2}blobs/sha256/[a-f0-9]{{2}}/([a-f0-9]{{64}})/data$", path)
            if m and m.group(1) in wanted:
                found.append(wanted[m.group(1)])
                rows.append({"kind": "blob data", "digest": f"sha256:{m.group(1)[:12]}",
                             "object": "…/" + _abbrev(path[len(V2):])})
    return rows, sorted(set(found))


def _abbrev(path: str) -> str:
    """Long hex digests in an object key shortened to 12 characters (a short table, not a wall)."""
    return re.sub(r"\b([a-f0-9]{12})[a-f0-9]{52}\b", r"\1…", path)


# -- context helpers ---------------------------------------------------------------------

def target(ctx) -> str:
    """HOST:PORT of the registry as clients address it (lb_host when set, else the first registry_host)."""
    return f"{_client_address(ctx)}:{ctx.params['registry_port']}"


def _client_address(ctx) -> str:
    return (ctx.params.get("lb_host") or "").strip() or P.as_list(ctx.params["registry_host"])[0]


def remote_ref(ctx) -> str:
    repo, tag = split_image(ctx.params["image_name"])
    return f"{target(ctx)}/{repo}:{tag}"


def _client(ctx):
    return ctx.host(ctx.params.get("client_host") or "local")


def _p(ctx, name, default=None):
    return ctx.params.get(name, default)


def _mem(ctx) -> dict:
    """Per-run facts shared by the steps and check() (the kernel runs one notebook)."""
    return ctx.__dict__.setdefault("_push", {})


def _password(ctx) -> str | None:
    """The registry user's password (env REGISTRY_PASSWORD or the state dir's 0600 file, as
    04-registry keeps it); never generated here.  Registered with its base64 'user:password' form."""
    return ctx.secret("registry_password", user=ctx.params["registry_user"], generate=False)


def _workdir(ctx) -> str:
    """Where the client host keeps this section's files (image build, OCI layout, authfile)."""
    m = _mem(ctx)
    if "workdir" not in m:
        if (ctx.params.get("client_host") or "local") == "local":
            m["workdir"] = os.path.join(ctx.state_dir, "push")
        else:
            home = _client(ctx).run(Command('printf %s "$HOME"'), read=True).stdout.strip() or "/root"
            m["workdir"] = f"{home}/.runbook-registry/push"
    return m["workdir"]


def _slug(image: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", image)


def _run_client(ctx, c: Command, *, what: str, timeout: float, stdin=None, read=False, changed=None) -> Result:
    """A client command; a failure is explained (TLS, 401, SANs, unreachable) with a hint."""
    h = _client(ctx)
    res = h.run(c, read=read, changed=changed, check=False, stdin=stdin, timeout=timeout)
    if res.skipped or res.exit_code == 0:
        return res
    text = f"{res.stdout}\n{res.stderr}"
    if res.exit_code == 124 and "timed out" in res.stderr:
        text += " i/o timeout"
    why = explain(text, target(ctx), _p(ctx, "client", "docker"))
    if res.exit_code == 127:
        why = ("missing", f"{what}: the client program is not installed on {h.name}.",
               "install it there (docker.io / podman / skopeo), or choose another client_host")
    if why is None:
        # a full disk shows as a 500 or as the registry dropping the upload mid-PATCH
        # ("connection reset by peer"): ask df, whatever the client said
        why = _storage_full(ctx)
    reason, explanation, hint = why or ("failed", f"{what} failed.", "read the client's message below")
    raise error_for(reason)(h.name, str(c), res.exit_code, res.stdout, res.stderr, reason, explanation, hint)


# -- HTTP to the registry (from the control node, CA verified) -----------------------------

def _session(ctx):
    m = _mem(ctx)
    if "session" not in m:
        try:
            from . import registry
            s = registry.session(ctx)
        except (ImportError, AttributeError):
            import requests
            from . import certs
            s = requests.Session()
            s.trust_env = False  # REQUESTS_CA_BUNDLE would override verify=
            s.verify = certs.ca_path(ctx)
        if not s.auth:
            s.auth = (ctx.params["registry_user"], _password(ctx))
        m["session"] = s
    return m["session"]


def _url(ctx) -> str:
    try:
        from . import registry
        return registry.url(ctx, _client_address(ctx)).rstrip("/")
    except (ImportError, AttributeError):
        return f"https://{target(ctx)}"


def api(ctx, method: str, path: str, headers=None, timeout: float = 15):
    """One registry API call, journaled (masked) as an http read."""
    import requests
    url = _url(ctx) + path
    t0 = time.monotonic()
    try:
        r = _session(ctx).request(method, url, headers=headers, timeout=timeout, allow_redirects=True)
    except requests.exceptions.SSLError as e:
        record(Result("local", f"{method} {url}", 1, "", str(e), time.monotonic() - t0, read=True, kind="http"))
        raise RunbookError(f"TLS to {url} failed from the control node: {e}",
                           "the CA from 03-certs must have signed the registry's certificate (run 03, then 04)") from None
    except requests.RequestException as e:
        record(Result("local", f"{method} {url}", 1, "", str(e), time.monotonic() - t0, read=True, kind="http"))
        raise RunbookError(f"{method} {url} failed: {e}", "check that 04-registry ran and the registry answers") from None
    record(Result("local", f"{method} {url}", r.status_code, "", "", time.monotonic() - t0, read=True, kind="http",
                  no_log=True))
    if r.status_code == 401:
        _, explanation, hint = explain("401 unauthorized", target(ctx), _p(ctx, "client", "docker"))
        raise AuthFailed("local", f"{method} {url}", 401, "", r.text[:300], "auth", explanation, hint)
    return r


def registry_digest(ctx) -> tuple[str | None, dict | None]:
    """(Docker-Content-Digest, manifest) of image_name in the registry, or (None, None)."""
    repo, tag = split_image(ctx.params["image_name"])
    r = api(ctx, "GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": ACCEPT})
    if r.status_code == 404:
        return None, None
    if r.status_code != 200:
        # a 5xx naming a storage driver: the registry cannot reach its storage (RGW down?) - say so
        why = (" — the registry's storage driver failed" + (" (it cannot connect to its storage: is RGW down?)"
               if '"dial"' in r.text else "")) if r.status_code >= 500 and '"DriverName"' in r.text else ""
        raise RunbookError(f"GET manifest {repo}:{tag}: HTTP {r.status_code}{why} {r.text[:300]}",
                           "see 07-faq (503: storage health) and `docker logs registry`" if why else None)
    try:
        body = r.json()
    except ValueError:
        body = {}
    return r.headers.get("Docker-Content-Digest"), body


# -- steps -----------------------------------------------------------------------------------

def _ca_pem(ctx) -> bytes:
    from . import certs
    with open(certs.ca_path(ctx), "rb") as f:
        return f.read()


def _ca_dirs(ctx) -> list[str]:
    t = target(ctx)
    if _p(ctx, "client", "docker") == "docker":
        return [f"{DOCKER_CERTS}/{t}"]
    return [f"{CONTAINERS_CERTS}/{t}"]


def _preflight_client(ctx) -> None:
    """The client must work on client_host before anything is written there; when it does not,
    say which clients the host has (a RHEL-family host has podman and no docker)."""
    h, client = _client(ctx), _p(ctx, "client", "docker")
    if client == "docker":
        r = h.run(cmd("docker version --format {f}", f="{{.Server.Version}}"), read=True, check=False, timeout=30)
    elif client == "podman":
        r = h.run(cmd("podman version --format {f}", f="{{.Client.Version}}"), read=True, check=False, timeout=30)
    else:
        r = h.run(Command("skopeo --version"), read=True, check=False, timeout=30)
    if r.exit_code != 0:
        found = h.run(Command("for c in docker podman skopeo; do command -v $c >/dev/null 2>&1 && echo $c; done; true"),
                      read=True, check=False).stdout.split()
        have = {c: c in found for c in ("docker", "podman", "skopeo")}
        why, hint = client_problem(client, have, r.exit_code, r.stderr + r.stdout)
        raise RunbookError(f"client_host {h.name}: {why} ({(r.stderr or r.stdout).strip()[-300:]}); "
                           f"this host has: {', '.join(c for c in have if have[c]) or 'no container client'}; "
                           "nothing was changed", hint)
    fact("client", f"{client} {r.stdout.strip().split()[-1] if r.stdout.strip() else ''} on {h.name}".strip())


@step("Trust the registry's CA on {ctx.params[client_host]} ({ctx.params[client]})")
def trust(ctx):
    """Install the CA where the client's engine looks: docker -> /etc/docker/certs.d/HOST:PORT/ca.crt,
    podman and skopeo -> /etc/containers/certs.d/HOST:PORT/ca.crt (on client_host)."""
    h = _client(ctx)
    _preflight_client(ctx)
    try:
        pem = _ca_pem(ctx)
    except RunbookError:
        if not ctx.dry_run:
            raise
        note("dry run: no CA yet (03-certs has not run); would install it at " + ", ".join(_ca_dirs(ctx)))
        mark_changed()
        return None
    want = hashlib.sha256(pem).hexdigest()
    for d in _ca_dirs(ctx):
        path = f"{d}/ca.crt"
        if not _p(ctx, "trust_ca", True):
            have = h.read_file(path)
            state = ("present, the CA from 03-certs" if have and hashlib.sha256(have).hexdigest() == want
                     else "present but a DIFFERENT CA" if have else "ABSENT")
            fact(path, state)
            note("trust_ca=False: the CA is not installed; the client must already trust it.")
            continue
        h.put_file(path, pem, mode=0o644)
        fact(path, f"CA sha256 {want[:16]}")
    _note_skopeo_cache(ctx)


_BUILD = """set -e
W={w}
BB=$(command -v busybox || true)
test -n "$BB" || {{ echo 'busybox not found on the client host (apt-get install busybox-static)' >&2; exit 3; }}
rm -rf "$W/rootfs" && mkdir -p "$W/rootfs/bin" "$W/rootfs/etc"
cp "$BB" "$W/rootfs/bin/busybox" && ln -s busybox "$W/rootfs/bin/sh"
printf '%s\\n' {text} > "$W/rootfs/etc/runbook-image"
chmod 755 "$W/rootfs" "$W/rootfs/bin" "$W/rootfs/etc" "$W/rootfs/bin/busybox"
chmod 644 "$W/rootfs/etc/runbook-image"
tar --sort=name --mtime=@{mtime} --owner=0 --group=0 --numeric-owner --format=gnu -C "$W/rootfs" -cf "$W/rootfs.tar" .
rm -rf "$W/rootfs"
"""


def _build_rootfs(ctx, w: str) -> Result:
    text = f"stand-in for {ctx.params['image_name']}, made by runbook 05-push (no image can be pulled here)"
    script = _BUILD.format(w=cmd("{x}", x=w), text=cmd("{x}", x=text), mtime=MTIME)
    return _client(ctx).run(cmd("sh -c {s}", s=script), timeout=120, changed=False,
                            hint="the client host needs busybox (busybox-static) and GNU tar")


def _engine(ctx) -> str:
    """The program of an engine client (docker | podman): same verbs for import, tag, push, pull."""
    return _p(ctx, "client", "docker")


def _make_engine_image(ctx):
    """docker import / podman import of the busybox rootfs (podman names it localhost/NAME:TAG)."""
    h, image, eng = _client(ctx), ctx.params["image_name"], _engine(ctx)
    fmt = "{{.Id}}"
    r = h.run(cmd("{e} image inspect --format {f} {i}", e=eng, f=fmt, i=image), read=True, check=False, timeout=60)
    if r.exit_code == 0:
        fact("image", f"{image} exists locally ({r.stdout.strip()[:19]})")
        note("already there: not rebuilt")
        return r.stdout.strip()
    if r.exit_code == 127:
        raise CommandFailed(h.name, r.command, r.exit_code, r.stdout, r.stderr,
                            hint=f"{eng} is not installed on client_host: install {CLIENT_PACKAGES[eng]}")
    if "Cannot connect to the Docker daemon" in r.stderr or "permission denied" in r.stderr:
        raise CommandFailed(h.name, r.command, r.exit_code, r.stdout, r.stderr,
                            hint="start dockerd on the client host (the lab's control dockerd: lab up)")
    w = _workdir(ctx)
    h.run(cmd("mkdir -p {w}", w=w), changed=False)
    _build_rootfs(ctx, w)
    h.run(cmd("{e} import --change {c} --message {m} {t} {i}", e=eng, c='CMD ["/bin/sh"]',
              m="runbook 05-push stand-in", t=f"{w}/rootfs.tar", i=image), timeout=120)
    h.run(cmd("rm -f {t}", t=f"{w}/rootfs.tar"), changed=False)
    if ctx.dry_run:
        return None
    r = h.run(cmd("{e} image inspect --format {f} {i}", e=eng, f=fmt, i=image), read=True, timeout=60)
    fact("image", f"{image} imported ({r.stdout.strip()[:19]})")
    return r.stdout.strip()


def _oci_dir(ctx) -> str:
    return f"{_workdir(ctx)}/oci/{_slug(split_image(ctx.params['image_name'])[0])}"


def _oci_manifest_digest(ctx) -> str | None:
    """The manifest digest the OCI layout holds for the tag (what skopeo will push), or None."""
    h = _client(ctx)
    _, tag = split_image(ctx.params["image_name"])
    idx = h.read_file(f"{_oci_dir(ctx)}/index.json")
    if not idx:
        return None
    try:
        for m in json.loads(idx).get("manifests", []):
            if (m.get("annotations") or {}).get("org.opencontainers.image.ref.name") == tag:
                hexd = m["digest"].split(":", 1)[1]
                if h.exists(f"{_oci_dir(ctx)}/blobs/sha256/{hexd}"):
                    return m["digest"]
    except (ValueError, KeyError):
        return None
    return None


def _make_oci_image(ctx):
    h, image = _client(ctx), ctx.params["image_name"]
    have = _oci_manifest_digest(ctx)
    d = _oci_dir(ctx)
    if have:
        fact("image", f"oci:{d}:{split_image(image)[1]} ({have[:19]})")
        note("already there: not rebuilt")
        return have
    w = _workdir(ctx)
    h.run(cmd("mkdir -p {w}", w=w), changed=False)
    _build_rootfs(ctx, w)
    if ctx.dry_run:
        note(f"would lay out an OCI image at {d}")
        mark_changed()
        return None
    sums = h.run(cmd("gzip -n -c {t} > {g} && sha256sum {t} {g} && stat -c %s {g}",
                     t=f"{w}/rootfs.tar", g=f"{w}/layer.tar.gz"), changed=False).stdout.split()
    diff_id, layer, size = "sha256:" + sums[0], "sha256:" + sums[2], int(sums[4])
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(h.run(Command("uname -m"), read=True).stdout.strip(), "amd64")
    docs = oci_docs(layer, size, diff_id, split_image(image)[1], arch, image)
    blobs = f"{d}/blobs/sha256"
    h.run(cmd("mkdir -p {b} && mv -f {g} {b}/{x} && rm -f {t}", b=blobs, g=f"{w}/layer.tar.gz", x=layer[7:],
              t=f"{w}/rootfs.tar"), changed=False)
    h.put_file(f"{blobs}/{docs['config_digest'].decode()[7:]}", docs["config"])
    h.put_file(f"{blobs}/{docs['manifest_digest'].decode()[7:]}", docs["manifest"])
    h.put_file(f"{d}/oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    h.put_file(f"{d}/index.json", docs["index"])
    mark_changed()
    digest = docs["manifest_digest"].decode()
    fact("image", f"oci:{d}:{split_image(image)[1]} ({digest[:19]})")
    return digest


@step("Make the image {ctx.params[image_name]} on {ctx.params[client_host]}")
def make_image(ctx):
    """A real image the lab can make without pulling: busybox rootfs, docker/podman import / OCI layout."""
    if _p(ctx, "client", "docker") in ("docker", "podman"):
        return _make_engine_image(ctx)
    return _make_oci_image(ctx)


def _docker_config_path(ctx) -> str:
    d = _client(ctx).run(Command('printf %s "${DOCKER_CONFIG:-$HOME/.docker}"'), read=True).stdout.strip()
    return f"{d}/config.json"


def _authfile(ctx) -> str:
    return f"{_workdir(ctx)}/auth.json"


def _podman_auth_path(ctx) -> str:
    """podman's own auth file on client_host (what a later `podman pull` by hand uses too)."""
    m = _mem(ctx)
    if "podman_auth" not in m:
        m["podman_auth"] = _client(ctx).run(cmd("sh -c {s}", s=podman_auth_path_script()), read=True).stdout.strip()
    return m["podman_auth"]


def _login_path(ctx) -> str:
    client = _p(ctx, "client", "docker")
    return (_docker_config_path(ctx) if client == "docker" else _podman_auth_path(ctx) if client == "podman"
            else _authfile(ctx))


@step("Log in to {ctx.params[registry_host]}:{ctx.params[registry_port]} as {ctx.params[registry_user]}")
def login(ctx):
    """docker login HOST:PORT -u USER --password-stdin (writes ~/.docker/config.json), podman login
    (its own auth file: as root /run/containers/0/auth.json), or skopeo login --authfile
    <workdir>/auth.json (0600).  Skipped when the stored credentials are already the current ones."""
    h, t, user = _client(ctx), target(ctx), ctx.params["registry_user"]
    pw = _password(ctx)
    if not pw and ctx.dry_run:
        note("dry run: no registry password yet (04-registry has not run); would log in")
        mark_changed()
        return None
    if not pw:
        raise RunbookError("no registry password known",
                           "set env REGISTRY_PASSWORD or run 04-registry first (same state_dir)")
    masking.register(pw, derived_for_user=user)  # the base64 in config.json is masked too
    client = _p(ctx, "client", "docker")
    path = _login_path(ctx)
    fact("credentials file", path)
    if stored_auth(h.read_file(path), t) == auth_b64(user, pw):
        api(ctx, "GET", "/v2/")  # and the registry still accepts them (401 -> AuthFailed)
        note(f"{path} already holds the current credentials for {t}, and the registry accepts them: no new login.")
        return path
    if client in ("docker", "podman"):
        c = cmd("{e} login {t} -u {u} --password-stdin", e=client, t=t, u=user)
    else:
        h.run(cmd("mkdir -p {w}", w=_workdir(ctx)), changed=False)
        c = cmd("skopeo login --authfile {a} -u {u} --password-stdin {t}", a=path, u=user, t=t)
    _run_client(ctx, c, what="login", timeout=TIMEOUT_LOGIN, stdin=pw + "\n")
    if client == "skopeo":
        h.run(cmd("chmod 600 {a}", a=path), changed=False)
    note(f"Login Succeeded: {path} now holds base64(user:password) for {t} (shown here as ****).")
    return path


def parse_inspects(text: str, n: int) -> list[tuple[str, list]]:
    """_tag_engine's read (a line "ID REPODIGESTS-JSON" per image, "-" for a missing one) -> n
    (id, repo digests); ("", []) for a missing or unreadable image.  (Pure.)"""
    out = []
    lines = text.splitlines()
    for i in range(n):
        iid, _, rest = (lines[i] if i < len(lines) else "").strip().partition(" ")
        try:
            digests = json.loads(rest) if rest else []
        except ValueError:
            digests = []
        out.append(("" if iid in ("", "-") else iid, digests if isinstance(digests, list) else []))
    return out


def _tag_engine(ctx) -> list:
    """Tag image_name as the registry's ref unless it already names the same image.  Returns the
    repo digests the ref's image then has (for _pushed_already): both images are read in one
    command (ids and digests), instead of three `image inspect` one after the other."""
    h, image, ref, eng = _client(ctx), ctx.params["image_name"], remote_ref(ctx), _engine(ctx)
    fmt = "{{.Id}} {{json .RepoDigests}}"
    r = h.run(cmd("for i in {imgs}; do {e} image inspect --format {f} \"$i\" 2>/dev/null || echo -; done",
                  imgs=[image, ref], e=eng, f=fmt), read=True, check=False)
    (src, src_digests), (dst, dst_digests) = parse_inspects(r.stdout, 2)
    if src and src == dst:
        fact("tag", f"{ref} (already on {src[:19]})")
        return dst_digests
    t = h.run(cmd("{e} tag {a} {b}", e=eng, a=image, b=ref))
    fact("tag", ref)
    # repo digests belong to the image, not to a name: after the tag the ref names src's image
    # (dry-run: the tag did not happen, the ref still names what it named)
    return dst_digests if t.skipped else src_digests


def _pushed_already(ctx, reg_digest: str | None, known: list) -> bool:
    """Does the local image already know the registry's digest (it pushed, or pulled back, exactly
    that)?  docker records it on push; podman on pull (05's pull back), and it also lists every name
    of the image with the digest of its local manifest — which then names this very image too.
    known: the repo digests of the ref's image (from _tag_engine's read)."""
    if not reg_digest:
        return False
    repo, _ = split_image(ctx.params["image_name"])
    return f"{target(ctx)}/{repo}@{reg_digest}" in (known or [])


@step("Push {ctx.params[image_name]} to {ctx.params[registry_host]}:{ctx.params[registry_port]}")
def push(ctx):
    """docker tag + docker push (digest from 'digest: sha256:...'), podman tag + podman push
    --digestfile (podman prints no digest), or skopeo copy oci:... docker://... (--digestfile).
    Nothing is pushed when the registry already has the tag at that digest."""
    h, ref, m = _client(ctx), remote_ref(ctx), _mem(ctx)
    client = _p(ctx, "client", "docker")
    try:
        reg, _ = registry_digest(ctx)
    except RunbookError as e:
        if not ctx.dry_run:
            raise
        note(f"dry run: the registry cannot be asked yet ({str(e).splitlines()[0]}); would tag and push {ref}")
        mark_changed()
        return None
    fact("registry had", reg or "nothing under that tag")
    if client in ("docker", "podman"):
        known = _tag_engine(ctx)
        if _pushed_already(ctx, reg, known):
            note("the registry already has this image at that digest: not pushed again.")
            m["client_digest"] = reg
            fact("digest", reg)
            return reg
    if client == "docker":
        res = _run_client(ctx, cmd("docker push {r}", r=ref), what="docker push", timeout=TIMEOUT_PUSH)
        if res.skipped:
            return None
        digest = parse_push_digest(res.stdout)
        if not digest:
            raise CheckFailed(f"docker push printed no digest:\n{res.stdout[-800:]}")
        layers = re.findall(r"^([0-9a-f]{12}): (Pushed|Layer already exists|Mounted from .*)$", res.stdout, re.M)
        for lid, what in layers:
            row(layer=lid, result=what)
    elif client == "podman":
        w = _workdir(ctx)
        df = f"{w}/pushed.digest"
        h.run(cmd("mkdir -p {w}", w=w), changed=False)
        res = _run_client(ctx, cmd("podman push --digestfile {df} {r}", df=df, r=ref), what="podman push",
                          timeout=TIMEOUT_PUSH)
        if res.skipped:
            return None
        digest = (h.read_file(df) or b"").decode().strip()
        if not digest.startswith("sha256:"):
            raise CheckFailed(f"podman push wrote no digest to {df}:\n{(res.stdout + res.stderr)[-800:]}")
        for line in (res.stdout + res.stderr).splitlines():  # podman reports progress on stderr
            if line.startswith(("Copying blob", "Copying config")):
                row(action=line.strip()[:80])
    else:
        want = _oci_manifest_digest(ctx)
        if want and reg == want:
            note("the registry already has this image at that digest: not pushed again.")
            m["client_digest"] = reg
            fact("digest", reg)
            return reg
        w = _workdir(ctx)
        df = f"{w}/pushed.digest"
        src = f"oci:{_oci_dir(ctx)}:{split_image(ctx.params['image_name'])[1]}"
        c = cmd("env TMPDIR={w} skopeo copy --authfile {a} --digestfile {df} {src} {dst}",
                w=w, a=_authfile(ctx), df=df, src=src, dst=f"docker://{ref}")
        res = _run_client(ctx, c, what="skopeo copy", timeout=TIMEOUT_PUSH)
        if res.skipped:
            return None
        digest = (h.read_file(df) or b"").decode().strip()
        for line in res.stdout.splitlines():
            if line.startswith(("Copying blob", "Copying config")):
                row(action=line.strip()[:80])
    m["client_digest"] = digest
    fact("pushed", ref)
    fact("digest", digest)
    return digest


@step("Prove it landed: catalog, tags, digest, pull back")
def verify(ctx):
    """Over the API (CA verified): the repository in _catalog, the tag in tags/list, the
    Docker-Content-Digest equal to the client's, every blob present; then pull it back."""
    m, repo_tag = _mem(ctx), split_image(ctx.params["image_name"])
    repo, tag = repo_tag
    want = m.get("client_digest")
    if ctx.dry_run and not want:
        note("dry run: nothing was pushed, nothing to verify")
        return None
    repos, path = [], "/v2/_catalog?n=1000"
    while path:
        r = api(ctx, "GET", path)
        repos += r.json().get("repositories") or []
        nxt = r.links.get("next", {}).get("url")
        path = nxt if nxt and nxt.startswith("/") else None
    if repo not in repos:
        raise CheckFailed(f"{repo} is not in the registry's catalog", f"catalog: {repos[:20]}")
    fact("catalog", f"{repo} listed ({len(repos)} repositories)")
    tags = api(ctx, "GET", f"/v2/{repo}/tags/list").json().get("tags") or []
    if tag not in tags:
        raise CheckFailed(f"tag {tag} is not in tags/list of {repo}", f"tags: {tags}")
    fact("tags", ", ".join(sorted(tags)[:10]))
    digest, manifest = registry_digest(ctx)
    fact("Docker-Content-Digest", digest)
    fact("client reported", want)
    if digest != want:
        raise CheckFailed(f"the registry serves {repo}:{tag} at {digest}, the client pushed {want}",
                          hint="another push to the same tag happened in between; run again")
    layers, config = manifest_digests(manifest or {})
    fact("manifest", f"{manifest_type(manifest or {})}, {len(layers)} layer(s)")
    for b in layers + ([config] if config else []):
        code = api(ctx, "HEAD", f"/v2/{repo}/blobs/{b}").status_code
        row(blob=b[:19] + "…", role="config" if b == config else "layer", http=code)
        if code != 200:
            raise CheckFailed(f"blob {b} of {repo}:{tag}: HTTP {code}")
    _note_skopeo_cache(ctx)
    pulled = _pull_back(ctx, want)
    _cleanup_skopeo_cache(ctx)
    fact("pulled back", pulled)
    if pulled != want:
        raise CheckFailed(f"pulling {remote_ref(ctx)} back gave {pulled}, the push gave {want}")
    m.update(registry_digest=digest, layers=layers, config=config)
    return {"digest": digest, "layers": layers, "config": config}


def _pull_back(ctx, want: str | None = None) -> str | None:
    h, ref = _client(ctx), remote_ref(ctx)
    client = _p(ctx, "client", "docker")
    if client == "docker":
        res = _run_client(ctx, cmd("docker pull {r}", r=ref), what="docker pull", timeout=TIMEOUT_PUSH, read=True)
        return parse_pull_digest(res.stdout)
    if client == "podman":
        # podman pull prints no digest: pull by tag (as a user does), then by the pushed digest,
        # which podman refuses unless the manifest the registry serves hashes to it
        _run_client(ctx, cmd("podman pull {r}", r=ref), what="podman pull", timeout=TIMEOUT_PUSH, read=True)
        if not want:
            return None
        by_digest = f"{ref.rpartition(':')[0]}@{want}"
        _run_client(ctx, cmd("podman pull {r}", r=by_digest), what="podman pull by digest", timeout=TIMEOUT_PUSH,
                    read=True)
        return want
    w = _workdir(ctx)
    d = f"{w}/pulled"
    c = cmd("rm -rf {d} && env TMPDIR={w} skopeo copy --authfile {a} {src} {dst} && skopeo manifest-digest {mf}",
            d=d, w=w, a=_authfile(ctx), src=f"docker://{ref}", dst=f"dir:{d}", mf=f"{d}/manifest.json")
    res = _run_client(ctx, c, what="skopeo copy (pull back)", timeout=TIMEOUT_PUSH, read=True)
    out = res.stdout.strip().splitlines()
    h.run(cmd("rm -rf {d}", d=d), read=True)
    return out[-1].strip() if out else None


REGISTRY_CONFIG_IN_CONTAINER = "/etc/docker/registry/config.yml"
SYSTEMD_CONFIG = "/etc/docker/registry/config.yml"


def _storage(ctx) -> dict:
    """{'driver': swift|s3|filesystem, 'host_root': ...} of the registry that runs on the first
    registry host, read from its config.yml (never shown: it holds keys) and its mounts."""
    m = _mem(ctx)
    if "storage" in m:
        return m["storage"]
    h = ctx.host(P.as_list(ctx.params["registry_host"])[0])
    from . import registry
    mounts = {}
    # docker's or podman's (runtime=podman) container: the same mounts; the first engine that has
    # it answers (one command: registry.container_engine and then an inspect would be two)
    r = h.run(cmd("for e in {engines}; do command -v \"$e\" >/dev/null 2>&1 && \"$e\" inspect --type container "
                  "--format {f} {n} 2>/dev/null && exit 0; done; exit 1", engines=list(registry.CONTAINER_RUNTIMES),
                  n=registry.CONTAINER_NAME, f="{{range .Mounts}}{{.Destination}}={{.Source}}\n{{end}}"),
              read=True, check=False, timeout=30)
    if r.exit_code == 0:
        for line in r.stdout.splitlines():
            dst, _, src = line.partition("=")
            if dst:
                mounts[dst] = src
        cfg_path = mounts.get(REGISTRY_CONFIG_IN_CONTAINER)
    else:
        cfg_path = SYSTEMD_CONFIG
    info = {"driver": "unknown", "config": cfg_path}
    text = h.read_file(cfg_path) if cfg_path else None
    if text:
        import yaml
        try:
            cfg = yaml.safe_load(text) or {}
        except yaml.YAMLError:
            cfg = {}
        st = cfg.get("storage") or {}
        for d in ("swift", "s3", "filesystem", "inmemory"):
            if d in st:
                info["driver"] = d
                opts = st[d] or {}
                if d == "filesystem":
                    root = opts.get("rootdirectory", "/var/lib/registry")
                    # in a container: the host path of the volume holding rootdirectory
                    src = [(k, v) for k, v in mounts.items() if root == k or root.startswith(k.rstrip("/") + "/")]
                    info["host_root"] = (src[0][1] + root[len(src[0][0]):]) if src else (None if mounts else root)
                elif d == "swift":
                    info["container"] = opts.get("container")
                    info["prefix"] = (opts.get("prefix") or "").strip("/")
                elif d == "s3":
                    info["container"] = opts.get("bucket")
                    info["prefix"] = (opts.get("rootdirectory") or "").strip("/")
    m["storage"] = info
    return info


def _storage_full(ctx, min_free_kb: int = 1024 * 100):
    """After an unexplained push failure: is the registry's filesystem storage (nearly) full?  (A read.)"""
    info = _storage(ctx)
    root = info.get("host_root")
    if info.get("driver") != "filesystem" or not root:
        return None
    h = ctx.host(P.as_list(ctx.params["registry_host"])[0])
    r = h.run(cmd("df -Pk {d}", d=root), read=True, check=False)
    fields = r.stdout.splitlines()[-1].split() if r.exit_code == 0 and r.stdout.strip() else []
    if len(fields) >= 4 and fields[3].isdigit() and int(fields[3]) < min_free_kb:
        return ("storage-full", f"the registry's storage is full: {fields[3]} KB free on {fields[5] if len(fields) > 5 else root} "
                f"({root} on {h.name}); the registry answered 500 to the upload.",
                "free space there or grow the volume (images already stored are intact), "
                "or delete images and run garbage collection (06-operations)")
    return None


def storage_infix(info: dict) -> str | None:
    """What the driver puts before docker/registry/v2/ in an object key (see classify_keys)."""
    pre = info.get("prefix") or ""
    if info.get("driver") == "swift":
        return (pre + "/" if pre else "") + "files/"
    if info.get("driver") == "s3":
        return pre + "/" if pre else ""
    return None


@step("List the registry's objects in storage (RGW pool on {ctx.params[rgw_host]})")
def storage_objects(ctx):
    """As the document: `rados --pool default.rgw.buckets.data ls` on rgw_host, the
    docker/registry/v2/repositories/<name>/... keys, and each layer's blob data object.
    Filesystem storage: the files under the registry's rootdirectory on the registry host."""
    m = _mem(ctx)
    repo, _ = split_image(ctx.params["image_name"])
    if ctx.dry_run and not m.get("client_digest"):
        note("dry run: nothing was pushed, nothing to list")
        return None
    st = _storage(ctx)
    fact("storage", st["driver"] + (f" (container {st['container']})" if st.get("container") else ""))
    layers, config = m.get("layers"), m.get("config")
    if layers is None:
        _, manifest = registry_digest(ctx)
        layers, config = manifest_digests(manifest or {})
    blobs = list(layers) + ([config] if config else [])
    if st["driver"] in ("swift", "s3"):
        out = ctx.host(ctx.params["rgw_host"]).run(cmd("rados --pool {p} ls", p=DATA_POOL), read=True,
                                                  timeout=120, hint="the Ceph admin keyring must be on rgw_host").stdout
        keys, where = out.split(), f"RGW pool {DATA_POOL}"
    elif st["driver"] == "filesystem" and st.get("host_root"):
        root = st["host_root"].rstrip("/")
        out = ctx.host(P.as_list(ctx.params["registry_host"])[0]).run(
            cmd("find {d} -type f", d=f"{root}/{V2}"), read=True, check=False, timeout=60).stdout
        keys, where = out.split(), f"{root} on the registry host"
    else:
        note(f"storage {st['driver']}: the data is not in RGW and there is no directory to list.")
        m["storage_done"], m["rgw_layers"] = st["driver"], None
        return None
    rows, found = classify_keys(keys, repo, blobs, storage_infix(st))
    kinds = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    for r in _short(rows):
        row(**r)
    if len(rows) > SHOW_ROWS:
        note(f"{len(rows) - SHOW_ROWS} more object(s) not shown.")
    fact("objects", f"{len(rows)} for {repo} in {where} (" + ", ".join(f"{v} {k}" for k, v in kinds.items()) + ")")
    have_layers = [b for b in layers if b in found]
    fact("layers stored", f"{len(have_layers)} of {len(layers)} (blob data objects)")
    m["rgw_layers"], m["storage_done"] = len(have_layers), st["driver"]
    missing = [b for b in blobs if b not in found]
    if missing:
        raise CheckFailed(f"{len(missing)} blob(s) of {repo} have no data object in {where}",
                          "; ".join(missing), hint="is the registry storing where 04-registry said (storage=...)?")
    return {"objects": len(rows), "layers": len(have_layers), "driver": st["driver"]}


def _short(rows: list[dict]) -> list[dict]:
    """A short table: tags and manifests first, then layer links and blob data."""
    order = {"tag": 0, "manifest revision": 1, "layer link": 2, "blob data": 3}
    return sorted(rows, key=lambda r: order.get(r["kind"], 9))[:SHOW_ROWS]


@step("Log out of {ctx.params[registry_host]}:{ctx.params[registry_port]}")
def logout(ctx):
    """With logout=True: remove the stored credentials (docker logout / podman logout / skopeo logout)."""
    if not _p(ctx, "logout", False):
        note("logout=False: the credentials stay in the client's auth file (docker: ~/.docker/config.json, "
             "podman: its auth.json, skopeo: the state dir's).")
        return None
    h, t = _client(ctx), target(ctx)
    client = _p(ctx, "client", "docker")
    path = _login_path(ctx)
    if not stored_auth(h.read_file(path), t):
        note(f"{path} holds no credentials for {t}.")
        return None
    c = (cmd("{e} logout {t}", e=client, t=t) if client in ("docker", "podman")
         else cmd("skopeo logout --authfile {a} {t}", a=path, t=t))
    h.run(c, timeout=30)
    return path


SKOPEO_CACHE = "/var/lib/containers/cache/blob-info-cache-v1.boltdb"


def _note_skopeo_cache(ctx) -> None:
    m = _mem(ctx)
    if _p(ctx, "client") == "skopeo" and "cache_existed" not in m:
        m["cache_existed"] = _client(ctx).exists(SKOPEO_CACHE)


def _cleanup_skopeo_cache(ctx) -> None:
    """skopeo writes its blob-info cache outside the state dir: removed when this run made it."""
    m = _mem(ctx)
    if _p(ctx, "client") != "skopeo" or m.get("cache_existed", True) or ctx.dry_run:
        return
    _client(ctx).run(cmd("rm -f {f}; rmdir {d} 2>/dev/null; true", f=SKOPEO_CACHE, d=os.path.dirname(SKOPEO_CACHE)),
                     changed=False)
    m["cache_existed"] = True


def check(ctx) -> None:
    """The outcome: the registry serves the pushed digest, and its layers are in RGW."""
    image, t, m = ctx.params["image_name"], target(ctx), _mem(ctx)
    client = _p(ctx, "client", "docker")
    if ctx.dry_run and not m.get("client_digest"):
        ctx.verdict(True, f"nothing pushed (dry run); would push {image} to {t} with {client}")
        return
    digest, manifest = registry_digest(ctx)
    want = m.get("client_digest")
    if not digest:
        ctx.verdict(False, f"{image} is not in the registry at {t}", hint="run the push step")
        return
    if want and digest != want:
        ctx.verdict(False, f"{t} serves {image} at {digest}, the client pushed {want}",
                    hint="another push to the same tag happened in between; run again")
        return
    if "storage_done" not in m:
        storage_objects(ctx)
    layers = manifest_digests(manifest or {})[0]
    n, driver = m.get("rgw_layers"), m.get("storage_done")
    if driver in ("swift", "s3"):
        where = f"{n} layer{'' if n == 1 else 's'} in RGW"
    elif driver == "filesystem" and n is not None:
        where = f"{n} layer{'' if n == 1 else 's'} on the registry host's filesystem"
    else:
        where = f"storage {driver} (not listed)"
    ok = n is None or n == len(layers)
    ctx.verdict(ok, f"pushed {image} to {t}, {where}", client=client, digest=digest,
                layers=len(layers), storage=driver)


# -- public names for other sections (07-faq drives the same client the same way) -------------------

def client_of(ctx):
    """The host the client runs on (client_host; "local" = the control node)."""
    return _client(ctx)


def stored_login_path(ctx) -> str:
    """Where the client keeps its login for the registry: docker's config.json
    (${DOCKER_CONFIG:-$HOME/.docker}/config.json on client_host), podman's auth file (as root
    /run/containers/0/auth.json), or skopeo's authfile of 05-push."""
    return _login_path(ctx)
