"""Root file systems for the lab's local images (no image can be pulled here).

`registry:2` is built like the official image: `/bin/registry` (Debian's `docker-registry`, CNCF
distribution 2.8.2) with the shared libraries `ldd` lists, busybox as `/bin/sh` and friends,
`/etc/docker/registry/config.yml` (filesystem storage) and the official `/entrypoint.sh`.
The tarballs are deterministic (fixed mtimes), so the image ID is the same on every `lab up`.
"""
from __future__ import annotations

import io
import os
import re
import tarfile

from .proc import LabError, run

MTIME = 1700000000
REGISTRY_BIN = "/usr/bin/docker-registry"
BUSYBOX = "/bin/busybox"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"

REGISTRY_CONFIG = """\
version: 0.1
log:
  fields:
    service: registry
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: /var/lib/registry
http:
  addr: :5000
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
"""

# the official image's docker-entrypoint.sh (distribution/distribution-library-image)
ENTRYPOINT = """\
#!/bin/sh

set -e

case "$1" in
    *.yaml|*.yml) set -- registry serve "$@" ;;
    serve|garbage-collect|help|-*) set -- registry "$@" ;;
esac

exec "$@"
"""

REGISTRY_CHANGES = [
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    'VOLUME ["/var/lib/registry"]',
    'EXPOSE 5000',
    'ENTRYPOINT ["/entrypoint.sh"]',
    'CMD ["/etc/docker/registry/config.yml"]',
]

BUSYBOX_CHANGES = [
    'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin',
    'CMD ["sh"]',
]


class _Tar:
    def __init__(self, fileobj):
        self.tf = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.GNU_FORMAT)
        self.seen: set[str] = set()

    def _info(self, name: str, type_, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name.lstrip("/"))
        ti.type, ti.mode, ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = type_, mode, MTIME, 0, 0, "root", "root"
        return ti

    def dir(self, name: str, mode: int = 0o755):
        name = name.strip("/")
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            if p and p not in self.seen:
                self.seen.add(p)
                self.tf.addfile(self._info(p, tarfile.DIRTYPE, mode if i == len(parts) else 0o755))

    def data(self, name: str, data: bytes, mode: int = 0o644):
        name = name.strip("/")
        if name in self.seen:
            return
        self.dir(os.path.dirname(name))
        self.seen.add(name)
        ti = self._info(name, tarfile.REGTYPE, mode)
        ti.size = len(data)
        self.tf.addfile(ti, io.BytesIO(data))

    def file(self, name: str, src: str, mode: int | None = None):
        with open(src, "rb") as f:
            data = f.read()
        self.data(name, data, mode if mode is not None else (os.stat(src).st_mode & 0o7777))

    def symlink(self, name: str, target: str):
        name = name.strip("/")
        if name in self.seen:
            return
        self.dir(os.path.dirname(name))
        self.seen.add(name)
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tf.addfile(ti)

    def close(self):
        self.tf.close()


def _libs(binary: str) -> list[str]:
    out = run(["ldd", binary], what=f"ldd {binary}").stdout
    libs = []
    for line in out.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)", line)
        if m:
            libs.append(m.group(1))
    return libs


def _base(t: _Tar):
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys", "dev", "var/lib", "run"):
        t.dir(d, 0o700 if d == "root" else 0o755)
    t.dir("tmp", 0o1777)
    t.data("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    t.data("etc/group", b"root:x:0:\nnogroup:x:65534:\n")
    t.data("etc/nsswitch.conf", b"hosts: files dns\n")
    if os.path.exists(CA_BUNDLE):
        t.file("etc/ssl/certs/ca-certificates.crt", os.path.realpath(CA_BUNDLE), 0o644)
    # busybox --install, done by hand: one symlink per applet at its usual place
    t.file("bin/busybox", BUSYBOX, 0o755)
    applets = run([BUSYBOX, "--list-full"], what="busybox --list-full").stdout.split()
    for path in applets:
        if os.path.basename(path) != "busybox":
            t.symlink(path, "/bin/busybox")


def build_registry_tar(dest: str) -> str:
    """Write the registry:2 root file system as an (uncompressed) tarball to dest."""
    for p in (REGISTRY_BIN, BUSYBOX):
        if not os.path.exists(p):
            raise LabError(f"{p} is missing (install docker-registry and busybox-static)")
    tmp = dest + ".tmp"
    with open(tmp, "wb") as f:
        t = _Tar(f)
        _base(t)
        for lib in _libs(REGISTRY_BIN):
            t.file(lib, os.path.realpath(lib), 0o755)
        t.file("bin/registry", REGISTRY_BIN, 0o755)
        t.data("etc/docker/registry/config.yml", REGISTRY_CONFIG.encode())
        t.data("entrypoint.sh", ENTRYPOINT.encode(), 0o755)
        t.dir("var/lib/registry")
        t.close()
    os.replace(tmp, dest)
    return dest


def build_busybox_tar(dest: str) -> str:
    tmp = dest + ".tmp"
    with open(tmp, "wb") as f:
        t = _Tar(f)
        _base(t)
        t.close()
    os.replace(tmp, dest)
    return dest


def import_argv(docker: list[str], changes: list[str], tag: str) -> list[str]:
    argv = list(docker) + ["import"]
    for c in changes:
        argv += ["--change", c]
    return argv + ["-", tag]
