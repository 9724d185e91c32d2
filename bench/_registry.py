"""A TLS + htpasswd registry:2 container on a bench lab host, made with the runbook's own pure
helpers (certs.make_ca/issue, registry.render_config/build_htpasswd), for benchmarks and fault tests
that need many registries quickly (no notebook per setup)."""
from __future__ import annotations

import json
import os
import pathlib
import secrets
import time
from dataclasses import dataclass

import requests
import yaml

from runbook_lib import certs, registry
from runbook_lib.host import SSHHost, cmd


@dataclass
class Reg:
    addr: str
    port: int
    url: str
    ca: str
    user: str
    password: str
    remote_dir: str
    data_dir: str | None

    def session(self, auth: bool = True) -> requests.Session:
        s = requests.Session()
        s.trust_env = False
        s.verify = self.ca
        if auth:
            s.auth = (self.user, self.password)
        return s


def host(addr: str) -> SSHHost:
    from runbook_lib import lab
    return SSHHost(addr, user=lab.SSH_USER, become=True, key_filename=str(lab.SSH_KEY), known_hosts=str(lab.KNOWN_HOSTS))


def swift_creds(rgw: str, uid: str) -> tuple[str, str]:
    """The uid's swift subuser key; user, subuser and key made when missing (radosgw-admin on rgw)."""
    h = host(rgw)
    try:
        r = h.run(cmd("radosgw-admin user info --uid={u}", u=uid), read=True, check=False, no_log=True)
        if r.exit_code != 0:
            h.run(cmd("radosgw-admin user create --uid={u} --display-name=bench", u=uid), no_log=True)
            h.run(cmd("radosgw-admin subuser create --uid={u} --subuser={s} --access=full --key-type=swift",
                      u=uid, s=f"{uid}:swift"), no_log=True)
            h.run(cmd("radosgw-admin key create --subuser={s} --key-type=swift --gen-secret", s=f"{uid}:swift"),
                  no_log=True)
            h.run(cmd("radosgw-admin key create --uid={u} --key-type=s3 --gen-access-key --gen-secret", u=uid),
                  no_log=True)
            r = h.run(cmd("radosgw-admin user info --uid={u}", u=uid), read=True, no_log=True)
        info = json.loads(r.stdout)
        key = next(k["secret_key"] for k in info["swift_keys"] if k["user"] == f"{uid}:swift")
        s3 = next((k["access_key"], k["secret_key"]) for k in info["keys"] if k["user"] == uid)
        return key, s3
    finally:
        h.close()


def start(addr: str, work: str | os.PathLike, *, storage: str = "filesystem", port: int = 8000,
          cost: int = 5, rgw: str = "198.18.0.2", uid: str = "bench", container: str = "bench-registry",
          tmpfs_mb: int | None = None, name: str = "registry", remote_dir: str = "/opt/bench/registry",
          health_interval: str = "10s", restart: str = "always", password: str | None = None) -> Reg:
    """(Re)create the registry container `name` on addr.  Filesystem data in remote_dir/data (a tmpfs of
    tmpfs_mb MiB when given).  Returns how to reach it."""
    work = pathlib.Path(work)
    work.mkdir(parents=True, exist_ok=True)
    ca_pem, ca_key = work / "ca.pem", work / "ca-key.pem"
    if not ca_pem.exists():
        ca, key = certs.make_ca()
        ca_pem.write_bytes(ca.public_bytes(certs.serialization.Encoding.PEM))
        ca_key.write_bytes(certs.key_pem(key))
    ca = certs.load_cert(ca_pem.read_bytes(), "ca")
    cakey = certs.load_key(ca_key.read_bytes(), "ca key")
    cert, key = certs.issue(ca, cakey, certs.subject_of(), [addr, "127.0.0.1"], 30)
    password = password or secrets.token_urlsafe(18)
    ht, _ = registry.build_htpasswd(None, {"foo": password}, cost=cost)
    kw = {}
    if storage == "swift":
        kw = {"swift_user": f"{uid}:swift", "swift_key": swift_creds(rgw, uid)[0]}
    elif storage == "s3":
        a, s = swift_creds(rgw, uid)[1]
        kw = {"s3_access": a, "s3_secret": s}
    cfg = registry.render_config(storage, port=port, http_secret=secrets.token_hex(16), rgw_url=f"http://{rgw}:7480",
                                 container=container, **kw)
    cfg["health"]["storagedriver"]["interval"] = health_interval
    h = host(addr)
    rd = remote_dir
    try:
        h.run(cmd("docker rm -f {n} >/dev/null 2>&1; umount {d}/data 2>/dev/null; rm -rf {rd}; "
                  "mkdir -p {rd}/auth {rd}/certs {rd}/data", n=name, d=rd, rd=rd))
        if tmpfs_mb:
            h.run(cmd("mount -t tmpfs -o size={s} tmpfs {d}", s=f"{tmpfs_mb}m", d=f"{rd}/data"))
        h.put_file(f"{rd}/auth/htpasswd", ht, mode=0o600, secret=True)
        h.put_file(f"{rd}/certs/registry.pem", cert.public_bytes(certs.serialization.Encoding.PEM))
        h.put_file(f"{rd}/certs/registry-key.pem", certs.key_pem(key), mode=0o600, secret=True)
        h.put_file(f"{rd}/config.yml", yaml.safe_dump(cfg, sort_keys=False), mode=0o600, secret=True)
        h.run(["docker", "run", "-d", "--name", name, "--restart", restart, "--network", "host",
               "-v", f"{rd}/auth:/auth", "-v", f"{rd}/certs:/certs",
               "-v", f"{rd}/config.yml:/etc/docker/registry/config.yml",
               "-v", f"{rd}/data:/var/lib/registry", "registry:2"])
    finally:
        h.close()
    reg = Reg(addr, port, f"https://{addr}:{port}", str(ca_pem), "foo", password, rd,
              f"{rd}/data" if storage == "filesystem" else None)
    wait(reg)
    return reg


def wait(reg: Reg, timeout: float = 30, want=(200,)) -> int:
    s = reg.session()
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = s.get(reg.url + "/v2/", timeout=3).status_code
            if last in want:
                return last
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"registry {reg.url} not ready in {timeout}s (last {last})")


def stop(addr: str, name: str = "registry", remote_dir: str = "/opt/bench/registry") -> None:
    h = host(addr)
    try:
        h.run(cmd("docker rm -f {n} >/dev/null 2>&1; umount {d}/data 2>/dev/null; rm -rf {d}; true",
                  n=name, d=remote_dir))
    finally:
        h.close()


# -- pushing small images over the API (what a client does), for many tags/repos quickly -----------
def blob_upload(s: requests.Session, url: str, repo: str, data: bytes) -> str:
    import hashlib
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    if s.head(f"{url}/v2/{repo}/blobs/{d}").status_code == 200:
        return d
    r = s.post(f"{url}/v2/{repo}/blobs/uploads/")
    r.raise_for_status()
    loc = r.headers["Location"]
    loc = loc if loc.startswith("http") else url + loc
    r = s.put(loc + ("&" if "?" in loc else "?") + f"digest={d}", data=data,
              headers={"Content-Type": "application/octet-stream"})
    r.raise_for_status()
    return d


def mount_blob(s: requests.Session, url: str, repo: str, digest: str, src: str) -> bool:
    r = s.post(f"{url}/v2/{repo}/blobs/uploads/?mount={digest}&from={src}")
    return r.status_code == 201


def tiny_image(s: requests.Session, url: str, repo: str, payload: bytes = b"hello") -> tuple[bytes, str]:
    """A one-layer OCI image (config + layer uploaded): (manifest bytes, media type)."""
    cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    cd = blob_upload(s, url, repo, cfg)
    ld = blob_upload(s, url, repo, payload)
    mt = "application/vnd.oci.image.manifest.v1+json"
    man = json.dumps({"schemaVersion": 2, "mediaType": mt,
                      "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": len(cfg)},
                      "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld,
                                  "size": len(payload)}]}).encode()
    return man, mt


def put_manifest(s: requests.Session, url: str, repo: str, ref: str, man: bytes, mt: str) -> str:
    r = s.put(f"{url}/v2/{repo}/manifests/{ref}", data=man, headers={"Content-Type": mt})
    r.raise_for_status()
    return r.headers.get("Docker-Content-Digest", "")
