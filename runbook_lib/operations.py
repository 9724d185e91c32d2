"""Section 6: operating the registry — its HTTP API, deletes, garbage collection.

The document's curl commands, done with one keep-alive `requests.Session`:

    catalog (paginated with `Link: <...>; rel="next"`), tags of a repository,
    the digest of an image (`Docker-Content-Digest`), deleting an image (DELETE the
    manifest by digest), deleting a layer (DELETE a blob), and, on the registry host,
    `registry garbage-collect` — the only thing that frees space.

`RegistryClient` needs only (base_url, ca_path, user, password): it is usable outside
a notebook.  The `@step` functions below take the notebook's `ctx`.  Every mutating
HTTP call is journaled (`kind="http"`) and, in dry-run, recorded as skipped instead
of being sent.
"""
from __future__ import annotations

import contextvars
import datetime as dt
import fnmatch
import hashlib
import importlib.util
import json
import re
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlparse

from . import masking, steps
from .errors import CommandFailed, ParameterError, RunbookError
from .host import cmd
from .journal import Result, record

# Sent on every manifest request: without the OCI types an OCI image 404s, and
# without the docker v2 type 2.x converts a v2 image to schema 1 (another digest).
DOCKER_V2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_TYPES = (DOCKER_V2, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX)
ACCEPT = ", ".join(MANIFEST_TYPES)
INDEX_TYPES = (DOCKER_LIST, OCI_INDEX)
SHORT_TYPE = {DOCKER_V2: "docker v2 (schema 2)", DOCKER_LIST: "docker manifest list", OCI_MANIFEST: "OCI manifest",
              OCI_INDEX: "OCI index", DOCKER_V1: "docker schema 1"}

DIGEST_RE = re.compile(r"^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
SHA256_RE = re.compile(r"^sha256:[a-f0-9]{64}$")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")
MAX_PAGE = 1000  # distribution: n > 1000 -> 400 PAGINATION_NUMBER_INVALID
DEFAULT_CONFIG = "/etc/docker/registry/config.yml"
SYSTEMD_BINARY = "/usr/bin/docker-registry"
PODMAN_UNIT = "container-registry.service"  # = registry.PODMAN_UNIT (04's runtime=podman)

# What a registry error code means here, and what to do about it.
EXPLAIN = {
    "UNAUTHORIZED": ("authentication failed", "check registry_user and the password (REGISTRY_PASSWORD or the "
                     "state dir's secrets/registry_password, written by 04-registry)"),
    "DENIED": ("access denied", "this user may not do that"),
    "NAME_UNKNOWN": ("repository not known to this registry", "check the repository name against the catalog"),
    "NAME_INVALID": ("invalid repository name", "lowercase letters, digits, . _ - separators, components split by /"),
    "MANIFEST_UNKNOWN": ("no such tag or manifest in this repository", "check the tag against the repository's tags"),
    "MANIFEST_BLOB_UNKNOWN": ("a blob the manifest references is missing", "the image is broken: re-push it"),
    "BLOB_UNKNOWN": ("no such blob in this repository", "the layer is not linked to this repository (already deleted?)"),
    "TAG_INVALID": ("invalid tag", "letters, digits, _ . -, at most 128 characters"),
    "DIGEST_INVALID": ("the registry wants a digest here", "registry 2.x deletes manifests by digest only, never by "
                       "tag name: resolve the tag to its Docker-Content-Digest first (delete_tag does that)"),
    "UNSUPPORTED": ("405: the registry is read-only for GC (storage.maintenance.readonly), or deletes are "
                    "disabled on it", "while 06-operations' garbage collection runs (gc_mode=readonly) every "
                    "write is refused: try again when it is done; otherwise set storage.delete.enabled: true in "
                    "its config.yml (04-registry) and restart it; nothing was deleted"),
    "PAGINATION_NUMBER_INVALID": ("page size too large", f"the registry accepts n <= {MAX_PAGE}: lower page_size"),
}


class RegistryError(RunbookError):
    """The registry answered an error.  Fields: status, code, method, path."""

    def __init__(self, message: str, hint: str | None = None, *, status: int | None = None, code: str = "",
                 method: str = "", path: str = ""):
        self.status, self.code, self.method, self.path = status, code, method, path
        super().__init__(message, hint)


# --------------------------------------------------------------------------- pure helpers
def parse_link(header: str | None) -> str | None:
    """The rel="next" target of a Link header (`<url>; rel="next"`), or None."""
    if not header:
        return None
    for part in header.split(","):
        m = re.match(r'\s*<([^>]*)>\s*;(.*)$', part)
        if m and re.search(r'rel\s*=\s*"?next"?', m.group(2)):
            return m.group(1)
    return None


def error_codes(body) -> list[tuple[str, str]]:
    """[(code, message)] from a registry error body ({"errors": [...]})."""
    try:
        data = json.loads(body) if isinstance(body, (str, bytes)) else body
        return [(e.get("code", ""), e.get("message", "")) for e in (data or {}).get("errors", [])]
    except (ValueError, AttributeError, TypeError):
        return []


def is_digest(ref: str) -> bool:
    return bool(ref) and ":" in ref and bool(DIGEST_RE.match(ref))


def reference_problem(ref: str) -> str | None:
    """Why a tag-or-digest is malformed (None when it is fine)."""
    if ":" in ref or ref.startswith("sha256"):
        if not SHA256_RE.match(ref):
            return (f"{ref!r} is not a valid digest (sha256: followed by 64 lowercase hex digits, as "
                    "Docker-Content-Digest shows)")
        return None
    if not TAG_RE.match(ref):
        return f"{ref!r} is not a valid tag (letters, digits, _ . -, at most 128, not starting with . or -)"
    return None


def is_pattern(repository: str) -> bool:
    return any(c in repository for c in "*?[")


def summarize_manifest(manifest: dict, media_type: str | None = None) -> dict:
    """config, layers and per-platform manifests of a manifest body (schema 2, OCI, list/index;
    schema 1's fsLayers.blobSum too — the document's field, which only schema 1 has)."""
    mt = media_type or manifest.get("mediaType") or ""
    if not mt and "manifests" in manifest:
        mt = OCI_INDEX
    out = {"media_type": mt, "config": None, "layers": [], "platforms": []}
    if "manifests" in manifest:
        for m in manifest.get("manifests") or []:
            p = m.get("platform") or {}
            plat = "/".join(x for x in (p.get("os"), p.get("architecture"), p.get("variant")) if x) or "?"
            out["platforms"].append({"platform": plat, "digest": m.get("digest"), "media_type": m.get("mediaType"),
                                     "size": m.get("size")})
    elif manifest.get("schemaVersion") == 1 or "fsLayers" in manifest:
        out["media_type"] = mt or DOCKER_V1
        out["layers"] = [{"digest": fs.get("blobSum"), "size": None, "media_type": ""}
                         for fs in manifest.get("fsLayers") or []]
    else:
        c = manifest.get("config") or {}
        if c:
            out["config"] = {"digest": c.get("digest"), "size": c.get("size"), "media_type": c.get("mediaType")}
        out["layers"] = [{"digest": l.get("digest"), "size": l.get("size"), "media_type": l.get("mediaType")}
                         for l in manifest.get("layers") or []]
    return out


def parse_time(value) -> dt.datetime | None:
    """An RFC 3339 time (config blob's `created`, nanoseconds allowed) as aware UTC."""
    if not value or not isinstance(value, str):
        return None
    v = value.strip().replace("Z", "+00:00")
    m = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(.*)$", v)
    if not m:
        return None
    frac = (m.group(2) or "")[:7]  # python takes at most 6 digits
    try:
        t = dt.datetime.fromisoformat(m.group(1) + (frac[:7] if frac else "") + (m.group(3) or ""))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def human_bytes(n) -> str:
    if n is None:
        return "?"
    n = float(n)
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{sign}{n:.0f} {unit}" if unit == "B" else f"{sign}{n:.1f} {unit}"
        n /= 1024
    return f"{sign}{n:.1f} TiB"


def parse_gc_output(text: str) -> dict:
    """`registry garbage-collect` output -> counts, and the blobs/manifests it would delete."""
    out = {"marked": None, "blobs_eligible": None, "manifests_eligible": None, "blobs": [], "manifests": []}
    m = re.search(r"(\d+) blobs marked, (\d+) blobs and (\d+) manifests eligible for deletion", text)
    if m:
        out["marked"], out["blobs_eligible"], out["manifests_eligible"] = (int(x) for x in m.groups())
    repo = ""
    for line in text.splitlines():
        r = re.match(r"^([a-z0-9][a-z0-9._/-]*)(?::\s+marking\s.*)?$", line.strip())
        if r and "eligible" not in line:
            repo = r.group(1)  # GC prints each repository's name, then its marks
        b = re.search(r"blob eligible for deletion: (\S+)", line)
        if b:
            out["blobs"].append(b.group(1))
        mm = re.search(r"manifest eligible for deletion: (\S+)", line)
        if mm:
            out["manifests"].append({"repository": repo, "digest": mm.group(1).strip()})
    return out


def parse_bucket_stats(text: str) -> dict:
    """`radosgw-admin bucket stats --bucket=B` -> {"bytes": size_actual, "objects": num_objects}."""
    data = json.loads(text)
    if isinstance(data, list):
        data = data[0] if data else {}
    usage = data.get("usage") or {}
    size = sum(int(u.get("size_actual", 0)) for u in usage.values())
    objs = sum(int(u.get("num_objects", 0)) for u in usage.values())
    return {"bytes": size, "objects": objs}


def choose_retention(tags: list[dict], keep_last: int, tag_filter: str = "") -> dict:
    """Which tags retention keeps and which digests it deletes, for ONE repository.

    tags: [{"tag", "digest", "created" (datetime or None)}].  Tags not matching
    tag_filter (re.search) are never candidates.  Among candidates the keep_last
    newest (by created, then tag name) are kept.  A digest is deleted only when
    every tag on it is to go: DELETE of a manifest removes all its tags, so a digest
    shared with a kept (or unfiltered) tag stays.
    Returns {"keep": [tag], "delete": {digest: [tags]}, "spared": {digest: [tags]}}.
    """
    rx = re.compile(tag_filter) if tag_filter else None
    cands = [t for t in tags if rx is None or rx.search(t["tag"])]
    epoch = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    cands.sort(key=lambda t: (t.get("created") or epoch, t["tag"]), reverse=True)
    keep = [t["tag"] for t in cands[:keep_last]]
    go = [t for t in cands[keep_last:]]
    go_tags = {t["tag"] for t in go}
    by_digest: dict[str, list[str]] = {}
    for t in tags:
        by_digest.setdefault(t["digest"], []).append(t["tag"])
    delete, spared = {}, {}
    for t in go:
        d = t["digest"]
        if all(x in go_tags for x in by_digest[d]):
            delete[d] = sorted(by_digest[d])
        else:
            spared[d] = sorted(by_digest[d])
    return {"keep": keep, "delete": delete, "spared": spared}


def _progress(total: int, desc: str):
    """A progress bar: tqdm.auto in a notebook with widgets, plain tqdm otherwise
    (tqdm.auto without ipywidgets prints a warning into the notebook)."""
    try:
        if importlib.util.find_spec("ipywidgets") is not None:
            from tqdm.auto import tqdm
        else:
            from tqdm.std import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=total < 2)


def pmap(fn, items, desc: str = "", workers: int = 8) -> list:
    """fn over items in a thread pool (keeping the active step for the journal), in
    order, with a progress bar.  Exceptions are re-raised after all finished."""
    items = list(items)
    if not items:
        return []
    bar = _progress(len(items), desc)
    try:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(items)))) as ex:
            futs = [ex.submit(contextvars.copy_context().run, fn, i) for i in items]
            out = []
            for f in futs:
                try:
                    out.append(f.result())
                finally:
                    if bar is not None:
                        bar.update(1)
            return out
    finally:
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------- the client
@dataclass
class Image:
    repository: str
    reference: str
    digest: str
    media_type: str
    size: int
    manifest: dict = field(repr=False, default_factory=dict)
    config: dict | None = None
    layers: list = field(default_factory=list)
    platforms: list = field(default_factory=list)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES or bool(self.platforms)


class RegistryClient:
    """The registry's HTTP API over one keep-alive session (TLS verified against ca_path)."""

    def __init__(self, base_url: str, ca_path: str | None, user: str | None = None, password: str | None = None,
                 *, pool_size: int = 16, timeout: float = 60.0):
        import requests
        from requests.adapters import HTTPAdapter

        if password:
            masking.register(password, derived_for_user=user)
        self.base_url = base_url.rstrip("/")
        self.ca_path = ca_path
        self.user = user
        self.timeout = timeout
        s = requests.Session()
        # REQUESTS_CA_BUNDLE in the environment would override verify=ca_path.
        s.trust_env = False
        s.verify = ca_path if ca_path else True
        if user is not None:
            s.auth = (user, password or "")
        adapter = HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
        s.mount("https://", adapter)
        s.mount("http://", adapter)
        s.headers["User-Agent"] = "runbook-registry-ops"
        self.session = s

    def __repr__(self):
        return f"<RegistryClient {self.base_url} as {self.user}>"

    def close(self):
        self.session.close()

    # -- transport -----------------------------------------------------------------
    def request(self, method: str, path: str, *, ok=(200,), headers=None, params=None,
                what: str = "") -> "requests.Response":
        import requests

        url = path if path.startswith("http") else self.base_url + path
        try:
            r = self.session.request(method, url, headers=headers, params=params, timeout=self.timeout,
                                     allow_redirects=True)
        except requests.exceptions.SSLError as e:
            raise RegistryError(f"{method} {url}: TLS verification failed ({_short(e)})",
                                f"the registry's certificate must be signed by the CA in {self.ca_path} and name "
                                "the address used (03-certs)", method=method, path=path) from None
        except requests.exceptions.ConnectionError as e:
            raise RegistryError(f"{method} {url}: cannot connect ({_short(e)})",
                                "is the registry running (04-registry) and the address/port right?",
                                method=method, path=path) from None
        except requests.exceptions.Timeout:
            raise RegistryError(f"{method} {url}: timed out after {self.timeout}s", method=method,
                                path=path) from None
        if r.status_code not in ok:
            raise self._error(r, method, path, what)
        return r

    def _error(self, r, method, path, what) -> RegistryError:
        codes = error_codes(r.content) if r.content else []
        code = codes[0][0] if codes else {401: "UNAUTHORIZED", 405: "UNSUPPORTED"}.get(r.status_code, "")
        detail = "; ".join(f"{c}: {m}" for c, m in codes) or r.reason
        meaning, hint = EXPLAIN.get(code, ("", None))
        if r.status_code == 503:
            meaning, hint = "registry unavailable", "its storage driver health check fails: see 07-faq (503)"
        elif r.status_code >= 500 and not meaning:
            meaning, hint = "the registry failed", ("usually its storage (RGW) did not answer: see `docker logs "
                                                    "registry` on the registry host, and 07-faq")
        msg = f"{what + ': ' if what else ''}{method} {urlparse(r.url).path} -> {r.status_code} {detail}"
        if meaning:
            msg += f" ({meaning})"
        return RegistryError(msg, hint, status=r.status_code, code=code, method=method, path=path)

    def _journal(self, method: str, path: str, status: int | None, changed: bool, skipped: bool = False,
                 duration: float = 0.0) -> Result:
        return record(Result(self.base_url, f"{method} {path}", exit_code=status, kind="http", changed=changed,
                             skipped=skipped, duration=duration))

    # -- reads -------------------------------------------------------------------------
    def ping(self) -> dict:
        """GET /v2/ (200 with credentials): the API version header."""
        r = self.request("GET", "/v2/", what="API check")
        return {"api": r.headers.get("Docker-Distribution-Api-Version", "")}

    def catalog(self, page_size: int = 100) -> tuple[list[str], int]:
        """Every repository, following Link rel="next" pages.  -> (names, pages)."""
        if not 1 <= page_size <= MAX_PAGE:
            raise RegistryError(f"page_size {page_size} out of range", f"1..{MAX_PAGE} (the registry's limit)",
                                code="PAGINATION_NUMBER_INVALID")
        names, pages = [], 0
        url = f"/v2/_catalog?n={page_size}"
        seen = set()
        while url and url not in seen:
            seen.add(url)
            r = self.request("GET", url, what="catalog")
            pages += 1
            names += r.json().get("repositories") or []
            nxt = parse_link(r.headers.get("Link"))
            url = urljoin(self.base_url + "/", nxt) if nxt else None
        return names, pages

    def tags(self, repository: str, listed: bool = False) -> list[str]:
        """Tags of a repository ([] for an emptied one: "tags": null on the filesystem driver).
        listed=True: the repository is in the catalog, so 404 NAME_UNKNOWN means emptied too
        (swift/s3 drop the empty tags directory)."""
        out, url, seen = [], f"/v2/{repository}/tags/list", set()
        while url and url not in seen:
            seen.add(url)
            try:
                r = self.request("GET", url, what=f"tags of {repository}")
            except RegistryError as e:
                if listed and e.code == "NAME_UNKNOWN":
                    return []
                raise
            out += r.json().get("tags") or []
            nxt = parse_link(r.headers.get("Link"))
            url = urljoin(self.base_url + "/", nxt) if nxt else None
        return out

    def resolve(self, repository: str, reference: str) -> str | None:
        """Docker-Content-Digest of a tag or digest (HEAD, all four types in Accept); None if unknown."""
        r = self.request("HEAD", f"/v2/{repository}/manifests/{reference}", ok=(200, 404),
                         headers={"Accept": ACCEPT}, what=f"{repository}:{reference}")
        if r.status_code == 404:
            return None
        return r.headers.get("Docker-Content-Digest")

    def image(self, repository: str, reference: str) -> Image:
        """The manifest of repository:reference with its digest, config, layers, platforms."""
        r = self.request("GET", f"/v2/{repository}/manifests/{reference}", headers={"Accept": ACCEPT},
                         what=f"manifest of {repository}:{reference}")
        mt = (r.headers.get("Content-Type") or "").split(";")[0].strip()
        body = r.json()
        s = summarize_manifest(body, mt or None)
        digest = r.headers.get("Docker-Content-Digest") or ("sha256:" + hashlib.sha256(r.content).hexdigest())
        return Image(repository, reference, digest, s["media_type"], len(r.content), body, s["config"], s["layers"],
                     s["platforms"])

    def blob_json(self, repository: str, digest: str) -> dict:
        r = self.request("GET", f"/v2/{repository}/blobs/{digest}", what=f"blob {digest[:19]}")
        return r.json()

    def blob_exists(self, repository: str, digest: str) -> bool:
        r = self.request("HEAD", f"/v2/{repository}/blobs/{digest}", ok=(200, 404), what=f"blob {digest[:19]}")
        return r.status_code == 200

    def created(self, repository: str, img: Image) -> dt.datetime | None:
        """The image's `created` time from its config blob (an index: its newest platform)."""
        if img.config and img.config.get("digest"):
            return parse_time(self.blob_json(repository, img.config["digest"]).get("created"))
        times = [self.created(repository, self.image(repository, p["digest"])) for p in img.platforms]
        times = [t for t in times if t]
        return max(times) if times else None

    # -- writes ----------------------------------------------------------------------------
    def delete_manifest(self, repository: str, digest: str, *, dry_run: bool = False) -> Result:
        """DELETE /v2/<repo>/manifests/<digest>: 202; removes every tag on that digest."""
        path = f"/v2/{repository}/manifests/{digest}"
        return self._delete(path, f"{repository}@{digest}", dry_run)

    def delete_blob(self, repository: str, digest: str, *, dry_run: bool = False) -> Result:
        """DELETE /v2/<repo>/blobs/<digest>: 202; unlinks it from the repository only (GC frees it)."""
        return self._delete(f"/v2/{repository}/blobs/{digest}", f"blob {digest} in {repository}", dry_run)

    def _delete(self, path: str, what: str, dry_run: bool) -> Result:
        if dry_run:
            return self._journal("DELETE", path, None, changed=True, skipped=True)
        t0 = time.monotonic()
        try:
            r = self.request("DELETE", path, ok=(202,), what=f"delete {what}")
        except RegistryError as e:
            self._journal("DELETE", path, e.status, changed=False, duration=time.monotonic() - t0)
            raise
        return self._journal("DELETE", path, r.status_code, changed=True, duration=time.monotonic() - t0)


def _short(e) -> str:
    s = str(e)
    m = re.search(r"\[SSL[^\]]*\][^')\"]*", s) or re.search(r"(Connection refused|Name or service not known|"
                                                            r"No route to host|timed out)", s)
    return m.group(0) if m else s[-200:]


# =========================================================================== the notebook's steps
def _state(ctx) -> dict:
    return ctx.__dict__.setdefault("_ops", {})


def _registry_hosts(ctx) -> list[str]:
    from . import params as P
    return P.as_list(ctx.registry_host)


def base_url(ctx) -> str:
    """https://HOST:PORT of the load balancer (lb_host) when there is one, else of the first
    registry host (04-registry's `registry.url`)."""
    host = (ctx.params.get("lb_host") or "").strip() or _registry_hosts(ctx)[0]
    try:
        from . import registry
        return registry.url(ctx, host)
    except (ImportError, AttributeError):  # pragma: no cover - 04 not there
        return f"https://{f'[{host}]' if ':' in host else host}:{ctx.registry_port}"


def client(ctx) -> RegistryClient:
    """The section's one RegistryClient (CA from 03-certs, password from 04-registry)."""
    st = _state(ctx)
    if "client" not in st:
        from . import certs
        ca = certs.ca_path(ctx)
        # never generate here: a new random password would not be the registry's
        pw = ctx.secret("registry_password", generate=False, user=ctx.registry_user)
        if not pw:
            raise RunbookError("no registry password known for this state_dir",
                               "run notebooks/04-registry.ipynb first with the same state_dir, or set "
                               "REGISTRY_PASSWORD in the environment")
        st["client"] = RegistryClient(base_url(ctx), ca, ctx.registry_user, pw, pool_size=16)
    return st["client"]


def _dry(ctx, dry_run) -> bool:
    return ctx.dry_run if dry_run is None else bool(dry_run)


def _repos(ctx, repository: str) -> list[str]:
    """The repositories a name or pattern (opstest/*) means; a plain name must exist."""
    c = client(ctx)
    if is_pattern(repository):
        names, _ = c.catalog(MAX_PAGE)
        return sorted(n for n in names if fnmatch.fnmatchcase(n, repository))
    return [repository]


def _tags_checked(ctx, repository: str) -> list[str]:
    """Tags of a repository; an unknown one is a clear error naming the parameter."""
    try:
        return client(ctx).tags(repository)
    except RegistryError as e:
        if e.code == "NAME_UNKNOWN":
            names, _ = client(ctx).catalog(MAX_PAGE)
            if repository in names:
                return []  # emptied: swift/s3 keep it in the catalog but drop its tags directory
            near = [n for n in names if n.split("/")[-1] == repository.split("/")[-1]][:5]
            raise RegistryError(f"repository: {repository!r} is not in the registry at {client(ctx).base_url} "
                                "(404 NAME_UNKNOWN)",
                                (f"did you mean {', '.join(near)}? " if near else "") +
                                f"the catalog has {len(names)} repositories; see the catalog step",
                                status=404, code="NAME_UNKNOWN") from None
        raise


@steps.step("Registry API at {ctx.registry_host}")
def connect(ctx) -> RegistryClient:
    """GET /v2/ with credentials: TLS verified against our CA, basic auth accepted."""
    c = client(ctx)
    info = c.ping()
    steps.fact("url", c.base_url)
    steps.fact("CA", c.ca_path)
    steps.fact("user", c.user)
    steps.fact("API", info["api"] or "?")
    return c


@steps.step("Catalog: every repository (pages of {page_size})")
def catalog(ctx, page_size: int = 100) -> list[dict]:
    """GET /v2/_catalog?n=page_size, following `Link: <...>; rel="next"`; then the tag
    count of each repository (concurrently).  The document's `curl .../v2/_catalog`."""
    c = client(ctx)
    names, pages = c.catalog(page_size)
    counts = pmap(lambda n: len(c.tags(n, listed=True)), names, desc="tags per repository", workers=8)
    rows = [{"repository": n, "tags": k if k else "no tags (emptied: stays in the catalog until removed by hand)"}
            for n, k in zip(names, counts)]
    for r in rows:
        steps.row(**r)
    steps.fact("repositories", len(names))
    steps.fact("pages", f"{pages} (n={page_size})")
    return rows


@steps.step("Tags of {repository}")
def tags(ctx, repository: str) -> dict:
    """GET /v2/<name>/tags/list (a pattern such as opstest/* lists every matching repository)."""
    repos = _repos(ctx, repository)
    if not repos:
        steps.note(f"no repository matches {repository!r}")
        return {}
    found = dict(zip(repos, pmap(lambda r: _tags_checked(ctx, r), repos, desc="tags")))
    for r, t in found.items():
        steps.row(repository=r, tags=", ".join(sorted(t)) if t else "no tags (tags: null — emptied repository)")
    steps.fact("tags", sum(len(t) for t in found.values()))
    return found


@steps.step("Digest, layers and config of {repository}:{tag}")
def image(ctx, repository: str, tag: str) -> Image | None:
    """GET the manifest with the four manifest types in Accept; Docker-Content-Digest is
    the image digest.  Layers are `layers[].digest` (schema 2 and OCI) — the document's
    `fsLayers.blobSum` is schema 1, which a 2.x registry only serves when Accept lacks v2."""
    c = client(ctx)
    if is_pattern(repository):
        # a pattern: the digest of `tag` in every matching repository that has it
        repos = _repos(ctx, repository)
        found = [r for r, d in zip(repos, pmap(lambda r: c.resolve(r, tag), repos, desc="digests")) if d]
        imgs = pmap(lambda r: c.image(r, tag), found, desc="manifests")
        for i in imgs:
            steps.row(repository=i.repository, tag=tag, digest=i.digest,
                      type=SHORT_TYPE.get(i.media_type, i.media_type), layers=len(i.layers),
                      platforms=len(i.platforms))
        steps.fact("repositories with this tag", f"{len(found)} of {len(repos)} matching {repository}")
        return imgs
    p = reference_problem(tag)
    if p:
        raise ParameterError([f"tag: {p}"])
    known = _tags_checked(ctx, repository)
    if not is_digest(tag) and tag not in known:
        raise RegistryError(f"tag: {repository}:{tag} does not exist (404 MANIFEST_UNKNOWN)",
                            f"{repository} has tags: {', '.join(sorted(known)) or 'none (emptied repository)'}",
                            status=404, code="MANIFEST_UNKNOWN")
    img = c.image(repository, tag)
    steps.fact("digest (Docker-Content-Digest)", img.digest)
    steps.fact("type", f"{SHORT_TYPE.get(img.media_type, img.media_type)} ({img.size} bytes)")
    if img.config:
        steps.fact("config blob", f"{img.config['digest']} ({img.config['size']} bytes)")
        try:
            created = c.created(repository, img)
            if created:
                steps.fact("created", created.isoformat())
        except RegistryError:
            pass
    for l in img.layers:
        steps.row(kind="layer", digest=l["digest"], size=human_bytes(l["size"]), media_type=l["media_type"] or "")
    for p_ in img.platforms:
        steps.row(kind=f"platform {p_['platform']}", digest=p_["digest"], size=human_bytes(p_["size"]),
                  media_type=p_["media_type"])
    if img.platforms:
        steps.note(f"a multi-platform {SHORT_TYPE.get(img.media_type)}: each platform's manifest has its own "
                   "layers (digest step with tag=<platform digest>).")
    else:
        total = sum(l["size"] or 0 for l in img.layers)
        steps.fact("layers", f"{len(img.layers)} ({human_bytes(total)} compressed)")
    return img


# -------------------------------------------------------------------------- deleting
@dataclass
class Plan:
    """What a delete will remove: [{"repository", "digest", "tags", "media_type"}], and notes."""
    what: str
    items: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    kept: list = field(default_factory=list)

    def __len__(self):
        return len(self.items)

    def __repr__(self):
        lines = [f"{self.what}: {len(self.items)} manifest(s) to delete"]
        for i in self.items:
            lines.append(f"  {i['repository']}@{i['digest']}  tags: {', '.join(i['tags']) or '(untagged)'}")
        lines += [f"  note: {n}" for n in self.notes]
        return masking.mask("\n".join(lines))


def _digests_by_tag(ctx, repository: str, tag_list) -> dict:
    c = client(ctx)
    tag_list = list(tag_list)
    ds = pmap(lambda t: c.resolve(repository, t), tag_list, desc=f"digests in {repository}", workers=8)
    return {t: d for t, d in zip(tag_list, ds) if d}


@steps.step("Plan: delete an image")
def plan_delete(ctx, repository: str, reference: str) -> Plan:
    """Resolve a tag (or take a digest), and list every other tag on the same digest:
    DELETE of a manifest removes all of them (2.x deletes by digest only)."""
    plan = Plan(f"delete {repository}:{reference}" if reference else "delete image")
    if reference:
        steps.fact("image", f"{repository}{'@' if is_digest(reference) else ':'}{reference}")
    if not reference:
        steps.note("delete_tag is empty: nothing to delete")
        return plan
    if is_pattern(repository):
        raise ParameterError([f"repository: {repository!r} is a pattern; deleting needs one repository"])
    p = reference_problem(reference)
    if p:
        raise ParameterError([f"delete_tag: {p}"])
    c = client(ctx)
    known = _tags_checked(ctx, repository)
    by_tag = _digests_by_tag(ctx, repository, known)
    if is_digest(reference):
        digest = c.resolve(repository, reference)
        if digest is None:
            steps.note(f"{repository}@{reference} is not in the registry: nothing to delete (already deleted?)")
            return plan
    else:
        digest = by_tag.get(reference)
        if digest is None:
            steps.note(f"{repository}:{reference} does not exist: nothing to delete (already deleted, or a typo: "
                       f"tags are {', '.join(sorted(known)) or 'none'})")
            return plan
    same = sorted(t for t, d in by_tag.items() if d == digest)
    plan.items.append({"repository": repository, "digest": digest, "tags": same})
    siblings = [t for t in same if t != reference]
    steps.fact("digest", digest)
    steps.fact("tags that go with it", ", ".join(same) or "(none: untagged manifest)")
    if siblings:
        plan.notes.append(f"WARNING: {', '.join(siblings)} share(s) this digest and will be deleted too")
        steps.note(plan.notes[-1])
    # what else references it: an index whose platform this is keeps a dangling reference
    return plan


@steps.step("Delete manifests")
def delete_images(ctx, plan: Plan, dry_run: bool | None = None) -> list[dict]:
    """DELETE /v2/<name>/manifests/<digest> (202) for each planned manifest, concurrently.
    Space is NOT freed: the layers stay until garbage collection."""
    dry = _dry(ctx, dry_run)
    plan = getattr(plan, "value", plan)  # a plan step's report, as the notebook passes it
    if not plan or not plan.items:
        steps.note("nothing to delete")
        return []
    c = client(ctx)
    for i in plan.items:
        steps.row(repository=i["repository"], digest=i["digest"], tags=", ".join(i["tags"]) or "(untagged)")
    steps.fact("summary", f"{'would delete' if dry else 'deleting'} {len(plan.items)} manifest(s) carrying "
                          f"{sum(len(i['tags']) for i in plan.items)} tag(s)")

    def one(i):
        # re-check: the tag may have moved since the plan; a gone digest is already done
        if not dry and c.resolve(i["repository"], i["digest"]) is None:
            return {"digest": i["digest"], "status": "already gone"}
        r = c.delete_manifest(i["repository"], i["digest"], dry_run=dry)
        if not r.skipped:
            _state(ctx).setdefault("deleted", set()).update((i["repository"], t) for t in i["tags"])
        return {"digest": i["digest"], "status": "would delete" if r.skipped else r.exit_code}

    try:
        out = pmap(one, plan.items, desc="DELETE manifests", workers=8)
    except RegistryError as e:
        if e.code == "UNSUPPORTED":
            raise RegistryError(f"{e.message}", e.hint, status=405, code="UNSUPPORTED") from None
        raise
    if not dry:
        steps.note("deleted; the blobs stay in storage until garbage collection (gc=True)")
    return out


@steps.step("Delete a layer")
def delete_layer(ctx, repository: str, digest: str, force: bool = False, dry_run: bool | None = None) -> dict:
    """DELETE /v2/<name>/blobs/<digest> — only when no tagged manifest in the repository
    still references it (the registry does not check: that image would then fail to pull
    with 404).  force=True deletes anyway.  Unlinks only; GC frees the space."""
    out = {"deleted": False, "users": []}
    if digest:
        steps.fact("layer", f"{repository}@{digest}")
    if not digest:
        steps.note("delete_layer is empty: nothing to delete")
        return out
    if not SHA256_RE.match(digest):
        raise ParameterError([f"delete_layer: {digest!r} is not a valid digest (sha256: + 64 lowercase hex)"])
    if is_pattern(repository):
        raise ParameterError([f"repository: {repository!r} is a pattern; deleting a layer needs one repository"])
    c = client(ctx)
    known = _tags_checked(ctx, repository)
    if not c.blob_exists(repository, digest):
        steps.note(f"{digest} is not linked in {repository}: nothing to delete (already deleted?)")
        return out
    users = references(ctx, repository, known)
    out["users"] = sorted({f"{repository}:{t}" for t in users.get(digest, [])})
    if out["users"]:
        steps.fact("still used by", ", ".join(out["users"]))
        if not force:
            raise RegistryError(f"delete_layer: refusing to delete {digest}: {len(out['users'])} tagged image(s) in "
                                f"{repository} still use it ({', '.join(out['users'])}); they would fail to pull "
                                "(404 BLOB_UNKNOWN). Nothing was deleted.",
                                "delete those images first (delete_tag), or pass force=True to break them on purpose",
                                code="LAYER_IN_USE")
        steps.note(f"force=True: deleting a layer that {', '.join(out['users'])} still use(s): they will not pull")
    else:
        steps.fact("still used by", "no tagged image in this repository")
    r = c.delete_blob(repository, digest, dry_run=_dry(ctx, dry_run))
    out["deleted"] = not r.skipped
    return out


def references(ctx, repository: str, tag_list=None) -> dict:
    """{blob digest: [tags whose image uses it]} over every tagged manifest of a repository
    (configs and layers, through indexes to their platform manifests)."""
    c = client(ctx)
    tag_list = list(c.tags(repository) if tag_list is None else tag_list)

    def walk(ref):
        img = c.image(repository, ref)
        blobs = {img.digest}
        if img.config:
            blobs.add(img.config["digest"])
        blobs |= {l["digest"] for l in img.layers}
        for p in img.platforms:
            blobs |= walk(p["digest"])
        return blobs

    used: dict[str, list[str]] = {}
    for t, blobs in zip(tag_list, pmap(walk, tag_list, desc=f"manifests of {repository}")):
        for b in blobs:
            used.setdefault(b, []).append(t)
    return used


@steps.step("Plan: retention — keep the newest {keep_last} tag(s) per repository in {repository}")
def plan_retention(ctx, repository: str, keep_last: int, tag_filter: str = "") -> Plan:
    """Per repository (a name or a pattern like opstest/*): the tags matching tag_filter
    (a regex, re.search; "" = all), newest first by the config blob's `created`; keep
    keep_last, delete the rest — unless a digest is shared with a tag that stays.
    Only a plan: delete_images(ctx, plan) acts."""
    plan = Plan(f"retention keep_last={keep_last} in {repository}" + (f" (tags ~ /{tag_filter}/)" if tag_filter else ""))
    if keep_last <= 0:
        steps.note("keep_last=0: retention is off")
        return plan
    c = client(ctx)
    repos = _repos(ctx, repository)
    for repo in repos:
        known = _tags_checked(ctx, repo)
        by_tag = _digests_by_tag(ctx, repo, known)
        digests = sorted(set(by_tag.values()))
        times = dict(zip(digests, pmap(lambda d: c.created(repo, c.image(repo, d)), digests,
                                       desc=f"created times in {repo}")))
        rows = [{"tag": t, "digest": d, "created": times.get(d)} for t, d in by_tag.items()]
        choice = choose_retention(rows, keep_last, tag_filter)
        for t in rows:
            fate = ("keep (newest)" if t["tag"] in choice["keep"] else
                    "DELETE" if t["digest"] in choice["delete"] else
                    "keep (digest shared with a kept tag)" if t["digest"] in choice["spared"] else
                    "keep (not matched by tag_filter)")
            steps.row(repository=repo, tag=t["tag"], created=t["created"].isoformat() if t["created"] else "?",
                      digest=t["digest"][:19] + "…", fate=fate)
        for d, ts in choice["delete"].items():
            plan.items.append({"repository": repo, "digest": d, "tags": ts})
        for d, ts in choice["spared"].items():
            plan.notes.append(f"{repo}@{d[:19]}… kept: it also carries {', '.join(ts)}")
        plan.kept += [f"{repo}:{t}" for t in choice["keep"]]
    steps.fact("repositories", len(repos))
    steps.fact("to delete", f"{len(plan.items)} manifest(s), {sum(len(i['tags']) for i in plan.items)} tag(s)")
    for n in plan.notes:
        steps.note(n)
    return plan


# -------------------------------------------------------------------------- garbage collection
@dataclass
class Deployment:
    """How the registry runs on its host (found there, not assumed): runtime docker
    (container), podman (container owned by container-registry.service), systemd (unit) or
    daemon (04-registry's pidfile, hosts without systemd)."""
    hosts: list
    runtime: str
    running: bool
    config_path: str               # as the registry process sees it
    config_host: str | None        # the same file on the host
    storage: str
    bucket: str | None = None      # swift container / s3 bucket (= the RGW bucket)
    root_host: str | None = None   # filesystem: rootdirectory on the host
    root_in: str | None = None
    container: str | None = None
    image_id: str | None = None
    readonly: bool = False
    mounts: list = field(default_factory=list)  # podman: [{"Source", "Destination"}] for a one-off GC container
    volume_label: str = ""                      # podman: ":Z" where SELinux is on

    def describe(self) -> str:
        where = {"docker": f"container {self.container}", "systemd": "systemd unit docker-registry",
                 "podman": f"podman container {self.container} (unit {PODMAN_UNIT})",
                 "daemon": "docker-registry daemon (pidfile)"}[self.runtime]
        st = f"{self.storage} bucket {self.bucket}" if self.bucket else (
            f"filesystem {self.root_host or self.root_in}" if self.storage == "filesystem" else self.storage)
        return f"{where}, {'running' if self.running else 'STOPPED'}, {st}, config {self.config_path}"


CONTAINER = "registry"
_DRIVER_KEYS = {"filesystem", "s3", "swift", "inmemory", "azure", "gcs", "oss"}
_SECRET_KEYS = re.compile(r"(password|secret|secretkey|accesskey|key|token)$", re.I)


def _register_secrets(obj):
    """Every secret-looking value in a config (swift password, s3 keys, http secret)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)):
                _register_secrets(v)
            elif isinstance(v, str) and _SECRET_KEYS.search(str(k)) and len(v) >= masking.MIN_LEN:
                masking.register(v)
    elif isinstance(obj, list):
        for v in obj:
            _register_secrets(v)


def _host_path(mounts: list, path: str) -> str | None:
    """The host path behind a container path, from `docker inspect` Mounts."""
    best = None
    for m in mounts or []:
        dest = (m.get("Destination") or "").rstrip("/")
        if path == dest or path.startswith(dest + "/"):
            if best is None or len(dest) > len(best[0]):
                best = (dest, m.get("Source") or "")
    if best is None or not best[1]:
        return None
    return best[1] + path[len(best[0]):]


def parse_config(text: str) -> dict:
    import yaml
    cfg = yaml.safe_load(text) or {}
    _register_secrets(cfg)
    return cfg


def storage_of(cfg: dict) -> tuple[str, str | None, str | None, bool]:
    """(driver, bucket/container, filesystem rootdirectory, read-only) of a config.yml."""
    st = cfg.get("storage") or {}
    drivers = [k for k in st if k in _DRIVER_KEYS]
    driver = drivers[0] if drivers else "?"
    params = st.get(driver) or {}
    bucket = params.get("container") if driver == "swift" else params.get("bucket") if driver == "s3" else None
    root = (params.get("rootdirectory") or "/var/lib/registry") if driver == "filesystem" else None
    ro = bool(((st.get("maintenance") or {}).get("readonly") or {}).get("enabled"))
    return driver, bucket, root, ro


def parse_podman_unit(text: str) -> tuple[str | None, list]:
    """(image, mounts) of the `podman run` in a unit made by `podman generate systemd --new`
    (when the unit is stopped its container does not exist: the unit is what says how it runs)."""
    from . import registry
    joined = re.sub(r"\\\n\s*", " ", text or "")
    line = next((ln.split("=", 1)[1] for ln in joined.splitlines() if ln.startswith("ExecStart=")), "")
    words = shlex.split(line) if line else []
    mounts = []
    for v in registry.unit_volumes(text):
        src, _, rest = v.partition(":")
        mounts.append({"Source": src, "Destination": rest.split(":")[0]})
    image = words[-1] if words and not words[-1].startswith("-") else None
    return image, mounts


def _podman_selinux_label(h) -> str:
    from . import registry
    r = h.run(cmd("command -v getenforce >/dev/null 2>&1 && getenforce || true"), read=True, check=False)
    return registry.volume_label(r.stdout)


def _from_inspect(ctx, h, hosts, engine: str, info: dict) -> Deployment:
    """A container registry (docker, or podman) from its `inspect` JSON."""
    for e in (info.get("Config") or {}).get("Env") or []:  # REGISTRY_* env may hold secrets
        k, _, v = e.partition("=")
        if _SECRET_KEYS.search(k) and len(v) >= masking.MIN_LEN:
            masking.register(v)
    args = info.get("Args") or []
    cfg_in = next((a for a in args if a.endswith((".yml", ".yaml"))), DEFAULT_CONFIG)
    mounts = info.get("Mounts") or []
    cfg_host = _host_path(mounts, cfg_in)
    running = bool((info.get("State") or {}).get("Running"))
    text = h.read_file(cfg_host) if cfg_host else None
    if text is None and running:
        text = h.run(cmd(engine + " exec {n} cat {p}", n=CONTAINER, p=cfg_in), read=True, no_log=True).stdout.encode()
    cfg = parse_config(text.decode() if text else "")
    driver, bucket, root, ro = storage_of(cfg)
    dep = Deployment(hosts, engine, running, cfg_in, cfg_host, driver, bucket,
                     _host_path(mounts, root) if root else None, root, CONTAINER, info.get("Image"), ro)
    if engine == "podman":
        dep.mounts = [{"Source": m.get("Source"), "Destination": m.get("Destination")} for m in mounts
                      if m.get("Type", "bind") == "bind"]
        dep.volume_label = _podman_selinux_label(h)
    return dep


def _podman_unit_deployment(ctx, h, hosts) -> Deployment | None:
    """A podman registry whose unit is stopped (no container then): read from the unit file."""
    from . import registry
    text = h.read_file(registry.PODMAN_UNIT_PATH)
    if not text:
        return None
    image, mounts = parse_podman_unit(text.decode(errors="replace"))
    # the file mounted as the config (registry 3 reads /etc/distribution/config.yml)
    cfg_in = next((m["Destination"] for m in mounts if m["Destination"].endswith((".yml", ".yaml"))), DEFAULT_CONFIG)
    cfg_host = _host_path(mounts, cfg_in)
    raw = h.read_file(cfg_host) if cfg_host else None
    cfg = parse_config(raw.decode() if raw else "")
    driver, bucket, root, ro = storage_of(cfg)
    running = h.test(cmd("systemctl is-active --quiet {u}", u=PODMAN_UNIT))
    return Deployment(hosts, "podman", running, cfg_in, cfg_host, driver, bucket,
                      _host_path(mounts, root) if root else None, root, CONTAINER, image, ro,
                      mounts=mounts, volume_label=_podman_selinux_label(h))


def detect(ctx) -> Deployment:
    """Find how the registry runs on the (first) registry host: `docker inspect registry`,
    `podman inspect registry` (or, stopped, podman's unit), else the docker-registry package's
    config (systemd unit, or 04's pidfile daemon)."""
    hosts = _registry_hosts(ctx)
    h = ctx.host(hosts[0])
    r = h.run(cmd("docker inspect {n} 2>/dev/null", n=CONTAINER), read=True, check=False, no_log=True)
    if r.exit_code != 0 or not r.stdout.strip().startswith("["):
        p = h.run(cmd("command -v podman >/dev/null && podman inspect --type container {n} 2>/dev/null", n=CONTAINER),
                  read=True, check=False, no_log=True)
        if p.exit_code == 0 and p.stdout.strip().startswith("["):
            return _from_inspect(ctx, h, hosts, "podman", json.loads(p.stdout)[0])
        if p.exit_code != 127 and h.has_systemd():
            dep = _podman_unit_deployment(ctx, h, hosts)
            if dep:
                return dep
    if r.exit_code == 0 and r.stdout.strip().startswith("["):
        return _from_inspect(ctx, h, hosts, "docker", json.loads(r.stdout)[0])
    text = h.read_file(DEFAULT_CONFIG)
    if text is None:
        raise RunbookError(f"registry_host: no registry found on {hosts[0]} (no `{CONTAINER}` container, "
                           f"no {DEFAULT_CONFIG})", "deploy it with notebooks/04-registry.ipynb")
    cfg = parse_config(text.decode())
    driver, bucket, root, ro = storage_of(cfg)
    if h.has_systemd():
        running = h.test(cmd("systemctl is-active --quiet docker-registry"))
        rt = "systemd"
    else:
        running = bool(_daemon(h)[1])
        rt = "daemon"
    return Deployment(hosts, rt, running, DEFAULT_CONFIG, DEFAULT_CONFIG, driver, bucket, root, root, None, None, ro)


def _daemon(h) -> tuple[str | None, bool]:
    """(config hash, running) of 04-registry's pidfile daemon."""
    from . import registry
    return registry.daemon_state(h)


def gc_argv(dep: Deployment, *, dry_run: bool, delete_untagged: bool, stopped: bool) -> list[str]:
    """The garbage-collect command for this deployment.

    docker, running: `docker exec registry registry garbage-collect ...` (the document's way).
    docker, stopped: `docker exec` cannot work; a one-off container from the SAME image
    (by ID) with the SAME mounts (`--volumes-from registry`: no mount list to keep in
    sync) and host networking (RGW is reached as the registry reaches it).
    podman, running: `podman exec registry registry garbage-collect ...` (the read-only registry
    of gc_mode readonly keeps serving pulls).  podman, stopped (its unit's stop removed the
    container): `podman run --rm` of the SAME image (by ID) with the SAME bind mounts, written out
    (podman's --volumes-from does not relabel for SELinux, so each mount gets the registry's own
    `:Z` where SELinux is on: the registry is stopped, and its unit relabels again on start).
    systemd/daemon: the package's binary, without AWS_CA_BUNDLE (the s3 driver panics)."""
    flags = (["--dry-run"] if dry_run else []) + (["--delete-untagged"] if delete_untagged else [])
    if dep.runtime == "podman":
        if not stopped and dep.running:
            return ["podman", "exec", dep.container, "registry", "garbage-collect", *flags, dep.config_path]
        vols = [w for m in dep.mounts for w in ("-v", f"{m['Source']}:{m['Destination']}{dep.volume_label}")]
        return ["podman", "run", "--rm", "--network", "host", *vols, dep.image_id or "docker.io/library/registry:2",
                "garbage-collect", *flags, dep.config_path]
    if dep.runtime == "docker":
        if not stopped and dep.running:
            return ["docker", "exec", dep.container, "registry", "garbage-collect", *flags, dep.config_path]
        return ["docker", "run", "--rm", "--network", "host", "--volumes-from", dep.container,
                dep.image_id or "registry:2", "garbage-collect", *flags, dep.config_path]
    return ["env", "-u", "AWS_CA_BUNDLE", SYSTEMD_BINARY, "garbage-collect", *flags, dep.config_path]


def usage(ctx, dep: Deployment) -> dict | None:
    """Bytes and objects the registry's storage holds now (a read): RGW bucket stats on
    rgw_host for swift/s3, `du -sb` of the rootdirectory for filesystem."""
    try:
        if dep.bucket:
            r = ctx.host(ctx.rgw_host).run(cmd("radosgw-admin bucket stats --bucket={b}", b=dep.bucket), read=True)
            u = parse_bucket_stats(r.stdout)
            u["where"] = f"RGW bucket {dep.bucket} on {ctx.rgw_host} (size_actual)"
            return u
        if dep.storage == "filesystem":
            h = ctx.host(dep.hosts[0])
            if dep.root_host:
                c = cmd("du -sb {p} && find {p} -type f | wc -l", p=dep.root_host)
            elif dep.runtime in ("docker", "podman") and dep.running:
                c = cmd(dep.runtime + " exec {n} sh -c {s}", n=dep.container,
                        s=f"du -sb {shlex.quote(dep.root_in)} && find {shlex.quote(dep.root_in)} -type f | wc -l")
            else:
                return None
            r = h.run(c, read=True)
            lines = r.stdout.split("\n")
            return {"bytes": int(lines[0].split()[0]), "objects": int(lines[1].strip()),
                    "where": f"{dep.root_host or dep.root_in} on {dep.hosts[0]} (du -sb)"}
    except Exception as e:  # noqa: BLE001 - a measurement must not stop GC; say why
        steps.note(f"storage usage not measured: {str(e).splitlines()[0][:200]}")
    return None


def gc_failure(h, r, delete_untagged: bool) -> RunbookError:
    """A failed garbage-collect, explained (nothing was stopped or deleted)."""
    text = masking.mask((r.stderr or r.stdout).strip()[-800:])
    m = re.search(r"failed to retrieve tags unknown repository name=(\S+)", text)
    if m and delete_untagged:
        return RunbookError(
            f"delete_untagged: garbage-collect --delete-untagged fails on {h.name}: repository {m.group(1)} has no "
            "tags left, and registry 2.x's GC aborts on such a repository with object storage (swift/s3 keep no "
            "empty tags directory; distribution/distribution#4331, fixed in registry 3). Nothing was stopped or "
            "deleted.", "run garbage collection without delete_untagged (it still frees every unreferenced "
            "blob), or push a tag to that repository first")
    if r.exit_code == 137:
        return RunbookError(f"garbage-collect was killed on {h.name} (exit 137): the registry container was "
                            "stopped or replaced while it ran (another deploy?)", "run it again")
    return RunbookError(f"garbage-collect failed on {h.name} (exit {r.exit_code}); the registry was not stopped: "
                        f"{text}", "look at the registry's config and storage health (07-faq)")


@steps.step("Garbage collection: dry run (what it would remove)")
def gc_report(ctx, delete_untagged: bool = False) -> dict:
    """`registry garbage-collect --dry-run` on the registry host: a read (safe while the
    registry runs); lists the blobs and manifests a real run would delete."""
    dep = detect(ctx)
    _state(ctx)["deployment"] = dep
    h = ctx.host(dep.hosts[0])
    argv = gc_argv(dep, dry_run=True, delete_untagged=delete_untagged, stopped=not dep.running)
    r = h.run(argv, read=True, check=False, timeout=600)
    if r.exit_code != 0:
        raise gc_failure(h, r, delete_untagged)
    g = parse_gc_output(r.stdout + "\n" + r.stderr)
    steps.fact("registry", dep.describe())
    steps.fact("would delete", f"{g['blobs_eligible']} blob(s), {g['manifests_eligible']} manifest(s)"
               + (" (with --delete-untagged)" if delete_untagged else ""))
    steps.fact("in use (marked)", f"{g['marked']} blob(s)")
    u = usage(ctx, dep)
    if u:
        steps.fact("storage now", f"{human_bytes(u['bytes'])} in {u['objects']} object(s), {u['where']}")
    for b in g["blobs"][:50]:
        steps.row(kind="blob", digest=b)
    for m in g["manifests"][:50]:
        steps.row(kind="manifest", digest=f"{m['repository']}@{m['digest']}")
    if delete_untagged and g["manifests"]:
        hit = untagged_children(ctx, g)
        if hit:
            g["breaks"] = hit
            steps.note("WARNING: --delete-untagged would delete the platform manifests of tagged multi-platform "
                       f"image(s) {', '.join(sorted(set(hit.values())))} (distribution 2.8 bug, "
                       "distribution/distribution#3178): garbage_collect refuses it")
    if len(g["blobs"]) > 50:
        steps.note(f"... and {len(g['blobs']) - 50} more blob(s)")
    g["usage"] = u
    _state(ctx)["gc_report"] = g
    return g


def untagged_children(ctx, report: dict) -> dict:
    """{manifest digest: "repo:tag"} for manifests GC would delete as untagged although a
    tagged index/manifest list in the same repository references them (2.8's GC bug)."""
    c = client(ctx)
    doomed = {(m["repository"], m["digest"]) for m in report["manifests"]}
    repos = sorted({r for r, _ in doomed if r}) or c.catalog(MAX_PAGE)[0]
    pairs = [(r, t) for r in repos for t in c.tags(r, listed=True)]

    def children(rt):
        img = c.image(*rt)
        return [(rt[0], p["digest"]) for p in img.platforms]

    hit = {}
    for rt, kids in zip(pairs, pmap(children, pairs, desc="indexes")):
        for repo, d in kids:
            if (repo, d) in doomed or ("", d) in doomed:
                hit[d] = f"{rt[0]}:{rt[1]}"
    return hit


def _stop(ctx, dep: Deployment, h, state: dict):
    if dep.runtime == "docker":
        h.run(cmd("docker stop {n}", n=dep.container))
    elif dep.runtime == "podman":  # the unit owns the container (a stop removes it; start makes it again)
        h.run(cmd("systemctl stop {u}", u=PODMAN_UNIT))
    elif dep.runtime == "systemd":
        h.run(cmd("systemctl stop docker-registry"))
    else:
        from . import registry
        state[h.name] = _daemon(h)[0]  # 04's config hash, written back on start
        registry.stop_daemon(h)


def _start(ctx, dep: Deployment, h, state: dict):
    if dep.runtime == "docker":
        h.run(cmd("docker start {n}", n=dep.container))
    elif dep.runtime == "podman":
        h.run(cmd("systemctl start {u}", u=PODMAN_UNIT))
    elif dep.runtime == "systemd":
        h.run(cmd("systemctl start docker-registry"))
    else:
        from . import registry
        registry.start_daemon(h, dep.config_path, state.get(h.name) or "")


def wait_ready(ctx, timeout: float = 30.0):
    """Until /v2/ answers 200 with credentials (storage healthy) on every registry host."""
    from . import registry
    registry.wait_ready(ctx, timeout, healthy=True)


@steps.step("Garbage collection (gc_mode readonly: replicas read-only one at a time, pulls served; "
            "stop: registry stopped), then read-write again")
def garbage_collect(ctx, delete_untagged: bool = False, run: bool = True, dry_run: bool | None = None,
                    gc_mode: str | None = None) -> dict:
    """`registry garbage-collect CONFIG` while no replica can write: gc_mode readonly (default)
    switches every registry host to storage.maintenance.readonly, one at a time (config change +
    restart; with a load balancer each replica is drained first), so pulls are served throughout and
    pushes get 405; stop stops them all (every pull fails meanwhile).  Either way each replica is
    restarted at the end — its in-memory blob-descriptor cache would otherwise tell the next push that
    a collected blob still exists.  Measures the storage before and after.  Nothing eligible ->
    nothing changed (ok)."""
    mode = gc_mode or ctx.params.get("gc_mode") or "readonly"
    if mode not in GC_MODES:
        raise ParameterError([f"gc_mode: {mode!r} is not one of {', '.join(GC_MODES)}"])
    out = {"ran": False, "freed_bytes": None, "freed_objects": None, "mode": mode}
    if not run:
        steps.note("gc=False: not run (the dry-run report above shows what it would remove)")
        return out
    dry = _dry(ctx, dry_run)
    dep = detect(ctx)
    _state(ctx)["deployment"] = dep
    h = ctx.host(dep.hosts[0])
    pre = h.run(gc_argv(dep, dry_run=True, delete_untagged=delete_untagged, stopped=not dep.running), read=True,
                check=False, timeout=600)
    g = parse_gc_output(pre.stdout + "\n" + pre.stderr)
    steps.fact("registry", dep.describe())
    steps.fact("will delete", f"{g['blobs_eligible']} blob(s), {g['manifests_eligible']} manifest(s)"
               + (" (--delete-untagged)" if delete_untagged else ""))
    if pre.exit_code != 0:
        raise gc_failure(h, pre, delete_untagged)
    if not g["blobs_eligible"] and not g["manifests_eligible"]:
        steps.note("nothing to collect: registry left running")
        return out
    if delete_untagged and g["manifests"]:
        hit = untagged_children(ctx, g)
        if hit:
            raise RunbookError(
                "delete_untagged: --delete-untagged would delete the per-platform manifests of tagged "
                f"multi-platform image(s) {', '.join(sorted(set(hit.values())))} — registry 2.x's GC treats them as "
                "untagged (distribution/distribution#3178, fixed in registry 3) and they would stop pulling. "
                "Nothing was stopped or deleted.",
                "run garbage collection without delete_untagged (it still frees every unreferenced blob), or "
                "delete those images first")
    before = usage(ctx, dep)
    hosts = [ctx.host(a) for a in dep.hosts]
    if mode == "readonly" and not dep.running:
        steps.note("the registry is not running: gc_mode readonly needs it running; collecting as gc_mode=stop")
        mode = out["mode"] = "stop"
    steps.fact("gc_mode", mode + (" (pulls served, pushes refused with 405)" if mode == "readonly" else
                                  " (every pull fails while GC runs)"))
    if before:
        steps.fact("storage before", f"{human_bytes(before['bytes'])} in {before['objects']} object(s)")
    if dry and not ctx.dry_run:
        # a per-action dry run on a live context: show the commands, run none
        gc_cmd = " ".join(shlex.quote(a) for a in gc_argv(dep, dry_run=False, delete_untagged=delete_untagged,
                                                           stopped=True))
        verb = {"docker": f"docker {{}} {dep.container}", "systemd": "systemctl {} docker-registry",
                "podman": f"systemctl {{}} {PODMAN_UNIT}", "daemon": "{} docker-registry (pidfile)"}[dep.runtime]
        if mode == "readonly":
            verb = ("config.yml storage.maintenance.readonly {} + " +
                    {"docker": f"docker restart {dep.container}", "systemd": "systemctl restart docker-registry",
                     "podman": f"systemctl restart {PODMAN_UNIT}",
                     "daemon": "restart docker-registry (pidfile)"}[dep.runtime])
            for text in [*(f"[{x.name}] " + verb.format("on") for x in hosts), gc_cmd,
                         *(f"[{x.name}] " + verb.format("off") for x in hosts)]:
                record(Result(h.name, text, None, skipped=True, changed=True))
            return out
        for text in [*(f"[{x.name}] " + verb.format("stop") for x in hosts), gc_cmd,
                     *(f"[{x.name}] " + verb.format("start") for x in hosts)]:
            record(Result(h.name, text, None, skipped=True, changed=True))
        return out
    if mode == "readonly":
        out["ran"], out["readonly_window_s"] = _gc_readonly(ctx, dep, h, delete_untagged)
        hosts = []  # nothing stopped below
    state: dict = {}
    stopped = []
    try:
        for x in hosts:
            if dep.running or x is not h:
                _stop(ctx, dep, x, state)
                stopped.append(x)
        if mode == "readonly":
            raise _Done
        argv = gc_argv(dep, dry_run=False, delete_untagged=delete_untagged, stopped=True)
        r = h.run(argv, timeout=1800, check=False)
        if r.exit_code not in (0, None) and "failed to mark" in r.stdout + r.stderr:
            # the mark phase only reads (nothing is deleted before the sweep): a storage error there
            # (seen once on swift: "Operation forbidden" right after pushes were cut off) is retried once
            steps.note("garbage-collect failed in its mark phase (nothing deleted): retrying once")
            time.sleep(2)
            r = h.run(argv, timeout=1800, check=False)
        if r.exit_code not in (0, None):
            raise CommandFailed(h.name, r.command, r.exit_code, r.stdout, r.stderr,
                                hint="the registry is restarted anyway; look at the output above")
        out["ran"] = not r.skipped
    except _Done:
        pass
    finally:
        for x in stopped:
            _start(ctx, dep, x, state)
        if stopped and not dry:
            wait_ready(ctx)
    if dry:
        return out
    after = usage(ctx, dep)
    if before and after:
        out["freed_bytes"] = before["bytes"] - after["bytes"]
        out["freed_objects"] = before["objects"] - after["objects"]
        out["before"], out["after"] = before, after
        steps.fact("storage after", f"{human_bytes(after['bytes'])} in {after['objects']} object(s)")
        steps.fact("freed", f"{human_bytes(out['freed_bytes'])} ({out['freed_bytes']} bytes), "
                            f"{out['freed_objects']} object(s) — {before['where']}")
    steps.note("registry restarted: its blob-descriptor cache is empty again")
    _state(ctx)["gc"] = out
    return out


# -------------------------------------------------------------------------- verdict
def check(ctx):
    """Verdict: the registry API answered (catalog, tags, digest) and every asked-for
    delete / GC is done (or shown, in dry-run)."""
    st = _state(ctx)
    c = client(ctx)
    names, pages = c.catalog(MAX_PAGE)
    repo, tag = ctx.repository, ctx.tag
    facts = {"catalog": f"{len(names)} repositories"}
    problems = []
    if not is_pattern(repo):
        try:
            d = c.resolve(repo, tag) if repo in names else None
            if not d and (repo, tag) in st.get("deleted", set()):
                d = "deleted by this run"
            facts["image"] = f"{repo}:{tag} -> {d}" if d else f"{repo}:{tag} not found"
            if not d:
                problems.append(f"{repo}:{tag} is not in the registry")
        except RegistryError as e:
            problems.append(str(e))
    g = st.get("gc_report")
    if g:
        facts["gc dry-run"] = f"{g['blobs_eligible']} blob(s), {g['manifests_eligible']} manifest(s) collectable"
    gc = st.get("gc")
    if gc and gc.get("freed_bytes") is not None:
        facts["gc freed"] = f"{gc['freed_bytes']} bytes"
    if problems:
        ctx.verdict(False, "; ".join(problems), hint="push the image (05-push) or change repository/tag", **facts)
    what = "read-only operations (catalog, tags, digest) answered"
    if ctx.dry_run:
        what += "; deletes and GC shown, not done (dry run)"
    ctx.verdict(True, what + "; GC dry-run reported", **facts)  # printed; no return value to display


# -------------------------------------------------------------------------- GC without pull downtime (issue 17)
GC_MODES = ("readonly", "stop")
RW_KEEP = ".runbook-rw"  # next to config.yml: the read-write config, kept while a replica is read-only for GC


class _Done(Exception):
    """Internal: the readonly path has already collected (skips the stop path's body)."""


class _OneHost:
    """ctx seen as if registry_host were one replica (detect / wait_ready act on that one)."""

    def __init__(self, ctx, addr: str):
        self.__dict__.update(_ctx=ctx, registry_host=addr)

    def __getattr__(self, name):
        return getattr(self.__dict__["_ctx"], name)


def readonly_block() -> dict:
    """storage.maintenance for GC: 04-registry's own read-only rendering (as 08-migrate uses it)."""
    from . import registry
    return registry.render_config("inmemory", port=1, http_secret="-", readonly=True)["storage"]["maintenance"]


def _restart(ctx, dep: Deployment, h):
    """Restart one replica the way it runs: SIGTERM first (with http.draintimeout in-flight requests
    finish), then start; the in-memory blob-descriptor cache starts empty."""
    if dep.runtime == "docker":
        h.run(cmd("docker restart -t 15 {n}", n=dep.container))
    elif dep.runtime == "podman":
        h.run(cmd("systemctl restart {u}", u=PODMAN_UNIT))
    elif dep.runtime == "systemd":
        h.run(cmd("systemctl restart docker-registry"))
    else:
        state: dict = {}
        _stop(ctx, dep, h, state)
        _start(ctx, dep, h, state)


def set_readonly(ctx, addr: str, readonly: bool) -> bool:
    """One replica to storage.maintenance.readonly (its deployed config.yml with the maintenance
    block 04-registry renders for read-only; the read-write file kept as config.yml.runbook-rw) or
    back to the kept file, byte for byte (so 04's config hash still matches); written in place
    (owner, group, mode kept), then the replica restarted and waited for (200 with credentials).
    -> changed.  Idempotent: a replica already in that state is left alone."""
    one = _OneHost(ctx, addr)
    dep = detect(one)
    h = ctx.host(addr)
    path = dep.config_host
    if not path:
        raise RunbookError(f"{addr}: the registry's config.yml is not a file on the host (no bind mount found)",
                           "collect with gc_mode=stop")
    keep = path + RW_KEEP
    has_keep = h.exists(keep)
    if readonly:
        if dep.readonly:
            if not has_keep:
                steps.note(f"{addr}: already read-only (not by this runbook): left as it is")
            return False
        text = h.read_file(path)
        if text is None:
            raise RunbookError(f"{addr}: cannot read {path}", "collect with gc_mode=stop")
        cfg = parse_config(text.decode())
        cfg.setdefault("storage", {})["maintenance"] = readonly_block()
        from . import registry
        h.run(cmd("cp -p {p} {k}", p=path, k=keep))
        h.run(cmd("cat > {p}", p=path), stdin=registry.to_yaml(cfg), no_log=True)
    else:
        if not has_keep:
            return False
        h.run(cmd("cp -p {k} {p} && rm -f {k}", k=keep, p=path))
    if ctx.dry_run:
        return True
    t0 = time.monotonic()
    _restart(ctx, dep, h)
    from . import registry
    registry.wait_ready(one, 60, healthy=True)
    steps.row(host=addr, config="read-only" if readonly else "read-write",
              restart=f"{time.monotonic() - t0:.1f} s", at=dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S"))
    return True


def _run_gc(h, argv) -> Result:
    r = h.run(argv, timeout=1800, check=False)
    if r.exit_code not in (0, None) and "failed to mark" in r.stdout + r.stderr:
        steps.note("garbage-collect failed in its mark phase (nothing deleted): retrying once")
        time.sleep(2)
        r = h.run(argv, timeout=1800, check=False)
    return r


def _gc_readonly(ctx, dep: Deployment, h, delete_untagged: bool) -> tuple[bool, float]:
    """Every replica read-only (one at a time, drained from the LB first), GC on the first one
    (docker exec in the running read-only container), every replica back to read-write the same way
    — also when GC fails.  -> (ran, read-only window in seconds)."""
    from . import lb
    t0 = time.monotonic()
    ran = False
    try:
        lb.rolling(ctx, lambda a: set_readonly(ctx, a, True), dep.hosts)
        steps.note("every replica read-only: pulls are served, pushes get 405 (\"registry is read-only for GC\")")
        ro_dep = detect(ctx)
        r = _run_gc(h, gc_argv(ro_dep, dry_run=False, delete_untagged=delete_untagged, stopped=not ro_dep.running))
        if r.exit_code not in (0, None):
            raise CommandFailed(h.name, r.command, r.exit_code, r.stdout, r.stderr,
                                hint="every replica is switched back to read-write anyway; look at the output above")
        ran = not r.skipped
    finally:
        lb.rolling(ctx, lambda a: set_readonly(ctx, a, False), dep.hosts)
        if not ctx.dry_run:
            wait_ready(ctx)
    window = round(time.monotonic() - t0, 1)
    steps.fact("read-only window", f"{window} s (first replica read-only -> last one read-write again)")
    return ran, window


@steps.step("Rolling restart of every registry replica (drained from the load balancer first)")
def rolling_restart(ctx) -> list:
    """Each replica restarted in turn (SIGTERM, in-flight requests finish, start, 200 with
    credentials), the next only when the previous one is back (and UP in haproxy)."""
    from . import lb

    def one(a):
        dep = detect(_OneHost(ctx, a))
        t0 = time.monotonic()
        _restart(ctx, dep, ctx.host(a))
        if not ctx.dry_run:
            from . import registry
            registry.wait_ready(_OneHost(ctx, a), 60, healthy=True)
        steps.row(host=a, restart=f"{time.monotonic() - t0:.1f} s")
        return a
    return lb.rolling(ctx, one, _registry_hosts(ctx))
