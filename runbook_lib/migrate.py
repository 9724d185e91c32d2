"""Section 8: move a registry deployed by 04-registry with storage=swift to the s3 driver, in place.

Same RGW user, same bucket (the Swift container IS the S3 bucket for a plain RGW user), and the
s3 driver's `rootdirectory` set to the swift driver's prefix (`/files`), so that s3 reads the tree
swift wrote.  Registry 3 has no swift driver: this is the way there.

What the s3 driver cannot live with (measured on RGW 16.2.15, see notebooks/08-migrate.ipynb):
every blob the swift driver stored through the upload API is a Dynamic Large Object: a zero-byte
`files/docker/registry/v2/blobs/sha256/xx/<hex>/data` with `X-Object-Manifest: <bucket>/segments/..`,
the bytes in `segments/...`.  RGW's S3 HEAD/GET resolve it (full length, concatenated bytes), but its
ListObjects entry says Size 0 — and registry 2.8's s3 `Stat` takes the size from the listing: it
would serve every layer as 0 bytes.  So every DLO blob is made a plain object first, server-side:

- `CopyObject` of a DLO copies the manifest attribute (the copy is another DLO), and a self-copy
  with `MetadataDirective: REPLACE` turns it into a 0-byte plain object (data gone): never used.
- `UploadPartCopy` from the DLO copies 0 bytes.  `UploadPartCopy` from each *segment* (plain
  objects) into a multipart upload works: RGW copies the bytes internally.  Parts but the last
  must be >= 5 MiB (RGW: EntityTooSmall), true for the swift driver's 20 MiB chunks of a blob
  pushed in one PATCH.
- Otherwise (segments under 5 MiB: a small `chunksize`, or a chunked upload) the object is
  streamed on the RGW host itself (curl GET of the DLO to a 0700 temp file, sha256 checked, PUT):
  the bytes never leave the RGW host, never through the control node.

Either way the new object is built under `_migrate/staging/<hex>` (outside the registry's tree),
its sha256 checked on the RGW host, copied over the DLO key (an atomic replace: readers see the
DLO or the plain object), checked again; the DLO's `X-Object-Manifest` is kept in
`_migrate/state.json` in the bucket, and its segments are deleted only once every digest of the
inventory verified through the registry on the s3 config.  Until then a rollback can restore any
DLO.  Plain objects are readable by the swift driver too: rolling back to swift works at any time.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from urllib.parse import quote

from . import accounts, journal, masking, operations, params as P, registry, steps
from .errors import RunbookError
from .host import cmd
from .journal import Result
from .steps import step

MiB = 1 << 20
MIN_PART = 5 * MiB          # RGW rgw_multipart_min_part_size (EntityTooSmall below it, but the last part)
MAX_COPY = 5 * 1024 * MiB   # CopyObject limit; larger objects are copied as ranged parts
STAGING = "_migrate/staging/"
STATE_KEY = "_migrate/state.json"
RGW_CONF_DIR = "/run/runbook-migrate"        # 0700 on the RGW host: the curl config (S3 keys)
RGW_TMP_DIR = "/var/tmp/runbook-migrate"     # 0700 on the RGW host: stream-converted blobs, one at a time
BLOB_RE = re.compile(r"docker/registry/v2/blobs/sha256/[0-9a-f]{2}/([0-9a-f]{64})/data$")
UPLOAD_RE = re.compile(r"docker/registry/v2/repositories/.+/_uploads/")
RESTART_S = 3.0            # what one replica restart costs here (rm + run + TLS up + storage healthy)
PART_COPY_MIB_S = 100.0    # measured: 13 MiB part-copied in 0.13 s
HASH_MIB_S = 150.0         # sha256 of an object read on the RGW host
S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


class MigrateError(RunbookError):
    pass


# =========================================================================== S3, signed, no bytes
class S3:
    """Signed S3 requests from the control node (the project's SigV4 signer), journaled.  Only
    listings, HEADs, copies, deletes and small JSON go through it: no blob bytes."""

    def __init__(self, endpoint: str, bucket: str, access: str, secret: str, region: str = registry.S3_REGION):
        import requests
        self.endpoint, self.bucket, self.region = endpoint.rstrip("/"), bucket, region
        self._ak, self._sk = access, masking.register(secret)
        self.s = requests.Session()
        self.s.trust_env = False

    def url(self, key: str = "") -> str:
        return f"{self.endpoint}/{self.bucket}" + (f"/{key}" if key else "")

    def req(self, method: str, key: str = "", query: str = "", headers: dict | None = None, data: bytes = b"",
            ok=(200,), read: bool = False, what: str = ""):
        u = self.url(key) + (f"?{query}" if query else "")
        h = accounts.sigv4_headers(method, u, self._ak, self._sk, payload=data, region=self.region)
        h.update(headers or {})
        t0 = time.monotonic()
        r = None
        for attempt in range(4):   # RGW restarts (other tests, a reboot) are ridden out, briefly
            try:
                r = self.s.request(method, u, headers=h, data=data or None, timeout=120)
                if r.status_code < 500:
                    break
            except Exception as e:  # noqa: BLE001 - connection refused while RGW restarts
                if attempt == 3:
                    journal.record(Result("rgw", what or f"{method} {u} (S3 v4)", -1, "", str(e)[:200],
                                          time.monotonic() - t0, read=read, kind="http"))
                    raise MigrateError(f"S3 {method} {u}: {type(e).__name__}", "is RGW up? (01-rgw)") from None
            time.sleep(1.0 + attempt)
            h = accounts.sigv4_headers(method, u, self._ak, self._sk, payload=data, region=self.region)
            h.update(headers or {})
        journal.record(Result("rgw", what or f"{method} {u} (S3 v4)", r.status_code, "", "", time.monotonic() - t0,
                              read=read, changed=not read and r.status_code in ok, kind="http", no_log=True))
        if r.status_code not in ok:
            code = re.search(r"<Code>([^<]+)</Code>", r.text or "")
            raise MigrateError(f"S3 {method} {u}: HTTP {r.status_code} {code.group(1) if code else ''}".strip())
        return r

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """Every (key, listing Size) under prefix (ListObjects v1, marker pages)."""
        out, marker = [], ""
        while True:
            q = "max-keys=1000&prefix=" + prefix + (f"&marker={marker}" if marker else "")
            r = self.req("GET", "", q, read=True, what=f"S3 list {self.bucket}/{prefix}*")
            root = ET.fromstring(r.content)
            items = [(c.findtext(f"{S3_NS}Key"), int(c.findtext(f"{S3_NS}Size") or 0))
                     for c in root.findall(f"{S3_NS}Contents")]
            out += items
            if root.findtext(f"{S3_NS}IsTruncated") != "true" or not items:
                return out
            marker = items[-1][0]

    def head(self, key: str):
        return self.req("HEAD", key, ok=(200, 404), read=True, what=f"S3 HEAD {self.bucket}/{key}")

    def get_small(self, key: str) -> bytes | None:
        r = self.req("GET", key, ok=(200, 404), read=True, what=f"S3 GET {self.bucket}/{key}")
        return r.content if r.status_code == 200 else None

    def put_small(self, key: str, data: bytes, content_type: str = "application/octet-stream"):
        return self.req("PUT", key, headers={"Content-Type": content_type}, data=data,
                        what=f"S3 PUT {self.bucket}/{key} ({len(data)} bytes)")

    def delete(self, key: str):
        return self.req("DELETE", key, ok=(204, 200, 404), what=f"S3 DELETE {self.bucket}/{key}")

    def delete_many(self, keys: list[str]) -> int:
        """DeleteObjects, 1000 keys a request; returns how many were asked."""
        for i in range(0, len(keys), 1000):
            body = ("<Delete><Quiet>true</Quiet>" + "".join(
                f"<Object><Key>{k}</Key></Object>" for k in keys[i:i + 1000]) + "</Delete>").encode()
            r = self.req("POST", "", "delete", data=body, what=f"S3 DeleteObjects {len(keys[i:i + 1000])} key(s)")
            if b"<Error>" in r.content:
                raise MigrateError(f"DeleteObjects reported errors: {r.text[:300]}")
        return len(keys)

    def copy(self, src: str, dst: str):
        """CopyObject within the bucket (RGW copies the data; never used on a DLO source)."""
        return self.req("PUT", dst, headers={"x-amz-copy-source": f"/{self.bucket}/{src}"},
                        what=f"S3 CopyObject {src} -> {dst}")

    def part_copy(self, dst: str, sources: list[tuple[str, str | None]]):
        """A multipart upload of dst whose parts are UploadPartCopy of (key, range or None)."""
        r = self.req("POST", dst, "uploads", headers={"Content-Type": "application/octet-stream"},
                     what=f"S3 CreateMultipartUpload {dst}")
        upload = ET.fromstring(r.content).findtext(f"{S3_NS}UploadId")
        try:
            etags = []
            for n, (src, rng) in enumerate(sources, 1):
                h = {"x-amz-copy-source": f"/{self.bucket}/{src}"}
                if rng:
                    h["x-amz-copy-source-range"] = rng
                r = self.req("PUT", dst, f"partNumber={n}&uploadId={upload}", headers=h,
                             what=f"S3 UploadPartCopy {src}{' ' + rng if rng else ''} -> {dst} part {n}")
                etags.append(ET.fromstring(r.content).findtext(f"{S3_NS}ETag"))
            body = ("<CompleteMultipartUpload>" + "".join(
                f"<Part><PartNumber>{n}</PartNumber><ETag>{e}</ETag></Part>" for n, e in enumerate(etags, 1))
                + "</CompleteMultipartUpload>").encode()
            self.req("POST", dst, f"uploadId={upload}", data=body, what=f"S3 CompleteMultipartUpload {dst}")
        except Exception:
            self.req("DELETE", dst, f"uploadId={upload}", ok=(204, 200, 404), what=f"S3 AbortMultipartUpload {dst}")
            raise

    def copy_any(self, src: str, dst: str, size: int):
        if size <= MAX_COPY:
            return self.copy(src, dst)
        step_ = 1024 * MiB   # (not exercised in the lab: no blob there is over 5 GiB)
        return self.part_copy(dst, [(src, f"bytes={o}-{min(o + step_, size) - 1}") for o in range(0, size, step_)])


# =========================================================================== the RGW host's hands
class RgwHands:
    """Commands on the RGW host that read object bytes there (sha256, stream conversion):
    curl against RGW's S3 API with the keys in a 0600 config file (never on a command line)."""

    def __init__(self, ctx, s3: S3):
        self.ctx, self.s3 = ctx, s3
        self.h = ctx.host(ctx.rgw_host)
        self.conf = f"{RGW_CONF_DIR}/s3.conf"
        self._ready = False

    def _setup(self):
        if self._ready:
            return
        self.h.run(cmd("mkdir -p -m 0700 {d} {t}", d=RGW_CONF_DIR, t=RGW_TMP_DIR), changed=False)
        conf = registry.curl_conf(user=f"{self.s3._ak}:{self.s3._sk}", aws_sigv4=f"aws:amz:{self.s3.region}:s3",
                                   header="x-amz-content-sha256: UNSIGNED-PAYLOAD")
        self.h.put_file(self.conf, conf, mode=0o600, secret=True)
        self._ready = True

    def sha256(self, key: str) -> str:
        self._setup()
        r = self.h.run(cmd("curl -sfS --retry 3 --retry-connrefused -K {c} {u} | sha256sum", c=self.conf,
                           u=self.s3.url(key)), read=True, check=False)
        return r.stdout.split()[0] if r.exit_code == 0 and r.stdout.strip() else f"error {r.exit_code}"

    def stream(self, src: str, dst: str, hexd: str):
        """GET src (a DLO: RGW concatenates it) into a temp file ON THE RGW HOST, check its sha256,
        PUT it as dst.  The bytes stay on the RGW host."""
        self._setup()
        f = f"{RGW_TMP_DIR}/{hexd}"
        script = cmd("curl -sfS --retry 3 --retry-connrefused -K {c} -o {f} {s} && "
                     "test \"$(sha256sum < {f} | cut -d' ' -f1)\" = {x} && "
                     "curl -sfS --retry 3 --retry-connrefused -K {c} -H 'Content-Type: application/octet-stream' "
                     "-T {f} {d} -o /dev/null; rc=$?; rm -f {f}; exit $rc",
                     c=self.conf, f=f, s=self.s3.url(src), x=hexd, d=self.s3.url(dst))
        r = self.h.run(script, check=False, timeout=3600)
        if r.exit_code != 0:
            raise MigrateError(f"stream conversion of {src} failed on {self.h.name} (exit {r.exit_code}): "
                               f"{masking.mask(r.stderr)[-300:]}", "nothing was replaced; run again")

    def corrupt(self, key: str, size: int):
        """fault=corrupt-one (tests): overwrite key with `size` zero bytes."""
        self._setup()
        f = f"{RGW_TMP_DIR}/corrupt"
        self.h.run(cmd("head -c {n} /dev/zero > {f} && curl -sfS -K {c} -T {f} {u} -o /dev/null; rc=$?; rm -f {f}; "
                       "exit $rc", n=str(size), f=f, c=self.conf, u=self.s3.url(key)))

    def cleanup(self):
        if self._ready:
            self.h.run(cmd("rm -rf {d} {t}", d=RGW_CONF_DIR, t=RGW_TMP_DIR), changed=False)
            self._ready = False


# =========================================================================== pure helpers (unit-tested)
def swift_layout(swift_cfg: dict) -> dict:
    """Where the swift driver keeps things: its `prefix` option (rootdirectory is not one of its
    keys: mapstructure drops it) -> files root, segments root, the s3 rootdirectory to use."""
    prefix = str(swift_cfg.get("prefix") or "").strip("/")
    base = f"{prefix}/" if prefix else ""
    return {"files": f"{base}files/", "segments": f"{base}segments/", "rootdirectory": f"/{base}files"}


def choose_method(segments: list[tuple[str, int]]) -> str:
    """How a DLO becomes a plain object: "empty" (no bytes), "part-copy" (every segment but the
    last >= 5 MiB, at most 10000: UploadPartCopy of each segment), else "stream" (on the RGW host)."""
    if not segments or sum(s for _, s in segments) == 0:
        return "empty"
    if len(segments) <= 10000 and all(s >= MIN_PART for _, s in segments[:-1]) and all(s > 0 for _, s in segments):
        return "part-copy"
    return "stream"


def manifest_prefix(value: str, bucket: str) -> str | None:
    """X-Object-Manifest `<container>/<prefix>` -> prefix, when it is in our bucket."""
    c, _, p = (value or "").partition("/")
    return p if c == bucket and p else None


def estimate_readonly(n_hosts: int, delta_bytes: int, uploads: int) -> float:
    """Seconds the registry is read-only: a restart per replica into read-only and one out (the
    window spans them all, one at a time), plus converting what the pre-pass left."""
    conv = delta_bytes / MiB / PART_COPY_MIB_S + 2 * delta_bytes / MiB / HASH_MIB_S
    return round(2 * n_hosts * RESTART_S + conv + 0.05 * uploads, 1)


def human(n) -> str:
    return operations.human_bytes(n)


# =========================================================================== state
@dataclass
class Survey:
    """What is there now: per host the running config, and the objects in the bucket."""
    hosts: dict = field(default_factory=dict)           # address -> "swift" | "swift-ro" | "s3" | "s3-ro" | other
    layout: dict = field(default_factory=dict)
    dlo_blobs: dict = field(default_factory=dict)       # hex -> {"key", "manifest", "size", "segments", "method"}
    plain_blobs: int = 0
    plain_bytes: int = 0
    uploads: list = field(default_factory=list)         # keys under _uploads/
    upload_manifests: list = field(default_factory=list)
    segments: list = field(default_factory=list)        # (key, size)
    staging: list = field(default_factory=list)
    objects: int = 0


def _state(ctx) -> dict:
    return ctx.__dict__.setdefault("_migrate", {})


def _container(ctx) -> str:
    return ctx.params.get("container", "registry")


def s3(ctx) -> S3:
    st = _state(ctx)
    if "s3" not in st:
        access, secret = accounts.s3_credentials(ctx)
        st["s3"] = S3(f"http://{ctx.rgw_host}:{ctx.rgw_port}", _container(ctx), access, secret)
    return st["s3"]


def hands(ctx) -> RgwHands:
    st = _state(ctx)
    if "hands" not in st:
        st["hands"] = RgwHands(ctx, s3(ctx))
    return st["hands"]


def _creds(ctx) -> dict:
    st = _state(ctx)
    if "creds" not in st:
        su, sk = accounts.swift_credentials(ctx)
        ak, sec = accounts.s3_credentials(ctx)
        st["creds"] = {"swift": {"swift_user": su, "swift_key": masking.register(sk)},
                       "s3": {"s3_access": ak, "s3_secret": masking.register(sec)}}
    return st["creds"]


STATES = {"swift": ("swift", False), "swift-ro": ("swift", True), "s3-ro": ("s3", True), "s3": ("s3", False)}


def sub(ctx, host: str, state: str):
    """A context for ONE registry host rendering one of the four configs (04-registry's own
    rendering: same files, same config hash label, so a 04 re-run with the same parameters agrees)."""
    from .context import Context
    storage, ro = STATES[state]
    p = dict(ctx.params, registry_host=host, storage=storage, readonly=ro,
             s3_rootdirectory=layout(ctx)["rootdirectory"] if storage == "s3" else "")
    c = Context(ctx.section, p)
    c._hosts = ctx._hosts   # same connections
    c.__dict__["_registry"] = {"creds": _creds(ctx)[storage]}
    return c


def layout(ctx) -> dict:
    st = _state(ctx)
    return st.get("layout") or swift_layout({})


def _running_hash(ctx, h) -> str | None:
    if ctx.runtime == "docker":
        return registry.docker_state(h)[0]
    r = h.run(cmd("cat {f} 2>/dev/null || true", f=registry.HASHFILE), read=True)
    return r.stdout.strip() or None


def host_state(ctx, host: str) -> str:
    """Which of the four configs runs on host (by 04's config-hash label), else what its config file says."""
    h = ctx.host(host)
    label = _running_hash(ctx, h)
    for name in STATES:
        if label and label == registry.config_hash(sub(ctx, host, name)):
            return name
    dep = operations.detect(sub(ctx, host, "swift"))
    return f"{dep.storage}{'-ro' if dep.readonly else ''} (not this runbook's rendering)"


def _read_swift_layout(ctx) -> dict:
    """The swift driver's prefix from the deployed config.yml on the first registry host."""
    h = ctx.host(P.as_list(ctx.registry_host)[0])
    path = f"{ctx.remote_dir}/config.yml" if ctx.runtime == "docker" else registry.SYSTEMD_CONFIG
    text = h.read_file(path)
    cfg = operations.parse_config(text.decode()) if text else {}
    sw = (cfg.get("storage") or {}).get("swift") or {}
    if sw.get("container") and sw["container"] != _container(ctx):
        raise MigrateError(f"container: the deployed config stores in Swift container {sw['container']!r}, "
                           f"not {_container(ctx)!r}", "pass container= as 04-registry was deployed")
    return swift_layout(sw)


def survey(ctx) -> Survey:
    """Hosts' running configs, and every object of the bucket that matters (reads only)."""
    st = _state(ctx)
    if "layout" not in st:
        try:
            st["layout"] = _read_swift_layout(ctx)
        except MigrateError:
            raise
        except Exception:  # noqa: BLE001 - a migrated host has no swift section: default layout
            st["layout"] = swift_layout({})
    lay = st["layout"]
    sv = Survey(layout=lay)
    sv.hosts = dict(zip(P.as_list(ctx.registry_host),
                        journal.parallel(lambda a: host_state(ctx, a), P.as_list(ctx.registry_host))))
    c = s3(ctx)
    files = c.list(lay["files"])
    sv.objects = len(files)
    zero = [k for k, size in files if size == 0 and k.endswith("/data")]
    heads = dict(zip(zero, operations.pmap(lambda k: c.head(k), zero, desc="HEAD zero-size objects", workers=8)))
    for k, size in files:
        rel = k[len(lay["files"]):]
        if UPLOAD_RE.match(rel):
            sv.uploads.append(k)
        m = BLOB_RE.match(rel)
        r = heads.get(k)
        man = r.headers.get("X-Object-Manifest") if r is not None and r.status_code == 200 else None
        if m and man:
            sv.dlo_blobs[m.group(1)] = {"key": k, "manifest": man, "size": int(r.headers.get("Content-Length", 0))}
        elif m:
            sv.plain_blobs += 1
            sv.plain_bytes += size
        elif man and UPLOAD_RE.match(rel):
            sv.upload_manifests.append(man)
    sv.segments = c.list(lay["segments"])
    sv.staging = [k for k, _ in c.list(STAGING)]
    by_prefix: dict = {}
    for k, size in sv.segments:
        by_prefix.setdefault(k.rsplit("/", 1)[0], []).append((k, size))
    for hexd, b in sv.dlo_blobs.items():
        pre = manifest_prefix(b["manifest"], c.bucket)
        if pre is None:
            raise MigrateError(f"blob {hexd[:12]}: X-Object-Manifest {b['manifest']!r} points outside bucket "
                               f"{c.bucket}", "this is not a layout the swift driver writes; stop and look")
        segs = sorted([(k, s) for k, s in sv.segments if k.startswith(pre)])
        b["segments"] = segs
        b["method"] = choose_method(segs)
    return sv


def load_state(ctx) -> dict:
    raw = s3(ctx).get_small(STATE_KEY)
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def save_state(ctx, data: dict):
    data["updated"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    s3(ctx).put_small(STATE_KEY, json.dumps(data, indent=1, sort_keys=True).encode(), "application/json")


# =========================================================================== 1. inventory
@step("Inventory through the registry API and RGW")
def inventory(ctx) -> dict:
    """Every repository, tag, manifest digest (index children included) and blob, read through
    the registry; the bucket's objects and bytes from `radosgw-admin bucket stats`."""
    c = operations.client(ctx)
    names, _ = c.catalog(operations.MAX_PAGE)
    tags, manifests, blobs, schema1 = {}, {}, {}, []

    def walk(repo, ref):
        img = c.image(repo, ref)
        manifests[(repo, img.digest)] = img.media_type
        if img.media_type == getattr(operations, "DOCKER_V1", "schema1") or img.manifest.get("schemaVersion") == 1:
            schema1.append(f"{repo}@{img.digest}")
        for p in img.platforms:
            if (repo, p["digest"]) not in manifests:
                walk(repo, p["digest"])
        for d in ([img.config] if img.config else []) + img.layers:
            if d and d.get("digest"):
                blobs.setdefault(d["digest"], {"repo": repo, "size": d.get("size")})
        return img.digest

    for repo in names:
        tags[repo] = {}
        for t in c.tags(repo, listed=True):
            tags[repo][t] = walk(repo, t)
    inv = {"repos": tags, "manifests": manifests, "blobs": blobs, "schema1": schema1}
    r = ctx.host(ctx.rgw_host).run(cmd("radosgw-admin bucket stats --bucket={b}", b=_container(ctx)), read=True,
                                  check=False)
    inv["bucket"] = operations.parse_bucket_stats(r.stdout) if r.exit_code == 0 else None
    ntags = sum(len(v) for v in tags.values())
    steps.fact("repositories", len(names))
    steps.fact("tags", ntags)
    steps.fact("manifests", f"{len(manifests)} ({sum(1 for m in manifests.values() if m in operations.INDEX_TYPES)} "
                            "index(es))")
    steps.fact("blobs", f"{len(blobs)} ({human(sum(b['size'] or 0 for b in blobs.values()))})")
    if inv["bucket"]:
        steps.fact(f"RGW bucket {_container(ctx)}", f"{inv['bucket']['objects']} object(s), "
                                                    f"{human(inv['bucket']['bytes'])} (radosgw-admin bucket stats)")
    for repo, tg in sorted(tags.items()):
        for t, d in sorted(tg.items()):
            steps.row(repository=repo, tag=t, digest=d, type=operations.SHORT_TYPE.get(manifests[(repo, d)],
                                                                                     manifests[(repo, d)]))
    _state(ctx)["inventory"] = inv
    return inv


# =========================================================================== 2. plan
@step("Plan: the s3 config, the objects to convert, the read-only window, the rollback")
def plan(ctx) -> dict:
    """All a dry run (or switch=False) does: read, and show what switch=True would do."""
    sv = survey(ctx)
    _state(ctx)["survey"] = sv
    hosts = list(sv.hosts)
    lay = sv.layout
    cfg = registry.config_for(sub(ctx, hosts[0], "s3"))
    steps.fact("new config.yml", f"s3 on bucket {_container(ctx)} (same RGW user {ctx.uid}), rootdirectory "
                                 f"{lay['rootdirectory']}, forcepathstyle, redirect off — shown below (masked)")
    steps.fact("hosts now", ", ".join(f"{a}: {s}" for a, s in sv.hosts.items()))
    by_method: dict = {}
    for b in sv.dlo_blobs.values():
        by_method.setdefault(b["method"], []).append(b)
    dlo_bytes = sum(b["size"] for b in sv.dlo_blobs.values())
    seg_bytes = sum(s for _, s in sv.segments)
    steps.fact("DLO blobs to convert", f"{len(sv.dlo_blobs)} ({human(dlo_bytes)}): " + (", ".join(
        f"{len(v)} {k}" for k, v in sorted(by_method.items())) or "none"))
    steps.fact("plain blobs (nothing to do)", f"{sv.plain_blobs} ({human(sv.plain_bytes)})")
    steps.fact("swift segments", f"{len(sv.segments)} object(s), {human(seg_bytes)} — deleted after verification")
    steps.fact("leftover _uploads", f"{len(sv.uploads)} object(s) ({len(sv.upload_manifests)} DLO) — deleted while "
                                    "read-only (the s3 driver cannot resume a swift upload)")
    swift_hosts = [a for a, s in sv.hosts.items() if s.startswith("swift")]
    prepass = ctx.params.get("prepass", True)
    delta = 0 if prepass and any(s == "swift" for s in sv.hosts.values()) else dlo_bytes
    est = estimate_readonly(len(swift_hosts), delta, len(sv.uploads)) if swift_hosts else 0.0
    steps.fact("read-only window", f"~{est:.0f} s (estimate: {2 * len(swift_hosts)} restart(s) of ~{RESTART_S:.0f} s one "
                                   "host at a time" + ("; the pre-pass converts the blobs while read-write" if prepass
                                                       else f"; converting {human(dlo_bytes)} inside it") + ")")
    steps.fact("order", "pre-pass conversion (swift serving) -> each replica read-only -> convert the rest, drop "
                        "_uploads -> each replica on s3 -> verify every digest + push/pull -> GC (read-only, pulls "
                        "served) -> delete segments")
    steps.fact("rollback", "one step: every replica back on its swift config (plain objects read fine with swift); a "
                           "blob that failed verification gets its DLO manifest back (its segments are kept until "
                           "verification passed)")
    for hexd, b in sorted(sv.dlo_blobs.items())[:50]:
        steps.row(blob=f"sha256:{hexd[:16]}…", size=b["size"], segments=len(b["segments"]), method=b["method"])
    if len(sv.dlo_blobs) > 50:
        steps.note(f"... and {len(sv.dlo_blobs) - 50} more")
    st = load_state(ctx)
    done = (all(s == "s3" for s in sv.hosts.values()) and not sv.dlo_blobs and not sv.segments
            and not sv.staging and st.get("phase") in (None, "done"))
    out = {"hosts": sv.hosts, "dlo": len(sv.dlo_blobs), "dlo_bytes": dlo_bytes, "segments": len(sv.segments),
           "uploads": len(sv.uploads), "readonly_estimate": est, "config": cfg, "migrated": done,
           "phase": st.get("phase")}
    if done:
        steps.note("already migrated: every replica runs the s3 config and no DLO or segment is left")
    elif st.get("phase"):
        steps.note(f"an earlier run stopped at phase {st['phase']!r}: switch=True finishes it")
    _state(ctx)["plan"] = out
    return out


def show_config(ctx) -> registry.MaskedConfig:
    host = P.as_list(ctx.registry_host)[0]
    s = sub(ctx, host, "s3")
    path = f"{ctx.remote_dir}/config.yml" if ctx.runtime == "docker" else registry.SYSTEMD_CONFIG
    return registry.MaskedConfig(registry.to_yaml(registry.config_for(s)), path)


# =========================================================================== 3. switch
def _go(ctx) -> bool:
    return bool(ctx.params.get("switch")) and not ctx.dry_run


def _skip(ctx, why: str = "") -> bool:
    if not _go(ctx):
        steps.note("plan only (switch=False): nothing changed" if not ctx.dry_run else "dry run: nothing changed")
        return True
    if _state(ctx).get("failed"):
        steps.note(f"skipped: {_state(ctx)['failed']}")
        return True
    if why:
        steps.note(why)
        return True
    return False


def apply(ctx, host: str, state: str) -> bool:
    """Restart ONE replica on one of the four configs (04-registry's configure + start), and
    wait until it answers 200 with credentials (its storage healthy).  -> changed."""
    if host_state(ctx, host) == state:
        return False
    s = sub(ctx, host, state)
    registry.configure.__wrapped__(s)
    registry.start.__wrapped__(s)
    registry.wait_ready(s, timeout=60, healthy=True)
    steps.row(host=host, config=state, at=dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S"))
    return True


def _phase(ctx, phase: str, **extra):
    st = _state(ctx).setdefault("record", None) or load_state(ctx)
    st.update(phase=phase, **extra)
    st.setdefault("manifests", {})
    _state(ctx)["record"] = st
    save_state(ctx, st)


def _record(ctx) -> dict:
    st = _state(ctx)
    if not st.get("record"):
        st["record"] = load_state(ctx)
        st["record"].setdefault("manifests", {})
    return st["record"]


def _guard(ctx, what: str, fn):
    """Run a switch-phase action; a failure is recorded (the rollback step then acts), not raised."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure means: roll back
        _state(ctx)["failed"] = masking.mask(f"{what}: {e}")
        steps.note(f"FAILED: {_state(ctx)['failed']} — the rollback step below puts swift back")
        return None


def convert_blob(ctx, hexd: str, b: dict) -> dict:
    """One DLO blob -> a plain object at the same key, verified; its segments are kept."""
    c, hd = s3(ctx), hands(ctx)
    rec = _record(ctx)
    if hexd not in rec["manifests"]:          # kept BEFORE the DLO is replaced: a rollback can restore it
        rec["manifests"][hexd] = {"key": b["key"], "manifest": b["manifest"], "size": b["size"]}
        save_state(ctx, rec)
    stage = STAGING + hexd
    t0 = time.monotonic()
    if b["method"] == "empty":
        c.put_small(stage, b"")
    elif b["method"] == "part-copy":
        c.part_copy(stage, [(k, None) for k, _ in b["segments"]])
    else:
        hd.stream(b["key"], stage, hexd)
    got = hd.sha256(stage) if b["size"] else hashlib.sha256(b"").hexdigest()
    if got != hexd:
        c.delete(stage)
        raise MigrateError(f"blob sha256:{hexd[:16]}: the {b['method']} copy has sha256 {got[:16]}: the DLO was NOT "
                           "replaced", "run again; if it repeats, its segments are damaged")
    c.copy_any(stage, b["key"], b["size"])
    r = c.head(b["key"])
    final = hd.sha256(b["key"]) if b["size"] else got
    if r.headers.get("X-Object-Manifest") or int(r.headers.get("Content-Length", -1)) != b["size"] or final != hexd:
        _restore(ctx, hexd, rec["manifests"][hexd])
        raise MigrateError(f"blob sha256:{hexd[:16]}: the new object did not verify (manifest header "
                           f"{r.headers.get('X-Object-Manifest')!r}, length {r.headers.get('Content-Length')}, sha256 "
                           f"{final[:16]}); its DLO manifest was restored")
    c.delete(stage)
    listed = c.list(b["key"])
    if not listed or listed[0][1] != b["size"]:
        raise MigrateError(f"blob sha256:{hexd[:16]}: listing Size {listed[:1]} after conversion, want {b['size']}")
    rec.setdefault("converted", {})[hexd] = b["method"]
    save_state(ctx, rec)
    return {"blob": f"sha256:{hexd[:16]}…", "size": b["size"], "method": b["method"],
            "seconds": round(time.monotonic() - t0, 2), "sha256": "verified"}


def _convert_all(ctx, title: str) -> dict:
    sv = survey(ctx)
    out = {"converted": 0, "bytes": 0, "seconds": 0.0, "by_method": {}}
    fault = str(ctx.params.get("fault", "") or "")
    rec = _record(ctx)
    new = {h: {"key": b["key"], "manifest": b["manifest"], "size": b["size"]} for h, b in sv.dlo_blobs.items()
           if h not in rec["manifests"]}
    if new:   # every DLO's manifest kept BEFORE any is replaced: a rollback / re-run knows them all
        rec["manifests"].update(new)
        save_state(ctx, rec)
    t0 = time.monotonic()
    for hexd, b in sorted(sv.dlo_blobs.items()):
        row = convert_blob(ctx, hexd, b)
        steps.row(**row)
        out["converted"] += 1
        out["bytes"] += b["size"]
        out["by_method"][b["method"]] = out["by_method"].get(b["method"], 0) + 1
        if fault.startswith("slow"):
            time.sleep(float(fault.partition(":")[2] or 2))
    out["seconds"] = round(time.monotonic() - t0, 2)
    for k in sv.staging:   # leftovers of an interrupted run
        s3(ctx).delete(k)
    steps.fact(title, f"{out['converted']} DLO blob(s), {human(out['bytes'])} in {out['seconds']:.1f} s "
                      + (f"({', '.join(f'{n} {m}' for m, n in sorted(out['by_method'].items()))})"
                         if out["converted"] else "— none left"))
    return out


@step("Pre-pass: convert the DLO blobs while swift still serves (read-write)")
def prepass(ctx) -> dict | None:
    """Blobs are immutable and the plain object reads the same through swift: converting them
    before the read-only window keeps that window to the restarts."""
    if _skip(ctx):
        return None
    return _guard(ctx, 'pre-pass', lambda: _prepass(ctx))


def _prepass(ctx):
    sv = _state(ctx).get("survey") or survey(ctx)
    if not ctx.params.get("prepass", True):
        steps.note("prepass=False: everything is converted inside the read-only window")
        return None
    if not any(s == "swift" for s in sv.hosts.values()):
        steps.note("no replica is read-write on swift (a re-run): the rest is converted read-only")
        return None
    _phase(ctx, "prepass", started=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    out = _convert_all(ctx, "pre-pass")
    _state(ctx)["prepass"] = out
    return out


@step("Read-only: each replica restarted on swift + storage.maintenance.readonly, one at a time")
def readonly(ctx) -> dict | None:
    """Pulls are served throughout (each replica is down for its own restart only); pushes get
    405 until that replica runs the s3 config; the upload purger is off."""
    if _skip(ctx):
        return None
    return _guard(ctx, 'read-only', lambda: _readonly(ctx))


def _readonly(ctx):
    sv = survey(ctx)
    todo = [a for a, s in sv.hosts.items() if s.startswith("swift")]
    if not todo:
        steps.note("no replica runs swift: nothing to make read-only")
        return None
    _phase(ctx, "readonly")
    st = _state(ctx)
    for a in todo:
        st.setdefault("ro_start", time.monotonic())
        apply(ctx, a, "swift-ro")
    steps.fact("read-only", ", ".join(todo))
    return {"hosts": todo}


@step("Storage prepared (read-only): convert the rest, delete swift-era _uploads, no DLO left")
def prepare(ctx) -> dict | None:
    if _skip(ctx):
        return None
    return _guard(ctx, 'storage preparation', lambda: _prepare(ctx))


def _prepare(ctx):
    sv = survey(ctx)
    if any(s == "swift" for s in sv.hosts.values()):
        raise MigrateError("a replica is still read-write on swift: run the read-only step first")
    if not any(s.startswith("swift") for s in sv.hosts.values()) and not sv.dlo_blobs:
        steps.note("every replica runs s3 already and no DLO blob is left")
        return None
    out = _convert_all(ctx, "converted read-only")
    c = s3(ctx)
    if any(s.startswith("swift") for s in sv.hosts.values()) and sv.uploads:
        c.delete_many(sv.uploads)
        steps.fact("_uploads deleted", f"{len(sv.uploads)} object(s) ({len(sv.upload_manifests)} DLO; their segments "
                                       "go with the other segments after verification)")
        out["uploads"] = len(sv.uploads)
    left = survey(ctx)
    if left.dlo_blobs:
        raise MigrateError(f"{len(left.dlo_blobs)} DLO blob(s) still there after conversion")
    steps.fact("DLO blobs left", 0)
    if str(ctx.params.get("fault", "")) == "corrupt-one":
        rec = _record(ctx)
        victim = sorted(rec.get("converted") or rec["manifests"])[0]
        m = rec["manifests"][victim]
        hands(ctx).corrupt(m["key"], m["size"])
        steps.note(f"fault=corrupt-one: sha256:{victim[:16]}… overwritten with {m['size']} zero bytes (test)")
    _phase(ctx, "prepared")
    return out


@step("Switch: each replica restarted on the s3 config, one at a time")
def switch(ctx) -> dict | None:
    if _skip(ctx):
        return None
    return _guard(ctx, 'switch to s3', lambda: _switch(ctx))


def _switch(ctx):
    sv = survey(ctx)
    if sv.dlo_blobs:
        raise MigrateError(f"{len(sv.dlo_blobs)} DLO blob(s) left: the s3 driver would serve them as 0 bytes")
    st = _state(ctx)
    changed = []
    for a, s in sv.hosts.items():
        if apply(ctx, a, "s3"):
            changed.append(a)
    if "ro_start" in st:
        st["ro_window"] = round(time.monotonic() - st["ro_start"], 1)
        steps.fact("read-only window", f"{st['ro_window']} s (first replica read-only -> last one on s3)")
    if changed or _record(ctx).get("phase") not in ("switched", "verified", "done"):
        _phase(ctx, "switched", readonly_window_s=st.get("ro_window"))
    steps.fact("on s3", ", ".join(sv.hosts))
    st["switched_now"] = bool(changed)
    return {"hosts": list(sv.hosts), "changed": changed}


# =========================================================================== 4. verify, GC, rollback
def _blob_sha(c: operations.RegistryClient, repo: str, digest: str) -> tuple[str, int]:
    r = c.session.get(f"{c.base_url}/v2/{repo}/blobs/{digest}", stream=True, timeout=120)
    if r.status_code != 200:
        return f"HTTP {r.status_code}", 0
    h, n = hashlib.sha256(), 0
    for chunk in r.iter_content(1 << 20):
        h.update(chunk)
        n += len(chunk)
    return "sha256:" + h.hexdigest(), n


def _clients(ctx) -> list[operations.RegistryClient]:
    st = _state(ctx)
    if "clients" not in st:
        base = operations.client(ctx)
        st["clients"] = [operations.RegistryClient(registry.url(ctx, a), base.ca_path, base.user,
                                                   base.session.auth[1]) for a in P.as_list(ctx.registry_host)]
    return st["clients"]


def verify_digests(ctx, full: bool = True) -> list[str]:
    """Every manifest (sha256 of the body) and every blob (sha256 of the bytes, or with
    full=False HEAD + Content-Length) of the inventory, through the registry, round-robin over
    the replicas.  -> problems."""
    inv = _state(ctx)["inventory"]
    cs = _clients(ctx)
    problems = []
    items = [("m", k) for k in sorted(inv["manifests"])] + [("b", d) for d in sorted(inv["blobs"])]

    def one(i_item):
        i, (kind, k) = i_item
        c = cs[i % len(cs)]
        if kind == "m":
            repo, d = k
            r = c.session.get(f"{c.base_url}/v2/{repo}/manifests/{d}", headers={"Accept": operations.ACCEPT},
                              timeout=60)
            got = "sha256:" + hashlib.sha256(r.content).hexdigest() if r.status_code == 200 else f"HTTP {r.status_code}"
            return None if got == d else f"manifest {repo}@{d[:19]} via {c.base_url}: {got[:19]}"
        b = inv["blobs"][k]
        if not full:
            r = c.session.head(f"{c.base_url}/v2/{b['repo']}/blobs/{k}", timeout=60)
            ok = r.status_code == 200 and (b["size"] is None or int(r.headers.get("Content-Length", -1)) == b["size"])
            return None if ok else f"blob {k[:19]} via {c.base_url}: HEAD {r.status_code} length " \
                                   f"{r.headers.get('Content-Length')}"
        got, n = _blob_sha(c, b["repo"], k)
        return None if got == k else f"blob {k[:19]} via {c.base_url}: {got[:19]} ({n} bytes)"

    for p in operations.pmap(one, list(enumerate(items)), desc="verify", workers=4):
        if p:
            problems.append(p)
    return problems


def _probe_image(tag: str) -> tuple[dict, list[tuple[str, bytes]]]:
    import gzip
    import io
    import tarfile
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        data = os.urandom(MiB)
        ti = tarfile.TarInfo(f"migrate-probe/{tag}")
        ti.size, ti.mtime = len(data), 1700000000
        t.addfile(ti, io.BytesIO(data))
    layer = gzip.compress(raw.getvalue(), mtime=0)
    diff = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "created": "2024-01-01T00:00:00Z",
                      "config": {"Labels": {"runbook": "08-migrate probe"}},
                      "rootfs": {"type": "layers", "diff_ids": [diff]}}, sort_keys=True).encode()
    blobs = [("application/vnd.oci.image.config.v1+json", cfg),
             ("application/vnd.oci.image.layer.v1.tar+gzip", layer)]
    desc = [{"mediaType": mt, "digest": "sha256:" + hashlib.sha256(b).hexdigest(), "size": len(b)} for mt, b in blobs]
    manifest = {"schemaVersion": 2, "mediaType": operations.OCI_MANIFEST, "config": desc[0], "layers": desc[1:]}
    return manifest, [(d["digest"], b) for d, (_, b) in zip(desc, blobs)]


def push_pull_probe(ctx) -> dict:
    """Push a new image (1 MiB random layer) through the registry API, pull it back (sha256 of
    every piece), and check its layer landed as a PLAIN object (the s3 driver's own write)."""
    c = operations.client(ctx)
    repo, tag = ctx.params.get("probe_repository", "runbook/migrate-probe"), "probe"
    manifest, blobs = _probe_image(tag)
    for d, data in blobs:
        r = c.request("POST", f"/v2/{repo}/blobs/uploads/", ok=(202,), what="start upload")
        loc = r.headers["Location"]
        loc = loc if loc.startswith("http") else c.base_url + loc
        r = c.session.put(loc + ("&" if "?" in loc else "?") + f"digest={d}", data=data,
                          headers={"Content-Type": "application/octet-stream"}, timeout=60)
        if r.status_code != 201:
            raise MigrateError(f"push of blob {d[:19]} to {repo}: HTTP {r.status_code} {r.text[:200]}")
    body = json.dumps(manifest, sort_keys=True).encode()
    mdig = "sha256:" + hashlib.sha256(body).hexdigest()
    r = c.session.put(f"{c.base_url}/v2/{repo}/manifests/{tag}", data=body,
                      headers={"Content-Type": operations.OCI_MANIFEST}, timeout=60)
    if r.status_code != 201:
        raise MigrateError(f"push of {repo}:{tag}: HTTP {r.status_code} {r.text[:200]}")
    problems = []
    for cl in _clients(ctx):   # pull back from every replica
        r = cl.session.get(f"{cl.base_url}/v2/{repo}/manifests/{tag}", headers={"Accept": operations.ACCEPT},
                           timeout=60)
        if r.status_code != 200 or "sha256:" + hashlib.sha256(r.content).hexdigest() != mdig:
            problems.append(f"pull {repo}:{tag} via {cl.base_url}: manifest {r.status_code}")
        for d, data in blobs:
            got, n = _blob_sha(cl, repo, d)
            if got != d:
                problems.append(f"pull {repo}:{tag} via {cl.base_url}: blob {d[:19]} {got[:19]}")
    lay = layout(ctx)
    layer = blobs[-1][0].split(":")[1]
    key = f"{lay['files']}docker/registry/v2/blobs/sha256/{layer[:2]}/{layer}/data"
    h = s3(ctx).head(key)
    listed = s3(ctx).list(key)
    plain = h.status_code == 200 and not h.headers.get("X-Object-Manifest") and listed and listed[0][1] == len(blobs[-1][1])
    if not plain:
        problems.append(f"the pushed layer is not a plain object at {key} (HEAD {h.status_code}, listing {listed[:1]})")
    return {"repo": repo, "tag": tag, "digest": mdig, "layer": blobs[-1][0], "layer_size": len(blobs[-1][1]),
            "config": blobs[0][0], "problems": problems}


@step("Verify every digest of the inventory through the registry on s3, and a push + pull")
def verify(ctx) -> dict | None:
    if _skip(ctx):
        return None
    return _guard(ctx, 'verification', lambda: _verify(ctx))


def _verify(ctx):
    st = _state(ctx)
    if not st.get("switched_now") and load_state(ctx).get("phase") in (None, "done"):
        problems = verify_digests(ctx, full=True)
        st["verify"] = {"problems": problems, "push": None}
        steps.fact("digests", f"{len(st['inventory']['manifests'])} manifest(s) + {len(st['inventory']['blobs'])} "
                              f"blob(s) sha256-verified: {'all good' if not problems else f'{len(problems)} bad'}")
        steps.note("already migrated: verified only (no probe push, no GC)")
        if problems:
            st["failed"] = "verification: " + "; ".join(problems[:5])
        return st["verify"]
    t0 = time.monotonic()
    problems = verify_digests(ctx, full=True)
    steps.fact("digests", f"{len(st['inventory']['manifests'])} manifest(s) + {len(st['inventory']['blobs'])} blob(s), "
                          f"sha256 through the registry: {'all good' if not problems else f'{len(problems)} BAD'} "
                          f"({time.monotonic() - t0:.1f} s)")
    probe = None
    if not problems:
        probe = push_pull_probe(ctx)
        problems += probe["problems"]
        steps.fact("push + pull", f"{probe['repo']}:{probe['tag']} {probe['digest'][:19]}… pushed, pulled from every "
                                  f"replica, layer stored as a plain object" if not probe["problems"] else "FAILED")
    for p in problems[:20]:
        steps.row(problem=p)
    st["verify"] = {"problems": problems, "push": probe}
    if problems:
        st["failed"] = "verification failed: " + "; ".join(problems[:5])
    else:
        _phase(ctx, "verified")
    return st["verify"]


@step("Garbage collection on the s3 config (replicas read-only one at a time: pulls served)")
def gc(ctx) -> dict | None:
    """Delete the probe image, `registry garbage-collect` on the s3 config while every replica
    serves pulls read-only, then each back to read-write (which also empties its blob-descriptor
    cache).  Measured: bytes freed (RGW bucket stats), the probe's blobs gone, every tagged image whole."""
    if _skip(ctx):
        return None
    return _guard(ctx, 'garbage collection', lambda: _gc(ctx))


def _gc(ctx):
    st = _state(ctx)
    probe = (st.get("verify") or {}).get("push")
    if not probe:
        steps.note("nothing pushed by this run: GC not needed")
        return None
    c = operations.client(ctx)
    c.request("DELETE", f"/v2/{probe['repo']}/manifests/{probe['digest']}", ok=(202,), what="delete probe")
    hosts = P.as_list(ctx.registry_host)
    for a in hosts:
        apply(ctx, a, "s3-ro")
    try:
        dep = operations.detect(sub(ctx, hosts[0], "s3-ro"))
        before = operations.usage(ctx, dep)
        h = ctx.host(hosts[0])
        r = h.run(operations.gc_argv(dep, dry_run=False, delete_untagged=False, stopped=False), timeout=1800,
                  check=False)
        g = operations.parse_gc_output(r.stdout + "\n" + r.stderr)
        if r.exit_code != 0:
            raise operations.gc_failure(h, r, False)
        after = operations.usage(ctx, dep)
    finally:
        for a in hosts:
            apply(ctx, a, "s3")
    freed = (before["bytes"] - after["bytes"]) if before and after else None
    gone = [d for d in (probe["layer"], probe["config"])
            if s3(ctx).head(f"{layout(ctx)['files']}docker/registry/v2/blobs/sha256/{d[7:9]}/{d[7:]}/data").status_code
            == 404]
    problems = verify_digests(ctx, full=False)
    if len(gone) != 2:
        problems.append(f"GC left the probe's blobs: {2 - len(gone)} of 2 still stored")
    if freed is not None and freed < probe["layer_size"]:
        problems.append(f"GC freed {freed} bytes, less than the probe layer's {probe['layer_size']}")
    steps.fact("collected", f"{g.get('blobs_eligible')} blob(s) eligible; freed {human(freed or 0)} ({freed} bytes) "
                            f"per RGW bucket stats; probe layer + config gone: {len(gone) == 2}")
    steps.fact("tagged images after GC", "every manifest and blob of the inventory answers" if not problems
               else f"{len(problems)} problem(s)")
    out = {"freed_bytes": freed, "eligible": g.get("blobs_eligible"), "problems": problems}
    st["gc"] = out
    if problems:
        st["failed"] = "after GC: " + "; ".join(problems[:5])
    return out


def _restore(ctx, hexd: str, m: dict):
    """Put the DLO manifest back (Swift: a zero-byte object with X-Object-Manifest) when its
    segments are all there."""
    pre = manifest_prefix(m["manifest"], _container(ctx))
    segs = s3(ctx).list(pre) if pre else []
    if not segs or sum(s for _, s in segs) != m["size"]:
        return False
    su, sk = _creds(ctx)["swift"]["swift_user"], _creds(ctx)["swift"]["swift_key"]
    url, token = accounts.swift_auth(ctx, su, sk)
    from .rgw import http
    r = http("PUT", f"{url}/{_container(ctx)}/{quote(m['key'])}", headers={"X-Auth-Token": token,
                                                                             "X-Object-Manifest": m["manifest"]},
             data=b"", read=False, what=f"Swift PUT {m['key']} (X-Object-Manifest: {m['manifest']})")
    return r.status_code in (201, 202)


@step("Rollback to swift (only when a check failed)")
def rollback(ctx) -> dict | None:
    """One step: the blobs that failed verification get their DLO manifest back (their segments
    are still there), then every replica restarts on its swift config (read-write), one at a time;
    then every manifest and blob of the inventory is checked again through swift."""
    st = _state(ctx)
    if not st.get("failed"):
        steps.note("nothing failed: no rollback")
        return None
    reason = st["failed"]
    rec = st.get("record") or load_state(ctx)
    restored = []
    bad = {p.split()[1] for p in (st.get("verify") or {}).get("problems", []) if p.startswith("blob ")}
    for hexd, m in (rec.get("manifests") or {}).items():
        if any(("sha256:" + hexd).startswith(b) for b in bad) and _restore(ctx, hexd, m):
            restored.append(hexd)
    for a in P.as_list(ctx.registry_host):
        apply(ctx, a, "swift")
    st.pop("clients", None)
    problems = verify_digests(ctx, full=True)
    rec.update(phase="rolled-back", reason=masking.mask(reason))
    save_state(ctx, rec)
    hands(ctx).cleanup()   # the curl config holding the S3 keys goes from the RGW host
    st["rollback"] = {"restored": restored, "problems": problems, "reason": reason}
    steps.fact("why", reason)
    steps.fact("DLO manifests restored", len(restored))
    steps.fact("on swift again", ", ".join(P.as_list(ctx.registry_host)))
    steps.fact("every digest through swift", "good" if not problems else f"{len(problems)} bad: {problems[:3]}")
    return st["rollback"]


@step("Remove the swift segments (only after every digest verified on s3)")
def finalize(ctx) -> dict | None:
    if _skip(ctx):
        return None
    st = _state(ctx)
    sv = survey(ctx)
    if any(not s == "s3" for s in sv.hosts.values()):
        raise MigrateError(f"not every replica runs s3 ({sv.hosts}): segments kept")
    if sv.dlo_blobs:
        raise MigrateError(f"{len(sv.dlo_blobs)} DLO object(s) still reference segments: kept")
    keys = [k for k, _ in sv.segments] + sv.staging
    nbytes = sum(s for _, s in sv.segments)
    if keys:
        s3(ctx).delete_many(keys)
    left = s3(ctx).list(layout(ctx)["segments"])
    if left:
        raise MigrateError(f"{len(left)} segment object(s) still listed after the delete")
    hands(ctx).cleanup()
    rec = st.get("record") or load_state(ctx)
    if keys or rec.get("phase") != "done":
        rec.update(phase="done", segments_deleted=len(keys), segment_bytes_deleted=nbytes,
                   finished=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
        save_state(ctx, rec)
    r = ctx.host(ctx.rgw_host).run(cmd("radosgw-admin bucket stats --bucket={b}", b=_container(ctx)), read=True)
    st["bucket_after"] = operations.parse_bucket_stats(r.stdout)
    steps.fact("segments deleted", f"{len(keys)} object(s), {human(nbytes)}; none left under {layout(ctx)['segments']}")
    steps.fact(f"RGW bucket {_container(ctx)}", f"{st['bucket_after']['objects']} object(s), "
                                                f"{human(st['bucket_after']['bytes'])}")
    st["finalized"] = {"deleted": len(keys), "bytes": nbytes}
    return st["finalized"]


# =========================================================================== 5. registry 3
@step("Registry 3 readiness (config rendered and checked for 3.x; no registry 3 binary here)")
def registry3(ctx) -> dict:
    """The migrated config rendered for registry_version 3 and checked against what 3.0 removed or
    changed; the registry:3 container command (config at /etc/distribution/config.yml).
    No registry 3 image or binary can be had on these machines: nothing is run with it."""
    host = P.as_list(ctx.registry_host)[0]
    s = sub(ctx, host, "s3")
    s.params["registry_version"] = 3
    s.params["image"] = ctx.params.get("image3", "registry:3")
    cfg = registry.config_for(s)
    problems = registry.validate_config(cfg, 3)
    inv = _state(ctx).get("inventory") or {}
    if inv.get("schema1"):
        problems.append(f"{len(inv['schema1'])} schema1 manifest(s): registry 3 cannot read them")
    argv = registry.docker_run_argv(s, "<config sha256>") if ctx.runtime == "docker" else None
    have = ctx.host(host).run(cmd("docker image inspect {i} >/dev/null 2>&1 && echo yes || echo no",
                                  i=s.params["image"]), read=True, check=False).stdout.strip() \
        if ctx.runtime == "docker" else "no"
    steps.fact("3.x config", "valid (s3, forcepathstyle, region set, no swift/reporting/compatibility)" if not problems
               else "; ".join(problems))
    if argv:
        steps.fact("registry:3 container", " ".join(argv))
    steps.fact("registry 3 image here", f"{s.params['image']}: {'present' if have == 'yes' else 'absent'} — no "
                                        "registry 3 image or binary can be had on these machines (Debian ships 2.8.2); "
                                        "the migration runs on 2.8.2's s3 driver, which reads the same layout")
    _state(ctx)["registry3"] = {"problems": problems, "image_present": have == "yes"}
    return _state(ctx)["registry3"]


# =========================================================================== verdict
def check(ctx):
    st = _state(ctx)
    pl = st.get("plan") or {}
    if st.get("rollback"):
        rb = st["rollback"]
        ctx.verdict(False, f"migration failed and was rolled back to swift: {rb['reason']}",
                    hint="see the failed check above; the registry serves from swift again"
                         + ("" if not rb["problems"] else f" — BUT {len(rb['problems'])} digest(s) still bad"),
                    rolled_back="every replica on swift", restored=len(rb["restored"]))
    if st.get("failed"):
        ctx.verdict(False, st["failed"])
    r3 = st.get("registry3") or {}
    if r3.get("problems"):
        ctx.verdict(False, "the registry 3 config does not validate: " + "; ".join(r3["problems"]))
    if not _go(ctx):
        ctx.verdict(True, ("plan only (switch=False): nothing changed; " if not ctx.dry_run else "dry run: ")
                    + ("already migrated to s3" if pl.get("migrated") else
                       f"{pl.get('dlo', 0)} DLO blob(s) ({human(pl.get('dlo_bytes', 0))}), "
                       f"{pl.get('segments', 0)} segment(s), {pl.get('uploads', 0)} _uploads object(s) to handle; "
                       f"read-only ~{pl.get('readonly_estimate', 0):.0f} s"),
                    replicas=f"{len(pl.get('hosts') or {})} (their configs: the plan above)",
                    registry3="3.x config valid; no registry 3 image here")
        return
    if pl.get("migrated") and not st.get("switched_now"):
        ctx.verdict(True, "already migrated: every replica on s3, no DLO or segment left; nothing changed",
                    verified=f"{len((st.get('inventory') or {}).get('blobs', {}))} blob(s) sha256-verified")
        return
    conv = (st.get("prepass") or {}).get("converted", 0)
    facts = {"read-only window": f"{st.get('ro_window')} s",
             "segments deleted": (st.get("finalized") or {}).get("deleted"),
             "gc freed": f"{(st.get('gc') or {}).get('freed_bytes')} bytes"}
    ctx.verdict(True, "migrated to s3: every digest verified through the registry, push + pull + GC on s3, "
                      "segments removed", pre_pass_converted=conv, **facts)
